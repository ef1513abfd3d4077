"""CEM search, shots, and the batched few-shot fitness (no Ray here; the actor pool is in test_two_pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2ray.adapt.cem import cem_search
from t2ray.adapt.fewshot import ShotFitness, pick_shots
from t2ray.experts import Expert
from t2ray.svf import base_model_info, patch_model, trainable_params
from t2ray.tasks import get_task
from t2ray.tasks.base import TaskError


def test_cem_finds_a_known_optimum():
    target = np.array([0.9, 0.1, 0.4])

    def fitness(alphas):
        return [(-float(np.abs(a - target).sum()), 0.0) for a in alphas]

    result = cem_search(fitness, (3,), population=32, generations=30, progress=False, seed=1)
    assert np.abs(result.alpha - target).max() < 0.05
    assert len(result.history) == 30
    assert result.history[-1]["best_accuracy"] >= result.history[0]["best_accuracy"]


def test_cem_ties_are_broken_by_loglik():
    def fitness(alphas):  # accuracy is flat: only the tie-break can steer towards α0 = 1
        return [(0.5, float(a[0])) for a in alphas]

    result = cem_search(fitness, (2,), population=16, generations=10, progress=False)
    assert result.alpha[0] > 0.9


def test_cem_per_module_shape_and_bounds():
    seen = []

    def fitness(alphas):
        seen.append(alphas.copy())
        return [(float(a.sum()), 0.0) for a in alphas]

    result = cem_search(fitness, (2, 5), population=8, generations=3, progress=False)
    assert result.alpha.shape == (2, 5)
    assert all(((a >= 0) & (a <= 1)).all() for a in seen)
    # the previous best is re-evaluated with every generation
    assert all(
        any(np.array_equal(best, c) for c in batch)
        for best, batch in zip([np.asarray(h["alpha"]) for h in result.history[:-1]], seen[1:], strict=True)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"population": 1}, "population"),
        ({"elite_ratio": 0.0}, "elite ratio"),
        ({"elite_ratio": 1.5}, "elite ratio"),
        ({"generations": 0}, "generation"),
    ],
)
def test_cem_settings_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cem_search(lambda a: [(0.0, 0.0)] * len(a), (2,), **kwargs)


def test_shots_come_from_train_and_never_from_test():
    task = get_task("math-hard")
    shots = pick_shots(task, 10, seed=3)
    test_prompts = {ex.prompt for ex in task.examples("test")}
    assert len(shots) == 10 and not any(s.prompt in test_prompts for s in shots)
    assert [s.id for s in shots] == [s.id for s in pick_shots(task, 10, seed=3)]
    with pytest.raises(TaskError, match="shots"):
        pick_shots(task, len(task.examples("train")) + 1)


def random_experts(model, n: int, seed: int = 0) -> list[Expert]:
    patch_model(model, progress=False)
    info = base_model_info(model)
    g = torch.Generator().manual_seed(seed)
    return [
        Expert(
            name=f"e{i}",
            params={k: v + torch.randn(v.shape, generator=g) for k, v in trainable_params(model).items()},
            base_model=info.model_id,
            fingerprint=info.fingerprint,
            task=task,
        )
        for i, task in zip(range(n), ["math", "code", "reasoning"], strict=False)  # the first n
    ]


def test_batched_fitness_equals_one_candidate_at_a_time(tiny, tokenizer):
    experts = random_experts(tiny, 2)
    task = get_task("math")
    fitness = ShotFitness(tiny, tokenizer, experts, task, pick_shots(task, 3), batch_size=4)
    alphas = np.array([[1.0, 0.0], [0.2, 0.7], [0.0, 1.0]])
    together = fitness(alphas)
    alone = [fitness(a[None])[0] for a in alphas]
    for (acc_t, ll_t), (acc_a, ll_a) in zip(together, alone, strict=True):
        assert acc_t == acc_a and ll_t == pytest.approx(ll_a, abs=1e-4)
    assert together[0][1] != pytest.approx(together[2][1], abs=1e-6)  # different experts, different scores


def test_fitness_checks_every_expert_and_honours_allow_transfer(tiny, tokenizer):
    """CEM used to check only the first expert and to refuse cross-model transfer even when it was allowed."""
    import dataclasses

    from t2ray.experts import ExpertError

    same, other = random_experts(tiny, 2)
    foreign = dataclasses.replace(other, base_model="other-llama", fingerprint="ab" * 12)
    task = get_task("math")
    shots = pick_shots(task, 2)
    with pytest.raises(ExpertError, match="allow-transfer"):  # the second expert was never checked
        ShotFitness(tiny, tokenizer, [same, foreign], task, shots, batch_size=4)
    fitness = ShotFitness(tiny, tokenizer, [same, foreign], task, shots, batch_size=4, allow_transfer=True)
    assert len(fitness(np.array([[0.5, 0.5]]))) == 1
