"""CEM candidates evaluated in parallel on Ray actors; each holds the model once and only switches z."""

from __future__ import annotations

import numpy as np


class CEMActor:
    def __init__(
        self,
        model_spec: str,
        expert_paths: list[str],
        task_spec: str,
        shots: int,
        seed: int,
        dtype: str = "auto",
        allow_transfer: bool = False,
        threads: int = 1,
    ):
        import torch

        from t2ray.adapt.fewshot import ShotFitness, pick_shots
        from t2ray.experts import load_expert
        from t2ray.models import load_model
        from t2ray.tasks import get_task

        torch.set_num_threads(threads)  # one core per actor: actors share the machine's cores
        model, tokenizer = load_model(model_spec, dtype=dtype)
        task = get_task(task_spec, seed=seed)
        self.fitness = ShotFitness(
            model,
            tokenizer,
            [load_expert(p) for p in expert_paths],
            task,
            pick_shots(task, shots, seed),
            allow_transfer=allow_transfer,
        )

    def evaluate(self, alphas: np.ndarray) -> list[tuple[float, float]]:
        return self.fitness(alphas)


class ActorPoolFitness:
    """fitness(alphas) split across `n` actors (population chunks run concurrently)."""

    def __init__(self, n: int, **actor_kwargs):
        import ray

        self.actors = [ray.remote(num_cpus=1)(CEMActor).remote(**actor_kwargs) for _ in range(n)]

    def __call__(self, alphas: np.ndarray) -> list[tuple[float, float]]:
        import ray

        chunks = [c for c in np.array_split(alphas, len(self.actors)) if len(c)]
        results = ray.get([actor.evaluate.remote(chunk) for actor, chunk in zip(self.actors, chunks, strict=False)])
        return [fit for chunk in results for fit in chunk]

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
