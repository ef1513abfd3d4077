"""t2ray.models.load_model: every spec kind, dtypes, the tokenizer's padding, user-facing errors."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from t2ray.models import MODEL_ALIASES, ModelError, cache_root, compute_dtype, load_model, load_tokenizer


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ids_for(tokenizer, text="The quick brown fox jumps over the lazy dog."):
    return tokenizer([text], return_tensors="pt")["input_ids"]


def test_unknown_spec_names_the_valid_ones():
    with pytest.raises(ModelError) as err:
        load_model("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message and all(alias in message for alias in MODEL_ALIASES)
    assert "\n" not in message


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype_is_refused():
    with pytest.raises(ModelError, match="unknown dtype 'float8'.*float32.*bfloat16"):
        load_model("tiny-llama", dtype="float8")


def test_tiny_llama_is_seeded_frozen_and_in_eval(make_tiny, tiny):
    a, b = make_tiny(seed=0), make_tiny(seed=1)
    assert torch.equal(a.model.layers[0].mlp.gate_proj.weight, tiny.model.layers[0].mlp.gate_proj.weight)
    assert not torch.equal(a.model.layers[0].mlp.gate_proj.weight, b.model.layers[0].mlp.gate_proj.weight)
    assert not a.training
    assert all(not p.requires_grad for p in a.parameters())
    assert a.config.name_or_path == "tiny-llama"
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64


def test_tokenizer_is_left_padded_with_a_pad_token(tiny_base):
    model, tok = tiny_base
    assert tok.padding_side == "left"
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert len(tok) == model.config.vocab_size
    batch = tok(["Hi", "A much longer prompt than the first"], return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert (batch["input_ids"][0][mask[0] == 0] == tok.pad_token_id).all()


def test_load_tokenizer_alone_matches(tokenizer):
    tok = load_tokenizer("tiny-llama")
    assert tok.padding_side == "left" and tok.pad_token_id == tokenizer.pad_token_id
    assert tok("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_saved_folder_loads_with_equal_logits(tiny_base, tmp_path):
    model, tok = tiny_base
    folder = tmp_path / "tiny-saved"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded, loaded_tok = load_model(str(folder), dtype="float32")
    ids = ids_for(tok)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token_id == tok.pad_token_id
    assert loaded.config.name_or_path == str(folder)
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())


def test_bfloat16_load(tiny_base):
    model16, _ = load_model("tiny-llama", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    ids = ids_for(tiny_base[1])
    out16 = logits(model16, ids)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()
    ref = logits(tiny_base[0], ids)
    assert (out16.float() - ref).abs().max() < 0.05  # same seed, same weights up to bf16 rounding


def test_float16_load_from_folder(tiny_base, tmp_path):
    model, tok = tiny_base
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype="float16")
    assert all(p.dtype == torch.float16 for p in loaded.parameters())


def test_cache_root_follows_env(t2ray_cache):
    assert cache_root() == t2ray_cache


def test_unreachable_hub_id_is_a_model_error():
    with pytest.raises(ModelError, match="cannot load model"):
        load_model("t2ray-no-such-org/no-such-model")  # HF_HUB_OFFLINE=1: never cached


def test_folder_without_weights_is_a_model_error(tiny_base, tmp_path):
    model, tok = tiny_base
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2_loads(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (30, 576, 1536, 49152)
    assert cfg.name_or_path == "smollm2-135m"
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert tok.padding_side == "left" and model.generation_config.pad_token_id == tok.pad_token_id
    # a real instruct model: a clear continuation gets a confident next token
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    top = logits(model, ids)[0, -1].argmax()
    assert "Paris" in tok.decode(top)


@pytest.mark.slow
def test_smollm2_bfloat16(smollm2):
    model16, tok = load_model("smollm2-135m", dtype="bfloat16")
    assert next(model16.parameters()).dtype == torch.bfloat16
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    out16, ref = logits(model16, ids)[0, -1].float(), logits(smollm2[0], ids)[0, -1]
    assert out16.argmax() == ref.argmax()


def test_auto_dtype_is_bf16_only_where_computed_natively(monkeypatch):
    from t2ray.models import loader

    assert compute_dtype("float32") == "float32" and compute_dtype("bfloat16") == "bfloat16"
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(loader, "native_bf16", lambda device="cpu", native=native: native)
        assert compute_dtype("auto") == expected
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        compute_dtype("fp8")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="ATEN_CPU_CAPABILITY=avx2 is an x86 capability")
def test_auto_dtype_follows_torch_told_to_run_avx2_kernels():
    """ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU's kernels, or a user's choice): bf16 would be emulated, so auto is
    fp32 even on a CPU with AVX512-BF16."""
    code = "import torch, t2ray.models as m; print(torch.backends.cpu.get_cpu_capability(), m.compute_dtype())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "float32"]


def test_auto_load_uses_the_compute_dtype(t2ray_cache):
    model, _ = load_model("tiny-llama", dtype="auto")
    assert model.dtype == {"bfloat16": torch.bfloat16, "float32": torch.float32}[compute_dtype("auto")]
