"""The expert library: SVF expert files or LoRA adapter folders, read by kind, and a base model loaded with them.

A mixture names SVF expert files (z' = Σ α_k z_k) or LoRA adapter folders (ΔW = Σ α_k ΔW_k, exact: no B_i A_j cross
terms); one expert folder alone is loaded with PEFT. The file formats themselves know no implementation
(``t2ray.experts``: SVF files and mixtures; ``t2ray.lora.layer``: adapter folders): the dispatch on kind lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from t2ray.experts import (
    BaseModelInfo,
    Expert,
    ExpertError,
    Mixture,
    alpha_matrix,
    common_modules,
    load_expert,
    parse_mix_spec,
    read_mixture,
)
from t2ray.lora.layer import read_lora_expert
from t2ray.models import load_model
from t2ray.svf import apply_experts

MIXED_KINDS = (
    "give SVF expert files or LoRA adapter folders, not both (one rescales W's singular values, the "
    "other adds a low-rank ΔW: they do not mix)"
)


def library_kind(paths: Sequence[str | Path]) -> str:
    """'lora' when every path is a LoRA adapter folder, 'svf' otherwise (expert files); a mix is refused."""
    folders = {Path(p).is_dir() for p in paths}
    if len(folders) > 1:
        raise ExpertError(MIXED_KINDS)
    return "lora" if folders == {True} else "svf"


def read_library(paths: Sequence[str | Path], base: BaseModelInfo | None = None, *, allow_transfer: bool = False):
    """The experts at `paths`: SVF Experts, or LoRAExpertFiles when the paths are adapter folders (whose fit to the
    model is checked when they are patched in)."""
    if library_kind(paths) == "lora":
        return [read_lora_expert(p) for p in paths]
    return [load_expert(p, base, allow_transfer=allow_transfer) for p in paths]


def load_mixture(path, base: BaseModelInfo | None = None, *, allow_transfer: bool = False) -> tuple[Mixture, list]:
    """A mixture file and its experts, loaded and validated (SVF Experts, or LoRAExpertFiles for adapter folders)."""
    mixture = read_mixture(path)
    try:
        experts = read_library(mixture.experts, base, allow_transfer=allow_transfer)
        lora = not isinstance(experts[0], Expert)
        alpha = alpha_matrix(mixture.alpha, len(experts), None if lora else common_modules(experts))
        if lora and alpha.ndim != 1:
            raise ExpertError("alpha over LoRA adapters is one weight per adapter, not per module")
    except ExpertError as e:
        raise ExpertError(f"{Path(path).name}: {e}") from None
    return mixture, experts


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
        label = "mix:" + ",".join(f"{e.name}={w:g}" for e, w in zip(experts, alpha, strict=True))
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
