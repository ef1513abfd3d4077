"""`t2ray decompose --workers N`: the SVDs as Ray tasks, written to the same per-matrix cache as local runs,
so an interrupted run resumes matrix by matrix and a later local run is a pure cache hit."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from t2ray.svf.decompose import Factors, load_cached, select_targets, store_factors, svd_cache_dir, svd_factors


def missing_targets(model, targets: list[str], folder) -> list[str]:
    modules = dict(model.named_modules())
    return [n for n in targets if load_cached(folder / f"{n}.safetensors", tuple(modules[n].weight.shape)) is None]


def decompose_distributed(
    model, target_modules, layers, *, fingerprint: str, workers: int, dtype: torch.dtype = torch.float32
) -> dict[str, int]:
    """Fill the SVD cache for the selected matrices with at most `workers` Ray tasks in flight."""
    import ray

    svd_task = ray.remote(num_cpus=1)(svd_factors)
    targets = select_targets(model, target_modules, layers)
    folder = svd_cache_dir(fingerprint, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    todo = missing_targets(model, targets, folder)
    computed = len(todo)
    modules = dict(model.named_modules())
    pending: dict = {}
    with tqdm(
        total=len(targets), initial=len(targets) - len(todo), desc=f"SVD ({workers} workers)", unit="matrix"
    ) as bar:
        while todo or pending:
            while todo and len(pending) < workers:
                name = todo.pop(0)
                pending[svd_task.remote(modules[name].weight.detach(), dtype)] = name
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            factors: Factors = ray.get(done[0])
            store_factors(folder / f"{name}.safetensors", factors)
            bar.update(1)
    return {"matrices": len(targets), "computed": computed, "cache": str(folder)}
