"""LoRA on the same target modules as SVF, trained by the same loop, saved as a PEFT adapter + t2ray metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from t2ray.config import LoRAConfig
from t2ray.experts import ExpertError
from t2ray.svf import SVFConfig, base_model_info, select_targets

LORA_META_FILE = "t2ray_expert.json"


class LoRAAdapter:
    method = "lora"

    def __init__(self, model: nn.Module, config: LoRAConfig, targets: SVFConfig, seed: int = 0):
        self.base_info = base_model_info(model)  # fingerprint of the untouched base weights
        names = select_targets(model, targets.target_modules, targets.layers)
        torch.manual_seed(seed)
        self.model = get_peft_model(
            model, LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names)
        )
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def reference(self):
        return self.model.disable_adapter()

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.model, state)

    def save(self, path, state, *, name, task, training, metrics) -> Path:
        folder = Path(path).with_suffix("")
        current = self.state()
        self.load_state(state)
        self.model.save_pretrained(folder)
        self.load_state(current)
        meta = {
            "kind": "t2ray-lora-expert",
            "name": name,
            "base_model": self.base_info.model_id,
            "fingerprint": self.base_info.fingerprint,
            "task": task,
            "training": training,
            "metrics": metrics,
        }
        (folder / LORA_META_FILE).write_text(json.dumps(meta, indent=2))
        return folder


def load_lora_expert(model: nn.Module, folder: str | Path, *, allow_transfer: bool = False) -> PeftModel:
    """Wrap `model` with a saved LoRA expert after checking it was trained on this base model."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / LORA_META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExpertError(f"{folder}: not a t2ray LoRA expert ({err})") from None
    fingerprint = base_model_info(model).fingerprint
    if meta.get("fingerprint") != fingerprint and not allow_transfer:
        raise ExpertError(
            f"LoRA expert {folder} was trained for base model {meta.get('base_model')} "
            f"(fingerprint {meta.get('fingerprint')}), not this one ({fingerprint}); "
            "pass --allow-transfer to apply it anyway"
        )
    peft = PeftModel.from_pretrained(model, folder)
    peft.t2ray_expert_name = meta.get("name") or folder.name  # what reports call it (the folder is always expert/)
    return peft
