"""A LoRA-mixture linear: K saved LoRA experts in one layer, mixed per batch row (or per token).

    y = W x + Σ_k w[b,k] · scale_k · B_k (A_k x)          (w: (K,), (B, K) or (B, T, K))

The K adapters are kept *concatenated* — A = [A_1; …; A_K] (Σr × n), B = [B_1 … B_K] (m × Σr) — and the
rank-space activations are scaled column by column by w[b, k(j)] · scale_k(j) before B. That is exactly
Σ_k w_k ΔW_k with ΔW_k = scale_k B_k A_k: no cross terms B_i A_j, unlike PEFT's ``linear`` merge of
weighted adapters (Belofsky 2023's router used that merge; SPEC §1 lists it as a fault). Cost per token:
one (n → Σr) and one (Σr → m) matmul on top of the base layer, whatever the weights.

Experts are PEFT adapter folders (``adapter_model.safetensors`` + ``adapter_config.json``, as
``LoRAAdapter.save`` writes them, optionally with ``t2ray_expert.json``), read with safetensors + json only:
PEFT is not needed at inference. Patching mirrors ``t2ray.svf.model``: ``patch_lora_mixture`` swaps the
target ``nn.Linear`` modules for :class:`LoRAMixtureLinear` in place, ``unpatch_lora_mixture`` puts them back.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from t2ray.experts import ExpertError
from t2ray.lora.model import LORA_META_FILE as T2RAY_META

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Config switches whose features this layer does not implement: refused instead of silently ignored.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "target_parameters",
    "use_bdlora",
)


class LoRAMixtureError(ExpertError):
    """A LoRA expert folder or mixture that cannot be used (one user-facing line)."""


@dataclass
class LoRAFactors:
    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)


@dataclass
class LoRAExpertFile:
    """One saved LoRA expert: its factors per module (HF module path, e.g. model.layers.0.mlp.down_proj)."""

    name: str
    path: Path
    modules: dict[str, LoRAFactors]
    meta: dict  # t2ray_expert.json, or {} for a plain PEFT adapter

    @property
    def task(self) -> str | None:
        """The task it was trained on (t2ray's metadata), as an SVF Expert's ``task``."""
        return self.meta.get("task")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora_expert(folder: str | Path) -> LoRAExpertFile:
    """Read and validate a PEFT LoRA adapter folder (safetensors + json only)."""
    folder = Path(folder)
    label = f"LoRA expert {folder}"
    if not folder.is_dir():
        raise LoRAMixtureError(f"{label}: not a folder; give the folder that save_pretrained wrote")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise LoRAMixtureError(f"{label}: no {ADAPTER_CONFIG}; is this a PEFT adapter folder?") from None
    except (OSError, json.JSONDecodeError) as err:
        raise LoRAMixtureError(f"{label}: cannot read {ADAPTER_CONFIG} ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise LoRAMixtureError(f"{label}: peft_type is {config.get('peft_type')!r}, only LORA adapters can be mixed")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise LoRAMixtureError(
                f"{label}: {key}={config[key]!r} is not supported by the LoRA mixture layer; "
                "save plain LoRA adapters (no DoRA, biases, extra trainable modules)"
            )
    if config.get("bias", "none") != "none":
        raise LoRAMixtureError(f"{label}: bias={config['bias']!r} is not supported; use bias='none'")
    try:
        tensors = load_file(folder / ADAPTER_WEIGHTS)
    except FileNotFoundError:
        raise LoRAMixtureError(
            f"{label}: no {ADAPTER_WEIGHTS} (older .bin adapters are not read; re-save with safe_serialization)"
        ) from None
    except (SafetensorError, OSError) as err:
        raise LoRAMixtureError(f"{label}: {ADAPTER_WEIGHTS} is unreadable ({err})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoRAMixtureError(
                f"{label}: tensor {key!r} is not a LoRA A/B weight; only plain LoRA on linear layers can be mixed"
            )
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if not pairs:
        raise LoRAMixtureError(f"{label}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    modules = {}
    alpha, r_default = config.get("lora_alpha"), config.get("r")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAMixtureError(f"{label}: module {module} has lora_{'A' if 'A' in ab else 'B'} but not the other")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or not a.is_floating_point():
            raise LoRAMixtureError(
                f"{label}: module {module} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; expected (r, in) and (out, r) float matrices"
            )
        r = a.shape[0]
        expected_r = _pattern_value(config.get("rank_pattern"), module, r_default)
        if expected_r is not None and int(expected_r) != r:
            raise LoRAMixtureError(f"{label}: module {module} has rank {r} but the config says {expected_r}")
        module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        if module_alpha is None:
            raise LoRAMixtureError(f"{label}: {ADAPTER_CONFIG} has no lora_alpha")
        scale = module_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoRAMixtureError(f"{label}: module {module} contains NaN/inf values")
        modules[module] = LoRAFactors(a=a, b=b, scale=float(scale))
    meta = {}
    if (folder / T2RAY_META).exists():
        try:
            meta = json.loads((folder / T2RAY_META).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LoRAMixtureError(f"{label}: {T2RAY_META} is unreadable ({err})") from None
    return LoRAExpertFile(name=str(meta.get("name") or folder.name), path=folder, modules=modules, meta=meta)


class LoRAMixtureLinear(nn.Module):
    """y = base(x) + Σ_k w[..., k] · scale_k · B_k (A_k x); no weights set (None) = the base layer exactly."""

    def __init__(self, base_layer: nn.Linear, experts: Sequence[LoRAFactors]):
        super().__init__()
        if not experts:
            raise LoRAMixtureError("a LoRA mixture layer needs at least one expert")
        self.base_layer = base_layer.requires_grad_(False)
        dtype, device = base_layer.weight.dtype, base_layer.weight.device
        out_features, in_features = base_layer.weight.shape
        for k, e in enumerate(experts):
            if e.a.shape[1] != in_features or e.b.shape[0] != out_features:
                raise LoRAMixtureError(
                    f"expert {k}: lora_A {tuple(e.a.shape)} / lora_B {tuple(e.b.shape)} do not fit "
                    f"a linear layer {in_features} -> {out_features}"
                )
        self.register_buffer("lora_A", torch.cat([e.a for e in experts]).to(device, dtype), persistent=False)
        self.register_buffer("lora_B", torch.cat([e.b for e in experts], 1).to(device, dtype), persistent=False)
        ranks = [e.a.shape[0] for e in experts]
        self.register_buffer(
            "column_expert",
            torch.repeat_interleave(torch.arange(len(experts)), torch.tensor(ranks)).to(device),
            persistent=False,
        )
        self.register_buffer(
            "column_scale",
            torch.repeat_interleave(
                torch.tensor([e.scale for e in experts], dtype=torch.float32), torch.tensor(ranks)
            ).to(device),
            persistent=False,
        )
        self.num_experts = len(experts)
        self.ranks = ranks
        self.weights: torch.Tensor | None = None

    def set_weights(self, weights: torch.Tensor | None) -> None:
        """(K,) for the whole batch, (B, K) per row or (B, T, K) per token; None = base layer."""
        if weights is not None:
            if weights.ndim not in (1, 2, 3) or weights.shape[-1] != self.num_experts:
                raise LoRAMixtureError(
                    f"mixture weights must have shape (K,), (B, K) or (B, T, K) with "
                    f"K = {self.num_experts}, got {tuple(weights.shape)}"
                )
            weights = weights.to(self.column_scale.device, torch.float32)
        self.weights = weights

    def decode_state(self) -> tuple:
        """What a forward reads that can change between decode steps (t2ray.cuda_graphs): the mixture weights."""
        return (self.weights,)

    def delta_weight(self, k: int) -> torch.Tensor:
        """ΔW_k = scale_k · B_k A_k (m × n), e.g. to check the mixture by hand."""
        cols = self.column_expert == k
        return (self.lora_B[:, cols] * self.column_scale[cols].to(self.lora_B.dtype)) @ self.lora_A[cols]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.weights is None:
            return y
        col = (self.weights[..., self.column_expert] * self.column_scale).to(x.dtype)  # (..., Σr)
        if col.ndim == 2 and x.ndim == 3:
            col = col.unsqueeze(1)  # one mixture per batch row, broadcast over tokens
        elif col.ndim == 3 and x.ndim == 3 and col.shape[1] != x.shape[1]:
            raise LoRAMixtureError(f"per-token weights cover {col.shape[1]} tokens, the input has {x.shape[1]}")
        return y + F.linear(F.linear(x, self.lora_A) * col, self.lora_B)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, ranks={self.ranks}"


def lora_mixture_layers(model: nn.Module) -> dict[str, LoRAMixtureLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAMixtureLinear)}


def _check_base(model: nn.Module, expert: LoRAExpertFile, allow_transfer: bool) -> None:
    fingerprint = expert.meta.get("fingerprint")
    if not fingerprint or allow_transfer:
        return  # a plain PEFT adapter carries no fingerprint: shapes are checked when patching
    from t2ray.svf import base_model_info  # lazy: the SVF package is only needed for this check

    actual = base_model_info(model).fingerprint
    if fingerprint != actual:
        raise LoRAMixtureError(
            f"LoRA expert {expert.path} was trained for base model {expert.meta.get('base_model')} "
            f"(fingerprint {fingerprint}), not this one ({actual}); pass allow_transfer=True "
            "to apply it anyway"
        )


def patch_lora_mixture(
    model: nn.Module, experts: Sequence[str | Path | LoRAExpertFile], *, allow_transfer: bool = False
) -> dict[str, LoRAMixtureLinear]:
    """Swap every module the experts adapt for a LoRAMixtureLinear holding all K experts, in place."""
    if lora_mixture_layers(model):
        raise LoRAMixtureError("model already has LoRA mixture layers; unpatch_lora_mixture first")
    files = [e if isinstance(e, LoRAExpertFile) else read_lora_expert(e) for e in experts]
    if not files:
        raise LoRAMixtureError("no LoRA experts given; pass at least one adapter folder")
    first = set(files[0].modules)
    for f in files[1:]:
        if set(f.modules) != first:
            missing, extra = sorted(first - set(f.modules)), sorted(set(f.modules) - first)
            raise LoRAMixtureError(
                f"LoRA experts {files[0].path} and {f.path} adapt different modules "
                f"(only in the first: {missing[:3]}, only in the second: {extra[:3]}); "
                "mix experts trained on the same target modules"
            )
    modules = dict(model.named_modules())
    for f in files:
        _check_base(model, f, allow_transfer)
    for name in files[0].modules:  # validate everything before changing the model
        target = modules.get(name)
        if target is None:
            raise LoRAMixtureError(f"LoRA expert {files[0].path}: module {name} does not exist in this model")
        if type(target) is not nn.Linear:
            raise LoRAMixtureError(
                f"module {name} is a {type(target).__name__}, not a plain nn.Linear; "
                "apply LoRA mixtures to an unpatched model"
            )
        for f in files:
            factors = f.modules[name]
            if factors.a.shape[1] != target.in_features or factors.b.shape[0] != target.out_features:
                raise LoRAMixtureError(
                    f"LoRA expert {f.path}: module {name} is {target.in_features} -> "
                    f"{target.out_features} here, the adapter is {factors.a.shape[1]} -> "
                    f"{factors.b.shape[0]}; it belongs to another model"
                )
    for name in files[0].modules:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRAMixtureLinear(getattr(parent, attr), [f.modules[name] for f in files]))
    model.t2ray_lora_experts = [f.name for f in files]
    return lora_mixture_layers(model)


def unpatch_lora_mixture(model: nn.Module) -> None:
    for name in lora_mixture_layers(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, getattr(parent, attr).base_layer)
    if hasattr(model, "t2ray_lora_experts"):
        del model.t2ray_lora_experts


def set_lora_weights(model: nn.Module, weights: torch.Tensor | Sequence[float] | None) -> None:
    """Mixture weights for every LoRA mixture layer: (K,), (B, K) or (B, T, K); None = the base model."""
    layers = lora_mixture_layers(model)
    if not layers:
        raise LoRAMixtureError("model has no LoRA mixture layers; call patch_lora_mixture first")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if not torch.isfinite(weights).all():
            raise LoRAMixtureError("mixture weights contain NaN/inf")
    for layer in layers.values():
        layer.set_weights(weights)
