"""Real Ray Train + DeepSpeed on CPU: one local Ray cluster per test module (2 CPUs), shut down at its end."""

from __future__ import annotations

import pytest
from ray_env import cluster_env  # tests/ray_env.py (tests/ is on the path: tests/conftest.py)


@pytest.fixture(scope="module")
def ray_cluster(t2ray_cache):
    """A fresh local cluster (never someone else's: address="local"), torn down after the module."""
    import ray

    with cluster_env():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        yield ray
