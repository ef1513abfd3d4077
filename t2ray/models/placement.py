"""Where a model's modules go when one replica spans several GPUs: its decoder layers split into contiguous runs, one
per GPU, balanced by bytes, written as a Hugging Face/accelerate device map (module name -> GPU index).

Why not ``device_map="auto"``: accelerate fills the GPUs in order up to a ``max_memory`` it reads from the GPUs at
load time, and knows nothing of what a replica adds after loading (SVF factors, materialised W', the KV cache, all of
them per decoder layer). This split is a pure function of the model's config and the GPU count, so `t2ray plan
--serve` counts the very split a replica makes, on any machine. It balances weights; what a replica adds per layer
follows the layers, so the GPUs holding the embedding or the LM head simply get a layer or so fewer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Split:
    device_map: dict[str, int]  # module name -> GPU index
    layers: list[list[int]]  # the decoder layers (indices) of each GPU
    weight_bytes: list[int]  # parameters and buffers per GPU


def meta_model(config, dtype: str) -> nn.Module:
    """The causal LM of a Hugging Face config on the meta device: every name and shape, no memory (seconds for 70B)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def split_model(model: nn.Module, gpus: int) -> Split:
    """The device map of `model` (real or on the meta device) over `gpus` GPUs: the input embedding (and an LM head
    tied to it) and tensor-only helpers such as rotary embeddings on GPU 0, the final norm and an untied LM head on the
    last GPU, the decoder layers in contiguous runs that minimise the fullest GPU's bytes."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    units = set(getattr(model, "_no_split_modules", None) or ())  # the decoder layer class(es) of the architecture
    modules = dict(model.named_modules())
    layers = [name for name, m in modules.items() if type(m).__name__ in units]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers ({sorted(units)}) to split over GPUs")
    if len(layers) < gpus:
        raise ValueError(f"{len(layers)} decoder layers cannot be split over {gpus} GPUs")
    by_module = {id(m): name for name, m in modules.items()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    placed = [by_module[id(embed)], *layers, *([by_module[id(head)]] if head is not None else [])]

    def covered(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in placed)

    first = {by_module[id(embed)]: _bytes(embed)}
    last: dict[str, int] = {}
    if head is not None:
        (first if tied else last)[by_module[id(head)]] = 0 if tied else _bytes(head)
    for name, m in modules.items():  # the rest that holds tensors itself: the final norm, rotary embeddings
        if not name or covered(name) or not (m._parameters or m._buffers):
            continue
        placed.append(name)
        # buffers only (rotary: computed before the first layer) go with the embedding; weights after the layers
        (last if any(p is not None for p in m._parameters.values()) else first)[name] = _bytes(m)
    extra = [0] * gpus
    extra[0] += sum(first.values())
    extra[-1] += sum(last.values())
    sizes = [_bytes(modules[name]) for name in layers]
    counts = _balanced_counts(sizes, extra)
    device_map, per_gpu, start = {}, [], 0
    for gpu, n in enumerate(counts):
        per_gpu.append(list(range(start, start + n)))
        device_map.update({layers[i]: gpu for i in per_gpu[-1]})
        start += n
    device_map.update({name: 0 for name in first})
    device_map.update({name: gpus - 1 for name in last})
    loads = [extra[g] + sum(sizes[i] for i in per_gpu[g]) for g in range(gpus)]
    return Split(device_map=device_map, layers=per_gpu, weight_bytes=loads)


def _balanced_counts(sizes: list[int], extra: list[int]) -> list[int]:
    """Layers per GPU, contiguous in order (`extra[g]` already sits on GPU g): the smallest capacity at which every
    layer fits (binary search; filling each GPU in turn decides it), then each GPU takes layers towards an even share
    of what is left, within that capacity and as many as the GPUs after it need."""

    def fits(i: int, gpu: int, capacity: int) -> bool:  # layers i.. onto GPUs gpu.., each filled in turn
        for load in extra[gpu:]:
            if load > capacity:
                return False
            while i < len(sizes) and load + sizes[i] <= capacity:
                load, i = load + sizes[i], i + 1
        return i == len(sizes)

    low, high = max(extra), sum(extra) + sum(sizes)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(0, 0, middle) else (middle + 1, high)
    counts, i = [], 0
    for gpu, load in enumerate(extra):
        share = (sum(extra[gpu:]) + sum(sizes[i:])) / (len(extra) - gpu)
        n = 0
        while i < len(sizes) and load + sizes[i] <= low and (load + sizes[i] / 2 <= share or not fits(i, gpu + 1, low)):
            load, i, n = load + sizes[i], i + 1, n + 1
        counts.append(n)
    return counts


def gpu_device_map(spec: str, gpus: int, *, dtype: str, seed: int = 0) -> dict[str, int]:
    """The split of model `spec` (any spec `load_model` takes) over `gpus` GPUs, from its config alone."""
    from transformers import AutoConfig

    from t2ray.models.loader import resolve

    return split_model(meta_model(AutoConfig.from_pretrained(resolve(spec, seed)), dtype), gpus).device_map
