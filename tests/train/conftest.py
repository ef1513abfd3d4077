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

# Before the cluster starts: Ray's processes (the Train controller, the workers) inherit this environment.
RUN_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "DS_ACCELERATOR": "cpu",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # report() waits on the controller's poll (SPEC §4)
}


# Our cluster runs without a dashboard, hence without a State API. Ray Train V2's PlacementGroupCleaner polls the
# State API for the controller; with no address it auto-detects a Ray instance, and on a machine where other
# users run their own clusters it can reach one of theirs, not find our controller there, declare it dead and
# remove our placement group mid-run ("A worker health check failed ... Destroying worker since its placement
# group was removed"; Ray's is_actor_alive treats a missing State API result as dead). Pointing the State API at
# a closed local port makes every query fail (ServerUnavailable), which the cleaner skips: it then stays idle,
# as it should while our controller is alive.
NO_STATE_API = "http://127.0.0.1:1"


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
