"""ZeRO-3 glue: each SVD computed once for all ranks, every factor partitioned as it is built, and the SVF layers'
base weights gathered for their forward too.

Ranks take the missing SVDs in turns (matrix i: rank i mod world), each into its own SVD cache; then, matrix by
matrix, the rank that holds a factor broadcasts it and every rank builds the layer under `deepspeed.zero.Init`, which
partitions the factor at once: a rank never holds more than one whole factor, nor computes an SVD another rank did.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from t2ray.svf.decompose import Factors, load_cached, store_factors, svd_cache_dir, svd_factors
from t2ray.train.collectives import group_device


def weight_shape(weight: torch.Tensor) -> tuple[int, int]:
    return tuple(getattr(weight, "ds_shape", weight.shape))  # a partitioned weight's own shape is (0,)


def shared_factors(model: nn.Module, targets: list[str], dtype: torch.dtype, fingerprint: str) -> Iterator:
    """(name, Factors) for every target, whole on every rank one at a time (see the module docstring)."""
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    folder = svd_cache_dir(fingerprint, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())

    def cached(name: str) -> Factors | None:
        return load_cached(folder / f"{name}.safetensors", weight_shape(modules[name].weight))

    # who holds each matrix's factors: a rank whose cache has them, else the rank whose turn it is to compute them
    holders = torch.tensor([rank if cached(name) is not None else -1 for name in targets], device=group_device())
    dist.all_reduce(holders, op=dist.ReduceOp.MAX)
    owners = [int(h) if h >= 0 else i % world for i, h in enumerate(holders.tolist())]
    for i, name in enumerate(targets):
        if holders[i] < 0:
            weight = modules[name].weight
            with deepspeed.zero.GatheredParameters([weight]):  # a collective: every rank, the owner computes
                if owners[i] == rank:
                    store_factors(folder / f"{name}.safetensors", svd_factors(weight, dtype))
    for name, owner in zip(targets, owners, strict=True):
        r = min(weight_shape(modules[name].weight))
        if owner == rank:
            found = cached(name)
            q, s = found.q.to(group_device()), found.s.to(group_device())
        else:
            q = torch.empty(r, r, device=group_device())
            s = torch.empty(r, device=group_device())
        dist.broadcast(q, owner)
        dist.broadcast(s, owner)
        yield name, Factors(q=q, s=s)
        del q, s


def register_svf_external_params(model: nn.Module) -> None:
    """SVF layers read their base weight directly: ZeRO-3 must gather it for their forward too."""
    import deepspeed

    from t2ray.svf import svf_layers

    for layer in svf_layers(model).values():
        deepspeed.zero.register_external_parameter(layer, layer.base_layer.weight)
