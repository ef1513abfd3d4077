"""Fitness of mixing weights on k shots of an unseen task, for CEM: every candidate × shot is one row of a
batch with its own z (factored SVF mode), so a whole population is scored without re-materialising weights."""
from __future__ import annotations

import numpy as np
import torch

from t2ray.evaluate import grade_all
from t2ray.experts import Expert, mix_z
from t2ray.generation import answer_loglik, rollout
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


def live_rows_z(model, batch_z: dict[str, torch.Tensor]):
    """A decode hook that keeps one z per row in step with the rows still decoding (done rows leave the batch)."""
    rows = {"n": -1}

    def hook(i, generated, done, live) -> None:
        if len(live) != rows["n"]:  # the first step, or rows retired (the batch only shrinks)
            set_z(model, {m: t[live] for m, t in batch_z.items()})
            rows["n"] = len(live)
    return hook


class ShotFitness:
    """Callable: alphas (P, K) or (P, K, M) -> [(accuracy, mean log-lik of reference answers)] per candidate."""

    def __init__(self, model, tokenizer, experts: list[Expert], task: Task, shots: list[Example],
                 batch_size: int = 64, allow_transfer: bool = False):
        self.model, self.tokenizer, self.experts, self.task, self.shots = model, tokenizer, experts, task, shots
        self.batch_size = batch_size
        apply_experts(model, experts, allow_transfer=allow_transfer)  # patches their modules, checks each fits
        set_mode(model, "factored")
        self.messages = [task.messages(ex) for ex in shots]
        self.references = [task.reference_completion(ex) for ex in shots]

    def row_z(self, alphas: np.ndarray) -> dict[str, torch.Tensor]:
        """z per (candidate, shot) row: (P·k, r) per module."""
        per_candidate = [mix_z(self.experts, a.tolist()) for a in alphas]
        k = len(self.shots)
        return {m: torch.stack([z[m] for z in per_candidate]).repeat_interleave(k, 0) for m in per_candidate[0]}

    @torch.no_grad()
    def __call__(self, alphas: np.ndarray) -> list[tuple[float, float]]:
        k, rows = len(self.shots), len(alphas) * len(self.shots)
        z = self.row_z(alphas)
        texts, logliks = [], []
        for start in range(0, rows, self.batch_size):
            stop = min(rows, start + self.batch_size)
            batch_z = {m: t[start:stop] for m, t in z.items()}
            idx = [i % k for i in range(start, stop)]
            texts += rollout(self.model, self.tokenizer, [self.messages[i] for i in idx],
                             max_new_tokens=self.task.max_new_tokens, before_step=live_rows_z(self.model, batch_z)).texts
            set_z(self.model, batch_z)  # every row again, for the log-likelihoods
            logliks.append(answer_loglik(self.model, self.tokenizer, [self.messages[i] for i in idx],
                                         [self.references[i] for i in idx], batch_size=stop - start))
        correct = [ok for ok, _ in grade_all(self.task, self.shots * len(alphas), texts)]
        ll = torch.cat(logliks)
        return [(float(np.mean(correct[c * k:(c + 1) * k])), float(ll[c * k:(c + 1) * k].mean()))
                for c in range(len(alphas))]
