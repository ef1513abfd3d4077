"""Pick target matrices, fingerprint the base model, and compute/cache the SVD square factors."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

MODULE_GROUPS = {
    "mlp": re.compile(r"\.(mlp|feed_forward|ffn)\."),
    "attn": re.compile(r"\.(self_attn|attn|attention)\."),
}
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


# Sharded training (ZeRO-3) partitions weights; the caller passes a way to gather them for a moment.
Gather = Callable[[list[torch.Tensor]], AbstractContextManager]


def no_gather(params: list[torch.Tensor]) -> AbstractContextManager:
    return nullcontext()


class DecomposeError(ValueError):
    """Bad target selection (one-line, user-facing)."""


@dataclass
class Factors:
    """SVD of one weight W (m×n), kept as the square orthogonal factor only (SPEC §3).

    tall (m ≥ n): q = V (n×n) and W' = c·W V diag(z) Vᵀ;  wide (m < n): q = U (m×m) and W' = c·U diag(z) Uᵀ W.
    """

    q: torch.Tensor
    s: torch.Tensor

    @property
    def rank(self) -> int:
        return self.s.numel()


def parse_layers(layers: str | list[int] | None, num_layers: int) -> set[int] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        picked: set[int] = set()
        for part in filter(None, (p.strip() for p in layers.split(","))):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise DecomposeError(f"bad layer range {part!r}: use forms like '0-14,20'")
            picked.update(range(int(lo), int(hi or lo) + 1))
        layers = sorted(picked)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise DecomposeError(f"layer indices {bad} out of range: the model has {num_layers} layers")
    return set(layers)


def select_targets(model: nn.Module, target_modules: str | list[str] = "mlp", layers=None) -> list[str]:
    """Names of the nn.Linear modules inside decoder layers that SVF adapts."""
    linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and LAYER_INDEX.search(n + ".") and not n.endswith(".base_layer")
    ]
    num_layers = 1 + max((int(LAYER_INDEX.search(n + ".").group(1)) for n in linears), default=-1)
    wanted_layers = parse_layers(layers, num_layers)
    if isinstance(target_modules, str) and target_modules in (*MODULE_GROUPS, "all"):
        pattern = MODULE_GROUPS.get(target_modules)
        names = [n for n in linears if pattern is None or pattern.search(n + ".")]
    else:
        suffixes = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        unknown = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in linears)]
        if unknown:
            examples = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise DecomposeError(f"no linear layer matches {unknown}; try mlp, attn, all or names among {examples}")
        names = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    names = [n for n in names if wanted_layers is None or int(LAYER_INDEX.search(n + ".").group(1)) in wanted_layers]
    if not names:
        raise DecomposeError(f"target selection {target_modules!r} (layers {layers!r}) matches no module")
    return names


def model_fingerprint(model: nn.Module, sample: int = 65536, gather: Gather = no_gather) -> str:
    """Names, shapes and a strided sample of every base weight -> short hex id.

    Sampling keeps it O(seconds) even for 70B models while any real change of weights shows up. The sample is
    hashed in a canonical form (rounded to bf16) so that one checkpoint loaded in fp32 or bf16 has one identity:
    an expert trained in one compute dtype applies in the other.
    """
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(base_state(model).items()):
        with gather([tensor]):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(flat[::step].to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own parameters, under their unpatched names (SVF parameters excluded)."""
    return {
        name.replace(".base_layer.", "."): p
        for name, p in model.named_parameters(remove_duplicate=True)
        if not name.endswith((".svf_p", ".svf_q"))
    }


def svd_factors(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> Factors:
    u, s, vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)
    m, n = weight.shape
    q = vh.T if m >= n else u
    return Factors(q=q.contiguous().to(torch.float32), s=s.to(torch.float32))


def svd_cache_dir(fingerprint: str, dtype: torch.dtype, root: Path | None = None) -> Path:
    from t2ray.models import cache_root  # lazy: models pulls in transformers

    return (Path(root) if root else cache_root() / "svd") / f"{fingerprint}-{str(dtype).removeprefix('torch.')}"


def load_cached(path: Path, shape: tuple[int, int]) -> Factors | None:
    """Cached factors for a weight of `shape`, or None if absent, unreadable or inconsistent (then recomputed)."""
    if not path.exists():
        return None
    try:
        tensors = load_file(path)
        factors = Factors(q=tensors["q"], s=tensors["s"])
    except (SafetensorError, OSError, KeyError) as err:
        log.warning("SVD cache %s unreadable (%s): recomputing", path, err)
        return None
    r = min(shape)
    if factors.q.shape != (r, r) or factors.s.shape != (r,) or not torch.isfinite(factors.q).all():
        log.warning("SVD cache %s does not match a %s weight: recomputing", path, shape)
        return None
    return factors


def store_factors(path: Path, factors: Factors) -> Factors:
    tmp = path.with_suffix(f".tmp-{socket.gethostname()}-{os.getpid()}")  # a cache on shared storage: many nodes
    save_file({"q": factors.q.cpu().contiguous(), "s": factors.s.cpu().contiguous()}, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written matrix
    return factors


def iter_decompose(
    model: nn.Module,
    targets: list[str],
    *,
    dtype: torch.dtype = torch.float32,
    fingerprint: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    gather: Gather = no_gather,
) -> Iterator[tuple[str, Factors]]:
    """(name, factors) of every target matrix, one at a time (a caller that builds layers as they come never holds
    every factor at once: 60 GiB for Llama-3-70B's MLPs in fp32), from a per-matrix cache of safetensors files (a
    re-run or a wider selection is a cache hit)."""
    folder = svd_cache_dir(fingerprint or model_fingerprint(model), dtype, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    for name in tqdm(targets, desc="SVD", unit="matrix", disable=not progress):
        weight = modules[name].weight
        path = folder / f"{name}.safetensors"
        with gather([weight]):
            cached = load_cached(path, tuple(weight.shape))
            if cached is None:
                cached = store_factors(path, svd_factors(weight, dtype))
        yield name, cached


def decompose(model: nn.Module, targets: list[str], **kwargs) -> dict[str, Factors]:
    """Every target's factors at once (see iter_decompose)."""
    return dict(iter_decompose(model, targets, **kwargs))
