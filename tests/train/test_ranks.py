"""What only a GPU cluster would show, made visible on the CPU: two ranks of t2ray's worker in a real gloo process
group (plain torch.distributed, no Ray), ZeRO-3, bf16 weights.

- every collective t2ray issues itself goes through t2ray.train.collectives (or the ZeRO-3 glue), with its tensors on
  the group's device: under NCCL a CPU tensor fails the first iteration;
- after set-up the frozen weights are in the configured dtype (zero.Init partitioned fp32 without a bf16 section),
  z stays fp32, and no rank holds a whole SVF factor;
- a rank that raises ends the run on every rank within seconds, with its message (not in a 30-minute collective).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from rl.learnable import LEARNABLE_RL, write_learnable_task

from train.ranks import run_rank  # tests/train/ranks.py (tests/ is on the path: tests/conftest.py)

pytestmark = pytest.mark.slow
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def config(tmp_path: Path, **rl) -> dict:
    return {
        "name": "ranks",
        "task": str(write_learnable_task(tmp_path / "task")),
        "model": {"spec": "tiny-llama", "dtype": "bfloat16"},
        "svf": {"target_modules": "mlp"},
        "rl": {**LEARNABLE_RL, "iterations": 3, "batch_size": 4, "eval_interval": 3, "eval_limit": 4, **rl},
        "deepspeed": {"enabled": True, "zero_stage": 3, "param_persistence_threshold": 1000},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"wandb": False},
        "storage_path": str(tmp_path / "runs"),
    }


def run_two_ranks(
    tmp_path: Path, port: int, cfg: dict, fail_rank: int | None = None, timeout: float = 300, cache: Path | None = None
):
    out = tmp_path / "ranks"
    out.mkdir()
    start = time.monotonic()
    context = mp.start_processes(
        run_rank,
        args=(2, port, cfg, str(out), fail_rank, str(cache) if cache else None),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    while not context.join(timeout=5):
        assert time.monotonic() - start < timeout, "the ranks did not end (a rank waits in a collective?)"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], time.monotonic() - start


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, free_port, t2ray_cache):
    tmp = tmp_path_factory.mktemp("zero3-ranks")
    cache = tmp / "empty-cache"  # no SVD cached yet; the models are the session's (built before any rank starts)
    cache.mkdir()
    (cache / "models").symlink_to(t2ray_cache / "models", target_is_directory=True)
    return run_two_ranks(tmp, free_port(), config(tmp), cache=cache)[0]


def test_every_collective_of_t2ray_is_on_the_group_device(zero3_run):
    for rank in zero3_run:
        assert "error" not in rank, rank.get("traceback")
        assert rank["iterations"] == 3
        assert rank["violations"] == [], rank["violations"][:5]


def test_zero3_weights_in_their_compute_dtype_z_in_fp32_and_no_factor_whole(zero3_run):
    for rank in zero3_run:
        setup = rank["setup"]
        assert setup["frozen_dtypes"] == ["torch.bfloat16"], setup  # weights and factors, as partitioned
        assert setup["z_dtypes"] == ["torch.float32"], setup
        assert not setup["shm_all_reduce_built"], setup
        assert setup["whole_bytes"]["svf_q"] == 0, setup  # every 64×64 factor partitioned on every rank
        # z: persistent, gathered whole at its first use and kept whole (the loop reads and saves it on every rank)
        assert setup["persistent"]["svf_p"] and not setup["persistent"]["svf_q"], setup


def test_each_svd_is_computed_once_for_all_ranks(zero3_run):
    """6 MLP matrices, an empty cache: the ranks take turns (3 each), none computes another's."""
    assert [rank["svds"] for rank in zero3_run] == [3, 3]


def test_a_rank_that_raises_ends_the_run_on_every_rank_with_its_message(tmp_path, free_port):
    ranks, seconds = run_two_ranks(tmp_path, free_port(), config(tmp_path), fail_rank=1, timeout=240)
    assert ranks[1]["error"] == "SandboxUnavailable: no OS sandbox on rank 1", ranks[1]
    assert ranks[0]["error"] == "RankFailed: rank 1 failed: SandboxUnavailable: no OS sandbox on rank 1", ranks[0]
    assert "iterations" not in ranks[0] and "iterations" not in ranks[1]
    assert all(rank["ended"] - ranks[1]["failed_at"] < 30 for rank in ranks), (ranks, seconds)


def test_the_70b_experiment_trains_on_a_stand_in(tmp_path, free_port):
    """experiments/llama3-70b-svf.yaml itself on tiny-llama and two CPU ranks: its ZeRO-3, bf16 weights, activation
    checkpointing, micro-batches and RL settings as shipped, through the worker that Ray Train runs (the launcher and
    its Ray Train run are every other training test's)."""
    from t2ray.config import load_experiment

    tiny = ["rl.iterations=1", "rl.batch_size=2", "rl.eval_interval=1", "rl.eval_limit=2", "rl.max_new_tokens=8"]
    cfg = load_experiment(
        EXPERIMENTS / "llama3-70b-svf.yaml",
        [
            *tiny,
            "rl.eval_batch_size=2",
            "model.spec=tiny-llama",
            "svf.layers=0-1",  # tiny-llama has 2 layers, not 80
            "scaling.use_gpu=false",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=1",
            "rl.rollout_engine=hf",  # its vLLM engine on GPUs of its own: tests/train/test_engines.py
            f"storage_path={tmp_path / 'runs'}",
        ],
    )
    ranks, _ = run_two_ranks(tmp_path, free_port(), cfg.model_dump(mode="json"))
    for rank in ranks:
        assert "error" not in rank, rank.get("traceback")
        assert rank["iterations"] == 1 and rank["violations"] == [], rank["violations"][:5]
        assert rank["setup"]["frozen_dtypes"] == ["torch.bfloat16"] and rank["setup"]["activation_checkpointing"]
    assert (tmp_path / "runs" / cfg.name / "expert.safetensors").is_file()
