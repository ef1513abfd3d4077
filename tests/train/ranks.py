"""One rank of a plain `torch.distributed` (gloo) training run, spawned by tests/train/test_ranks.py: t2ray's worker
without Ray, and a check of every collective t2ray itself issues."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

# Where t2ray may call torch.distributed itself: both put every tensor on the process group's device.
COLLECTIVE_MODULES = ("t2ray/train/collectives.py", "t2ray/train/zero3.py")
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "barrier",
    "broadcast_object_list",
)


def check_collectives(violations: list[str]) -> None:
    """Wrap torch.distributed's collectives: a call made from t2ray's code must come from COLLECTIVE_MODULES, with
    its tensors on the group's device (DeepSpeed's own calls are DeepSpeed's business)."""
    from t2ray.train.collectives import group_device

    def checked(name, original):
        def call(*args, **kwargs):
            caller = sys._getframe(1)
            while caller and "/torch/distributed/" in caller.f_code.co_filename:
                caller = caller.f_back
            where = caller.f_code.co_filename if caller else ""
            if "/t2ray/" in where:
                line = f"{name} from {where.split('/t2ray/', 1)[1]}:{caller.f_lineno}"
                if not where.endswith(COLLECTIVE_MODULES):
                    violations.append(f"{line}: not through t2ray.train.collectives")
                for t in (*args, *kwargs.values()):
                    if torch.is_tensor(t) and t.device != group_device():
                        violations.append(f"{line}: a tensor on {t.device}, the group's device is {group_device()}")
            return original(*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, checked(name, getattr(dist, name)))


def setup_report(adapter) -> dict:
    """What each rank holds once DeepSpeed is set up: dtypes, and the bytes of tensors it holds whole."""
    model = adapter.model
    whole = {"svf_q": 0, "svf_p": 0, "base": 0}
    persistent: dict[str, bool] = {}
    dtypes = set()
    for name, p in model.named_parameters():
        kind = "svf_q" if name.endswith("svf_q") else "svf_p" if name.endswith("svf_p") else "base"
        persistent[kind] = persistent.get(kind, True) and bool(getattr(p, "ds_persist", False))
        if kind != "svf_p":
            dtypes.add(str(getattr(p, "ds_tensor", p).dtype))
        if p.numel() > 0:  # a ZeRO-3 partitioned parameter holds an empty tensor between forwards
            whole[kind] += p.numel() * p.element_size()
    z_dtypes = {str(p.dtype) for p in adapter.parameters()}
    from deepspeed.comm import comm

    return {
        "shm_all_reduce_built": comm.cdb.shm_comm_op is not None,  # a 30 s JIT compile t2ray skips on CPU
        "activation_checkpointing": model.is_activation_checkpointing,
        "whole_bytes": whole,
        "persistent": persistent,
        "frozen_dtypes": sorted(dtypes),
        "z_dtypes": sorted(z_dtypes),
    }


def run_rank(
    rank: int, world: int, port: int, config: dict, out: str, fail_rank: int | None, cache: str | None = None
) -> None:
    if cache:
        os.environ["T2RAY_CACHE"] = cache  # an empty SVD cache: every SVD is computed in this run
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    violations: list[str] = []
    check_collectives(violations)
    result: dict = {"rank": rank}
    try:
        from t2ray.config import ExperimentConfig
        from t2ray.rl import loop
        from t2ray.tasks.sandbox import SandboxUnavailable
        from t2ray.train import zero3
        from t2ray.train.worker import run_worker

        svd, result["svds"] = zero3.svd_factors, 0

        def counted_svd(*args, **kwargs):
            result["svds"] += 1
            return svd(*args, **kwargs)

        zero3.svd_factors = counted_svd

        if rank == fail_rank:  # this rank's grader fails at the second iteration (the others' do not)
            original, calls = loop.safe_rewards, []

            def failing(*args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    result["failed_at"] = time.time()
                    raise SandboxUnavailable(f"no OS sandbox on rank {rank}")
                return original(*args, **kwargs)

            loop.safe_rewards = failing

        def on_start(state, adapter):
            result["setup"] = setup_report(adapter)

        state = run_worker(
            ExperimentConfig.model_validate(config), rank=rank, world=world, local_rank=rank, on_start=on_start
        )
        result["iterations"] = state.iteration
    except Exception as err:  # noqa: BLE001 — reported to the test
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-3000:]
    result["violations"] = violations
    result["ended"] = time.time()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()  # a gloo group left to interpreter teardown aborted a rank once (SIGABRT on CI)
