"""Shared fixtures: an isolated T2RAY_CACHE per session, a fresh tiny-llama per test, SmolLM2 once per session.

Environment: offline Hugging Face hub, and the CLI's own defaults (t2ray.console.ENV_DEFAULTS). The session's
``$T2RAY_CACHE`` is a temporary folder (so SVD caches and outputs never touch the user's), with ``models/`` linked to
the real model cache: the converted SmolLM2 safetensors stay reachable, and a first conversion lands in the real
cache for later sessions.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# tests/ on the path: shared helpers (ray_env.py, rl/learnable.py, tune/helpers.py) import by their own names
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from t2ray.console import apply_env_defaults  # noqa: E402
from t2ray.ray_auth import TOKEN_ENV, TOKEN_PATH_ENV, refresh_ray, write_token  # noqa: E402

apply_env_defaults()  # what the CLI sets for every command (wandb offline, tokenizers quiet)

# Every Ray cluster of the tests runs in token mode, as t2ray's own do (t2ray.ray_auth), with a token of this session
# (never the user's ~/.ray/auth_token): every test is also a test that t2ray works with authentication on.
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="t2ray-test-auth-"))
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN_DIR / "auth_token")
os.environ["RAY_AUTH_MODE"] = "token"
write_token(_TOKEN_DIR / "auth_token")
atexit.register(shutil.rmtree, _TOKEN_DIR, ignore_errors=True)

from t2ray.tasks import sandbox  # noqa: E402

if sandbox._probe() is not None:  # no user namespaces: grade in plain subprocesses (opted in here); the escape tests
    os.environ.setdefault(sandbox.UNSAFE_ENV, "1")  # still fail on Linux unless T2RAY_TEST_WITHOUT_OS_SANDBOX=1

import pytest  # noqa: E402
import torch  # noqa: E402
from ray_env import env_var  # noqa: E402  (tests/ray_env.py)


def _real_cache_root() -> Path:
    return Path(os.environ.get("T2RAY_CACHE", Path.home() / ".cache" / "t2ray"))


@pytest.fixture(scope="session", autouse=True)
def t2ray_cache(tmp_path_factory) -> Path:
    """Per-session T2RAY_CACHE whose models/ is the real model cache (SVD caches are isolated)."""
    real_models = _real_cache_root() / "models"
    real_models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("t2ray_cache")
    (root / "models").symlink_to(real_models.resolve(), target_is_directory=True)
    with env_var("T2RAY_CACHE", str(root)):
        yield root


@pytest.fixture(scope="session")
def tiny_base(t2ray_cache):
    """(model, tokenizer) of tiny-llama seed 0, loaded once. Never mutate it: use `tiny`."""
    from t2ray.models import load_model

    return load_model("tiny-llama", seed=0, dtype="float32")  # unit tests check fp32 identities exactly


@pytest.fixture
def tiny(tiny_base):
    """A fresh, unpatched tiny-llama (seed 0) that the test may patch or edit."""
    torch.manual_seed(0)
    return copy.deepcopy(tiny_base[0])


@pytest.fixture
def varied(tiny):
    """tiny-llama with larger random weights, so that greedy tokens vary from step to step and row to row."""
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in tiny.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    return tiny


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    """SmolLM2's tokenizer (left padding, pad token set); shared, do not change its settings."""
    return tiny_base[1]


@pytest.fixture
def make_tiny(t2ray_cache):
    """Factory: make_tiny(seed=0, dtype="float32") -> a freshly loaded tiny-llama model."""
    from t2ray.models import load_model

    def make(seed: int = 0, dtype: str = "float32"):
        return load_model("tiny-llama", seed=seed, dtype=dtype)[0]

    return make


@pytest.fixture(scope="session")
def lora_library(tmp_path_factory, t2ray_cache) -> dict[str, Path]:
    """Four tiny-llama LoRA adapters (math/code/reasoning/cls on the MLP, r=4), as PEFT folders with t2ray's metadata
    (name lora-<task>, the task, the base model's fingerprint), and ΔW large enough to change greedy answers."""
    import json

    from peft import LoraConfig, get_peft_model

    from t2ray.models import load_model
    from t2ray.svf import base_model_info

    info = base_model_info(load_model("tiny-llama")[0])
    folder = tmp_path_factory.mktemp("lora_library")
    paths = {}
    for seed, task in enumerate(("math", "code", "reasoning", "cls")):
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            load_model("tiny-llama")[0],
            LoraConfig(
                r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False
            ),
        )
        with torch.no_grad():  # PEFT's non-default init is small: make ΔW visible in the answers
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(50)
        paths[task] = folder / f"lora-{task}"
        peft_model.save_pretrained(paths[task])
        (paths[task] / "t2ray_expert.json").write_text(
            json.dumps(
                {"name": f"lora-{task}", "task": task, "base_model": info.model_id, "fingerprint": info.fingerprint}
            )
        )
    return paths


@pytest.fixture(scope="session")
def smollm2(t2ray_cache):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, loaded once per session.

    Shared: a test that patches it must unpatch it (or work on a deepcopy).
    """
    from t2ray.models import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture
def torch_threads():
    """Run the test with T2RAY_TEST_THREADS torch threads (default 1), restoring the previous count.

    Small matrices gain nothing from a second thread, and on a busy 2-core machine a 2-thread pool makes
    tiny SVDs 100-500x slower (the workers spin against other processes); one thread keeps tests fast
    and their timings stable.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("T2RAY_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


_GIVEN_PORTS: set[int] = set()


def _free_port() -> int:
    """A port nothing listens on, below Linux's ephemeral range (32768+): a port the kernel hands out for outgoing
    connections could be taken by one of Ray's own before the server meant for it binds. Never the same one twice."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32768)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port


def _pids_using(folder: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(folder) in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def _stop_session(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` and its session (its leader may be gone while what it started still runs)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started ...
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # ... and whatever is left of its session is ours to end


@contextlib.contextmanager
def ray_head(env: dict[str, str], log_dir: Path, num_cpus: int = 2, worker_nodes: tuple[dict, ...] = ()):
    """`ray start --head` as a user types it (`env` is its whole environment), with the dashboard on 127.0.0.1 and
    every port free and explicit (other Ray clusters on this machine hold the defaults: 52365, 10001...), then one
    `ray start --address=…` per entry of `worker_nodes` ({"num_cpus": 2, "resources": {"trainer": 2}}): more
    raylets on this machine, each a node of the cluster. Yields (dashboard address, GCS address). Each node runs
    in its own session so that exactly the processes it started are stopped at the end (never `ray stop`, which
    stops every cluster of the user)."""
    with talking_to(env):
        yield from _ray_head(env, log_dir, num_cpus, worker_nodes)


@contextlib.contextmanager
def talking_to(env: dict[str, str]):
    """This process's Ray client holds the token of a cluster started from `env` (a bare shell has its own, in its own
    home): the dashboard checks of the test then pass its authentication."""
    path = env.get(TOKEN_PATH_ENV) or str(Path(env.get("HOME", Path.home())) / ".ray" / "auth_token")
    token = env.get(TOKEN_ENV) or (Path(path).read_text().strip() if Path(path).is_file() else None)
    if token is None:
        yield
        return
    try:
        with env_var(TOKEN_ENV, token):
            refresh_ray()
            yield
    finally:
        refresh_ray()


def _ray_head(env: dict[str, str], log_dir: Path, num_cpus: int, worker_nodes: tuple[dict, ...]):
    import json

    from ray.util.state import list_nodes

    from t2ray import jobs

    gcs, dash = _free_port(), _free_port()
    temp = Path(f"/tmp/t2rh{os.getpid()}-{gcs}")
    ray = str(Path(sys.executable).with_name("ray"))
    log_path = log_dir / "ray-start.log"
    log = log_path.open("w")

    def ports(*flags: str) -> list[str]:
        return [
            f"--{flag}={_free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
                *flags,
            )
        ]

    procs = [
        subprocess.Popen(
            [
                ray,
                "start",
                "--head",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--num-cpus={num_cpus}",
                "--include-dashboard=true",
                *ports("ray-client-server-port"),
                f"--temp-dir={temp}",
                "--block",
            ],
            env=env,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    ]
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                jobs.list_jobs(address=address)
                break
            except jobs.JobError:
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not come up: {log_path.read_text()[-2000:]}")
                time.sleep(1)
        for i, node in enumerate(worker_nodes):  # each in its own temp dir (its sockets, its session)
            procs.append(
                subprocess.Popen(
                    [
                        ray,
                        "start",
                        f"--address=127.0.0.1:{gcs}",
                        f"--num-cpus={node.get('num_cpus', 1)}",
                        f"--resources={json.dumps(node.get('resources', {}))}",
                        *ports("node-manager-port", "object-manager-port"),
                        f"--temp-dir={temp}-w{i}",
                        "--block",
                    ],
                    env=env,
                    start_new_session=True,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        while worker_nodes:
            alive = [n for n in list_nodes(address=address) if n.state == "ALIVE"]
            if len(alive) == 1 + len(worker_nodes):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail(f"the worker nodes did not join: {log_path.read_text()[-2000:]}")
            time.sleep(1)
        yield address, f"127.0.0.1:{gcs}"
    finally:
        for proc in reversed(procs):
            _stop_session(proc)
        for pid in _pids_using(temp):  # a process that left its group but still runs from our temp dirs (prefix)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        for folder in (temp, *(Path(f"{temp}-w{i}") for i in range(len(worker_nodes)))):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port on 127.0.0.1 that nothing listens on."""
    return _free_port


@pytest.fixture(scope="session")
def ray_head_starter():
    """ray_head_starter(env, log_dir) -> a context manager: a local Ray head (see `ray_head`)."""
    return ray_head
