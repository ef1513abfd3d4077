"""PEFT LoRA experts behind the same trainable-adapter interface as SVF (the paper's baseline)."""

from t2ray.lora.model import LORA_META_FILE, LoRAAdapter, load_lora_expert

__all__ = ["LORA_META_FILE", "LoRAAdapter", "load_lora_expert"]
