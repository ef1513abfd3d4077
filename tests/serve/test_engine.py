"""The replica's engine without Ray: per-row mixtures, materialised LRU, decoding, limits; config and request
validation; the shipped Serve config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from t2ray.generation import rollout
from t2ray.library import load_adapted
from t2ray.serve.config import ServeArgs, read_serve_config, t2ray_applications
from t2ray.serve.engine import DecodeBatch, ExpertLibrary, GenRequest, MixtureRef, run_to_completion
from t2ray.serve.errors import RequestError
from t2ray.serve.schema import ChatRequest, CompletionRequest, parse_body

from .conftest import tiny_args

SHIPPED = Path(__file__).resolve().parents[2] / "experiments" / "serve-smollm2.yaml"
PROMPTS = ["hello there", "What is 12 + 7? Reply with the number.", "x", "Write a Python function add(a, b)."]


@pytest.fixture(scope="module")
def lib(tiny_experts):
    torch.set_num_threads(1)
    return ExpertLibrary(
        "tiny-llama",
        {n: str(tiny_experts[n]) for n in ("math", "code", "reasoning")},
        classifier=str(tiny_experts["cls"]),
        mode="factored",
        dtype="float32",
    )  # exact checks


def ref_of(weights: dict[str, float] | None) -> MixtureRef:
    if not weights:
        return MixtureRef()
    return MixtureRef("mix", tuple(weights), tuple(weights.values()))


@pytest.fixture(scope="module")
def lora_lib(lora_library):
    """The same library over LoRA adapter folders (one LoRA mixture layer per module, a weight per adapter)."""
    torch.set_num_threads(1)
    return ExpertLibrary(
        "tiny-llama",
        {n: str(lora_library[n]) for n in ("math", "code", "reasoning")},
        classifier=str(lora_library["cls"]),
        mode="materialized",
        dtype="float32",
    )


def reference(paths, weights, prompt: str, max_tokens: int):
    """Greedy tokens from generation.rollout, and the logits after the prompt, on a model set up as `t2ray eval
    --mix` sets it up (apply_experts for SVF files, the LoRA mixture layer with fixed weights for folders)."""
    model, tokenizer, _ = load_adapted(
        "tiny-llama", dtype="float32", mix=",".join(f"{paths[n]}:{w}" for n, w in weights.items()) if weights else None
    )
    out = rollout(model, tokenizer, [prompt], max_new_tokens=max_tokens)
    with torch.no_grad():
        logits = model(out.prompt_ids).logits[0, -1]
    return out.completion_ids[0][out.completion_mask[0].bool()].tolist(), logits


def run_batch(lib, requests):
    """Generated ids per request, the logits each row decoded from at every step, and the batch's mode."""
    items = [lib.prepare(r) for r in requests]
    batch = DecodeBatch(lib, items)
    batch.prefill()
    logits = [[] for _ in items]
    while not batch.done:
        for j, row in enumerate(batch.active):
            logits[row].append(batch.logits[j].clone())
        batch.step()
    return [it.generated for it in items], logits, batch.mode


@pytest.mark.parametrize("kind", ["svf", "lora"])
def test_mixed_batch_rows_match_each_mixture_alone(kind, request, torch_threads):
    """One batch, a different mixture per row (SVF: z per row, factored; LoRA: adapter weights per row), rows leaving
    at different steps: every row's logits at every step equal those of that request run alone, and `eval --mix`'s."""
    lib, paths = (
        request.getfixturevalue(f) for f in (("lib", "tiny_experts") if kind == "svf" else ("lora_lib", "lora_library"))
    )
    mixtures = [None, {"math": 1.0}, {"math": 0.3, "code": 0.7}, {"reasoning": 1.0}]
    budgets = [10, 3, 7, 10]  # rows leave the batch at different steps (cache, mask and z rows shrink)
    requests = [
        GenRequest(ref_of(w), messages=[{"role": "user", "content": p}], max_tokens=n, temperature=0)
        for w, p, n in zip(mixtures, PROMPTS, budgets, strict=True)
    ]
    ids, logits, mode = run_batch(lib, requests)
    assert mode == "factored"
    for i, (w, p, n) in enumerate(zip(mixtures, PROMPTS, budgets, strict=True)):
        alone_ids, alone_logits, _ = run_batch(lib, [requests[i]])
        assert ids[i] == alone_ids[0] and len(logits[i]) == n
        for step, (a, b) in enumerate(zip(logits[i], alone_logits[0], strict=True)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"row {i} step {step}")
        ref_ids, ref_logits = reference(paths, w, p, n)
        assert ids[i] == ref_ids
        torch.testing.assert_close(logits[i][0], ref_logits, atol=1e-4, rtol=1e-4)


def test_each_mixed_batch_decodes_with_its_own_rows_z(lib, monkeypatch):
    """Batches of mixed rows come and go (requests finish, new ones prefill): each one's prefill and steps run on its
    own z per row. The library once knew a batch's z by id() of its dict, which CPython hands to the next dict once
    the last is freed, and then left the model on the freed batch's z (a 500 under load): every id() alike here
    stands for that reuse."""
    import t2ray.serve.engine as engine

    monkeypatch.setattr(engine, "id", lambda obj: 0, raising=False)
    mixtures = [{"math": 1.0}, {"code": 1.0}, {"math": 0.5, "code": 0.5}]
    for rows in [3, 2, 3, 1, 2] * 4:
        requests = [
            GenRequest(ref_of(mixtures[i % 3]), messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=2)
            for i in range(rows)
        ]
        ids, _, mode = run_batch(lib, requests)
        assert (rows == 1 or mode == "factored") and all(len(row) == 2 for row in ids)


@pytest.mark.parametrize("kind,loop", [("svf", "kv"), ("lora", "kv"), ("svf", "hf")])
def test_rows_joining_a_running_batch_decode_as_if_alone(kind, loop, request, torch_threads, monkeypatch):
    """Continuous batching: two requests decode, two more (longer prompts, other mixtures) join after 2 steps and one
    more after 5, rows leave at different steps; every row's tokens and logits equal that request run alone. Both
    decode steps (t2ray/kv_decode.py: the KV decoder, and Hugging Face's forward that other models run)."""
    monkeypatch.setenv("T2RAY_DECODE", loop)
    lib = request.getfixturevalue("lib" if kind == "svf" else "lora_lib")

    def chat(text, weights, n):
        return GenRequest(ref_of(weights), messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0)

    schedule = {
        0: [chat("hi", {"math": 1.0}, 9), chat("x", None, 3)],
        2: [
            chat(PROMPTS[1] + " Explain every step carefully.", {"code": 0.5, "reasoning": 0.5}, 6),
            chat(PROMPTS[3], {"math": 1.0}, 4),
        ],
        5: [chat(PROMPTS[0], {"reasoning": 1.0}, 5)],
    }
    requests = [r for group in schedule.values() for r in group]
    logits: dict[int, list] = {i: [] for i in range(len(requests))}
    batch, step, order = None, 0, []
    while step == 0 or not batch.done or step <= max(schedule):
        if step in schedule:
            joining = DecodeBatch(lib, [lib.prepare(r) for r in schedule[step]])
            joining.prefill()
            order += schedule[step]
            batch = joining if batch is None else (batch.merge(joining) or batch)
        for j, row in enumerate(batch.active):
            logits[row].append(batch.logits[j].clone())
        batch.step()
        step += 1
    # Σ of the rows decoding at each of its steps: 2 rows, 4 after the join at step 2 (the base row ends), 3, 4 after
    # the join at step 5, then rows leave one by one
    assert [it.rows_decoding for it in batch.items] == [
        2 + 2 + 4 + 3 + 3 + 4 + 3 + 3 + 2,
        2 + 2 + 4,
        4 + 3 + 3 + 4 + 3 + 3,
        4 + 3 + 3 + 4,
        4 + 3 + 3 + 2 + 1,
    ]
    for row, r in enumerate(order):
        alone_ids, alone_logits, _ = run_batch(lib, [r])
        assert batch.items[row].generated == alone_ids[0], f"row {row}"
        for k, (a, b) in enumerate(zip(logits[row], alone_logits[0], strict=True)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"row {row} step {k}")
    assert lib.stats["decoding_rows"] == 0


def test_experts_change_the_model(lib):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    outs = []
    for ref in (MixtureRef(), ref_of({"math": 1.0}), ref_of({"code": 1.0})):
        z = lib.z_of(ref)
        lib.use_base() if z is None else lib.use_factored(z, ref.key)
        with torch.no_grad():
            outs.append(lib.model(ids).logits)
    lib.invalidate()
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_materialized_lru_equals_factored(tiny_experts, torch_threads):
    lib = ExpertLibrary(
        "tiny-llama",
        {n: str(tiny_experts[n]) for n in ("math", "code", "reasoning")},
        mode="auto",
        materialize_after=3,
        lru_size=2,
        dtype="float32",
    )
    math, code, reasoning = ref_of({"math": 1.0}), ref_of({"code": 1.0}), ref_of({"reasoning": 1.0})

    def run(ref, max_tokens=6):
        return run_batch(lib, [GenRequest(ref, prompt=p, max_tokens=max_tokens, temperature=0) for p in PROMPTS[:2]])

    def same(a, b):  # over the tokens both generated
        for row in range(2):
            n = min(len(a[0][row]), len(b[0][row]))
            assert a[0][row][:n] == b[0][row][:n]
            for x, y in zip(a[1][row][:n], b[1][row][:n], strict=True):
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)

    cold = run(math)  # 2 requests seen: not hot yet
    assert cold[2] == "factored"
    hot = run(math)  # 4 seen: W' built once, kept in the LRU
    assert hot[2] == "materialized" and lib.stats["materialized_builds"] == 1
    same(hot, cold)
    code_cold = run(code)
    run(code)  # code's W' built too (LRU: math, code)
    assert lib.stats["materialized_builds"] == 2
    restored = run(math)  # math's W' restored from the LRU: no rebuild, same logits
    assert restored[2] == "materialized" and lib.stats["materialized_builds"] == 2
    same(restored, cold)
    # a third hot expert evicts the least recently used (code), for a batch that pays for the build
    run(reasoning), run(reasoning, lib.build_tokens)
    assert lib.stats["materialized_builds"] == 3
    code_again = run(code, lib.build_tokens)
    assert code_again[2] == "materialized" and lib.stats["materialized_builds"] == 4
    same(code_again, code_cold)


def test_lru_evicts_before_it_builds_and_keeps_to_its_byte_budget(tiny_experts, torch_threads, monkeypatch):
    lib = ExpertLibrary(
        "tiny-llama",
        {n: str(tiny_experts[n]) for n in ("math", "code", "reasoning")},
        mode="materialized",
        lru_size=3,
        dtype="float32",
    )
    one = lib.entry_bytes(lib.z_of(ref_of({"math": 1.0})))
    lib.lru_bytes = int(1.5 * one)  # room for one W' by bytes, three by count
    held_during_builds = []
    for layer in lib.layers.values():
        build = layer.materialized_state
        monkeypatch.setattr(
            layer, "materialized_state", lambda build=build: held_during_builds.append(len(lib._weights)) or build()
        )

    for weights in ({"math": 1.0}, {"math": 0.5, "code": 0.5}, {"code": 1.0}):
        run_batch(lib, [GenRequest(ref_of(weights), prompt="x", max_tokens=2, temperature=0)])
        assert len(lib._weights) == 1  # the budget, not the count, binds
    assert max(held_during_builds) == 0  # the old entry was gone before the new W' was built
    lib.lru_bytes = one // 2  # larger than the budget: used, not kept
    assert (
        run_batch(lib, [GenRequest(ref_of({"reasoning": 1.0}), prompt="x", max_tokens=2, temperature=0)])[2]
        == "materialized"
        and len(lib._weights) == 0
    )


def test_a_full_lru_takes_a_new_w_prime_only_for_a_batch_that_pays_for_its_build(tiny_experts, torch_threads):
    """Mode auto with more hot experts than the LRU holds: a batch of a third expert runs factored unless its
    tokens left (prompts + max_tokens) reach what a build costs, max(m, n) tokens; the kept ones are used as ever."""
    lib = ExpertLibrary(
        "tiny-llama",
        {n: str(tiny_experts[n]) for n in ("math", "code", "reasoning")},
        materialize_after=1,
        lru_size=1,
        dtype="float32",
    )
    assert lib.build_tokens == max(max(x.base_layer.weight.shape) for x in lib.layers.values())

    def mode_of(expert: str, max_tokens: int) -> str:
        return run_batch(lib, [GenRequest(ref_of({expert: 1.0}), prompt="x", max_tokens=max_tokens, temperature=0)])[2]

    assert mode_of("math", 2) == "materialized"  # room in the LRU: built for a short batch too
    assert mode_of("code", 2) == "factored" and list(lib._weights) == [ref_of({"math": 1.0}).key]
    assert mode_of("code", lib.build_tokens) == "materialized" and list(lib._weights) == [ref_of({"code": 1.0}).key]
    assert mode_of("code", 2) == "materialized"  # kept: used whatever the batch
    assert lib.stats["materialized_builds"] == 2


def test_out_of_memory_building_w_prime_falls_back_to_factored(tiny_experts, torch_threads, monkeypatch):
    lib = ExpertLibrary(
        "tiny-llama",
        {n: str(tiny_experts[n]) for n in ("math", "code", "reasoning")},
        mode="materialized",
        lru_size=2,
        dtype="float32",
    )
    requests = [
        GenRequest(ref_of({"math": 0.7, "code": 0.3}), prompt=p, max_tokens=5, temperature=0) for p in PROMPTS[:2]
    ]
    expected = run_batch(lib, requests)
    lib._weights.clear()
    lib.invalidate()
    layer = next(iter(lib.layers.values()))

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(layer, "materialized_state", out_of_memory)
    ids, _, mode = run_batch(lib, requests)
    assert mode == "factored" and ids == expected[0] and lib.stats["materialize_failures"] == 1
    assert not lib._weights


def test_prompts_sharing_a_start_prefill_only_the_rest_and_answer_the_same(lib, tiny_experts, torch_threads):
    """The second request of the same weights and chat-template start prefills only what follows the cached blocks;
    another mixture's rows cache their own. Answers equal a replica without the prefix cache (fp32, greedy)."""
    plain = ExpertLibrary("tiny-llama", {"math": str(tiny_experts["math"])}, dtype="float32", prefix_cache_bytes=0)

    def ask(library, question: str, mixture: MixtureRef) -> dict:
        messages = [{"role": "user", "content": question}]
        return run_to_completion(library, [GenRequest(mixture, messages, max_tokens=6, temperature=0)])[0]

    math = MixtureRef("expert:math", ("math",), (1.0,))
    for mixture in (MixtureRef(), math):
        first = ask(lib, "What is 2 + 2?", mixture)
        again = ask(lib, "What is 3 + 5?", mixture)
        assert again["cached_tokens"] >= 16 and again["cached_tokens"] % 16 == 0
        assert again["cached_tokens"] < again["prompt_tokens"]
        assert [first["text"], again["text"]] == [
            ask(plain, q, mixture)["text"] for q in ("What is 2 + 2?", "What is 3 + 5?")
        ]
    assert lib.stats["prefix_cached_tokens"] > 0 and plain.stats["prefix_cached_tokens"] == 0


def test_sampling_is_seeded_and_stops_are_honoured(lib):
    req = GenRequest(MixtureRef(), prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = run_to_completion(lib, [req, req])
    assert a["text"] == b["text"] and a["completion_tokens"] >= 1
    c = run_to_completion(
        lib, [GenRequest(MixtureRef(), prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=8)]
    )[0]
    full = run_to_completion(lib, [GenRequest(MixtureRef(), prompt="Once upon a time", max_tokens=12, temperature=0)])[
        0
    ]
    assert full["finish_reason"] == "length" and full["completion_tokens"] == 12
    stop = full["text"][3:6]
    cut = run_to_completion(
        lib, [GenRequest(MixtureRef(), prompt="Once upon a time", max_tokens=12, temperature=0, stop=(stop,))]
    )[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].index(stop)]
    assert isinstance(c["text"], str)


def test_streamed_text_is_decoded_incrementally(lib):
    """The streamed deltas add up to the full decode, multi-byte characters whole, while the tokenizer decodes
    O(1) tokens per step (re-decoding the whole answer each step was O(n²))."""
    decoded = []
    decode = lib.tokenizer.decode

    def counting(ids, **kwargs):
        decoded.append(len(ids))
        return decode(ids, **kwargs)

    req = GenRequest(MixtureRef(), prompt="Ünïcödé → 日本語 ✓", max_tokens=48, temperature=1.0, seed=5, ignore_eos=True)
    item = lib.prepare(req)
    batch = DecodeBatch(lib, [item])
    batch.prefill()
    lib.tokenizer.decode = counting
    try:
        deltas = []
        while not batch.done:
            deltas += [ev["text"] for ev in batch.step() if ev is not None]
    finally:
        lib.tokenizer.decode = decode
    ids = [t for t in item.generated if t not in lib.eos]
    assert "".join(deltas) == decode(ids, skip_special_tokens=True) and len(ids) == 48
    assert sum(decoded) < 8 * len(ids)  # a few tokens per step, not the whole prefix


def test_cancelled_rows_leave_the_batch_at_the_next_step(lib):
    def request(seed):
        return GenRequest(
            MixtureRef(), prompt=f"Tell me about {seed}", max_tokens=32, temperature=1.0, seed=seed, ignore_eos=True
        )

    alone = run_to_completion(lib, [request(1), request(3)])
    items = [lib.prepare(request(s)) for s in (1, 2, 3)]
    batch = DecodeBatch(lib, items)
    batch.prefill()
    before = lib.stats["decoding_rows"]
    texts = ["", "", ""]
    for step in range(32):
        if step == 2:
            items[1].cancelled = True  # its caller left
        for i, ev in enumerate(batch.step()):
            texts[i] += ev["text"] if ev else ""
        if step == 2:
            assert batch.active == [0, 2] and lib.stats["decoding_rows"] == before - 1
    assert items[1].finish_reason == "cancelled" and len(items[1].generated) == 2
    assert [texts[0], texts[2]] == [a["text"] for a in alone]  # the others are untouched
    assert lib.stats["decoding_rows"] == before - 3


def test_request_errors(lib):
    with pytest.raises(RequestError) as err:
        lib.prepare(GenRequest(MixtureRef(), prompt="word " * 1200, max_tokens=4))
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    with pytest.raises(RequestError) as err:
        lib.prepare(GenRequest(ref_of({"nope": 1.0}), prompt="x", max_tokens=4))
    assert err.value.status == 404 and "math" in err.value.message
    with pytest.raises(RequestError) as err:
        lib.prepare(GenRequest(ref_of({"math": -1.0, "code": 1.0}), prompt="x", max_tokens=4))
    assert err.value.status == 400


def test_lora_library_mixes_per_adapter_and_never_materialises(lora_lib, lora_library, tiny_experts):
    """A hot LoRA mixture decodes factored even in materialized mode (its cost does not depend on the mix);
    per-module α is refused; the classifier adapter classifies; SVF files and LoRA folders in one library are not."""
    from t2ray.experts import ExpertError

    hot = GenRequest(ref_of({"math": 1.0}), prompt="x", max_tokens=2, temperature=0)
    assert run_batch(lora_lib, [hot, hot])[2] == "factored"
    with pytest.raises(RequestError, match="one weight per adapter") as err:
        lora_lib.prepare(GenRequest(MixtureRef("m", ("math",), ((0.5, 0.5),)), prompt="x", max_tokens=2))
    assert err.value.status == 400
    with pytest.raises(RequestError, match="negative"):
        lora_lib.prepare(GenRequest(ref_of({"math": -1.0, "code": 1.0}), prompt="x", max_tokens=2))
    assert len(lora_lib.classify(["What is 2 + 2?", "Write a function"], use_classifier=True)) == 2
    with pytest.raises(ExpertError, match="not both"):
        ExpertLibrary("tiny-llama", {"math": str(tiny_experts["math"])}, classifier=str(lora_library["cls"]))


def test_classify_base_and_classifier(lib):
    labels = lib.classify(["What is 2 + 2?", "Write a function"], use_classifier=False)
    assert all(label in ("code", "math", "reasoning", "other") for label in labels)
    assert len(lib.classify(["What is 2 + 2?"], use_classifier=True)) == 1


@pytest.mark.parametrize(
    "body, param",
    [
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "auto", "messages": []}', "messages"),
        (b'{"model": "auto", "messages": [{"role": "robot", "content": "x"}]}', "messages.0.role"),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "t2ray": {"weights": [NaN, 1]}}',
            "t2ray.weights",
        ),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "t2ray": {"weights": {"math": -1}}}',
            "t2ray.weights",
        ),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 2}', "n"),
        (b"[1, 2]", None),
        (b'{"model": ', None),
    ],
)
def test_bad_bodies_name_the_field(body, param):
    with pytest.raises(RequestError) as err:
        parse_body(body, ChatRequest)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("logit_bias", {"42": 5}),
        ("presence_penalty", 0.5),
        ("best_of", 2),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(field, value):
    body = {"model": "auto", "messages": [{"role": "user", "content": "x"}], field: value}
    with pytest.raises(RequestError) as err:
        parse_body(json.dumps(body).encode(), ChatRequest)
    assert err.value.status == 400 and err.value.param == field and err.value.code == "unsupported_parameter"
    no_op = {
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logprobs": False,
        "top_logprobs": 0,
        "logit_bias": {},
        "presence_penalty": 0,
        "best_of": 1,
    }[field]
    assert parse_body(json.dumps({**body, field: no_op}).encode(), ChatRequest).model == "auto"


def test_seed_bounds_and_lone_surrogates_are_400s():
    base = '{"model": "m", "messages": [{"role": "user", "content": %s}]%s}'
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(RequestError) as err:
            parse_body((base % ('"x"', f', "seed": {seed}')).encode(), ChatRequest)
        assert err.value.param == "seed"
    assert parse_body((base % ('"x"', f', "seed": {2**64 - 1}')).encode(), ChatRequest).seed == 2**64 - 1
    with pytest.raises(RequestError) as err:
        parse_body((base % ('"a\\ud800b"', "")).encode(), ChatRequest)
    assert err.value.param == "messages.0.content" and "surrogate" in err.value.message


def test_tiny_temperature_is_greedy_not_nan(lib):
    greedy = run_to_completion(lib, [GenRequest(MixtureRef(), prompt="Once upon a time", max_tokens=6, temperature=0)])[
        0
    ]
    for temperature in (1e-38, 1e-6):
        tiny = run_to_completion(
            lib,
            [
                GenRequest(
                    MixtureRef(), prompt="Once upon a time", max_tokens=6, temperature=temperature, seed=2**64 - 1
                )
            ],
        )[0]
        assert tiny["text"] == greedy["text"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampled_requests_run_on_cuda(tiny_experts):
    """A CPU torch.Generator failed every request with temperature > 0 on a CUDA replica."""
    cuda = ExpertLibrary("tiny-llama", {"math": str(tiny_experts["math"])}, device="cuda", dtype="float32")
    out = run_to_completion(
        cuda, [GenRequest(ref_of({"math": 1.0}), prompt="x", max_tokens=4, temperature=1.0, seed=1)]
    )[0]
    assert out["completion_tokens"] == 4 or out["finish_reason"] == "stop"


def test_dispatcher_never_serves_open_when_a_key_is_required(tiny_experts, monkeypatch):
    """A key set where the app is built but missing (or blank) where the Dispatcher runs used to turn auth off."""
    from t2ray.serve.app import api_key, plan

    from .conftest import tiny_args

    monkeypatch.setenv("T2RAY_API_KEY", "  s3cret \n")
    _, settings = plan(ServeArgs.model_validate(tiny_args(tiny_experts)).resolved())
    assert settings["require_api_key"]
    assert api_key(settings) == "s3cret"  # whitespace from a file or a shell is not part of the secret
    for missing in ("", "   "):
        monkeypatch.setenv("T2RAY_API_KEY", missing)
        with pytest.raises(RuntimeError, match="api key required"):
            api_key(settings)
    monkeypatch.delenv("T2RAY_API_KEY")
    open_settings = plan(ServeArgs.model_validate(tiny_args(tiny_experts)).resolved())[1]
    assert not open_settings["require_api_key"] and api_key(open_settings) == ""


def test_replica_queue_is_bounded_through_the_yaml(tiny_experts):
    from .conftest import tiny_args

    args = ServeArgs.model_validate(tiny_args(tiny_experts, expert_model={"max_queued_requests": 8}))
    assert args.expert_model.options()["max_queued_requests"] == 8
    assert ServeArgs.model_fields["expert_model"].default.options()["max_queued_requests"] == 256  # by default


def test_good_bodies_parse():
    chat = parse_body(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],'
        b' "max_completion_tokens": 3, "frequency_penalty": 0, "t2ray": {"weights": {"math": 1}}}',
        ChatRequest,
    )
    assert chat.question() == "a" and chat.token_budget() == 3 and chat.t2ray.weights == {"math": 1.0}
    completion = parse_body(b'{"model": "m", "prompt": ["a", "b"], "stop": "\\n"}', CompletionRequest)
    assert completion.prompts() == ["a", "b"] and completion.stops() == ("\n",)


def test_args_validation(tiny_experts, tmp_path):
    args = tiny_args(tiny_experts)
    assert ServeArgs.model_validate(args).resolved().experts["math"] == str(Path(tiny_experts["math"]).resolve())
    with pytest.raises(ValueError, match="unknown expert 'physics'"):
        ServeArgs.model_validate({**args, "mixtures": {"m": {"weights": {"physics": 1}}}})
    with pytest.raises(ValueError, match="extra"):
        ServeArgs.model_validate({**args, "batchin": {}})
    with pytest.raises(ValueError, match="reserved"):
        ServeArgs.model_validate({**args, "experts": {"auto": str(tiny_experts["math"])}})
    with pytest.raises(ValueError, match="auto.strategy expert needs auto.expert"):
        ServeArgs.model_validate({**args, "auto": {"strategy": "expert"}})
    missing = {**args, "experts": {**args["experts"], "math": str(tmp_path / "gone.safetensors")}}
    with pytest.raises(FileNotFoundError, match="expert 'math'.*gone.safetensors.*not found"):
        ServeArgs.model_validate(missing).resolved()


def test_shipped_config_is_a_valid_serve_config():
    """Ray's schema accepts it and its args validate (the expert files exist only after the quickstart)."""
    config = read_serve_config(SHIPPED)
    (app,) = t2ray_applications(config)
    assert app["import_path"] == "t2ray.serve.app:build_app" and config["http_options"]["host"] == "127.0.0.1"
    args = ServeArgs.model_validate(app["args"])
    assert args.model.spec == "smollm2-135m" and "math" in args.experts
    assert all(p.startswith("runs/quickstart/") for p in args.experts.values())


def test_t2ray_serve_names_a_missing_expert(tmp_path):
    from typer.testing import CliRunner

    from t2ray.cli import app

    config = yaml.safe_load(SHIPPED.read_text())
    config["applications"][0]["args"]["experts"]["math"] = str(tmp_path / "nowhere" / "math.safetensors")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = CliRunner().invoke(app, ["serve", str(path)])
    assert result.exit_code == 2
    assert "expert 'math'" in result.output and "not found" in result.output


def test_prefix_cached_scoring_equals_the_full_prompt(lib):
    """Pass 1 with the classification prompt's prefix cached (per model state) gives the full prompt's scores."""
    from t2ray.adapt.dispatch import classification_ids, classify

    questions = [
        "What is 2 + 2?",
        "Write a function that reverses a list.",
        "Why is the sky blue?",
        "Hi",
        "A much longer question about trains leaving two stations at different speeds, when do they meet?",
    ]
    for use_classifier in (False, True):
        labels = lib.classify(questions, use_classifier=use_classifier)
        scorer, state = lib._scorer, "__classifier__" if use_classifier else "base"
        P = len(scorer.prefix_ids)
        assert P > 200 and all(
            classification_ids(lib.tokenizer, q)[:P] == scorer.prefix_ids for q in questions
        )  # the cache is used
        cached = scorer.scores(questions, state=state)
        full = torch.stack(
            [
                lib.model(input_ids=torch.tensor([classification_ids(lib.tokenizer, q)]), logits_to_keep=1).logits[
                    0, -1
                ][scorer.label_ids]
                for q in questions
            ]
        ).detach()
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
        if not use_classifier:
            assert labels == classify(lib.model, lib.tokenizer, questions, mode="score")


def test_shipped_serve_config_points_at_the_quickstart_experts():
    from t2ray.quickstart import QuickstartConfig, expert_config, expert_path

    args = yaml.safe_load(SHIPPED.read_text())["applications"][0]["args"]
    assert sorted(args["experts"]) == sorted(QuickstartConfig().trained)  # the tour's experts, no more
    for task, file in args["experts"].items():
        written = expert_path(expert_config(Path("runs/quickstart"), QuickstartConfig(), task, "svf"))
        assert Path(file).resolve() == written, task
