"""What the RL loop trains, behind one small interface: SVF z-vectors (LoRA lives in t2ray/lora)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from t2ray.experts import Expert, save_expert
from t2ray.svf import SVFConfig, base_model_info, disabled, load_params, patch_model, trainable_params, use_trainable
from t2ray.svf.decompose import no_gather


class TrainableAdapter(Protocol):
    method: str
    model: nn.Module  # what to run (PEFT wraps the base model)

    def parameters(self) -> list[nn.Parameter]: ...
    def reference(self) -> AbstractContextManager: ...  # the frozen base model, for the KL term
    def state(self) -> dict[str, torch.Tensor]: ...  # small, CPU tensors: checkpoints and best-so-far
    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def save(
        self, path: Path, state: dict[str, torch.Tensor], *, name: str, task: str, training: dict, metrics: dict
    ) -> Path: ...


class SVFAdapter:
    method = "svf"

    def __init__(
        self, model: nn.Module, config: SVFConfig, seed: int = 0, progress: bool = True, gather=no_gather, **patch
    ):
        self.model = model
        patch_model(model, config, seed=seed, progress=progress, gather=gather, **patch)
        self.max_mult = config.max_mult
        self._params = use_trainable(model)

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def reference(self):
        return disabled(self.model)

    def state(self) -> dict[str, torch.Tensor]:
        return trainable_params(self.model)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        load_params(self.model, state)

    def save(self, path, state, *, name, task, training, metrics) -> Path:
        info = base_model_info(self.model)
        expert = Expert(
            name=name,
            params=state,
            base_model=info.model_id,
            fingerprint=info.fingerprint,
            max_mult=self.max_mult,
            task=task,
            training=training,
            metrics=metrics,
        )
        return save_expert(expert, Path(path).with_suffix(".safetensors"))
