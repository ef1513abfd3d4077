"""Real Ray Train + DeepSpeed on CPU: one local Ray cluster per test module (2 CPUs), shut down at its end."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/ on the path: the learnable task lives in tests/rl/learnable.py (shared with the single-process tests)
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from ray_env import NO_STATE_API, RUN_ENV  # noqa: E402  (tests/ray_env.py)


@pytest.fixture(scope="module")
def ray_cluster(t2ray_cache):
    """A fresh local cluster (never someone else's: address="local"), torn down after the module."""
    import ray

    for key, value in RUN_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.pop("RAY_ADDRESS", None)
    previous_api = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = NO_STATE_API
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous_api is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous_api
