"""Escape attempts against the code sandbox (t2ray/tasks/sandbox.py), each written as model-written code would be:
every one must stay inside. A program prints ESCAPED when an attempt worked."""

from __future__ import annotations

import os
import socket
import time

import pytest
from tasks.sandbox_required import require_os_sandbox  # tests/tasks/sandbox_required.py

from t2ray.tasks import sandbox
from t2ray.tasks.sandbox import MAX_PROCESSES, SandboxUnavailable, run_python


@pytest.fixture(autouse=True)
def os_sandbox() -> None:
    """On Linux every test here runs: no bubblewrap sandbox fails them, with the reason (never a silent skip)."""
    require_os_sandbox()


def sandboxed_processes() -> list[int]:
    """Host pids of processes still running the sandbox's runner."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"/sandbox/_runner.py" in fh.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_no_network_even_through_the_c_module():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        r = run_python(
            "import _socket\n"
            "for family, address in ((_socket.AF_INET, ('127.0.0.1', PORT)), (_socket.AF_INET, ('1.1.1.1', 53))):\n"
            "    s = _socket.socket(family, _socket.SOCK_STREAM)\n"
            "    s.settimeout(1)\n"
            "    try:\n"
            "        s.connect(address)\n"
            "        print('ESCAPED', address)\n"
            "    except OSError as err:\n"
            "        print('blocked', err)\n".replace("PORT", str(port))
        )
    finally:
        listener.close()
    assert r.passed and "ESCAPED" not in r.stdout and r.stdout.count("blocked") == 2, r


def test_shell_through_posix_cannot_write_to_the_host(tmp_path):
    target = tmp_path / "pwned"
    r = run_python(
        f"import posix\nposix.system('touch {target} /work/pwned /pwned 2>/dev/null')\n"
        "import os; print(os.path.exists('/bin/sh'))"
    )
    assert r.passed and not target.exists() and not os.path.exists("/work/pwned") and not os.path.exists("/pwned")


def test_writes_outside_its_tmp_fail(tmp_path):
    import sysconfig

    targets = [
        str(tmp_path / "x.txt"),
        os.path.join(sysconfig.get_paths()["purelib"], "evil.pth"),
        "/usr/lib/evil.pth",
        "/sandbox/program.py",
        "/etc/evil",
        os.path.expanduser("~/.evil"),
    ]
    r = run_python(
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('import os')\n"
        "        print('ESCAPED', path)\n"
        "    except OSError:\n"
        "        pass\n"
        "open('/tmp/scratch.txt', 'w').write('fine')\n"
        "print(open('/tmp/scratch.txt').read())\n"
    )
    assert r.passed and "ESCAPED" not in r.stdout and r.stdout.strip() == "fine", r
    assert not any(os.path.exists(t) for t in targets[:3] + targets[4:])


def test_host_files_are_not_visible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    r = run_python(
        f"import os\n"
        f"for path in ({str(secret)!r}, '/root/.bash_history', '/work', '/home', '/etc/passwd', '/etc/shadow'):\n"
        "    if os.path.exists(path):\n"
        "        print('ESCAPED', path)\n"
    )
    assert r.passed and "ESCAPED" not in r.stdout, r


def test_parent_environment_is_unreadable(monkeypatch):
    monkeypatch.setenv("T2RAY_TEST_SECRET", "s3cr3t-token-value")
    r = run_python(
        "import os\n"
        "print(dict(os.environ))\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    for name in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            print(open(f'/proc/{pid}/{name}', 'rb').read())\n"
        "        except OSError:\n"
        "            pass\n"
    )
    assert r.passed and "s3cr3t" not in r.stdout + r.stderr, r


def test_proc_shows_only_the_sandbox():
    host_pid = os.getpid()
    r = run_python(
        "import os, signal\n"
        "pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(len(pids))\n"
        f"for action in (lambda: os.kill({host_pid}, signal.SIGKILL), lambda: os.kill(-1, signal.SIGKILL)):\n"
        "    try:\n"
        "        action()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    assert int(r.stdout.split()[0]) <= 3, r  # bwrap's init, the runner (and its proc listing): no host process
    assert os.getpid() == host_pid  # still alive


def test_fork_bomb_stops_at_the_process_limit():
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
    time.sleep(0.5)
    assert sandboxed_processes() == []  # the sleeping children died with the run


def test_setsid_double_fork_does_not_outlive_the_run():
    r = run_python(
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "print('parent done')\n"
    )
    assert r.passed and "parent done" in r.stdout
    time.sleep(0.5)
    assert sandboxed_processes() == []


def test_completion_marker_cannot_be_read_and_printed():
    r = run_python(
        "import os, re, sys\n"
        "seen = ''\n"
        "for path in ('/sandbox/program.py', '/sandbox/_runner.py', '/proc/self/cmdline', '/proc/self/environ',\n"
        "             '/proc/1/cmdline', '/proc/1/environ'):\n"
        "    try:\n"
        "        seen += open(path, 'rb').read().decode('latin-1')\n"
        "    except OSError:\n"
        "        pass\n"
        "for token in set(re.findall(r'[0-9a-f]{32}', seen)):\n"
        "    print(token)\n"
        "sys.stdout.flush()\n"
        "os._exit(0)\n"
        "assert False, 'the tests'\n",
        require_completion=True,
    )
    assert not r.passed and r.status == "failed" and "exited before its end" in r.stderr, r


def test_memory_bomb_is_stopped_inside():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**8))", memory_mb=256)
    assert r.status == "memory" and not r.passed


def test_huge_files_and_output_are_capped():
    r = run_python(
        "written = 0\n"
        "try:\n"
        "    with open('/tmp/big', 'wb') as fh:\n"
        "        for _ in range(300):\n"
        "            fh.write(b'x' * 10**6)\n"
        "            written += 10**6\n"
        "except OSError as err:\n"
        "    print('stopped at', written, type(err).__name__)\n"
    )
    assert "stopped at" in r.stdout and int(r.stdout.split()[2]) <= sandbox._MAX_OUTPUT_BYTES, r
    flood = run_python("import sys\nfor _ in range(100):\n    sys.stdout.write('y' * 10**6)\n")
    assert not flood.passed and len(flood.stdout) <= sandbox.STDERR_TAIL_CHARS


def test_without_an_os_sandbox_untrusted_code_is_refused_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap_binary", lambda: None)  # a machine without bubblewrap
    sandbox._probe.cache_clear()
    try:
        monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
        with pytest.raises(SandboxUnavailable, match="T2RAY_UNSAFE_SANDBOX=1"):
            run_python("print(1)")
        from t2ray.evaluate import safe_grade
        from t2ray.rl.loop import safe_rewards
        from t2ray.tasks import get_task

        task = get_task("code")  # graded by running code: a set-up error, not a wrong answer (nor a −1 reward)
        example = task.examples("test")[0]
        with pytest.raises(SandboxUnavailable):
            safe_grade(task, example, task.reference_completion(example))
        with pytest.raises(SandboxUnavailable):
            safe_rewards(task, [example], [task.reference_completion(example)])
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
        r = run_python("print(1)", require_completion=True)
        assert r.passed and r.stdout.strip() == "1"
    finally:
        sandbox._probe.cache_clear()
