"""`t2ray plan --serve CONFIG`: the memory of one ExpertModel replica per GPU, from a Serve config.

The model is built from its config on the meta device (t2ray.plan's machinery), split over the replica's GPUs with
the very device map the replica computes (t2ray.models.placement), and patched as ExpertLibrary patches it (SVF layers
on the modules the experts adapt). What a replica holds is counted per GPU, by the layers that GPU holds:

- the frozen weights, in the serving dtype;
- SVF: each adapted matrix's square factor Q (and s), whatever the mode; the z cache (up to 256 mixtures) and the
  batch's z per row; `lru_size` materialised W' copies of every adapted matrix unless `batching.mode` is factored
  (a W' larger than `lru_bytes` is built and used, not kept: one copy). LoRA: every adapter's A and B per module;
- the KV cache: `max_batch_size` rows × the model's context (a prompt and its answer fit the context); where rows join
  a running batch the single-device decoder copies the whole cache, a split model's decoder one layer at a time;
  the single-device decoder's prefix cache (`prefix_cache_bytes`);
- a prefill's activations: at most `prefill_tokens_per_step` prompt tokens join per step, padded to the longest
  (up to `max_batch_size` rows × that), or one prompt of a whole context; estimated from the shapes of a decoder layer
  at a time (the residual stream, an SVF layer's temporaries and the MLP's), the attention mask and the logits.

When the experts' files exist, their modules (and LoRA ranks) are read; otherwise SVF on every layer's MLP is
assumed, as t2ray trains by default (the output says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from t2ray.plan import GIB, PRESETS, Plan, Run, meta_model, model_config
from t2ray.serve.config import ServeArgs, read_serve_config, t2ray_applications

Z_CACHE = 256  # ExpertLibrary's z_cache_size: mixtures whose z (fp32, on the layers' devices) is kept


@dataclass
class ServePlan:
    app: str
    args: ServeArgs
    dtype: str
    gpu: int  # the fullest GPU of the replica's split
    layers: list[int]  # its decoder layers
    experts: str  # what the experts were counted as
    plan: Plan
    notes: list[str] = field(default_factory=list)


def plan_serve(path: str | Path, gpu_mem_gb: float) -> list[ServePlan]:
    """One plan per t2ray application of the Serve config at `path`."""
    from t2ray.serve.app import app_args

    config = read_serve_config(path)
    return [
        plan_replica(app.get("name", "default"), ServeArgs.model_validate(app_args(app)), gpu_mem_gb)
        for app in t2ray_applications(config)
    ]


def serving_dtype(args: ServeArgs) -> tuple[str, str | None]:
    """The dtype a replica computes in, and a note when `auto` had to be decided for another machine."""
    from t2ray.models.loader import compute_dtype

    dtype, device = args.model.dtype, args.model.device
    if dtype != "auto":
        return dtype, None
    if device.startswith("cuda"):  # planned anywhere: every GPU t2ray targets (A100, H100, H200) computes bf16
        return "bfloat16", "dtype auto on a GPU: bfloat16 (native on A100/H100-class GPUs)"
    return compute_dtype("auto", "cpu"), "dtype auto on the CPU: as this machine's CPU computes it"


def expert_files(args: ServeArgs) -> list | None:
    """The experts a replica loads (those only a mixture file names included), or None when a file is missing."""
    from t2ray.library import read_library
    from t2ray.serve.app import plan as engine_plan

    try:
        engine, _ = engine_plan(args.resolved())
    except FileNotFoundError:
        return None
    paths = [*engine["experts"].values(), *([engine["classifier"]] if engine["classifier"] else [])]
    return read_library(paths) if paths else []


def plan_replica(app: str, args: ServeArgs, gpu_mem_gb: float) -> ServePlan:
    from transformers import AutoConfig

    from t2ray.kv_decode import SUPPORTED
    from t2ray.models.loader import resolve
    from t2ray.models.placement import meta_model as base_meta_model
    from t2ray.models.placement import split_model
    from t2ray.svf import svf_layers

    spec, gpus, batching = args.model.spec, args.replica_gpus, args.batching
    dtype, note = serving_dtype(args)
    notes = [note] if note else []
    config = model_config(spec if spec in PRESETS else str(resolve(spec, args.model.seed)))
    split = split_model(base_meta_model(AutoConfig.for_model(**without_names(config)), dtype), gpus)

    files = expert_files(args) if args.experts or args.classifier_expert else []
    lora = bool(files) and not hasattr(files[0], "params")
    if files is None:
        count = len(args.experts) + bool(args.classifier_expert)
        notes.append("expert files not found: planned as SVF experts on every layer's MLP (t2ray's default)")
        modules: str | tuple[str, ...] | None = "mlp"
        experts = f"{plural(count, 'SVF expert')} (assumed: mlp)"
    elif lora:
        modules, experts = None, plural(len(files), "LoRA adapter")
    else:
        modules = tuple(dict.fromkeys(m for e in files for m in e.modules)) or None
        experts = f"{plural(len(files), 'SVF expert')} on {plural(len(modules or ()), 'matrix', 'matrices')}"
    net = meta_model(config, Run(gpus=1, zero=0, dtype=dtype, modules=modules)) if modules else None

    def gpu_of(name: str) -> int:
        if gpus == 1:
            return 0
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in split.device_map:
                return split.device_map[".".join(parts[:end])]
        raise ValueError(f"{name}: not in the replica's device map")

    rows = [dict.fromkeys(ROWS, 0.0) for _ in range(gpus)]
    for g, weight_bytes in enumerate(split.weight_bytes):
        rows[g]["weights"] = weight_bytes
    layers = svf_layers(net) if net is not None else {}
    copies = materialized_copies(args, sum(_matrix_bytes(layer.base_layer.weight) for layer in layers.values()))
    z_values = sum(layer.rank for layer in layers.values())
    for name, layer in layers.items():
        g = gpu_of(name)
        rows[g]["factors"] += sum(_matrix_bytes(t) for t in (layer.svf_q, layer.s, layer.svf_p))
        rows[g]["z"] += layer.rank * 4 * (Z_CACHE + batching.max_batch_size)
        rows[g]["w_prime"] += copies * _matrix_bytes(layer.base_layer.weight)
    if lora:
        for name in files[0].modules:
            ranks = sum(f.modules[name].a.shape[0] for f in files)
            out_features, in_features = files[0].modules[name].b.shape[0], files[0].modules[name].a.shape[1]
            # A and B in the weights' dtype; per column an int64 expert index and an fp32 scale
            rows[gpu_of(name)]["factors"] += ranks * (in_features + out_features) * BYTES_OF[dtype] + ranks * 12
            z_values += ranks * (in_features + out_features)

    per_layer_kv = kv_bytes_per_token(config, dtype) * batching.max_batch_size * context(config)
    kv_decoder = gpus == 1 and config.get("model_type") in SUPPORTED
    tokens, mask, logits = prefill_shape(args, config, dtype)
    for g, held in enumerate(split.layers):
        rows[g]["kv"] = per_layer_kv * len(held)
        rows[g]["kv_merge"] = rows[g]["kv"] if kv_decoder else (per_layer_kv if held else 0)
        rows[g]["prefix_cache"] = batching.prefix_cache_bytes if kv_decoder else 0
        rows[g]["activations"] = tokens * activation_bytes_per_token(config, dtype, modules is not None) + mask
    rows[0]["activations"] += logits  # the logits come back to the embedding's GPU
    fullest = max(range(gpus), key=lambda g: sum(rows[g].values()))
    labels = row_labels(args, dtype, lora, copies, tokens)
    plan = Plan(
        rows={labels[key]: value / GIB for key, value in rows[fullest].items() if key in labels},
        gpu_mem_gb=gpu_mem_gb,
        z_values=z_values,
    )
    return ServePlan(app, args, dtype, fullest, split.layers[fullest], experts, plan, notes)


ROWS = ("weights", "factors", "z", "w_prime", "kv", "kv_merge", "prefix_cache", "activations")
BYTES_OF = {"float32": 4, "bfloat16": 2, "float16": 2}


def row_labels(args: ServeArgs, dtype: str, lora: bool, copies: int, tokens: int) -> dict[str, str]:
    batching = args.batching
    labels = {
        "weights": f"frozen weights ({dtype})",
        "factors": "LoRA adapters (A, B of each)" if lora else "SVF factors (Q per adapted matrix)",
        "kv": f"KV cache ({batching.max_batch_size} rows × the context)",
        "kv_merge": "KV copy while rows join",
        "prefix_cache": "prefix cache (prompts' shared starts)",
        "activations": f"prefill activations ({tokens} padded tokens) and logits",
    }
    if not lora:
        labels["z"] = f"z cache ({Z_CACHE} mixtures) and z per row"
        labels["w_prime"] = f"materialised W' ({copies} cop{'y' if copies == 1 else 'ies'}, mode {batching.mode})"
    return labels


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def without_names(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("architectures", "_name_or_path")}


def _matrix_bytes(t) -> int:
    return t.numel() * t.element_size()


def context(config: dict) -> int:
    return int(config.get("max_position_embeddings", 2048))  # as generation.context_length reads it


def kv_bytes_per_token(config: dict, dtype: str) -> int:
    """Keys and values of one token in one decoder layer."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * (config.get("num_key_value_heads") or heads) * head_dim * BYTES_OF[dtype]


def materialized_copies(args: ServeArgs, entry_bytes: int) -> int:
    """How many W' copies ExpertLibrary can hold at once (its LRU evicts before it builds)."""
    b = args.batching
    if b.mode == "factored" or not entry_bytes:
        return 0
    if b.lru_size == 0:
        return 1 if b.mode == "materialized" else 0  # built for the batch, kept by no one
    if b.lru_bytes is not None:
        return max(1, min(b.lru_size, b.lru_bytes // entry_bytes))  # one too large is still built and used
    return b.lru_size


def prefill_shape(args: ServeArgs, config: dict, dtype: str) -> tuple[int, int, int]:
    """(padded tokens, attention-mask bytes, logits bytes) of the largest prefill a replica runs."""
    rows, budget, ctx = args.batching.max_batch_size, args.batching.prefill_tokens_per_step, context(config)
    width = min(budget, ctx)  # rows join while their prompts fit the budget; a longer prompt comes alone
    tokens = max(rows * width, ctx)
    mask = max(rows * width * width, ctx * ctx)  # one bool per (query, key) pair and row
    logits = rows * config["vocab_size"] * (BYTES_OF[dtype] + 4)  # the last position's, and its fp32 copy
    return tokens, mask, logits


def activation_bytes_per_token(config: dict, dtype: str, svf: bool) -> int:
    """What one prefill token keeps alive inside one decoder layer at its peak (the MLP): the residual stream and
    the normed input, the gate, up and activation outputs, and an SVF layer's three hidden-wide temporaries."""
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    return (2 * hidden + 3 * mlp + (3 * hidden if svf else 0)) * BYTES_OF[dtype]
