"""The training loop's own collectives, each with its tensor on the process group's device: NCCL takes CUDA tensors
only ("No backend type associated with device type cpu"), gloo takes CPU ones. Every collective t2ray issues goes
through here (DeepSpeed issues its own); tests/train/test_collectives.py checks both rules in a real process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class RankFailed(RuntimeError):
    """Another rank raised: this one stops too, with that rank's message (not 30 minutes later, in a collective)."""


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_device() -> torch.device:
    """Where the default process group's collectives take their tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of `t` over every rank, on `t`'s own device; `t` itself in one process."""
    if not distributed():
        return t
    on_group = t.detach().to(group_device(), copy=True)
    dist.all_reduce(on_group, op=OPS[op])
    return on_group.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return all_reduce(t, "sum")


def every_rank_done(mine: bool) -> bool:
    """ZeRO-3 generation lockstep: True when no rank has a row still decoding (a collective, once per step)."""
    return float(all_reduce(torch.tensor([0.0 if mine else 1.0]), "max")) == 0.0


def spread(value: float) -> float:
    """max − min of `value` over every rank (0 in one process)."""
    both = all_reduce(torch.tensor([value, -value], dtype=torch.float64), "max")
    return float(both[0] + both[1])


def barrier() -> None:
    if distributed():
        dist.barrier()


def raise_if_any_rank_failed(error: BaseException | None) -> None:
    """A point every rank reaches, failed or not: if any rank's `error` is set, every rank raises, the failed ranks
    their own exception and the others RankFailed with the first failed rank's message."""
    if not distributed():
        if error is not None:
            raise error
        return
    failed = all_reduce(torch.tensor([0.0 if error is None else 1.0]), "max")
    if float(failed) == 0.0:
        return
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise RankFailed(f"rank {rank} failed: {message}")
