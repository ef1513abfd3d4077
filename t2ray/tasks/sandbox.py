"""Run untrusted (model-written) Python in a separate, limited process.

Each run gets a fresh temporary directory as its working directory, a near-empty environment,
a wall-clock timeout (the whole process group is killed), ``RLIMIT_AS`` (memory),
``RLIMIT_CPU``, ``RLIMIT_FSIZE`` and ``RLIMIT_CORE`` limits, and no network: when
``unshare --net`` works (as root on Linux) the process runs in an empty network namespace,
otherwise a preamble disables :mod:`socket`. Destructive ``os``/``shutil``/``subprocess``
functions are disabled before the program runs (as in OpenAI's human-eval harness).

This is a reliability guard for grading, not a security boundary against a determined attacker.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 512
STDERR_TAIL_CHARS = 2000
_MAX_OUTPUT_BYTES = 1 << 20  # RLIMIT_FSIZE: stdout/stderr files and any file the code writes

# Runs inside the child before the user's program; {limits} are filled in by the parent.
_RUNNER = r'''
import resource, sys
def _lim(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass
_lim(resource.RLIMIT_AS, {memory_bytes})
_lim(resource.RLIMIT_CPU, {cpu_seconds})
_lim(resource.RLIMIT_FSIZE, {fsize_bytes})
_lim(resource.RLIMIT_CORE, 0)
if {disable_socket}:
    import socket as _socket
    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled in the t2ray sandbox")
    class _NoSocket:
        def __init__(self, *args, **kwargs):
            _no_network()
    _socket.socket = _NoSocket
    _socket.create_connection = _no_network
    _socket.getaddrinfo = _no_network
    _socket.socketpair = _no_network
    _socket.fromfd = _no_network
    del _socket
if {guard}:
    import builtins, os, shutil, subprocess, faulthandler
    faulthandler.disable()
    for _name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir",
                  "fchdir", "setuid", "fork", "forkpty", "rename", "renames", "truncate",
                  "replace", "unlink", "fchmod", "fchown", "chmod", "chown", "chroot",
                  "lchown", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve",
                  "posix_spawn", "posix_spawnp"):
        if hasattr(os, _name):
            setattr(os, _name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[_mod] = None
    del builtins, os, shutil, subprocess, faulthandler
del _lim, resource
import runpy
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
'''


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


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """``"unshare"`` when ``unshare --net`` works here, else ``"preamble"`` (detected once)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return "preamble"
    try:
        proc = subprocess.run(
            [exe, "--net", "--", sys.executable, "-I", "-S", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "preamble"
    return "unshare" if proc.returncode == 0 else "preamble"


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
    if "RecursionError" in last:
        return "failed"
    if last.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "error"
    return "failed"


def run_python(
    code: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    stdin: str | None = None,
    guard: bool = True,
    python: str | None = None,
    require_completion: bool = False,
    site_packages: bool = False,
) -> SandboxResult:
    """Run ``code`` as a Python program in a fresh, limited subprocess.

    The program sees the standard library only (``python -S``: no site-packages, which also
    makes start-up ~3x faster); ``site_packages=True`` makes installed packages importable.

    With ``require_completion`` a line printing a random marker is appended to the program,
    and the run only passes if the marker was printed: code that exits early with status 0
    (``sys.exit(0)``, ``os._exit(0)``) before the tests ran does not pass.
    """
    start = time.monotonic()
    marker = f"T2RAY-DONE-{secrets.token_hex(8)}" if require_completion else None
    if marker is not None:
        code = code.rstrip("\n") + f"\n\nprint({marker!r}, flush=True)\n"
    isolation = network_isolation()
    workdir = tempfile.mkdtemp(prefix="t2ray-sandbox-")
    try:
        prog = os.path.join(workdir, "program.py")
        with open(prog, "w", encoding="utf-8") as fh:
            fh.write(code)
        runner = _RUNNER.format(
            memory_bytes=int(memory_mb) * 1024 * 1024,
            cpu_seconds=max(1, int(timeout_s) + 1),
            fsize_bytes=_MAX_OUTPUT_BYTES,
            disable_socket=isolation != "unshare",
            guard=bool(guard),
        )
        runner_path = os.path.join(workdir, "_t2ray_runner.py")
        with open(runner_path, "w", encoding="utf-8") as fh:
            fh.write(runner)
        # -s: no user site-packages; -S: no site-packages at all; -B: no .pyc files.
        # (Not -I: it would ignore PYTHONHASHSEED.)
        flags = ["-s", "-B"] if site_packages else ["-s", "-S", "-B"]
        cmd = [python or sys.executable, *flags, runner_path]
        if isolation == "unshare":
            cmd = [shutil.which("unshare") or "unshare", "--net", "--", *cmd]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        out_path = os.path.join(workdir, "_stdout.txt")
        err_path = os.path.join(workdir, "_stderr.txt")
        timed_out = False
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                    stdout=out_f,
                    stderr=err_f,
                    start_new_session=True,
                )
            except OSError as exc:
                return SandboxResult(
                    False, "error", None, f"could not start sandbox: {exc}", "",
                    time.monotonic() - start,
                )
            try:
                proc.communicate(
                    input=stdin.encode("utf-8") if stdin is not None else None, timeout=timeout_s
                )
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
            finally:
                if proc.poll() is None:
                    _kill_group(proc)
        stderr = _tail(err_path)
        stdout = _tail(out_path)
        status = _classify(proc.returncode, stderr, timed_out)
        if status == "passed" and marker is not None:
            if marker in stdout:
                stdout = stdout.replace(marker, "").rstrip("\n")
            else:
                status = "failed"
                stderr = (stderr + "\nt2ray sandbox: the program exited before its end").lstrip()
        return SandboxResult(
            status == "passed", status, proc.returncode, stderr, stdout, time.monotonic() - start
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
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
        return list(pool.map(
            lambda c: run_python(c, timeout_s=timeout_s, memory_mb=memory_mb,
                                 require_completion=require_completion),
            codes,
        ))
