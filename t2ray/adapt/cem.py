"""Few-shot search of mixing weights α with the cross-entropy method (SPEC §1 defaults). No Ray here:
`fitness` may evaluate a population locally or on an actor pool (t2ray.adapt.cem_pool)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

Fitness = tuple[float, float]  # (accuracy on the shots, mean log-likelihood of the right answers): compared in order


@dataclass
class CEMResult:
    alpha: np.ndarray
    fitness: Fitness
    history: list[dict] = field(default_factory=list)


def cem_search(
    fitness: Callable[[np.ndarray], list[Fitness]],
    shape: tuple[int, ...],
    *,
    population: int = 32,
    elite_ratio: float = 0.2,
    generations: int = 50,
    init_std: float = 0.5,
    normalize: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> CEMResult:
    """Maximise fitness over α ∈ [0,1]^shape (shape (K,) or (K, M)); the previous best is re-evaluated
    with every generation (fitness on few shots is noisy)."""
    if population < 2:
        raise ValueError(f"CEM population must be ≥ 2, got {population}")
    if not 0 < elite_ratio <= 1:
        raise ValueError(f"CEM elite ratio must be in (0, 1], got {elite_ratio}")
    if generations < 1:
        raise ValueError(f"CEM needs ≥ 1 generation, got {generations}")
    rng = np.random.default_rng(seed)
    mean = np.full(shape, 1.0 / shape[0])
    std = np.full(shape, init_std)
    n_elite = max(1, math.ceil(population * elite_ratio))
    best: np.ndarray | None = None
    best_fit: Fitness = (-math.inf, -math.inf)
    history = []
    for gen in tqdm(range(generations), desc="CEM", unit="gen", disable=not progress):
        samples = np.clip(rng.normal(mean, std, size=(population - (best is not None), *shape)), 0.0, 1.0)
        if normalize:
            samples = samples / np.clip(samples.sum(axis=1, keepdims=True), 1e-8, None)
        candidates = samples if best is None else np.concatenate([best[None], samples])
        dead = candidates.sum(axis=1) == 0  # an all-zero α (overall or for one module) is no mixture
        candidates[:, ...] = np.where(dead[:, None], 1.0 / shape[0], candidates)
        scores = fitness(candidates)
        order = sorted(range(len(candidates)), key=lambda i: scores[i], reverse=True)
        elites = candidates[order[:n_elite]]
        mean, std = elites.mean(0), elites.std(0) + 1e-3  # a floor keeps the search from freezing
        best, best_fit = candidates[order[0]].copy(), scores[order[0]]
        history.append(
            {
                "generation": gen + 1,
                "best_accuracy": best_fit[0],
                "best_loglik": best_fit[1],
                "mean_accuracy": float(np.mean([s[0] for s in scores])),
                "alpha": best.tolist(),
            }
        )
    return CEMResult(alpha=best, fitness=best_fit, history=history)
