"""Batched generation, left padding, log-likelihoods, context limits (tiny-llama, real tokenizer)."""

from __future__ import annotations

import pytest
import torch

from t2ray.generation import (
    PromptTooLongError,
    answer_loglik,
    completion_logits,
    completion_mask,
    generate,
    greedy,
    nucleus,
    render,
    rollout,
    sample,
    token_logprobs,
)


def test_render_uses_chat_template(tokenizer):
    text = render(tokenizer, "What is 2 + 2?")
    assert "What is 2 + 2?" in text and text != "What is 2 + 2?"
    assert render(tokenizer, [{"role": "user", "content": "What is 2 + 2?"}]) == text


def test_batched_greedy_equals_one_by_one(tiny, tokenizer):
    prompts = ["hi", "a much longer prompt that forces left padding of the short one", "third"]
    batched = generate(tiny, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(tiny, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_length_sorted_batches_keep_the_prompt_order(tiny, tokenizer):
    prompts = [
        "a much longer prompt that forces left padding of the short one",
        "hi",
        "a medium prompt here",
        "x",
        "another fairly long prompt, with several words in it",
    ]
    batched = generate(tiny, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert batched == [generate(tiny, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]


def test_ignore_eos_generates_every_token(tiny, tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer([render(tokenizer, "hi")], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # point EOS's output row along the last hidden state: EOS becomes the greedy choice
        hidden = tiny(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        tiny.lm_head.weight[eos] = 100 * hidden / hidden.norm()
    assert int(rollout(tiny, tokenizer, ["hi"], max_new_tokens=6).completion_mask.sum()) == 1
    roll = rollout(tiny, tokenizer, ["hi", "hello there"], max_new_tokens=6, ignore_eos=True)
    assert roll.completion_ids.shape == (2, 6)


def test_generation_is_deterministic_for_a_seed(tiny, tokenizer):
    prompts = ["tell me a story"] * 4
    a = generate(tiny, tokenizer, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(tiny, tokenizer, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b


@pytest.mark.parametrize("vocab", [49152, 49153, 1000, 200])
def test_greedy_is_argmax_with_its_ties_and_nan(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(33, vocab, generator=g).bfloat16().float()  # bf16 values: many exact ties
    top = logits.amax(-1)
    logits[0, [7, vocab - 1]] = top[0] + 1  # a tie between the first block and the last (short) block
    logits[1, vocab - 1] = top[1] + 1  # the maximum at the very end
    logits[2, [vocab // 2, 3]] = float("nan")  # NaN wins, the first NaN
    logits[3] = 0.0  # all equal: index 0
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert greedy(logits)[:4].tolist() == [7, vocab - 1, 3, 0]


def test_sample_draws_each_token_over_its_share_of_the_unit_interval():
    probs = torch.tensor([0.1, 0.0, 0.25, 0.05, 0.6, 0.0])
    logits = probs.log().expand(2, -1)  # log 0 = -inf: never drawn
    n = 2000
    uniform = (torch.arange(n) + 0.5) / n
    drawn = torch.cat([sample(logits, 1.0, 1.0, uniform[i : i + 2]) for i in range(0, n, 2)])
    assert torch.bincount(drawn, minlength=6).tolist() == (probs * n).round().long().tolist()
    top = torch.tensor([1.0, 0.0])  # even the end of [0, 1) lands on a token with mass
    assert sample(logits, 1.0, 1.0, top).tolist() == [4, 0]
    # per-row temperature and top_p: row 0 at T -> 0 keeps its argmax, row 1 its nucleus {2, 4} (without the cut,
    # 0.05 would land on token 0)
    picks = sample(logits, torch.tensor([1e-3, 1.0]), torch.tensor([1.0, 0.8]), torch.tensor([0.05, 0.05]))
    assert picks.tolist() == [4, 2]


def reference_nucleus(probs, top_p):  # the rule by a full sort of each row
    values, order = probs.sort(-1, descending=True)
    values = values.masked_fill(values.cumsum(-1) - values >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, values)


def test_nucleus_is_the_sorted_rule_per_row_for_peaked_and_flat_rows():
    g = torch.Generator().manual_seed(0)
    peaked = torch.softmax(torch.randn(3, 5000, generator=g) * 4, -1)  # the top 256 hold 0.9
    flat = torch.softmax(torch.randn(2, 5000, generator=g) * 0.1, -1)  # they do not: the whole row is sorted
    for probs in (peaked, flat, torch.cat([peaked, flat])):
        top_p = torch.linspace(0.5, 1.0, len(probs))
        cut = nucleus(probs, top_p)
        for row in range(len(probs)):
            expected = probs[row] if top_p[row] == 1 else reference_nucleus(probs[row], top_p[row])
            assert torch.equal(cut[row], expected)
        assert (cut[:-1] > 0).sum(-1).lt(5000).all()  # rows below top_p = 1 really were cut
    assert torch.equal(nucleus(peaked, 1.0), peaked)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5]])
    assert completion_mask(ids, {2}).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_rollout_logprobs_match_teacher_forcing(tiny, tokenizer):
    roll = rollout(tiny, tokenizer, ["one", "a longer second prompt"], max_new_tokens=5)
    with torch.no_grad():
        logp = token_logprobs(tiny, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    assert logp.shape == roll.completion_ids.shape
    # greedy tokens are the argmax: their log-prob is the row max, so every one is > log(1/vocab)
    assert (logp[roll.completion_mask.bool()] > -torch.log(torch.tensor(float(len(tokenizer))))).all()


def test_completion_logits_equal_the_full_forward_slice(tiny, tokenizer):
    roll = rollout(tiny, tokenizer, ["one", "a longer second prompt"], max_new_tokens=5, temperature=1.0, seed=1)
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
    mask = torch.cat([roll.prompt_mask, roll.completion_mask], 1)
    with torch.no_grad():
        full = tiny(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        kept = completion_logits(tiny, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    torch.testing.assert_close(kept, full[:, roll.prompt_ids.shape[1] - 1 : -1])


def test_answer_loglik_is_the_mean_token_logprob(tiny, tokenizer):
    prompts, answers = ["q one", "a longer question two"], ["yes", "no it is not"]
    scores = answer_loglik(tiny, tokenizer, prompts, answers)
    for prompt, answer, score in zip(prompts, answers, scores, strict=True):
        p = tokenizer([render(tokenizer, prompt)], return_tensors="pt", add_special_tokens=False)
        a = tokenizer([answer], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logp = token_logprobs(tiny, p["input_ids"], p["attention_mask"], a["input_ids"], a["attention_mask"])
        assert score == pytest.approx(float(logp.mean()), abs=1e-4)


@pytest.mark.slow
def test_answer_loglik_knows_facts_on_smollm2(smollm2):
    model, tokenizer = smollm2
    scores = answer_loglik(
        model, tokenizer, ["What is the capital of France? Answer in one word."] * 2, ["Paris", "Banana"]
    )
    assert scores[0] > scores[1] + 1.0


def test_prompt_longer_than_context_is_refused(tiny, tokenizer):
    long_prompt = "word " * (tiny.config.max_position_embeddings + 10)
    with pytest.raises(PromptTooLongError, match="exceeds the model's context"):
        generate(tiny, tokenizer, [long_prompt], max_new_tokens=4)


@pytest.mark.slow
def test_bf16_decodes_like_fp32_on_smollm2(smollm2):
    """bf16 (what dtype auto picks on bf16 hardware) vs fp32 on the real model: the fp32 greedy answers,
    teacher-forced through the bf16 model, are bf16's greedy choice at the large majority of positions, and the
    chosen tokens' log-probabilities agree within a few hundredths of a nat on average."""
    import copy

    from t2ray.tasks import get_task

    model32, tokenizer = smollm2
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    task = get_task("math")
    prompts = [task.messages(ex) for ex in task.examples("test")[:16]]
    roll = rollout(model32, tokenizer, prompts, max_new_tokens=32)
    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    with torch.no_grad():
        logits32, logits16 = completion_logits(model32, *args).float(), completion_logits(model16, *args).float()
    mask = roll.completion_mask.bool()
    agree = (logits16.argmax(-1) == roll.completion_ids)[mask].float().mean()
    assert (logits32.argmax(-1) == roll.completion_ids)[mask].all()  # fp32 reproduces its own greedy tokens
    assert agree >= 0.95, f"bf16 picks fp32's greedy token at only {agree:.1%} of positions"
    logp32 = torch.log_softmax(logits32, -1).gather(-1, roll.completion_ids[..., None])[..., 0][mask]
    logp16 = torch.log_softmax(logits16, -1).gather(-1, roll.completion_ids[..., None])[..., 0][mask]
    assert (logp16 - logp32).abs().mean() < 0.05
    assert (logp16 - logp32).abs().max() < 1.0


def test_shared_prompt_logits_and_gradients_equal_the_full_forward(tiny, tokenizer):
    """k samples per prompt: the prompt runs once and its cache serves the k completions — same logits, and the
    same z gradient (it flows through the shared prefix), as running every row whole."""
    from t2ray.svf import SVFConfig, patch_model, use_trainable

    patch_model(tiny, SVFConfig(target_modules="all"), progress=False)
    params = use_trainable(tiny)
    k = 3
    prompts = [p for p in ["one", "a longer second prompt"] for _ in range(k)]
    roll = rollout(tiny, tokenizer, prompts, max_new_tokens=5, temperature=1.0, seed=1)
    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    grads = []
    for samples in (1, k):
        logits = completion_logits(tiny, *args, samples_per_prompt=samples)
        (logits.float().log_softmax(-1).amax(-1) * roll.completion_mask).sum().backward()
        grads.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
        if samples == 1:
            whole = logits.detach()
    torch.testing.assert_close(logits.detach(), whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="not groups of 2 copies"):
        completion_logits(tiny, *args, samples_per_prompt=2)


def test_shared_prompt_prefill_samples_like_a_prefill_per_row(tiny, tokenizer):
    """k samples of a prompt prefilled once: the same tokens as prefilling each copy (same seed), fewer FLOPs."""
    prompts = ["hi"] * 3 + ["a longer prompt that is left padded against the short one"] * 3
    for temperature in (0.0, 1.0):
        shared = rollout(
            tiny, tokenizer, prompts, max_new_tokens=6, temperature=temperature, seed=5, samples_per_prompt=3
        )
        each = rollout(tiny, tokenizer, prompts, max_new_tokens=6, temperature=temperature, seed=5)
        assert torch.equal(shared.completion_ids, each.completion_ids)
        assert shared.texts == each.texts
    assert len(set(shared.texts[:3])) > 1  # sampled copies still differ


def test_shared_prompt_prefill_needs_adjacent_equal_prompts(tiny, tokenizer):
    with pytest.raises(ValueError, match="adjacent groups of 2"):
        rollout(tiny, tokenizer, ["a", "b", "a", "b"], max_new_tokens=2, samples_per_prompt=2)
    with pytest.raises(ValueError, match="adjacent groups of 2"):
        rollout(tiny, tokenizer, ["a", "a", "b"], max_new_tokens=2, samples_per_prompt=2)


def test_retired_rows_leave_the_batch_without_changing_any_row(tiny, tokenizer):
    """Rows done early leave the batch and its KV cache: every row's tokens stay what the full-width loop makes."""
    from t2ray.generation import decode, encode_prompts

    torch.manual_seed(0)
    with torch.no_grad():  # a random init this wide decodes one token for every row: make rows differ
        for weight in tiny.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    prompts = ["hi", "a much longer prompt that is left padded", "third one", "x y z", "five", "six and more"]
    batch = encode_prompts(tokenizer, prompts, tiny, 8)
    args = dict(max_new_tokens=8, pad_id=tokenizer.pad_token_id)
    free, _, _ = decode(tiny, batch["input_ids"], batch["attention_mask"], eos_ids=set(), **args)
    eos = {int(free[0, 1]), int(free[2, 3])}  # tokens some rows emit early: those rows end there
    full, full_mask, full_tokens = decode(tiny, batch["input_ids"], batch["attention_mask"], eos_ids=eos, **args)
    kept, kept_mask, kept_tokens = decode(
        tiny, batch["input_ids"], batch["attention_mask"], eos_ids=eos, retire_rows=True, **args
    )
    assert torch.equal(full * full_mask, kept * kept_mask) and torch.equal(full_mask, kept_mask)
    assert 0 < int(full_mask.sum(1).min()) < int(full_mask.sum(1).max())  # rows really ended at different steps
    assert kept_tokens < full_tokens
    with pytest.raises(ValueError, match="retire_rows"):
        decode(
            tiny,
            batch["input_ids"],
            batch["attention_mask"],
            eos_ids=eos,
            retire_rows=True,
            recompute_prefix=True,
            **args,
        )


def test_zero3_lockstep_keeps_stepping_until_every_rank_is_done(tiny, tokenizer):
    """Under ZeRO-3 each forward gathers the weights from every rank: a rank whose rows are all done must keep
    stepping (full width, no retirement) while another rank still decodes, or the other rank waits forever."""
    from t2ray.generation import decode, encode_prompts

    batch = encode_prompts(tokenizer, ["hi", "another prompt"], tiny, 6)
    args = dict(max_new_tokens=6, pad_id=tokenizer.pad_token_id)
    alone, alone_mask, _ = decode(tiny, batch["input_ids"], batch["attention_mask"], eos_ids=set(), **args)
    eos = {int(alone[0, 0]), int(alone[1, 0])}  # both rows of this rank end at the first token
    asked = []

    def other_rank_done_after_four_steps(mine: bool) -> bool:  # what all_reduce answers when rank 1 decodes on
        asked.append(mine)
        return len(asked) >= 4

    ids, mask, tokens = decode(
        tiny,
        batch["input_ids"],
        batch["attention_mask"],
        eos_ids=eos,
        retire_rows=True,
        all_done=other_rank_done_after_four_steps,
        **args,
    )
    assert ids.shape[1] == 4 and asked == [True] * 4  # stepped on with the other rank, every step asked
    assert mask.sum(1).tolist() == [1, 1]  # its own rows still ended at their EOS
    assert tokens == int(batch["input_ids"].numel()) + 3 * 2  # full width throughout: no row retired
    alone_ids, *_ = decode(tiny, batch["input_ids"], batch["attention_mask"], eos_ids=eos, **args)
    assert alone_ids.shape[1] == 1  # alone, it would have stopped at once


def test_retired_rows_keep_their_own_z_through_the_hook(tiny, tokenizer):
    """One z per row (CEM candidates): with done rows leaving the batch, the hook hands the live rows' z to the
    model, and every row decodes exactly what it decodes alone with its z."""
    from t2ray.generation import on_live_rows
    from t2ray.svf import patch_model, set_mode, set_z, svf_layers

    torch.manual_seed(0)
    with torch.no_grad():
        for weight in tiny.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    patch_model(tiny, progress=False)
    set_mode(tiny, "factored")
    prompts = ["hi", "hi", "third one", "x y z"]
    z = {name: 1 + 0.5 * torch.randn(len(prompts), layer.rank) for name, layer in svf_layers(tiny).items()}
    set_z(tiny, z)

    def live_rows_z():
        return on_live_rows(lambda live: set_z(tiny, {m: t[live] for m, t in z.items()}))

    free = rollout(tiny, tokenizer, prompts, max_new_tokens=8, ignore_eos=True, before_step=live_rows_z())
    eos = {int(free.completion_ids[0, 1]), int(free.completion_ids[2, 2])}
    tiny.generation_config.eos_token_id = sorted(eos)
    batched = rollout(tiny, tokenizer, prompts, max_new_tokens=8, before_step=live_rows_z())
    assert 0 < int(batched.completion_mask.sum(1).min()) < int(batched.completion_mask.sum(1).max())
    for row, prompt in enumerate(prompts):
        set_z(tiny, {name: t[row : row + 1] for name, t in z.items()})
        alone = rollout(tiny, tokenizer, [prompt], max_new_tokens=8)
        assert alone.texts[0] == batched.texts[row], row


def test_split_continuation_moves_trailing_spaces_like_lm_eval(tokenizer):
    from t2ray.generation import split_continuation

    head, tail = split_continuation(tokenizer, "Question: Is ice cold?\nAnswer: ", "yes")
    assert head == tokenizer("Question: Is ice cold?\nAnswer:", add_special_tokens=False).input_ids
    assert tokenizer.decode(tail) == " yes"
    with pytest.raises(ValueError, match="empty"):
        split_continuation(tokenizer, " ", "x")


def test_continuation_logliks_batched_equal_one_at_a_time(tiny, tokenizer):
    from t2ray.generation import continuation_logliks, split_continuation

    pairs = [
        ("Question: What is frozen water?\nAnswer:", " ice"),
        ("Q: 2+2?\nA:", " four, of course"),
        ("Question: What is frozen water?\nAnswer:", " steam"),
    ]
    batched = continuation_logliks(tiny, tokenizer, pairs, batch_size=3)
    for (context, continuation), score in zip(pairs, batched, strict=True):
        head, tail = split_continuation(tokenizer, context, continuation)
        with torch.no_grad():
            logp = tiny(input_ids=torch.tensor([head + tail])).logits[0].float().log_softmax(-1)
        direct = sum(float(logp[len(head) - 1 + k, t]) for k, t in enumerate(tail))
        assert score == pytest.approx(direct, abs=1e-4)
