"""Load a base model with an adapter applied: nothing, one expert, or a mixture (files or FILE:w specs).

A mixture names SVF expert files (z' = Σ α_k z_k) or LoRA adapter folders (ΔW = Σ α_k ΔW_k, exact: no B_i A_j cross
terms); one expert folder alone is loaded with PEFT."""

from __future__ import annotations

from pathlib import Path

from t2ray.experts import Expert, ExpertError, load_mixture, parse_mix_spec, read_library
from t2ray.models import load_model
from t2ray.svf import apply_experts


def load_adapted(
    model_spec: str,
    *,
    expert: str | Path | None = None,
    mix: str | None = None,
    mixture: str | Path | None = None,
    allow_transfer: bool = False,
    dtype: str = "auto",
):
    """(model, tokenizer, label). At most one of expert / mix / mixture; an expert folder is a LoRA expert."""
    if sum(x is not None for x in (expert, mix, mixture)) > 1:
        raise ExpertError("give at most one of --expert, --mix, --mixture")
    model, tokenizer = load_model(model_spec, dtype=dtype)
    if expert is None and mix is None and mixture is None:
        return model, tokenizer, "base"
    if expert is not None and Path(expert).is_dir():
        from t2ray.lora import load_lora_expert

        peft = load_lora_expert(model, expert, allow_transfer=allow_transfer)
        return peft, tokenizer, f"lora:{peft.t2ray_expert_name}"
    # Files are validated here; whether they fit this model is checked once, when they are applied.
    if mixture is not None:
        spec, experts = load_mixture(mixture)
        alpha, label = spec.alpha, f"mixture:{spec.name}"
    elif mix is not None:
        paths, alpha = parse_mix_spec(mix)
        experts = read_library(paths)
        label = "mix:" + ",".join(f"{e.name}={w:g}" for e, w in zip(experts, alpha))
    else:
        experts, alpha = read_library([expert]), None
        label = f"expert:{experts[0].name}"
    if isinstance(experts[0], Expert):
        apply_experts(model, experts, alpha, allow_transfer=allow_transfer)
    else:
        from t2ray.lora.layer import patch_lora_mixture, set_lora_weights

        patch_lora_mixture(model, experts, allow_transfer=allow_transfer)
        set_lora_weights(model, alpha)
        label = f"lora-{label}"
    return model, tokenizer, label
