"""The environment of the local Ray clusters the tests start, what their kill tests wait for, and `env_var` (an
environment variable set for a while); tests/conftest.py puts tests/ on the path, so any test imports it by name."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

# Before a cluster starts: Ray's processes (the Train controller, the workers) inherit this environment.
RUN_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "token",  # the token: $RAY_AUTH_TOKEN_PATH, the session's own (tests/conftest.py)
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "DS_ACCELERATOR": "cpu",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # report() waits on the controller's poll (SPEC §4)
}


# Our clusters run without a dashboard, hence without a State API. Ray Train V2's PlacementGroupCleaner polls the
# State API for the controller; with no address it auto-detects a Ray instance, and on a machine where other
# users run their own clusters it can reach one of theirs, not find our controller there, declare it dead and
# remove our placement group mid-run ("A worker health check failed ... Destroying worker since its placement
# group was removed"; Ray's is_actor_alive treats a missing State API result as dead). Pointing the State API at
# a closed local port makes every query fail (ServerUnavailable), which the cleaner skips: it then stays idle,
# as it should while our controller is alive.
NO_STATE_API = "http://127.0.0.1:1"


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """`name` set to `value` (None: unset) for a while; its previous value (or absence) restored after."""
    previous = os.environ.get(name)
    _set_env(name, value)
    try:
        yield
    finally:
        _set_env(name, previous)


@contextlib.contextmanager
def cluster_env():
    """RUN_ENV (where unset) and the closed State API address around a cluster's life; restored after."""
    import ray

    for key, value in RUN_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.pop("RAY_ADDRESS", None)
    with env_var("RAY_API_SERVER_ADDRESS", NO_STATE_API):
        if ray.is_initialized():
            ray.shutdown()
        try:
            yield
        finally:
            ray.shutdown()


def logged(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl in order (a resumed or restarted run appends)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def checkpointed(run_dir: Path) -> list[int]:
    """The iterations of the run's checkpoint folders written so far."""
    return sorted(
        json.loads((f / "state.json").read_text())["iteration"]
        for f in Path(run_dir).glob("checkpoint_*")
        if (f / "state.json").exists()
    )


def checkpoint_registered(run_dir: Path) -> bool:
    """A checkpoint the Train controller has taken: its folder appears while Ray still registers it; two
    iterations later the controller has the report (report() waits on its poll), so a restart gets it."""
    try:
        saved, rows = checkpointed(run_dir), logged(run_dir)
        return bool(saved) and bool(rows) and rows[-1]["iteration"] >= saved[0] + 2
    except (OSError, ValueError, KeyError):  # files being written
        return False


def placements(run_dir: Path) -> list[dict]:
    """The run's workers.jsonl: one line per rank and (re)start (node, pid, the iteration it resumed at)."""
    path = Path(run_dir) / "workers.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def while_watching(call, strike, interval: float = 0.05):
    """call() while a thread tries strike() every `interval` s until it returns True (it acted: a kill) or call()
    returns; the thread is stopped either way. Returns call()'s result."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not strike():
            time.sleep(interval)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        return call()
    finally:
        stop.set()
        thread.join(timeout=10)


def interrupted_once(command: list[str], ready, timeout: float = 300) -> tuple[int, str]:
    """Run a t2ray command as a user does and press Ctrl-C once `ready()` holds: (exit code, its output)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=120), proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
