"""Fitness of mixing weights on k shots of an unseen task, for CEM: every candidate × shot is one row of a
batch with its own z (factored SVF mode), so a whole population is scored without re-materialising weights."""

from __future__ import annotations

import numpy as np
import torch

from t2ray.evaluate import grade_all
from t2ray.experts import Expert, ExpertError, mix_z
from t2ray.generation import answer_loglik, on_live_rows, rollout
from t2ray.svf import apply_experts, set_mode, set_z
from t2ray.tasks.base import Example, Task, TaskError


def pick_shots(task: Task, k: int, seed: int = 0) -> list[Example]:
    """k examples from the task's train split, checked disjoint from its test split."""
    pool = task.examples("train")
    if k > len(pool):
        raise TaskError(f"{task.name}: asked for {k} shots but its train split has only {len(pool)} examples")
    shots = list(np.random.default_rng(seed).permutation(len(pool))[:k])
    picked = [pool[i] for i in shots]
    test_prompts = {ex.prompt for ex in task.examples("test")}
    leaked = [ex.id for ex in picked if ex.prompt in test_prompts]
    if leaked:
        raise TaskError(f"{task.name}: shots {leaked} also appear in the test split")
    return picked


class ShotFitness:
    """Callable: alphas (P, K) or (P, K, M) -> [(accuracy, mean log-lik of reference answers)] per candidate.
    Every (candidate, shot) is one batch row with its own mixture: here a z per row (SVF experts, factored mode);
    LoRAShotFitness: adapter weights per row."""

    def __init__(
        self,
        model,
        tokenizer,
        experts: list[Expert],
        task: Task,
        shots: list[Example],
        batch_size: int = 64,
        allow_transfer: bool = False,
    ):
        apply_experts(model, experts, allow_transfer=allow_transfer)  # patches their modules, checks each fits
        set_mode(model, "factored")
        self.experts = experts
        self._on(model, tokenizer, task, shots, batch_size)

    def _on(self, model, tokenizer, task: Task, shots: list[Example], batch_size: int) -> None:
        self.model, self.tokenizer, self.task, self.shots, self.batch_size = model, tokenizer, task, shots, batch_size
        self.messages = [task.messages(ex) for ex in shots]
        self.references = [task.reference_completion(ex) for ex in shots]

    def row_mixtures(self, alphas: np.ndarray) -> dict[str, torch.Tensor]:
        """z per (candidate, shot) row: (P·k, r) per module."""
        per_candidate = [mix_z(self.experts, a.tolist()) for a in alphas]
        k = len(self.shots)
        return {m: torch.stack([z[m] for z in per_candidate]).repeat_interleave(k, 0) for m in per_candidate[0]}

    def select(self, mixtures: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        """Put these rows' mixtures on the model, one per batch row."""
        set_z(self.model, {m: t[rows] for m, t in mixtures.items()})

    @torch.no_grad()
    def __call__(self, alphas: np.ndarray) -> list[tuple[float, float]]:
        k, rows = len(self.shots), len(alphas) * len(self.shots)
        mixtures = self.row_mixtures(alphas)
        texts, logliks = [], []
        for start in range(0, rows, self.batch_size):
            stop = min(rows, start + self.batch_size)
            batch = torch.arange(start, stop)
            idx = [i % k for i in range(start, stop)]
            texts += rollout(
                self.model,
                self.tokenizer,
                [self.messages[i] for i in idx],
                max_new_tokens=self.task.max_new_tokens,
                before_step=on_live_rows(lambda live, rows=batch: self.select(mixtures, rows[live])),
            ).texts
            self.select(mixtures, batch)  # every row again, for the log-likelihoods
            logliks.append(
                answer_loglik(
                    self.model,
                    self.tokenizer,
                    [self.messages[i] for i in idx],
                    [self.references[i] for i in idx],
                    batch_size=stop - start,
                )
            )
        correct = [ok for ok, _ in grade_all(self.task, self.shots * len(alphas), texts)]
        ll = torch.cat(logliks)
        return [
            (float(np.mean(correct[c * k : (c + 1) * k])), float(ll[c * k : (c + 1) * k].mean()))
            for c in range(len(alphas))
        ]


class LoRAShotFitness(ShotFitness):
    """The same fitness over LoRA adapters (LoraHub's setting): a candidate's α are the weights of its rows'
    adapters in LoRAMixer's exact Σ_k α_k ΔW_k; one α per adapter (per-module α is an SVF setting)."""

    def __init__(self, model, tokenizer, mixer, task: Task, shots: list[Example], batch_size: int = 64):
        self.mixer = mixer
        self._on(model, tokenizer, task, shots, batch_size)

    def row_mixtures(self, alphas: np.ndarray) -> torch.Tensor:
        weights = torch.as_tensor(np.asarray(alphas), dtype=torch.float32)
        if weights.ndim != 2 or weights.shape[1] != self.mixer.num_experts:
            raise ExpertError(
                f"LoRA adapters take one α per adapter: (P, {self.mixer.num_experts}), got "
                f"{tuple(weights.shape)} (cem.per_module is for SVF experts)"
            )
        return weights.repeat_interleave(len(self.shots), 0)

    def select(self, mixtures: torch.Tensor, rows: torch.Tensor) -> None:
        self.mixer.set_weights(mixtures[rows])
