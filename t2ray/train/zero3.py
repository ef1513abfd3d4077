"""ZeRO-3 glue: SVF layers read their base weight directly, so ZeRO must gather it for their forward too."""

from __future__ import annotations

from torch import nn


def register_svf_external_params(model: nn.Module) -> None:
    import deepspeed

    from t2ray.svf import svf_layers

    for layer in svf_layers(model).values():
        deepspeed.zero.register_external_parameter(layer, layer.base_layer.weight)
