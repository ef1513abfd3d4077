"""Wrap a model's target linears in SVF layers, and set z (an expert, a mixture, per-row or per-token) on them.

There is one way to apply z: ``set_z(model, {module: z})``. Training uses the layers' own parameters
(``use_trainable``); ``disabled`` gives the untouched base model (the KL reference, no second copy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from t2ray.experts import BaseModelInfo, Expert, check_expert, mix_z
from t2ray.svf.config import SVFConfig
from t2ray.svf.decompose import Factors, Gather, iter_decompose, model_fingerprint, no_gather, select_targets
from t2ray.svf.layer import SVFLinear

# Where a patch gets each target's factors, one at a time: (model, targets, svd dtype, fingerprint) -> (name, factors).
FactorSource = Callable[[nn.Module, list[str], torch.dtype, str], Iterable[tuple[str, Factors]]]


def patch_model(
    model: nn.Module,
    config: SVFConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
    gather: Gather = no_gather,
    factors: FactorSource | None = None,
    place: Callable[[SVFLinear], None] = lambda layer: None,
) -> dict[str, SVFLinear]:
    """Decompose (or load from cache) the target matrices and swap in SVFLinear layers, in place, one matrix at a
    time. `factors` replaces the local decomposition (sharded training shares one SVD per matrix among its ranks);
    `place(layer)` runs on each new layer before the next is built (ZeRO-3: partition its factor at once)."""
    config = config or SVFConfig()
    if svf_layers(model):
        raise ValueError("model is already SVF-patched")
    model.t2ray_fingerprint = getattr(model, "t2ray_fingerprint", None) or model_fingerprint(model, gather=gather)
    targets = select_targets(model, config.target_modules, config.layers)
    dtype = getattr(torch, config.svd_dtype)
    if factors is None:
        stream = iter_decompose(
            model, targets, dtype=dtype, fingerprint=model.t2ray_fingerprint, progress=progress, gather=gather
        )
    else:
        stream = factors(model, targets, dtype, model.t2ray_fingerprint)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for name, found in stream:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent,
            attr,
            build_layer(getattr(parent, attr), found, config),
        )
        place(getattr(parent, attr))
    torch.random.set_rng_state(generator_state)
    return svf_layers(model)


def build_layer(base: nn.Linear, factors: Factors, config: SVFConfig) -> SVFLinear:
    return SVFLinear(
        base,
        factors,
        max_mult=config.max_mult,
        init_mean=config.init_mean,
        init_std=config.init_std,
        mode=config.mode,
    )


def unpatch_model(model: nn.Module) -> None:
    model.__dict__.pop("t2ray_fingerprint", None)  # the weights may change before the next patch
    for name in svf_layers(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, getattr(parent, attr).base_layer)


def svf_layers(model: nn.Module) -> dict[str, SVFLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVFLinear)}


def base_model_info(model: nn.Module) -> BaseModelInfo:
    """Identity of the base model; before patching, every decoder linear counts as adaptable (no SVD needed)."""
    layers = svf_layers(model)
    if layers:
        ranks = {name: layer.rank for name, layer in layers.items()}
    else:
        modules = dict(model.named_modules())
        ranks = {name: min(modules[name].weight.shape) for name in select_targets(model, "all")}
    fingerprint = getattr(model, "t2ray_fingerprint", None) or model_fingerprint(model)
    return BaseModelInfo(model_id=model.config.name_or_path, fingerprint=fingerprint, module_ranks=ranks)


def set_z(model: nn.Module, z_by_module: dict[str, torch.Tensor] | None) -> None:
    """Apply z per module; modules not listed (or all, for None) run as the base model."""
    layers = svf_layers(model)
    unknown = set(z_by_module or ()) - set(layers)
    if unknown:
        raise ValueError(f"z given for modules that are not SVF-patched: {sorted(unknown)[:3]}")
    for name, layer in layers.items():
        z = (z_by_module or {}).get(name)
        layer.enabled = z is not None
        layer.set_z(None if z is None else z.to(layer.s.device))


def apply_experts(model: nn.Module, experts: list[Expert], alpha=None, *, allow_transfer: bool = False) -> None:
    """Patch the experts' modules if the model is not patched yet, validate, and set z' = Σ α_k z_k."""
    if not svf_layers(model):
        modules = list(dict.fromkeys(m for expert in experts for m in expert.modules))
        patch_model(model, SVFConfig(target_modules=modules), progress=False)
    info = base_model_info(model)
    for expert in experts:
        check_expert(expert, info, allow_transfer=allow_transfer)
    set_z(
        model, experts[0].z() if alpha is None and len(experts) == 1 else mix_z(experts, alpha or [1.0] * len(experts))
    )


def use_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every SVF layer on, driven by its own p; returns the trainable parameters (p only)."""
    params = []
    for layer in svf_layers(model).values():
        layer.enabled = True
        layer.set_z(None)
        params.append(layer.svf_p)
    return params


def set_mode(model: nn.Module, mode: str) -> None:
    if mode not in ("materialized", "factored"):
        raise ValueError(f"unknown SVF mode {mode!r}")
    for layer in svf_layers(model).values():
        layer.mode = mode


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current raw p per module (detached copies), e.g. to save as an expert."""
    return {name: layer.svf_p.detach().clone().cpu() for name, layer in svf_layers(model).items()}


def load_params(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy raw p into the layers (e.g. resume training from an expert)."""
    layers = svf_layers(model)
    with torch.no_grad():  # in-place copy under no_grad bumps the version, so cached W' is rebuilt
        for name, p in params.items():
            layers[name].svf_p.copy_(p)


@contextmanager
def disabled(model: nn.Module):
    """Run the untouched base model (W exactly) inside the block: the KL reference policy."""
    layers = svf_layers(model).values()
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.enabled = was
