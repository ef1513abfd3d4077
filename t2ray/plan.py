"""Capacity planner: memory per GPU of an SVF (or LoRA) training run, counted on the real code.

The model is built from its config.json on the meta device (no memory, seconds even for 70B), patched with the real
SVF layers (or PEFT's LoRA), and one real update step's forward runs there under saved-tensor hooks: what autograd
keeps for the backward is counted, not guessed, with and without activation checkpointing. The bytes are then
divided as ZeRO divides them (stage 3: weights and factors; 1+: Adam; 2+: gradients). bench/plan_vs_measured.py
checks the prediction against real runs.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PREFETCH_BUCKET = 5e7  # DeepSpeed's stage3_prefetch_bucket_size default: parameters gathered ahead of their use
MAX_LIVE = 1e9  # DeepSpeed's stage3_max_live_parameters default: gathered parameters kept before any is released

# Presets: the fields of their config.json that shape memory (Llama architecture).
PRESETS = {
    "smollm2-135m": dict(layers=30, hidden=576, mlp=1536, vocab=49152, heads=9, kv_heads=3, tied=True),
    "llama3-8b": dict(layers=32, hidden=4096, mlp=14336, vocab=128256, heads=32, kv_heads=8),
    "mistral-7b": dict(layers=32, hidden=4096, mlp=14336, vocab=32768, heads=32, kv_heads=8),
    "llama3-70b": dict(layers=80, hidden=8192, mlp=28672, vocab=128256, heads=64, kv_heads=8),
}
# Hub ids whose architecture a preset holds: planned offline when their config.json is not in the hub cache.
HUB_PRESETS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b",
    "meta-llama/Meta-Llama-3-70B-Instruct": "llama3-70b",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b",
}
REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads")


def preset_config(layers, hidden, mlp, vocab, heads, kv_heads, tied=False) -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "vocab_size": vocab,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 8192,
    }


def model_config(model: str) -> dict:
    """A preset name, a model folder, a config.json, or a hub id (its config.json: from the hub cache offline)."""
    if model in PRESETS:
        return preset_config(**PRESETS[model])
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return checked(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if path.suffix == ".json" or "/" not in model or Path(model).is_absolute() or model.startswith("."):
        raise ValueError(
            f"unknown model {model!r}: a preset ({', '.join(PRESETS)}), a model folder, a "
            "config.json, or a hub id such as meta-llama/Meta-Llama-3-8B-Instruct"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # the hub cache first; a preset's own model is planned without the network
        config = hf_hub_download(model, "config.json", local_files_only=model in HUB_PRESETS)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        if model in HUB_PRESETS:
            return preset_config(**PRESETS[HUB_PRESETS[model]])
        raise ValueError(
            f"{model}: its config.json is neither in the hub cache nor reachable ({type(err).__name__})"
            "; pass a model folder or a config.json instead"
        ) from None
    return checked(json.loads(Path(config).read_text()), model)


def checked(config: dict, source: str) -> dict:
    text = config.get("text_config", config)  # multimodal wrappers keep the LM's under text_config
    missing = [key for key in REQUIRED if not isinstance(text.get(key), int)]
    if missing:
        raise ValueError(f"{source}: not a decoder config t2ray can plan for (missing {', '.join(missing)})")
    return text


@dataclass(frozen=True)
class Run:
    """What one rank does per step, in the planner's terms."""

    gpus: int  # ranks over which ZeRO shards
    zero: int
    dtype: str = "bfloat16"
    modules: str | tuple[str, ...] = "mlp"
    layers: str | tuple[int, ...] | None = None
    method: str = "svf"
    lora_r: int = 16
    micro_batch: int = 8  # rows per update forward
    prompt_len: int = 768
    completion_len: int = 256
    rollout_rows: int = 32  # rows decoded at once on a rank (its prompts × samples per prompt)
    checkpointing: bool = True
    rollout_engine: str = "hf"
    engines: int = 0  # rollout engines on GPUs of their own (rollout.num_engines); 0: none, or one per worker
    engine_gpus: int = 1  # GPUs per engine: vLLM's tensor parallel
    applier_on: str = "device"  # where an engine rank keeps the part of W and the factors its z sync reads


@dataclass
class Plan:
    rows: dict[str, float]  # GiB per GPU
    gpu_mem_gb: float
    z_values: int
    engine_rows: dict[str, float] = field(default_factory=dict)  # GiB per GPU of a rollout engine (if on its own)
    host_gib: float = 0.0  # host memory per engine GPU (rollout.applier_on: host)

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    @property
    def engine_total(self) -> float:
        return sum(self.engine_rows.values())

    @property
    def usable(self) -> float:
        return 0.9 * self.gpu_mem_gb * 1e9 / GIB  # keep 10 % for fragmentation and the CUDA context

    @property
    def fits(self) -> bool:
        return self.total <= self.usable and self.engine_total <= self.usable

    def table(self) -> str:
        lines = ["| component | GiB per GPU |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in self.rows.items()]
        lines += [f"| **total** | **{self.total:.2f}** |"]
        if self.engine_rows:
            lines += ["| *each GPU of a rollout engine* | |"]
            lines += [f"| {k} | {v:.2f} |" for k, v in self.engine_rows.items()]
            lines += [f"| **engine total** | **{self.engine_total:.2f}** |"]
            if self.host_gib:
                lines += [f"| host memory per engine GPU (applier) | {self.host_gib:.2f} |"]
        lines += [f"| usable (90 % of {self.gpu_mem_gb:g} GB) | {self.usable:.2f} |"]
        return "\n".join(lines)


def meta_model(config: dict, run: Run):
    """The model on the meta device, adapted as training adapts it (the real SVFLinear or PEFT LoRA layers)."""
    import torch
    from transformers import AutoConfig

    from t2ray.models.placement import meta_model as base_model
    from t2ray.svf import SVFConfig, patch_model
    from t2ray.svf.decompose import Factors

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures", "_name_or_path")})
    model = base_model(hf_config, run.dtype)
    model.requires_grad_(False)  # as t2ray loads every model: only the adapter trains
    svf = SVFConfig(
        target_modules=list(run.modules) if isinstance(run.modules, tuple) else run.modules,
        layers=list(run.layers) if isinstance(run.layers, tuple) else run.layers,
    )
    if run.method == "lora":
        from peft import LoraConfig, get_peft_model

        from t2ray.svf import select_targets

        targets = select_targets(model, svf.target_modules, svf.layers)
        return get_peft_model(model, LoraConfig(r=run.lora_r, lora_alpha=2 * run.lora_r, target_modules=targets))

    def empty_factors(model, targets, dtype, fingerprint):
        modules = dict(model.named_modules())
        for name in targets:
            r = min(modules[name].out_features, modules[name].in_features)
            yield name, Factors(q=torch.empty(r, r, device="meta"), s=torch.empty(r, device="meta"))

    model.t2ray_fingerprint = "meta"  # nothing to fingerprint: no values
    patch_model(model, svf, progress=False, factors=empty_factors)
    return model


def kept_for_backward(vocab: int, weights):
    """A context that counts what autograd keeps for the backward inside it, by storage, once each, the model's own
    `weights` excluded: yields a dict that holds {"activations": bytes, "logits": bytes} when the block ends (logits:
    tensors whose last dimension is the vocabulary)."""
    import torch

    @contextlib.contextmanager
    def counting():
        own = {p.untyped_storage()._cdata for p in weights}
        saved: dict[int, tuple[int, bool]] = {}
        result: dict[str, int] = {}

        def keep(t):
            key = t.untyped_storage()._cdata
            if key not in own:
                saved[key] = (t.untyped_storage().nbytes(), t.dim() > 0 and t.shape[-1] == vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            yield result
        result["logits"] = sum(size for size, is_logits in saved.values() if is_logits)
        result["activations"] = sum(size for size, _ in saved.values()) - result["logits"]

    return counting()


@contextlib.contextmanager
def fused_attention():
    """On the meta device SDPA takes its math path and keeps the fp32 scores (B·H × T × T); the fused kernels that
    run on CPUs and GPUs keep q, k, v, the output and the softmax statistics only: count what they keep."""
    import torch

    plain = torch.nn.functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = plain


def saved_for_backward(model, run: Run, vocab: int) -> tuple[int, int]:
    """(activations, logits) bytes that one update micro-batch keeps for its backward: the real forward of the loop's
    loss (prompt + completion, the LM head on the completion only) on the meta model."""
    import torch

    from t2ray.generation import gather_logprobs
    from t2ray.models.loader import enable_activation_checkpointing

    if run.checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    rows, length, width = run.micro_batch, run.prompt_len + run.completion_len, run.completion_len
    ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
    # A prepared causal mask: meta tensors have no values for the padding checks a 2-D mask would go through.
    mask = torch.ones(rows, 1, length, length, dtype=torch.bool, device="meta").tril()
    positions = torch.arange(length, device="meta").expand(rows, -1)
    with fused_attention(), kept_for_backward(vocab, model.parameters()) as kept:
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=width + 1
        ).logits[:, :-1]
        gather_logprobs(logits, ids[:, -width:], torch.ones(rows, width, device="meta")).sum()
    return kept["activations"], kept["logits"]


def largest_layer(model) -> int:
    """Parameters of the largest decoder layer (what ZeRO-3 gathers at once for its forward)."""
    from t2ray.svf.decompose import LAYER_INDEX

    sizes: dict[int, int] = {}
    for name, p in model.named_parameters():
        found = LAYER_INDEX.search(name)
        if found:
            sizes[int(found.group(1))] = sizes.get(int(found.group(1)), 0) + p.numel()
    return max(sizes.values(), default=0)


def plan_run(model: str, run: Run, gpu_mem_gb: float) -> Plan:
    if run.gpus < 1 or run.zero not in (0, 1, 2, 3):
        raise ValueError("need gpus ≥ 1 and zero in 0..3")
    if run.rollout_engine not in ("hf", "vllm"):
        raise ValueError(f"unknown rollout engine {run.rollout_engine!r}: hf | vllm")
    config = model_config(model)
    net = meta_model(config, run)
    b = BYTES[run.dtype]
    shard3 = run.gpus if run.zero == 3 else 1
    trained = [p for p in net.parameters() if p.requires_grad]
    factors = [p for n, p in net.named_parameters() if n.endswith("svf_q")]
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad) - sum(p.numel() for p in factors)
    z = sum(p.numel() for p in trained)
    layers = config["num_hidden_layers"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * layers * kv_heads * head_dim * (run.prompt_len + run.completion_len) * run.rollout_rows * b
    activations, logits = saved_for_backward(net, run, config["vocab_size"])
    rows = {
        f"frozen weights ({run.dtype})": frozen * b / shard3 / GIB,
        "SVF factors (square U or V)": sum(p.numel() for p in factors) * b / shard3 / GIB,
        # fp32 trained values (whole on every rank), their gradient (sharded from ZeRO-2), Adam's two moments and
        # DeepSpeed's fp32 master copy (sharded from ZeRO-1)
        "trained values, gradients, Adam": z * (4 + 4 / (run.gpus if run.zero >= 2 else 1)) / GIB
        + z * 12 / (run.gpus if run.zero >= 1 else 1) / GIB,
        f"activations kept for backward ({'checkpointed' if run.checkpointing else 'all'})": activations / GIB,
        "logits and their gradient (fp32, one micro-batch)": 2 * logits / GIB,
    }
    if run.checkpointing:  # the backward recomputes one decoder layer at a time: its activations, whole
        unchecked = saved_for_backward(meta_model(config, Run(**{**run.__dict__, "checkpointing": False})), run, 0)
        rows["one layer recomputed in the backward"] = (unchecked[0] / layers) / GIB
    if run.zero == 3 and run.gpus > 1:  # gathered and kept until MAX_LIVE are, at least a layer, plus a prefetch
        # (on one GPU a partition is the whole tensor, used in place: measured on an H200, RESULTS `gpu_check`)
        live = max(largest_layer(net), min(MAX_LIVE, frozen + sum(p.numel() for p in factors)))
        rows["ZeRO-3 gathered parameters (live + prefetch)"] = (live + PREFETCH_BUCKET) * b / GIB
    plan = Plan(rows=rows, gpu_mem_gb=gpu_mem_gb, z_values=z)
    if run.engines:  # engines on GPUs of their own: the trainers' GPUs hold no rollout state
        plan.engine_rows, plan.host_gib = engine_rows(net, config, run)
    elif run.rollout_engine == "vllm":
        # a separate engine beside each trainer holds the full weights + factors (no ZeRO) and a KV cache
        rows["rollout engine (vLLM weights + factors + KV)"] = (
            (frozen + sum(p.numel() for p in factors)) * b + kv
        ) / GIB
    else:
        rows["rollout KV cache (in-process decode)"] = kv / GIB
    return plan


ENGINE_RUNTIME_GIB = 2.0  # vLLM's own per GPU: CUDA graphs, a step's activations and logits (a budget, not counted)
ROW_PARALLEL = ("o_proj", "down_proj")  # vLLM splits their input columns; every other projection its output rows


def engine_rows(net, config: dict, run: Run) -> tuple[dict[str, float], float]:
    """GiB per GPU of one tensor-parallel rollout engine (t2ray.rl.vllm_engine), and host GiB per GPU when the z
    applier lives there. A rank's z sync reads its block of W (whole W where the factor contracts the split side:
    k/v_proj and o_proj) and each adapted matrix's whole square factor."""
    b, tp = BYTES[run.dtype], run.engine_gpus
    layers = {n: m for n, m in net.named_modules() if hasattr(m, "svf_q")}
    weights = sum(p.numel() for n, p in net.named_parameters() if not n.endswith(("svf_q", "svf_p")))
    source = 0
    for name, layer in layers.items():
        m, n = layer.base_layer.weight.shape
        split_rows = not name.endswith(ROW_PARALLEL)
        along = (m >= n) == split_rows  # the split runs along the side the factor does not contract
        source += m * n // (tp if along else 1)
    factors = sum(layer.svf_q.numel() for layer in layers.values())
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rows = run.rollout_rows * run.gpus // run.engines  # the run's rollout rows, shared by the engines
    kv = 2 * config["num_hidden_layers"] * max(1, kv_heads // tp) * head_dim
    kv *= (run.prompt_len + run.completion_len) * rows * b
    applier = (source + factors) * b / GIB
    out = {
        f"weights ({run.dtype}, tensor parallel {tp})": weights * b / tp / GIB,
        f"KV cache ({rows} rows)": kv / GIB,
        "vLLM runtime (CUDA graphs, activations: a budget)": ENGINE_RUNTIME_GIB,
    }
    if run.applier_on == "host":
        return out, applier
    return {**out, "z applier: its block of W + whole square factors": applier}, 0.0


def plan(
    model: str,
    *,
    gpus: int,
    gpu_mem_gb: float,
    zero: int,
    modules: str = "mlp",
    dtype: str = "bfloat16",
    micro_batch: int = 8,
    seq_len: int = 1024,
    rollout_engine: str = "hf",
    rollout_batch: int = 32,
    checkpointing: bool = True,
) -> Plan:
    """`t2ray plan`'s command line: a sequence of `seq_len` tokens, a quarter of them completion."""
    return plan_run(
        model,
        Run(
            gpus=gpus,
            zero=zero,
            dtype=dtype,
            modules=modules,
            micro_batch=micro_batch,
            prompt_len=seq_len - seq_len // 4,
            completion_len=seq_len // 4,
            rollout_rows=rollout_batch,
            checkpointing=checkpointing,
            rollout_engine=rollout_engine,
        ),
        gpu_mem_gb,
    )


def experiment_run(cfg, prompt_len: int, completion_len: int | None = None) -> Run:
    """The Run of an experiment config (ExperimentConfig) on its scaling.num_workers GPUs."""
    from t2ray.models.loader import compute_dtype

    rl, workers = cfg.rl, cfg.scaling.num_workers
    k = rl.samples_per_prompt
    return Run(
        gpus=workers,
        zero=cfg.deepspeed.zero_stage if cfg.deepspeed.enabled else 0,
        dtype=compute_dtype(cfg.model.dtype, "cuda" if cfg.scaling.use_gpu else "cpu"),
        modules=cfg.svf.target_modules if isinstance(cfg.svf.target_modules, str) else tuple(cfg.svf.target_modules),
        layers=cfg.svf.layers if not isinstance(cfg.svf.layers, list) else tuple(cfg.svf.layers),
        method=cfg.method,
        lora_r=cfg.lora.r,
        micro_batch=max(k, rl.micro_batch_size // k * k),
        prompt_len=prompt_len,
        completion_len=completion_len or rl.max_new_tokens or 256,
        rollout_rows=rl.batch_size // workers * k,
        checkpointing=rl.activation_checkpointing,
        rollout_engine="vllm" if rl.rollout_engine == "vllm" else "hf",
        engines=cfg.rollout.num_engines if rl.rollout_engine != "hf" and cfg.scaling.use_gpu else 0,
        engine_gpus=cfg.rollout.gpus_per_engine,
        applier_on=cfg.rollout.applier_on,
    )
