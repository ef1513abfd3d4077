"""REINFORCE with optional KL to the base model (SPEC §2)."""
from __future__ import annotations

import torch


def advantages(rewards: torch.Tensor, num_samples: int = 1, *, baseline: str = "none", normalize: bool = False,
               clip: float | None = None) -> torch.Tensor:
    """Turn rewards (N = prompts × num_samples, sample-major per prompt) into per-sequence weights."""
    adv = rewards.float()
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    if baseline == "mean":
        adv = adv - adv.mean()
    elif baseline == "group":  # each prompt's own samples are its baseline
        groups = adv.view(-1, num_samples)
        adv = (groups - groups.mean(1, keepdim=True)).view(-1)
    elif baseline != "none":
        raise ValueError(f"unknown baseline {baseline!r}: none | mean | group")
    if normalize and adv.numel() > 1:
        adv = adv / (adv.std() + 1e-6)
    return adv


def reinforce_loss(token_logp: torch.Tensor, adv: torch.Tensor, batch_size: int) -> torch.Tensor:
    # L = −Σ_i (Σ_t log π(y_it)) · A_i / B
    return -(token_logp.sum(1) * adv).sum() / batch_size


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # KL(ref ‖ π) = Σ_v p_ref (log p_ref − log π), averaged over completion tokens; zero when π is the base model
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(logits.float(), -1))).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
