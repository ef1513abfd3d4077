"""Capacity planner: memory per GPU for SVF training (weights, factors, activations, rollout engine)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    mlp: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False  # input and output embeddings share one matrix
    head_size: int | None = None  # when the config gives it (else hidden ÷ heads)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @classmethod
    def from_config(cls, config: dict, source: str) -> Architecture:
        """A Hugging Face decoder config (Llama, Mistral, Qwen, SmolLM…: the names those configs use)."""
        config = config.get("text_config", config)  # multimodal wrappers keep the LM's under text_config
        names = {
            "layers": "num_hidden_layers",
            "hidden": "hidden_size",
            "mlp": "intermediate_size",
            "vocab": "vocab_size",
            "heads": "num_attention_heads",
        }
        missing = [key for key in names.values() if not isinstance(config.get(key), int)]
        if missing:
            raise ValueError(f"{source}: not a decoder config t2ray can plan for (missing {', '.join(missing)})")
        values = {field: config[key] for field, key in names.items()}
        return cls(
            **values,
            kv_heads=config.get("num_key_value_heads") or values["heads"],
            tied=bool(config.get("tie_word_embeddings", False)),
            head_size=config.get("head_dim"),
        )

    def linear_shapes(self, modules: str) -> list[tuple[int, int]]:
        """(out, in) of the adapted matrices in one layer."""
        kv = self.kv_heads * self.head_dim
        mlp = [(self.mlp, self.hidden), (self.mlp, self.hidden), (self.hidden, self.mlp)]
        attn = [(self.hidden, self.hidden), (kv, self.hidden), (kv, self.hidden), (self.hidden, self.hidden)]
        return {"mlp": mlp, "attn": attn, "all": mlp + attn}[modules]

    @property
    def params(self) -> int:
        per_layer = sum(m * n for m, n in self.linear_shapes("all")) + 2 * self.hidden
        return self.layers * per_layer + (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden


PRESETS = {
    "smollm2-135m": Architecture(30, 576, 1536, 49152, 9, 3),
    "llama3-8b": Architecture(32, 4096, 14336, 128256, 32, 8),
    "mistral-7b": Architecture(32, 4096, 14336, 32768, 32, 8),
    "llama3-70b": Architecture(80, 8192, 28672, 128256, 64, 8),
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def architecture(model: str) -> Architecture:
    """A preset name, a model folder, a config.json, or a hub id (its config.json: from the hub cache offline)."""
    import json
    from pathlib import Path

    if model in PRESETS:
        return PRESETS[model]
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return Architecture.from_config(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if path.suffix == ".json" or "/" not in model or Path(model).is_absolute() or model.startswith("."):
        raise ValueError(
            f"unknown model {model!r}: a preset ({', '.join(PRESETS)}), a model folder, a "
            "config.json, or a hub id such as meta-llama/Meta-Llama-3-8B-Instruct"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        config = hf_hub_download(model, "config.json")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ValueError(
            f"{model}: its config.json is neither in the hub cache nor reachable ({type(err).__name__})"
            "; pass a model folder or a config.json instead"
        ) from None
    return Architecture.from_config(json.loads(Path(config).read_text()), model)


@dataclass
class Plan:
    rows: dict[str, float]  # GiB per GPU
    gpu_mem_gb: float
    z_values: int

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.gpu_mem_gb * 1e9 / GIB  # keep 10 % for fragmentation and CUDA context

    def table(self) -> str:
        lines = ["| component | GiB per GPU |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in self.rows.items()]
        lines += [
            f"| **total** | **{self.total:.2f}** |",
            f"| usable (90 % of {self.gpu_mem_gb:g} GB) | {0.9 * self.gpu_mem_gb * 1e9 / GIB:.2f} |",
        ]
        return "\n".join(lines)


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
) -> Plan:
    if gpus < 1 or zero not in (0, 1, 2, 3):
        raise ValueError("need gpus ≥ 1 and zero in 0..3")
    arch, b = architecture(model), BYTES[dtype]
    shard = gpus if zero == 3 else 1
    ranks = [min(m, n) for m, n in arch.linear_shapes(modules)] * arch.layers
    z = sum(ranks)
    rows = {
        "frozen weights": arch.params * b / shard / GIB,
        "SVF factors (square U or V)": sum(r * r for r in ranks) * b / shard / GIB,
        # z in fp32 + Adam moments (2×) + gradient; sharded from ZeRO-1 on
        "z, gradients, Adam state": z * 4 * 4 / (gpus if zero >= 1 else 1) / GIB,
        # checkpointed activations: one hidden state per layer per token, plus one layer's MLP working set
        "activations (checkpointed)": micro_batch * seq_len * (arch.layers * arch.hidden + 4 * arch.mlp) * b / GIB,
        "logits (fp32, one micro-batch)": micro_batch * seq_len * arch.vocab * 4 / GIB,
    }
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * seq_len * rollout_batch * b
    if rollout_engine == "vllm":
        # a separate engine holds the full weights + factors (no ZeRO) and a KV cache for the rollout batch
        rows["rollout engine (vLLM weights + factors + KV)"] = (
            arch.params * b + sum(r * r for r in ranks) * b + kv
        ) / GIB
    elif rollout_engine == "hf":
        rows["rollout KV cache (HF generate)"] = kv / GIB
    else:
        raise ValueError(f"unknown rollout engine {rollout_engine!r}: hf | vllm")
    return Plan(rows=rows, gpu_mem_gb=gpu_mem_gb, z_values=z)
