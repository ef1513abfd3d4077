"""REINFORCE with optional KL to the base model (SPEC §2)."""

from __future__ import annotations

import torch

BASELINES = ("none", "mean", "group", "rloo")


def advantages(
    rewards: torch.Tensor,
    samples_per_prompt: int = 1,
    *,
    baseline: str = "none",
    normalize: bool = False,
    clip: float | None = None,
) -> torch.Tensor:
    """Turn rewards (N = prompts × samples_per_prompt, a prompt's samples adjacent) into per-sequence weights, in
    this order: the baseline, then `normalize` (a z-score; all zero when every advantage is equal: no signal), then
    `clip` (to ±clip, as PPO-style trainers clip advantages: after normalisation, where it can bite)."""
    adv = rewards.float()
    groups = adv.view(-1, samples_per_prompt)
    if baseline == "mean":
        adv = adv - adv.mean()
    elif baseline == "group":  # each prompt's own samples are its baseline
        adv = (groups - groups.mean(1, keepdim=True)).view(-1)
    elif baseline == "rloo":  # A_i = r_i − mean of the prompt's *other* k−1 samples (unbiased; Ahmadian 2024)
        if samples_per_prompt < 2:
            raise ValueError("baseline rloo needs rl.samples_per_prompt ≥ 2")
        others = (groups.sum(1, keepdim=True) - groups) / (samples_per_prompt - 1)
        adv = (groups - others).view(-1)
    elif baseline != "none":
        raise ValueError(f"unknown baseline {baseline!r}: {' | '.join(BASELINES)}")
    if normalize and adv.numel() > 1:
        centred = adv - adv.mean()
        std = centred.std()
        adv = centred / std if std > 1e-6 else torch.zeros_like(adv)
    return adv.clamp(-clip, clip) if clip is not None else adv


def reinforce_loss(token_logp: torch.Tensor, adv: torch.Tensor, batch_size: int) -> torch.Tensor:
    # L = −Σ_i (Σ_t log π(y_it)) · A_i / B
    return -(token_logp.sum(1) * adv).sum() / batch_size


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # KL(ref ‖ π) = Σ_v p_ref (log p_ref − log π), averaged over completion tokens; zero when π is the base model
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(logits.float(), -1))).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
