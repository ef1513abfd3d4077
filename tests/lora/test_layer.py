"""The LoRA-mixture linear: reading PEFT adapter folders (safetensors + json), exact per-row / per-token mixtures,
patch / unpatch, and clear errors for folders that cannot be mixed. Real PEFT adapters saved from tiny-llama."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from t2ray.lora.layer import (
    LoRAFactors,
    LoRAMixtureError,
    LoRAMixtureLinear,
    lora_mixture_layers,
    patch_lora_mixture,
    read_lora_expert,
    set_lora_weights,
    unpatch_lora_mixture,
)
from t2ray.svf import SVFConfig, base_model_info, patch_model

pytestmark = pytest.mark.usefixtures("torch_threads")

TARGETS = ["q_proj", "down_proj"]


def save_adapter(model, folder, *, seed=0, r=4, alpha=8, targets=TARGETS, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    peft_model.save_pretrained(folder)
    return folder


def ids(tokenizer, n=2):
    return tokenizer(["The quick brown fox jumps over the lazy dog"], return_tensors="pt")["input_ids"].repeat(n, 1)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_read_adapter_folder(tiny, tmp_path):
    folder = save_adapter(tiny, tmp_path / "a", r=4, alpha=12)
    expert = read_lora_expert(folder)
    assert sorted(expert.modules) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    factors = expert.modules["model.layers.0.mlp.down_proj"]
    assert factors.a.shape == (4, 160) and factors.b.shape == (64, 4) and factors.scale == 3.0
    rs = read_lora_expert(save_adapter(tiny, tmp_path / "rs", r=4, alpha=12, use_rslora=True))
    assert rs.modules["model.layers.0.mlp.down_proj"].scale == pytest.approx(12 / math.sqrt(4))
    pattern = read_lora_expert(
        save_adapter(tiny, tmp_path / "p", r=4, alpha=8, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6})
    )
    assert pattern.modules["model.layers.1.mlp.down_proj"].a.shape[0] == 2
    assert pattern.modules["model.layers.1.mlp.down_proj"].scale == 3.0
    assert pattern.modules["model.layers.1.self_attn.q_proj"].scale == 2.0


def test_layer_math_per_row_and_per_token():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    experts = [
        LoRAFactors(torch.randn(2, 6), torch.randn(5, 2), 0.5),
        LoRAFactors(torch.randn(3, 6), torch.randn(5, 3), 2.0),
    ]
    layer = LoRAMixtureLinear(base, experts)
    x = torch.randn(2, 4, 6)
    delta = [e.scale * e.b @ e.a for e in experts]
    for k in range(2):
        assert torch.allclose(layer.delta_weight(k), delta[k])
    assert torch.equal(layer(x), base(x))  # no weights: the base layer exactly
    w = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    layer.set_weights(w)
    expected = torch.stack([base(x[b]) + x[b] @ (w[b, 0] * delta[0] + w[b, 1] * delta[1]).T for b in range(2)])
    assert torch.allclose(layer(x), expected, atol=1e-5)
    wt = torch.rand(2, 4, 2)
    layer.set_weights(wt)
    expected = torch.stack(
        [
            torch.stack(
                [base(x[b, t]) + x[b, t] @ (wt[b, t, 0] * delta[0] + wt[b, t, 1] * delta[1]).T for t in range(4)]
            )
            for b in range(2)
        ]
    )
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(LoRAMixtureError, match="per-token weights cover 3 tokens"):
        layer.set_weights(torch.rand(2, 3, 2))
        layer(x)
    with pytest.raises(LoRAMixtureError, match="K = 2"):
        layer.set_weights(torch.rand(2, 3))


def test_patch_mix_and_unpatch_on_a_model(tiny, tokenizer, tmp_path):
    from peft import PeftModel

    paths = [save_adapter(tiny, tmp_path / f"a{s}", seed=s) for s in (1, 2)]
    x = ids(tokenizer)
    base = logits(tiny, x)
    model = copy.deepcopy(tiny)
    layers = patch_lora_mixture(model, paths)
    assert len(layers) == 4 and model.t2ray_lora_experts == ["a1", "a2"]
    assert torch.equal(logits(model, x), base)  # patched but no weights set: base model
    set_lora_weights(model, [0.0, 1.0])  # (K,): the same mixture for every row
    peft = logits(PeftModel.from_pretrained(copy.deepcopy(tiny), paths[1]), x)
    assert torch.allclose(logits(model, x), peft, atol=1e-5)
    set_lora_weights(model, torch.tensor([[1.0, 0.0], [0.25, 0.75]]))
    by_hand = copy.deepcopy(tiny)
    with torch.no_grad():
        for name, layer in layers.items():
            by_hand.get_submodule(name).weight += 0.25 * layer.delta_weight(0) + 0.75 * layer.delta_weight(1)
    assert torch.allclose(logits(model, x)[1], logits(by_hand, x)[1], atol=1e-4)
    with pytest.raises(LoRAMixtureError, match="already"):
        patch_lora_mixture(model, paths)
    unpatch_lora_mixture(model)
    assert not lora_mixture_layers(model) and type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.equal(logits(model, x), base)
    with pytest.raises(LoRAMixtureError, match="no LoRA mixture layers"):
        set_lora_weights(model, [1.0, 0.0])


def test_experts_must_adapt_the_same_modules(tiny, tmp_path):
    a = save_adapter(tiny, tmp_path / "a")
    b = save_adapter(tiny, tmp_path / "b", targets=["q_proj"])
    with pytest.raises(LoRAMixtureError, match="adapt different modules"):
        patch_lora_mixture(copy.deepcopy(tiny), [a, b])
    with pytest.raises(LoRAMixtureError, match="no LoRA experts"):
        patch_lora_mixture(copy.deepcopy(tiny), [])


def test_bad_folders_are_refused_clearly(tiny, tmp_path):
    with pytest.raises(LoRAMixtureError, match="not a folder"):
        read_lora_expert(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAMixtureError, match="no adapter_config.json"):
        read_lora_expert(tmp_path / "empty")
    folder = save_adapter(tiny, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAMixtureError, match="use_dora"):
        read_lora_expert(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "down_proj.lora_A" in k)
    save_file({**tensors, key: torch.zeros(4, 99)}, folder / "adapter_model.safetensors")
    with pytest.raises(LoRAMixtureError, match="belongs to another model"):
        patch_lora_mixture(copy.deepcopy(tiny), [folder])
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
    with pytest.raises(LoRAMixtureError, match="not a LoRA A/B weight"):
        read_lora_expert(folder)
    save_file({k: v for k, v in tensors.items() if k != key}, folder / "adapter_model.safetensors")
    with pytest.raises(LoRAMixtureError, match="but not the other"):
        read_lora_expert(folder)


def test_fingerprint_of_t2ray_experts_is_checked(tiny, tmp_path):
    folder = save_adapter(tiny, tmp_path / "a")
    meta = {"kind": "t2ray-lora-expert", "name": "math-lora", "base_model": "other", "fingerprint": "0" * 24}
    (folder / "t2ray_expert.json").write_text(json.dumps(meta))
    with pytest.raises(LoRAMixtureError, match="allow_transfer"):
        patch_lora_mixture(copy.deepcopy(tiny), [folder])
    assert len(patch_lora_mixture(copy.deepcopy(tiny), [folder], allow_transfer=True)) == 4
    meta["fingerprint"] = base_model_info(tiny).fingerprint
    (folder / "t2ray_expert.json").write_text(json.dumps(meta))
    model = copy.deepcopy(tiny)
    patch_lora_mixture(model, [folder])
    assert model.t2ray_lora_experts == ["math-lora"]


def test_svf_patched_targets_are_refused(tiny, tmp_path):
    folder = save_adapter(tiny, tmp_path / "a", targets=["down_proj"])
    patch_model(tiny, SVFConfig(target_modules="mlp"), progress=False)
    with pytest.raises(LoRAMixtureError, match="not a plain nn.Linear"):
        patch_lora_mixture(tiny, [folder])


def test_the_kv_decoder_runs_lora_weights_per_row(tiny, tokenizer, tmp_path, monkeypatch):
    """The KV decode step calls the model's own modules: a LoRA mixture per row decodes as in Hugging Face's loop."""
    from t2ray.generation import rollout

    model = copy.deepcopy(tiny)
    patch_lora_mixture(model, [save_adapter(tiny, tmp_path / f"a{s}", seed=s) for s in (1, 2)])
    set_lora_weights(model, torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 1.0]]))
    prompts = ["hi", "a longer prompt to pad", "third"]
    runs = {}
    for loop in ("hf", "kv"):
        monkeypatch.setenv("T2RAY_DECODE", loop)
        runs[loop] = rollout(model, tokenizer, prompts, max_new_tokens=10, ignore_eos=True).completion_ids
    assert torch.equal(runs["hf"], runs["kv"])
    set_lora_weights(model, None)
    assert not torch.equal(
        rollout(model, tokenizer, prompts, max_new_tokens=10, ignore_eos=True).completion_ids, runs["kv"]
    )
