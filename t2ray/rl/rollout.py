"""Rollout engines behind one interface, and the z-only weight sync (SPEC §3).

After each optimizer step the trainer sends an engine only z (a few hundred KB even for 70B), never weights:
an engine that holds W and the square factors rebuilds W' = c · W V diag(z) Vᵀ (or c · U diag(z) Uᵀ W) itself.

* ``InProcessEngine``: generates with the training model (HF generate; CPU and GPU; the default).
* ``ReplicaEngine``: a separate copy of the model that applies synced z into its own weights in place — the
  CPU twin of the vLLM engine, and what a Ray actor runs. ``VLLMEngine`` does the same inside vLLM (GPU extra).
"""
from __future__ import annotations

import json
from typing import Protocol, Sequence

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from t2ray.generation import Messages, Rollouts, rollout
from t2ray.svf import SVFConfig, patch_model, svf_layers
from t2ray.svf.layer import adapted_weight


class ZSyncError(ValueError):
    """A z-sync message that is malformed or does not fit the receiving engine."""


def encode_z(z: dict[str, torch.Tensor], version: int) -> bytes:
    """The whole sync message: z per module (float32) + a version, as safetensors bytes (no pickle)."""
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in z.items()}
    return save_bytes(tensors, metadata={"t2ray_z_version": json.dumps(version)})


def decode_z(message: bytes) -> tuple[int, dict[str, torch.Tensor]]:
    try:
        tensors = load_bytes(message)
        header_len = int.from_bytes(message[:8], "little")
        meta = json.loads(message[8:8 + header_len]).get("__metadata__", {})
        version = json.loads(meta["t2ray_z_version"])
    except Exception as err:  # noqa: BLE001 — any malformed bytes are one error to the caller
        raise ZSyncError(f"malformed z-sync message: {err}") from None
    bad = [n for n, t in tensors.items() if t.dim() != 1 or not torch.isfinite(t).all()]
    if bad:
        raise ZSyncError(f"z for {bad[0]} is not a finite 1-D vector")
    return int(version), tensors


def current_z(model) -> dict[str, torch.Tensor]:
    return {name: layer.z().detach() for name, layer in svf_layers(model).items()}


class RolloutEngine(Protocol):
    def sync(self, z: dict[str, torch.Tensor], version: int) -> int: ...   # returns bytes sent
    def generate(self, prompts: Sequence[Messages | str], *, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> Rollouts: ...


class InProcessEngine:
    """Generate with the training model itself: nothing to sync."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def sync(self, z, version) -> int:
        return 0

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed) -> Rollouts:
        return rollout(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed)


class ZApplier:
    """Holds W and the square factor of every adapted matrix of an engine's model and writes W' in place."""

    def __init__(self, weights: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.weights = weights                                  # the engine's live weight tensors
        self.originals = {n: w.detach().clone() for n, w in weights.items()}
        self.factors = factors                                  # name -> (q, s)
        self.version = -1

    def apply(self, message: bytes) -> int:
        version, z = decode_z(message)
        unknown = set(z) - set(self.weights)
        if unknown:
            raise ZSyncError(f"z for modules this engine does not adapt: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for name, zi in z.items():
                w, (q, s) = self.originals[name], self.factors[name]
                if zi.numel() != s.numel():
                    raise ZSyncError(f"z for {name} has {zi.numel()} values, expected {s.numel()}")
                self.weights[name].copy_(adapted_weight(w, q, s, zi.to(s.device)))
        self.version = version
        return len(message)


class ReplicaEngine:
    """A separate HF model that receives only z (the CPU twin of the vLLM engine; runs inside a Ray actor)."""

    def __init__(self, model_spec: str, svf: SVFConfig | dict, dtype: str = "auto"):
        from t2ray.models import load_model

        self.model, self.tokenizer = load_model(model_spec, dtype=dtype)
        config = svf if isinstance(svf, SVFConfig) else SVFConfig.model_validate(svf)
        layers = patch_model(self.model, config, progress=False)  # the factors come from the shared SVD cache
        self.applier = ZApplier({n: layer.base_layer.weight for n, layer in layers.items()},
                                {n: (layer.svf_q.detach(), layer.s) for n, layer in layers.items()})
        for layer in layers.values():
            layer.enabled = False  # the weights themselves hold W' after each sync

    def receive(self, message: bytes) -> int:
        return self.applier.apply(message)

    @property
    def version(self) -> int:
        return self.applier.version

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed) -> Rollouts:
        return rollout(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=seed)


class VLLMEngine:
    """vLLM generation (GPU extra): same z-only sync, applied to vLLM's own weight tensors."""

    def __init__(self, model_path: str, svf: SVFConfig | dict, gpu_memory_utilization: float = 0.4,
                 dtype: str = "bfloat16"):
        try:
            from vllm import LLM
        except ImportError as err:  # pragma: no cover - GPU extra
            raise RuntimeError("the vLLM engine needs `pip install t2ray[vllm]` and a CUDA GPU") from err
        from t2ray.models import load_model, resolve

        self.llm = LLM(model=str(resolve(model_path)), gpu_memory_utilization=gpu_memory_utilization,
                       enforce_eager=True, dtype=dtype)
        twin, self.tokenizer = load_model(model_path)  # CPU copy only to read the factors from the SVD cache
        config = svf if isinstance(svf, SVFConfig) else SVFConfig.model_validate(svf)
        self.layers = {n: (layer.svf_q.detach(), layer.s) for n, layer in patch_model(twin, config).items()}
        self.version = -1

    def receive(self, message: bytes) -> int:  # pragma: no cover - needs a GPU
        factors = self.layers

        def apply(model):
            params = dict(model.named_parameters())
            # vLLM fuses gate/up into gate_up_proj; the unfused names map to row blocks of it.
            weights = {n: unfused_view(params, n) for n in factors}
            return ZApplier(weights, {n: (q.cuda(), s.cuda()) for n, (q, s) in factors.items()}).apply(message)

        self.llm.apply_model(apply)
        self.version, _ = decode_z(message)
        return len(message)

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed) -> Rollouts:  # pragma: no cover
        from vllm import SamplingParams

        from t2ray.generation import completion_mask, render

        texts = [render(self.tokenizer, p) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        outs = self.llm.generate(texts,
                                 SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                                seed=seed))
        ids = [list(o.outputs[0].token_ids) for o in outs]
        width = max(1, max(map(len, ids)))
        pad = self.tokenizer.pad_token_id
        completion = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        mask = mask * completion_mask(completion, {self.tokenizer.eos_token_id})
        return Rollouts(batch["input_ids"], batch["attention_mask"], completion, mask,
                        [o.outputs[0].text for o in outs])


def unfused_view(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:  # pragma: no cover - vLLM layout
    """The rows of vLLM's fused weights that hold HF module `name` (gate/up -> gate_up_proj, q/k/v -> qkv_proj)."""
    if name + ".weight" in params:
        return params[name + ".weight"]
    prefix, _, leaf = name.rpartition(".")
    fused = {"gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2)}
    if leaf not in fused:
        raise ZSyncError(f"no vLLM weight for {name}")
    fused_name, index, parts = fused[leaf]
    weight = params[f"{prefix}.{fused_name}.weight"]
    rows = weight.shape[0] // parts
    return weight[index * rows:(index + 1) * rows]
