"""Token-level routing (Belofsky 2023): router formula, train-only centroids, KV-cache decoding, per-row mixing
through SVF (factored z per row) and exact LoRA mixtures. Real tiny-llama, real MiniLM embedder, real tasks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from t2ray.adapt.embedder import get_embedder
from t2ray.adapt.token_routing import (
    LoRAMixer,
    Router,
    SVFMixer,
    generate_routed,
    greedy_decode,
    routing_text,
    routing_weights,
)
from t2ray.experts import Expert, ExpertError, mix_z
from t2ray.generation import rollout
from t2ray.svf import SVFConfig, apply_experts, patch_model, set_z, svf_layers
from t2ray.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_threads")

TASKS = ("math", "code", "reasoning")
WEIGHT_GAIN = 6.0  # tiny-llama's N(0, 0.02) init predicts one token forever; sharper weights make tokens vary


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


@pytest.fixture(scope="module")
def tasks():
    return [get_task(name) for name in TASKS]


@pytest.fixture(scope="module")
def router(tasks, embedder):
    return Router.from_tasks(tasks, embedder, examples_per_task=16)


@pytest.fixture(scope="module")
def prompts(tasks):
    return [task.messages(task.examples("test")[0]) for task in tasks]  # one unseen prompt per task


def sharpen(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(WEIGHT_GAIN)
    return model


def random_experts(model, n: int, scale: float = 1.5) -> list[Expert]:
    experts = []
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        params = {name: 0.1 + scale * torch.randn(layer.rank, generator=g) for name, layer in svf_layers(model).items()}
        experts.append(
            Expert(name=f"e{k}", params=params, base_model="tiny-llama", fingerprint=model.t2ray_fingerprint)
        )
    return experts


@pytest.fixture
def svf_model(tiny):
    sharpen(tiny)
    patch_model(tiny, SVFConfig(target_modules="mlp"), progress=False)
    return tiny


def completions(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


# ----------------------------------------------------------------------------- router


def test_routing_formula_by_hand():
    # centroids on the axes; one embedding at (0.6, 0.8, 0): cosines (0.6, 0.8, 0); the largest (0.8) times 4
    router = Router(torch.eye(3) * 2.5, temperature=4.0, embedder=object())  # centroid length must not matter
    w = router.weights_from_embeddings(torch.tensor([[0.6, 0.8, 0.0], [-3.0, 0.0, 0.0]]))
    e = [math.exp(0.6), math.exp(3.2), math.exp(0.0)]
    assert w[0].tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-6)
    # second row: cosines (-1, 0, 0); argmax is the first 0 (index 1): 0 × 4 = 0, so softmax of (-1, 0, 0)
    e = [math.exp(-1.0), 1.0, 1.0]
    assert w[1].tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-6)
    assert routing_weights(torch.tensor([[0.1, 0.5]]), 1.0).tolist()[0] == pytest.approx(
        torch.softmax(torch.tensor([0.1, 0.5]), 0).tolist()
    )


def test_router_weights_sum_to_one_and_follow_the_formula_on_real_embeddings(router, embedder, prompts):
    texts = [routing_text(p) for p in prompts] + ["Tell me about the history of Rome."]
    w = router.weights(texts)
    assert w.shape == (4, 3)
    assert torch.allclose(w.sum(1), torch.ones(4), atol=1e-6)
    emb = embedder.embed(texts)
    for row, e in zip(w, emb, strict=True):
        cos = [float(e @ c / (e.norm() * c.norm())) for c in router.centroids]
        best = max(range(3), key=lambda k: cos[k])
        cos[best] *= 4.0
        expected = [math.exp(c) / sum(math.exp(x) for x in cos) for c in cos]
        assert row.tolist() == pytest.approx(expected, abs=1e-5)
    # each task's unseen test prompt is routed to its own task's expert
    assert w[:3].argmax(1).tolist() == [0, 1, 2]


def test_centroids_use_only_train_examples(router, tasks, embedder):
    assert router.names == list(TASKS)
    for k, task in enumerate(tasks):
        used = router.sources[task.name]
        train = {ex.id: ex for ex in task.examples("train")}
        held_out = {ex.id for split in ("valid", "test") for ex in task.examples(split)}
        assert len(used) == 16 and set(used) <= set(train) and not set(used) & held_out
        by_hand = embedder.embed([routing_text(task.messages(train[i])) for i in used]).mean(0)
        assert torch.allclose(router.centroids[k], by_hand, atol=1e-5)


def test_router_rejects_bad_centroids():
    with pytest.raises(ValueError, match="centroids"):
        Router(torch.zeros(3))
    with pytest.raises(ValueError, match="non-zero"):
        Router(torch.zeros(2, 4))


# ----------------------------------------------------------------------------- SVF mixer


def test_svf_mixer_per_row_weights_equal_each_rows_own_expert(svf_model, tokenizer):
    experts = random_experts(svf_model, 3)
    batch = tokenizer(["What is 2 + 3?", "def add(a, b):", "Which is smallest?"], return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    kw = dict(input_ids=batch["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    weights = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.0, 0.7]])
    mixer = SVFMixer(svf_model, experts)
    modes = lambda: {layer.mode for layer in svf_layers(svf_model).values()}  # noqa: E731
    assert modes() == {"materialized"}  # building a mixer changes nothing
    mixer.set_weights(weights)
    assert modes() == {"factored"}
    with torch.no_grad():
        mixed = svf_model(**kw).logits
    mixer.reset()
    assert modes() == {"materialized"} and all(layer.z_override is None for layer in svf_layers(svf_model).values())
    for b, row in enumerate(weights):
        set_z(svf_model, mix_z(experts, row.tolist()))  # z' = Σ w_k z_k for this row alone (materialized W')
        with torch.no_grad():
            alone = svf_model(**kw).logits[b]
        valid = mask[b].bool()
        assert torch.allclose(mixed[b][valid], alone[valid], atol=1e-4)
    with pytest.raises(ValueError, match="weights must be"):
        mixer.set_weights(torch.ones(3, 2))


def test_svf_mixer_refuses_mismatched_experts(svf_model):
    a, b = random_experts(svf_model, 2)
    b.params.pop(next(iter(b.params)))
    with pytest.raises(ExpertError, match="cannot mix"):
        SVFMixer(svf_model, [a, b])


# ----------------------------------------------------------------------------- routed generation


def test_equal_experts_kv_cache_equals_prefix_recompute_equals_plain_generation(svf_model, tokenizer, router, prompts):
    expert = random_experts(svf_model, 1)[0]
    mixer = SVFMixer(svf_model, [expert] * 3)
    cached = generate_routed(svf_model, tokenizer, prompts, mixer, router, every=1, max_new_tokens=8)
    recomputed = generate_routed(
        svf_model, tokenizer, prompts, mixer, router, every=1, max_new_tokens=8, recompute_prefix=True
    )
    assert torch.equal(cached.completion_ids, recomputed.completion_ids)
    assert cached.texts == recomputed.texts
    assert cached.forward_tokens < recomputed.forward_tokens  # the cache runs each token once
    apply_experts(svf_model, [expert])  # plain HF generate with that expert's materialized W'
    plain = rollout(svf_model, tokenizer, prompts, max_new_tokens=8)
    assert completions(cached.completion_ids, cached.completion_mask) == completions(
        plain.completion_ids, plain.completion_mask
    )
    assert len(set(map(tuple, cached.completion_ids.tolist()))) > 1  # tokens vary: the check is not vacuous


def test_per_row_routing_and_each_row_equals_its_own_run(svf_model, tokenizer, router, prompts):
    mixer = SVFMixer(svf_model, random_experts(svf_model, 3))
    batch = generate_routed(svf_model, tokenizer, prompts, mixer, router, every=2, max_new_tokens=8)
    assert batch.weights_trace.shape == (4, 3, 3)
    assert batch.weights_trace[0].argmax(1).tolist() == [0, 1, 2]  # rows are routed differently
    for b, prompt in enumerate(prompts):
        single = generate_routed(svf_model, tokenizer, [prompt], mixer, router, every=2, max_new_tokens=8)
        assert completions(single.completion_ids, single.completion_mask) == completions(
            batch.completion_ids[b : b + 1], batch.completion_mask[b : b + 1]
        )
        assert torch.allclose(single.weights_trace[:, 0], batch.weights_trace[:, b], atol=1e-5)
    # the weights reach the model: routing all rows like row 0 changes the other rows' tokens
    fixed = Router(router.centroids[[0, 0, 0]] + torch.tensor([[0.0], [-1e-3], [-2e-3]]), embedder=router.embedder)
    other = generate_routed(svf_model, tokenizer, prompts, mixer, fixed, every=2, max_new_tokens=8)
    assert not torch.equal(other.completion_ids[1:], batch.completion_ids[1:])


@pytest.mark.parametrize("recompute", [False, True])
def test_every_k_routes_every_kth_token(svf_model, tokenizer, router, prompts, recompute):
    mixer = SVFMixer(svf_model, random_experts(svf_model, 3))
    calls = {}
    for every in (1, 2, 4):
        before = router.calls
        out = generate_routed(
            svf_model, tokenizer, prompts[:2], mixer, router, every=every, max_new_tokens=8, recompute_prefix=recompute
        )
        assert out.completion_mask.all()  # no row stopped early, so the counts are exact
        calls[every] = router.calls - before
        assert out.router_calls == calls[every] and out.route_steps == list(range(0, 8, every))
    assert calls == {1: 8, 2: 4, 4: 2}
    with pytest.raises(ValueError, match="every"):
        generate_routed(svf_model, tokenizer, prompts, mixer, router, every=0, max_new_tokens=2)


def test_greedy_decode_matches_hf_generate(tiny, tokenizer):
    sharpen(tiny)
    prompts = ["hi", "a much longer prompt that forces left padding of the short one"]
    ids, mask, _ = greedy_decode(tiny, tokenizer, prompts, max_new_tokens=6)
    plain = rollout(tiny, tokenizer, prompts, max_new_tokens=6)
    assert completions(ids, mask) == completions(plain.completion_ids, plain.completion_mask)


# ----------------------------------------------------------------------------- LoRA mixer


def save_peft_adapters(model, folder, seeds, r=4, alpha=8):
    from peft import LoraConfig, get_peft_model

    paths = []
    for seed in seeds:
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            copy.deepcopy(model),
            LoraConfig(
                r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
            ),
        )
        with torch.no_grad():  # PEFT's non-default init is small: make ΔW visible in the logits
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(20)
        path = folder / f"lora{seed}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def test_lora_mixer_is_exact_and_differs_from_pefts_linear_merge(tiny, tokenizer, tmp_path):
    from peft import PeftModel

    paths = save_peft_adapters(tiny, tmp_path, seeds=(1, 2))
    ids = tokenizer(["What is 2 + 3? Reply with a number."], return_tensors="pt")["input_ids"].repeat(2, 1)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    base = copy.deepcopy(tiny)
    mixed = copy.deepcopy(tiny)
    mixer = LoRAMixer(mixed, paths)
    # one-hot per row: row 0 = adapter 1 only, row 1 = adapter 2 only, each equal to PEFT applying that adapter
    mixer.set_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    one_hot = logits(mixed)
    for b, path in enumerate(paths):
        peft_logits = logits(PeftModel.from_pretrained(copy.deepcopy(tiny), path))
        assert torch.allclose(one_hot[b], peft_logits[b], atol=1e-5)
        assert not torch.allclose(one_hot[b], logits(base)[b], atol=1e-3)
    # (0.5, 0.5): W + 0.5 ΔW1 + 0.5 ΔW2 written into the weights by hand
    mixer.set_weights(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    half = logits(mixed)
    by_hand = copy.deepcopy(tiny)
    from t2ray.lora.layer import lora_mixture_layers

    with torch.no_grad():
        for name, layer in lora_mixture_layers(mixed).items():
            by_hand.get_submodule(name).weight += 0.5 * layer.delta_weight(0) + 0.5 * layer.delta_weight(1)
    assert torch.allclose(half, logits(by_hand), atol=1e-4)
    # PEFT's 'linear' merge of weighted adapters adds cross terms B_i A_j: a different model
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny), paths[0], adapter_name="a")
    peft_model.load_adapter(paths[1], adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], adapter_name="linear", combination_type="linear")
    peft_model.set_adapter("linear")
    assert (logits(peft_model) - half).abs().max() > 1e-2
    mixer.reset()
    assert torch.equal(logits(mixed), logits(base))


def test_routed_generation_with_lora_mixer_equals_peft_for_equal_adapters(tiny, tokenizer, router, prompts, tmp_path):
    from peft import PeftModel

    sharpen(tiny)
    path = save_peft_adapters(tiny, tmp_path, seeds=(3,))[0]
    mixed = copy.deepcopy(tiny)
    out = generate_routed(mixed, tokenizer, prompts, LoRAMixer(mixed, [path] * 3), router, every=2, max_new_tokens=6)
    peft_model = PeftModel.from_pretrained(tiny, path)
    plain = rollout(peft_model, tokenizer, prompts, max_new_tokens=6)
    assert completions(out.completion_ids, out.completion_mask) == completions(
        plain.completion_ids, plain.completion_mask
    )


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_routed_generation_on_smollm2(smollm2, router, prompts):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    patch_model(model, SVFConfig(target_modules="mlp", layers="0-3"), progress=False)
    experts = random_experts(model, 3, scale=0.05)
    mixer = SVFMixer(model, [experts[0]] * 3)
    cached = generate_routed(model, tokenizer, prompts, mixer, router, every=2, max_new_tokens=12)
    apply_experts(model, [experts[0]])
    plain = rollout(model, tokenizer, prompts, max_new_tokens=12)
    assert cached.texts == plain.texts
    mixer = SVFMixer(model, experts)
    routed = generate_routed(model, tokenizer, prompts, mixer, router, every=2, max_new_tokens=12)
    assert routed.weights_trace[0].argmax(1).tolist() == [0, 1, 2]
    assert all(isinstance(t, str) for t in routed.texts)
