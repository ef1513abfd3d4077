"""Shared fixtures: an isolated T2RAY_CACHE per session, a fresh tiny-llama per test, SmolLM2 once per session.

Environment: offline Hugging Face hub, and the CLI's own defaults (t2ray.console.ENV_DEFAULTS). The session's ``$T2RAY_CACHE`` is a
temporary folder (so SVD caches and outputs never touch the user's), with ``models/`` linked to the real
model cache: the converted SmolLM2 safetensors stay reachable, and a first conversion lands in the real
cache for later sessions.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from t2ray.console import apply_env_defaults  # noqa: E402

apply_env_defaults()  # what the CLI sets for every command (wandb offline, Ray without token auth, ...)

from t2ray.tasks import sandbox  # noqa: E402

if sandbox._probe() is not None:  # a machine without user namespaces: grade in plain subprocesses (opted in here);
    os.environ.setdefault(sandbox.UNSAFE_ENV, "1")  # tests/tasks/test_sandbox_escapes.py then skips, saying why

import pytest  # noqa: E402
import torch  # noqa: E402


def _real_cache_root() -> Path:
    return Path(os.environ.get("T2RAY_CACHE", Path.home() / ".cache" / "t2ray"))


@pytest.fixture(scope="session", autouse=True)
def t2ray_cache(tmp_path_factory) -> Path:
    """Per-session T2RAY_CACHE whose models/ is the real model cache (SVD caches are isolated)."""
    real_models = _real_cache_root() / "models"
    real_models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("t2ray_cache")
    (root / "models").symlink_to(real_models.resolve(), target_is_directory=True)
    previous = os.environ.get("T2RAY_CACHE")
    os.environ["T2RAY_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("T2RAY_CACHE", None)
    else:
        os.environ["T2RAY_CACHE"] = previous


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
