"""SVF math (no Ray): decomposition, the SVF linear layer, and patching a model."""

from t2ray.svf.config import SVFConfig
from t2ray.svf.decompose import DecomposeError, Factors, decompose, model_fingerprint, select_targets
from t2ray.svf.layer import SVFLinear
from t2ray.svf.model import (
    apply_experts,
    base_model_info,
    disabled,
    load_params,
    patch_model,
    set_mode,
    set_z,
    svf_layers,
    trainable_params,
    unpatch_model,
    use_trainable,
)

__all__ = [
    "SVFConfig",
    "DecomposeError",
    "Factors",
    "decompose",
    "model_fingerprint",
    "select_targets",
    "SVFLinear",
    "apply_experts",
    "base_model_info",
    "disabled",
    "load_params",
    "patch_model",
    "set_mode",
    "set_z",
    "svf_layers",
    "trainable_params",
    "unpatch_model",
    "use_trainable",
]
