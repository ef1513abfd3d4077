"""The KV decode step (t2ray/kv_decode.py) against Hugging Face's loop (T2RAY_DECODE=hf), token for token, on every
adapter path that runs inside it."""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from t2ray.generation import on_live_rows, rollout
from t2ray.kv_decode import unsupported_reason
from t2ray.svf import patch_model, set_mode, set_z, svf_layers

PROMPTS = ["hi", "a longer prompt, padded on the left of the short ones", "third one", "x y z"]


def both_loops(monkeypatch, run):
    """(Hugging Face's loop, the KV decoder) of the same call."""
    monkeypatch.setenv("T2RAY_DECODE", "hf")
    reference = run()
    monkeypatch.setenv("T2RAY_DECODE", "kv")
    return reference, run()


def test_the_base_model_decodes_as_hugging_faces_loop(varied, tokenizer, monkeypatch):
    assert unsupported_reason(varied) is None
    hf, kv = both_loops(monkeypatch, lambda: rollout(varied, tokenizer, PROMPTS, max_new_tokens=12, ignore_eos=True))
    assert torch.equal(hf.completion_ids, kv.completion_ids)
    from t2ray.kv_decode import retain_heap

    assert retain_heap.cache_info().currsize == 1  # making a decoder kept the heap (test_the_decoder_keeps_freed…)


def test_svf_materialised_and_one_z_per_row_with_rows_retiring(varied, tokenizer, monkeypatch):
    patch_model(varied, progress=False)
    z = {name: 1 + 0.5 * torch.randn(len(PROMPTS), layer.rank) for name, layer in svf_layers(varied).items()}
    set_z(varied, {name: t[1] for name, t in z.items()})
    set_mode(varied, "materialized")
    hf, kv = both_loops(monkeypatch, lambda: rollout(varied, tokenizer, PROMPTS, max_new_tokens=12, ignore_eos=True))
    assert torch.equal(hf.completion_ids, kv.completion_ids)

    set_mode(varied, "factored")

    def per_row(**options):
        hook = on_live_rows(lambda live: set_z(varied, {m: t[live] for m, t in z.items()}))
        return rollout(varied, tokenizer, PROMPTS, max_new_tokens=8, before_step=hook, **options)

    free = per_row(ignore_eos=True)
    varied.generation_config.eos_token_id = [int(free.completion_ids[0, 1]), int(free.completion_ids[2, 2])]

    hf, kv = both_loops(monkeypatch, per_row)
    from t2ray.kv_decode import _FACTORS

    # a z per row: each layer's W in Q's basis packed (the rescaled form: two products, not three)
    assert all("wq" in _FACTORS[layer] for layer in svf_layers(varied).values())
    assert any("xq" in factors for factors in _FACTORS.values())  # gate's and up's x·Q as one GEMM
    lengths = kv.completion_mask.sum(1)
    assert int(lengths.min()) < int(lengths.max())  # rows retired mid-way
    assert torch.equal(hf.completion_ids, kv.completion_ids) and torch.equal(hf.completion_mask, kv.completion_mask)


def test_svf_layers_off_decode_on_packed_base_weights_kept_beside_w_prime(varied, tokenizer, monkeypatch):
    """A server's base-model batches switch the SVF layers off (set_z None): their W is packed like a plain layer's
    (it ran unpacked, slower than an expert's W'), under the nn.Linear that owns it, so switching to an expert's W'
    and back packs nothing again."""
    from t2ray.kv_decode import _PACKED, PACK

    patch_model(varied, progress=False)
    set_mode(varied, "materialized")
    layers = svf_layers(varied).values()

    def decode(z):
        set_z(varied, z)
        return rollout(varied, tokenizer, PROMPTS, max_new_tokens=8, ignore_eos=True).completion_ids

    hf, kv = both_loops(monkeypatch, lambda: decode(None))
    assert torch.equal(hf, kv)

    def packed(key_of):  # the packed copies (gate's and up's stacked under gate) holding each layer's weight
        return [
            p for p in list(_PACKED.values()) if any(ref() is key_of(layer) for layer in layers for ref, _ in p.sources)
        ]

    base = packed(lambda layer: layer.base_layer.weight)
    assert PACK and {ref() for p in base for ref, _ in p.sources} == {layer.base_layer.weight for layer in layers}
    decode({name: 1 + 0.5 * torch.randn(layer.rank) for name, layer in svf_layers(varied).items()})  # an expert: W'
    assert len(packed(lambda layer: layer._weight_cache[1])) == len(base)  # W' packed too
    assert torch.equal(decode(None), kv)
    again = packed(lambda layer: layer.base_layer.weight)
    assert len(again) == len(base) and all(a is b for a, b in zip(again, base, strict=True))  # not packed again


def test_what_outlives_the_inference_mode_step_is_an_ordinary_tensor(varied, tokenizer):
    """The step's layers run in inference mode; its logits (callers scale them in place), an SVF layer's cached W'
    (autograd saves it when a later forward needs gradients) and the KV cache stay ordinary tensors."""
    from t2ray.kv_decode import KVDecoder

    patch_model(varied, progress=False)
    set_mode(varied, "materialized")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    decoder = KVDecoder(varied, len(PROMPTS), batch["input_ids"].shape[1] + 2)
    with torch.no_grad():
        logits = decoder.prefill(batch["input_ids"], batch["attention_mask"])
        logits = decoder.step(logits.argmax(-1), batch["attention_mask"].sum(1, keepdim=True))
    logits.div_(0.7)
    cached = [layer._weight_cache[1] for layer in svf_layers(varied).values()]
    assert cached and not any(t.is_inference() for t in [*cached, decoder.keys, decoder.values])
    x = torch.randn(2, cached[0].shape[1], requires_grad=True)
    torch.nn.functional.linear(x, cached[0]).sum().backward()  # autograd may save W' for backward
    assert x.grad is not None


def test_shared_prompts_sample_as_hugging_faces_loop(varied, tokenizer, monkeypatch):
    """k samples per prompt: each prompt prefilled once, its cache copied to its k rows; same seed, same tokens."""
    prompts = [p for p in PROMPTS[:2] for _ in range(3)]

    def sampled():
        return rollout(varied, tokenizer, prompts, max_new_tokens=10, temperature=1.0, seed=3, samples_per_prompt=3)

    hf, kv = both_loops(monkeypatch, sampled)
    assert torch.equal(hf.completion_ids, kv.completion_ids)
    assert len({tuple(row.tolist()) for row in kv.completion_ids[:3]}) > 1  # the k rows of one prompt differ


def test_other_architectures_and_the_switch_fall_back_with_a_reason(varied, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from t2ray.kv_decode import HFDecoder, new_decoder

    qwen = AutoModelForCausalLM.from_config(
        Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    )
    assert "qwen2" in unsupported_reason(qwen)
    with caplog.at_level("WARNING", logger="t2ray"):
        assert isinstance(new_decoder(qwen, 2, 8), HFDecoder) and isinstance(new_decoder(qwen, 2, 8), HFDecoder)
    said = [r.getMessage() for r in caplog.records if "Hugging Face's forward step" in r.getMessage()]
    assert len(said) == 1 and "qwen2" in said[0]  # once per reason, not once per batch
    varied.lm_head.weight.ds_id = 3  # how DeepSpeed ZeRO-3 marks a weight it partitions (on one rank too)
    assert "ZeRO-3" in unsupported_reason(varied)
    del varied.lm_head.weight.ds_id
    monkeypatch.setenv("T2RAY_DECODE", "hf")
    assert unsupported_reason(varied) == "T2RAY_DECODE=hf"


def test_a_model_split_over_devices_steps_through_hugging_faces_forward(varied, caplog):
    """A replica over several GPUs holds its layers on several devices: the one-tensor cache cannot, so Hugging
    Face's forward steps it (accelerate's hooks move the activations); the reason is said once."""
    from t2ray.kv_decode import HFDecoder, input_device, new_decoder

    varied.model.layers[1].to("meta")  # a second device, as the second GPU of a split holds the later layers
    assert unsupported_reason(varied) == "the model is split over 2 devices (cpu, meta)"
    with caplog.at_level("WARNING", logger="t2ray"):
        assert isinstance(new_decoder(varied, 2, 8), HFDecoder) and isinstance(new_decoder(varied, 2, 8), HFDecoder)
    said = [r.getMessage() for r in caplog.records if "split over 2 devices" in r.getMessage()]
    assert len(said) == 1
    assert input_device(varied) == varied.model.embed_tokens.weight.device  # where its input ids go


@pytest.mark.slow
def test_smollm2_fp32_is_token_for_token(smollm2, monkeypatch):
    """32 prompts × 64 tokens: fp32 identical to Hugging Face's loop."""
    model, tokenizer = smollm2
    prompts = math_prompts(32)
    hf, kv = both_loops(monkeypatch, lambda: rollout(model, tokenizer, prompts, max_new_tokens=64, ignore_eos=True))
    assert torch.equal(hf.completion_ids, kv.completion_ids)


def math_prompts(n: int) -> list:
    from t2ray.tasks import get_task

    task = get_task("math")
    return [task.messages(ex) for ex in task.examples("test")[:n]]


@torch.inference_mode()
def teacher_forced(reference, *decoders):
    """Each decoder's logits at each completion position, every decoder fed the reference's tokens: one early
    difference does not turn every later position of a free-running row into a mismatch."""
    ids, mask, tokens = reference.prompt_ids, reference.prompt_mask, reference.completion_ids
    logits = [decoder.prefill(ids, mask) for decoder in decoders]
    position = mask.sum(1, keepdim=True)
    for t in range(tokens.shape[1]):
        yield logits
        if t + 1 < tokens.shape[1]:
            logits = [decoder.step(tokens[:, t], position) for decoder in decoders]
            position = position + 1


@pytest.mark.slow
@pytest.mark.parametrize("path", ["base", "materialised", "z per row", "base, unpacked"])
def test_smollm2_in_bf16_stays_as_close_to_fp32_as_hugging_faces_bf16(smollm2, monkeypatch, path):
    """bf16 (what auto picks on bf16 hardware) on each path of the step, fed fp32's greedy tokens (32 prompts × 32):
    the KV decoder picks fp32's next token at ≥ 95 % of positions and about as often as Hugging Face's bf16 loop (the
    packed AMX GEMMs round in their own order: ±1 point on a Xeon), and its distributions stay as close to fp32's (a
    bf16 path that loses precision shows there first: rounding the down projections' input to fp8 made the KL 2.5×
    and moved the picks by 0.4 points)."""
    from t2ray import kv_decode
    from t2ray.kv_decode import HFDecoder, KVDecoder
    from t2ray.svf import SVFConfig

    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    prompts = math_prompts(32)
    z = None
    if path in ("materialised", "z per row"):
        per_row = path == "z per row"
        config = SVFConfig(target_modules="mlp", layers="0-5", mode="factored") if per_row else SVFConfig()
        patch_model(model, config, progress=False)
        g, shape = torch.Generator().manual_seed(0), (len(prompts),) if per_row else ()
        z = {name: 0.9 + 0.2 * torch.rand(*shape, layer.rank, generator=g) for name, layer in svf_layers(model).items()}
        set_z(model, z)
    monkeypatch.setenv("T2RAY_DECODE", "hf")
    reference = rollout(model, tokenizer, prompts, max_new_tokens=32, ignore_eos=True)
    half = copy.deepcopy(model).to(torch.bfloat16)
    if z is not None:
        set_z(half, z)  # z stays fp32, as a loaded expert's
    monkeypatch.setattr(kv_decode, "PACK", path != "base, unpacked")
    capacity = reference.prompt_ids.shape[1] + 32
    decoders = KVDecoder(model, len(prompts), capacity), KVDecoder(half, len(prompts), capacity), HFDecoder(half)
    picks, divergence = [], []
    for exact, *bf16 in teacher_forced(reference, *decoders):
        target = exact.float().log_softmax(-1)
        picks.append(torch.stack([logits.argmax(-1) for logits in (exact, *bf16)]))
        # KL(fp32 ‖ bf16): how far the whole distribution moved, not only its top token
        kl = [F.kl_div(x.float().log_softmax(-1), target, log_target=True, reduction="none").sum(-1) for x in bf16]
        divergence.append(torch.stack(kl))
    picks, divergence = torch.stack(picks, -1), torch.stack(divergence, -1).mean((1, 2))
    assert torch.equal(picks[0], reference.completion_ids)  # fp32: token for token
    ours, theirs = (picks[1:] == reference.completion_ids).float().mean((1, 2)).tolist()
    print(
        f"bf16 {path}: fp32's next token {ours:.2%} (HF {theirs:.2%}), KL {divergence[0]:.2e} (HF {divergence[1]:.2e})"
    )
    assert ours >= 0.95 and ours >= theirs - 0.02, f"bf16 {path}: fp32's next token at {ours:.1%} (HF {theirs:.1%})"
    assert divergence[0] <= 1.5 * divergence[1], f"bf16 {path}: KL from fp32 {divergence.tolist()} (ours, HF's)"
    if path == "z per row":  # both ran the rescaled form, on SmolLM2's shapes (tall gate/up, wide down)
        assert all("wq" in kv_decode._FACTORS[layer] for m in (model, half) for layer in svf_layers(m).values())


def test_a_full_cache_grows_and_the_step_logits_equal_hugging_faces(varied, tokenizer):
    """A decoder given no room beyond the prompt (a caller that under-counted) grows its cache and stays exact."""
    from t2ray.kv_decode import HFDecoder, KVDecoder

    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours, theirs = KVDecoder(varied, len(PROMPTS), ids.shape[1]), HFDecoder(varied)
    with torch.no_grad():
        a, b = ours.prefill(ids, mask), theirs.prefill(ids, mask)
        position = mask.sum(1, keepdim=True)
        for _ in range(5):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            token = a.argmax(-1)
            a, b = ours.step(token, position), theirs.step(token, position)
            position = position + 1
    assert ours.valid.shape[1] > ids.shape[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plain_linears_run_on_packed_weights_that_follow_in_place_edits(varied, tokenizer, monkeypatch, dtype):
    """bf16 and fp32 on the CPU: plain linears run on oneDNN-packed weights (q/k/v and gate/up stacked, one GEMM
    each), greedy tokens as torch's; a weight edited in place is packed again before its next use."""
    from t2ray.kv_decode import _PACKED

    half = varied.to(dtype)

    def greedy():
        return rollout(half, tokenizer, PROMPTS, max_new_tokens=10, ignore_eos=True).completion_ids

    hf, before = both_loops(monkeypatch, greedy)
    assert torch.equal(hf, before)
    layer = half.model.layers[0]
    assert half.lm_head in _PACKED and layer.mlp.down_proj in _PACKED
    assert len(_PACKED[layer.self_attn.q_proj].sources) == 3 and len(_PACKED[layer.mlp.gate_proj].sources) == 2
    with torch.no_grad():
        for layer in half.model.layers:
            layer.mlp.down_proj.weight.mul_(-1)
    hf, kv = both_loops(monkeypatch, greedy)
    assert torch.equal(hf, kv) and not torch.equal(kv, before)  # the edit counts, in both steps alike


def test_a_materialised_svf_expert_runs_on_its_packed_w_prime_and_follows_a_new_z(varied, tokenizer, monkeypatch):
    """bf16 SVF, materialised: the KV step multiplies by a packed copy of each layer's W' (what its forward would
    multiply by); a new z builds a new W' and the packed copy follows it (twice, with no decode in between too)."""
    from t2ray.kv_decode import _PACKED

    half = varied.to(torch.bfloat16)
    layers = patch_model(half, progress=False)
    set_mode(half, "materialized")
    z = [{name: 0.4 + torch.rand(layer.rank) for name, layer in layers.items()} for _ in range(3)]

    def greedy():
        return rollout(half, tokenizer, PROMPTS, max_new_tokens=10, ignore_eos=True).completion_ids

    set_z(half, z[0])
    hf, first = both_loops(monkeypatch, greedy)
    assert torch.equal(hf, first)
    down = half.model.layers[0].mlp.down_proj
    assert _PACKED[down].sources[0][0]() is down.materialised_weight()  # packed from the very W' the forward uses
    set_z(half, z[1])
    set_z(half, z[2])  # two new W' before the next call: the packed copy must be of the last
    hf, last = both_loops(monkeypatch, greedy)
    assert torch.equal(hf, last) and not torch.equal(last, first)


AVX2_PROBE = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from t2ray.kv_decode import _PACKED, PACKED_DTYPES, KVDecoder

config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
ids, mask = torch.randint(0, 64, (2, 5)), torch.ones(2, 5, dtype=torch.long)
for dtype in (torch.bfloat16, torch.float32):
    model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        decoder = KVDecoder(model, 2, 8)
        logits = decoder.prefill(ids, mask)
        decoder.step(logits.argmax(-1), mask.sum(1, keepdim=True))
    print(dtype, model.lm_head in _PACKED)
print(PACKED_DTYPES)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AVX2 vs AVX512 is an x86 question")
def test_on_an_avx2_only_cpu_bf16_keeps_torch_mm_and_fp32_packs():
    """oneDNN packs bf16 only with AVX512-BW/VL/DQ (or AVX-NE-CONVERT): under AVX2 kernels a bf16 model (asked for by
    name; auto picks fp32 there) decodes through torch.mm instead of raising, and fp32 still packs."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", AVX2_PROBE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:3] == ["torch.bfloat16 False", "torch.float32 True", "(torch.float32,)"]


def test_biased_svf_projections_keep_their_bias_when_stacked(varied, tokenizer, monkeypatch):
    """q/k/v with biases (attention_bias=True), wrapped in SVF layers with a materialised W': the bias lives on the
    wrapped linear, so the KV step runs each one apart (bias included) and matches Hugging Face's loop."""
    from transformers import LlamaForCausalLM

    from t2ray.svf import SVFConfig

    config = copy.deepcopy(varied.config)
    config.attention_bias = True
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0, 0.3)
    layers = patch_model(model, SVFConfig(target_modules="attn"), progress=False)
    set_z(model, {name: 0.4 + torch.rand(layer.rank) for name, layer in layers.items()})
    set_mode(model, "materialized")
    hf, kv = both_loops(
        monkeypatch, lambda: rollout(model, tokenizer, PROMPTS, max_new_tokens=10, ignore_eos=True).completion_ids
    )
    assert torch.equal(hf, kv)


HEAP_PROBE = """
import resource, torch
from t2ray.kv_decode import retain_heap

def faults():  # minor page faults of 20 allocations of 4 MiB, each freed before the next
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(1 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults(), retain_heap(), faults(), faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_decoder_keeps_freed_blocks_in_the_heap():
    """A fresh process faults thousands of pages in for 20 blocks of 4 MiB; after `retain_heap` (which `new_decoder`
    runs) freed blocks are reused without faulting (a step's logits and activations: ~6 % of a step)."""
    done = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    before, applied, _, after = done.stdout.split()
    assert applied == "True" and int(before) > 2_000 and int(after) < 100, done.stdout
    env = {**os.environ, "T2RAY_MALLOPT": "0"}
    done = subprocess.run([sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split()[1] == "False", done.stderr[-2000:]


@pytest.fixture
def fixed_shapes(monkeypatch):
    """Every decoder steps at fixed shapes: the step a CUDA graph captures, run eagerly on the CPU."""
    from t2ray import kv_decode

    monkeypatch.setattr(kv_decode, "wants_static_step", lambda device: True)


def test_the_fixed_shape_step_decodes_as_the_step_it_replaces(varied, tokenizer, monkeypatch, fixed_shapes):
    """What a CUDA graph replays (the new token's slot a tensor, attention over a power-of-two window, unwritten
    slots masked) gives Hugging Face's tokens in fp32: the base model past a window's end, and a z per row with
    rows retiring (the batch's cache moves, so the decoder drops its graphs)."""
    long = rollout(varied, tokenizer, PROMPTS, max_new_tokens=70, ignore_eos=True)  # crosses the 64-slot window
    monkeypatch.setenv("T2RAY_DECODE", "hf")
    hf = rollout(varied, tokenizer, PROMPTS, max_new_tokens=70, ignore_eos=True)
    assert torch.equal(long.completion_ids, hf.completion_ids)

    patch_model(varied, progress=False)
    set_mode(varied, "factored")
    z = {name: 1 + 0.5 * torch.randn(len(PROMPTS), layer.rank) for name, layer in svf_layers(varied).items()}

    def per_row():
        hook = on_live_rows(lambda live: set_z(varied, {m: t[live] for m, t in z.items()}))
        return rollout(varied, tokenizer, PROMPTS, max_new_tokens=8, before_step=hook)

    monkeypatch.setenv("T2RAY_DECODE", "kv")
    free = per_row()
    varied.generation_config.eos_token_id = [int(free.completion_ids[0, 1]), int(free.completion_ids[2, 2])]
    hf, kv = both_loops(monkeypatch, per_row)
    lengths = kv.completion_mask.sum(1)
    assert int(lengths.min()) < int(lengths.max())  # rows retired mid-way
    assert torch.equal(hf.completion_ids, kv.completion_ids)


def test_merged_and_trimmed_batches_step_at_fixed_shapes_as_they_do_eagerly(varied, tokenizer):
    """Continuous batching (the serve replica) merges a new batch in and trims padding: the fixed-shape step's
    logits stay those of the eager step, and the cache slots it attends over but nobody wrote stay finite."""
    from t2ray.kv_decode import KVDecoder

    def run(static: bool) -> list[torch.Tensor]:
        first, second = (tokenizer(p, return_tensors="pt", padding=True) for p in (PROMPTS[:2], PROMPTS[2:]))
        a = KVDecoder(varied, 2, first["input_ids"].shape[1] + 8, static=static)
        b = KVDecoder(varied, 2, second["input_ids"].shape[1] + 4, static=static)
        out = []
        with torch.no_grad():
            tokens = a.prefill(first["input_ids"], first["attention_mask"]).argmax(-1)
            position = first["attention_mask"].sum(1, keepdim=True)
            for _ in range(3):
                out.append(a.step(tokens, position))
                tokens, position = out[-1].argmax(-1), position + 1
            joining = b.prefill(second["input_ids"], second["attention_mask"]).argmax(-1)
            a.merge(b)
            a.select(torch.tensor([0, 2, 3]))  # row 1 retires
            a.trim()
            tokens = torch.cat([tokens, joining])[[0, 2, 3]]
            position = torch.cat([position, second["attention_mask"].sum(1, keepdim=True)])[[0, 2, 3]]
            for _ in range(6):
                out.append(a.step(tokens, position))
                tokens, position = out[-1].argmax(-1), position + 1
        assert torch.isfinite(a.keys).all() or not static
        return out

    for eager, fixed in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(fixed, eager, atol=1e-5, rtol=1e-5)


def test_the_adapter_state_a_graph_is_kept_for_moves_with_every_change_a_step_would_read(varied, tokenizer):
    """t2ray.cuda_graphs drops a captured step when what it reads changes: a new z, z edited in place, a rebuilt W',
    a layer switched off, new LoRA mixture weights; and keeps it while nothing does."""
    from t2ray.cuda_graphs import adapter_state, stateful_modules
    from t2ray.generation import announce_tokens

    patch_model(varied, progress=False)
    set_mode(varied, "materialized")
    modules = stateful_modules(varied)
    layer = next(iter(svf_layers(varied).values()))
    assert layer in modules

    def signature():
        return adapter_state(modules)[0]

    with torch.no_grad():
        rollout(varied, tokenizer, PROMPTS[:1], max_new_tokens=2)  # builds and keeps each W'
        before = signature()
        assert before == signature()
        rollout(varied, tokenizer, PROMPTS[:1], max_new_tokens=2)
        assert signature() == before  # the same W' kept
        layer.svf_p.add_(0.1)  # an optimizer step: z edited in place
        assert signature() != before
        edited = signature()
        layer.materialised_weight()  # W' rebuilt for it
        assert signature() != edited
        rebuilt = signature()
        layer.enabled = False
        assert signature() != rebuilt
        layer.enabled = True
        set_z(varied, {name: torch.ones(layer.rank) for name, layer in svf_layers(varied).items()})
        assert signature() != rebuilt
        outside = signature()
        with announce_tokens(varied, 1):  # the call's size decides W' against the factored path
            assert signature() != outside

    from t2ray.lora.layer import LoRAFactors, LoRAMixtureLinear

    mixture = LoRAMixtureLinear(torch.nn.Linear(8, 8), [LoRAFactors(torch.randn(2, 8), torch.randn(8, 2), 2.0)] * 2)
    states = []
    for weights in (None, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])):
        mixture.set_weights(weights)
        states.append(adapter_state([mixture])[0])
    assert len(set(states)) == 3 and adapter_state([mixture])[0] == states[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_replay_the_eager_steps_tokens(varied, tokenizer, monkeypatch):
    """On a GPU the step is captured once its adapter state holds and replayed: the same greedy tokens as the step
    run eagerly (fp32), for the base model past a window's end and for a z per row with rows retiring."""
    from t2ray.cuda_graphs import STATS

    model = copy.deepcopy(varied).cuda()
    replays = STATS.replays

    def both(run):
        graphed = run()
        monkeypatch.setenv("T2RAY_CUDA_GRAPHS", "0")
        eager = run()
        monkeypatch.delenv("T2RAY_CUDA_GRAPHS")
        return graphed, eager

    graphed, eager = both(lambda: rollout(model, tokenizer, PROMPTS, max_new_tokens=70, ignore_eos=True))
    assert torch.equal(graphed.completion_ids, eager.completion_ids)
    assert STATS.replays > replays + 50 and not STATS.failures

    patch_model(model, progress=False)
    set_mode(model, "factored")
    z = {
        name: 1 + 0.5 * torch.randn(len(PROMPTS), layer.rank, device="cuda")
        for name, layer in svf_layers(model).items()
    }

    def per_row():
        hook = on_live_rows(lambda live: set_z(model, {m: t[live] for m, t in z.items()}))
        return rollout(model, tokenizer, PROMPTS, max_new_tokens=40, before_step=hook)

    free = per_row()
    model.generation_config.eos_token_id = [int(free.completion_ids[0, 1]), int(free.completion_ids[2, 2])]
    graphed, eager = both(per_row)
    assert torch.equal(graphed.completion_ids, eager.completion_ids) and not STATS.failures


ONE_ROW_PROBE = """
import logging
import torch
from t2ray.kv_decode import packs_one_row

logging.basicConfig(level=logging.INFO, format="%(message)s")
print(packs_one_row(torch.float32), packs_one_row(torch.float32), packs_one_row(torch.float16))
"""


def test_one_row_fp32_packing_is_measured_once_and_both_answers_decode_alike(varied, tokenizer, monkeypatch):
    """At one row (B = 1) packed fp32 GEMMs lose to MKL's GEMV on an Intel Xeon and win 2.3x on an AMD EPYC: the
    decoder measures which once per process (one log line), T2RAY_PACK_WEIGHTS=1 skips that, and either answer
    decodes Hugging Face's tokens."""
    done = subprocess.run([sys.executable, "-c", ONE_ROW_PROBE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    first, again, fp16 = done.stdout.split()
    said = [line for line in done.stderr.splitlines() if line.startswith("one-row float32 GEMMs")]
    assert first == again and fp16 == "False" and len(said) == 1, done.stderr
    assert said[0].endswith("packed" if first == "True" else "torch.mm")
    forced = subprocess.run(
        [sys.executable, "-c", ONE_ROW_PROBE],
        env={**os.environ, "T2RAY_PACK_WEIGHTS": "1"},
        capture_output=True,
        text=True,
    )
    assert forced.stdout.split()[:2] == ["True", "True"] and "one-row" not in forced.stderr, forced.stderr

    from t2ray import kv_decode

    def one_row():
        return rollout(varied, tokenizer, PROMPTS[1:2], max_new_tokens=10, ignore_eos=True).completion_ids

    monkeypatch.setenv("T2RAY_DECODE", "hf")
    reference = one_row()
    monkeypatch.setenv("T2RAY_DECODE", "kv")
    for answer in (True, False):
        monkeypatch.setattr(kv_decode, "packs_one_row", lambda dtype, answer=answer: answer)
        kv_decode._PACKED.clear()
        assert torch.equal(one_row(), reference)
        # the prefill's rows pack either way; the one-row products (every step's, the LM head's) follow the answer
        assert varied.model.layers[0].mlp.down_proj in kv_decode._PACKED
        assert (varied.lm_head in kv_decode._PACKED) == answer
