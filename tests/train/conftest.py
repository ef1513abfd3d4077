"""Real Ray Train + DeepSpeed on CPU: one local Ray cluster per test module (2 CPUs), shut down at its end."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ on the path: the learnable task lives in tests/rl/learnable.py (shared with the single-process tests)
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from ray_env import cluster_env  # noqa: E402  (tests/ray_env.py)


@pytest.fixture(scope="module")
def ray_cluster(t2ray_cache):
    """A fresh local cluster (never someone else's: address="local"), torn down after the module."""
    import ray

    with cluster_env():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        yield ray
