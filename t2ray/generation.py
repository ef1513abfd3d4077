"""Where tasks meet models: chat prompts, batched generation, and log-likelihood scoring."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from t2ray.kv_decode import cache_kwarg, input_device, new_decoder, output_cache

Messages = list[dict[str, str]]


class PromptTooLongError(ValueError):
    """A prompt (plus the generation budget) does not fit in the model's context."""


@dataclass
class Rollouts:
    """Token-level view of generations, as RL needs it (left-padded prompts, right-padded completions)."""

    prompt_ids: torch.Tensor  # (N, P)
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C)
    completion_mask: torch.Tensor  # (N, C): 1 up to and including the first EOS
    texts: list[str]


class RawText(str):
    """A prompt that is already the model's input text: no chat template (what lm-eval's generation tasks feed)."""


def render(tokenizer, prompt: Messages | str) -> str:
    """A chat prompt ready for generation (plain strings are treated as one user message; RawText as is)."""
    if isinstance(prompt, RawText):
        return str(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def encode_prompts(tokenizer, prompts: Sequence[Messages | str], model, max_new_tokens: int, reply_prefix: str = ""):
    """Left-padded batch of chat prompts; `reply_prefix` starts the assistant's reply (e.g. a forced format)."""
    batch = tokenizer(
        [render(tokenizer, p) + reply_prefix for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    limit = context_length(model)
    lengths = batch["attention_mask"].sum(1)
    if int(lengths.max()) + max_new_tokens > limit:
        i = int(lengths.argmax())
        raise PromptTooLongError(
            f"prompt {i} has {int(lengths[i])} tokens; with max_new_tokens={max_new_tokens} "
            f"it exceeds the model's context of {limit}"
        )
    return batch


def completion_mask(ids: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """1 for generated tokens up to and including the first EOS, 0 after it."""
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= ids == eos
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


def eos_token_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    return ids | {tokenizer.eos_token_id}


# (token index, generated (B, i), done (B,), live: which of the B rows this step's batch holds, in its order)
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
AllDone = Callable[[bool], bool]  # this rank's rows are done -> every rank's are (a collective; ZeRO-3)
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily: dividing logits by ~0 gives NaN probabilities


def on_live_rows(select: Callable[[torch.Tensor], None]) -> StepHook:
    """A decode hook calling select(live) — the batch rows still decoding — whenever that set changes (the first
    step, then as rows retire: the batch only shrinks), so per-row mixtures stay in step with the rows."""
    rows = {"n": -1}

    def hook(i: int, generated: torch.Tensor, done: torch.Tensor, live: torch.Tensor) -> None:
        if len(live) != rows["n"]:
            select(live)
            rows["n"] = len(live)

    return hook


ARGMAX_BLOCK = 256


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) of (rows, vocab) logits, the same index (the first of equal maxima; NaN counts as the
    largest). On the CPU, argmax does not vectorise (1.5 ms for 32 rows of a 49k vocabulary) and amax does: each
    block's maximum picks the first block holding the row's maximum, and an argmax inside that block the index
    (5-6x faster, RESULTS generation_greedy)."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or vocab <= ARGMAX_BLOCK:
        return logits.argmax(-1)
    full = vocab - vocab % ARGMAX_BLOCK
    maxima = logits[:, :full].reshape(rows, -1, ARGMAX_BLOCK).amax(-1)
    if full < vocab:
        maxima = torch.cat([maxima, logits[:, full:].amax(-1, keepdim=True)], 1)
    start = maxima.argmax(-1) * ARGMAX_BLOCK
    # a short last block reads its last index again past its end: a repeat comes after the first, never chosen
    block = (start[:, None] + torch.arange(ARGMAX_BLOCK, device=logits.device)).clamp_(max=vocab - 1)
    return start + logits.gather(1, block).argmax(-1)


NUCLEUS_CANDIDATES = 256


def nucleus(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """probs (rows, vocab) cut to each row's top_p nucleus, unnormalised: the most likely tokens, each kept while the
    mass before it stays under top_p (a row at top_p = 1 keeps all). The nucleus is sought among a row's 256 most
    likely tokens (topk: 13x cheaper than sorting 49k values on the CPU), among all where those hold less than top_p."""
    top_p = torch.as_tensor(top_p, dtype=probs.dtype, device=probs.device).reshape(-1, 1).expand(len(probs), 1)
    cut = (top_p < 1).squeeze(1)
    if not cut.any():
        return probs
    part, top_p = probs[cut], top_p[cut]
    values, order = part.topk(min(NUCLEUS_CANDIDATES, part.shape[-1]), -1)  # largest first
    if (values.sum(-1, keepdim=True) < top_p).any():
        values, order = part.sort(-1, descending=True)
    values = values.masked_fill(values.cumsum(-1) - values >= top_p, 0.0)
    out = probs.clone()
    out[cut] = torch.zeros_like(part).scatter_(-1, order, values)
    return out


def sample(
    logits: torch.Tensor, temperature: torch.Tensor | float, top_p: torch.Tensor | float, uniform: torch.Tensor
) -> torch.Tensor:
    """One token per row of logits (rows, vocab) from softmax(logits / temperature) cut to its top_p nucleus, at the
    row's `uniform` (rows,) in [0, 1) by inverse CDF: one search of the running sum. torch.multinomial takes
    1.1 ms a row of a 49k vocabulary on the CPU, as long as the decode step (RESULTS generation_sampling)."""
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).reshape(-1, 1)
    cdf = nucleus(torch.softmax(logits.float() / temperature, -1), top_p).cumsum(-1)
    total = cdf[:, -1:]
    # below the total, so the token found has mass: the first whose running sum exceeds the target
    target = torch.minimum(uniform.reshape(-1, 1).to(cdf) * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """Greedy below GREEDY_BELOW, else nucleus sampling."""
    if temperature < GREEDY_BELOW:  # in fp32: the same index (bf16 → fp32 is exact), a faster CPU argmax
        return greedy(logits.float())
    return sample(logits, temperature, top_p, torch.rand(len(logits), generator=generator, device=logits.device))


RETIRE_SHARE = 4  # retire_rows compacts the batch once a quarter of its rows are done (a copy of the KV cache)


@torch.no_grad()
def decode(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    before_step: StepHook | None = None,
    recompute_prefix: bool = False,
    samples_per_prompt: int = 1,
    retire_rows: bool = False,
    all_done: AllDone | None = None,
):
    """The decode loop every path shares (rollouts, evaluation, CEM, token routing): a left-padded batch, a KV
    cache, the LM head on the last position only, rows done at EOS (later tokens are padding) and the loop
    ended when every row is done. ``before_step`` runs before the forward that picks each token (token-level
    routing sets z there); ``recompute_prefix`` re-runs prompt + prefix without a cache (the original router).
    ``samples_per_prompt`` = k: rows come in adjacent groups of k identical prompts (RL's k samples) and the model
    treats every row alike, so each prompt is prefilled once and its KV cache copied to its k rows.
    ``retire_rows``: done rows leave the batch (and the KV cache), so a long tail of one rambling row no longer
    costs a full-width step; a model holding one z per row must then be given the `live` rows' z by
    ``before_step``.
    ``all_done(mine)``: under ZeRO-3 every forward is a collective (it gathers the weights), so every rank steps
    until all ranks' rows are done (HF's ``synced_gpus``); it returns whether they are. No row retires then.
    Returns (completion_ids (B, N), completion_mask (B, N), tokens run through the model)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if retire_rows and recompute_prefix:
        raise ValueError("retire_rows needs the KV cache: not with recompute_prefix")
    device = prompt_ids.device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature >= GREEDY_BELOW else None
    eos = torch.tensor(sorted(eos_ids), device=device)
    rows = prompt_ids.shape[0]
    generated = torch.empty(rows, 0, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # the batch's rows among all rows (every row unless retire_rows)
    forward_tokens = 0
    decoder = (
        None
        if recompute_prefix
        else new_decoder(model, rows, prompt_ids.shape[1] + max_new_tokens, lockstep=all_done is not None)
    )
    next_position = prompt_mask.sum(1, keepdim=True)  # every row's next position (left padding)
    for i in range(max_new_tokens):
        if before_step is not None:
            before_step(i, generated, done, live)
        if recompute_prefix:  # prompt + prefix again, no cache
            mask = torch.cat([prompt_mask, torch.ones_like(generated)], 1)
            ids = torch.cat([prompt_ids, generated], 1)
            logits = padded_forward(model, ids, mask, use_cache=False, logits_to_keep=1).logits[:, -1]
            forward_tokens += ids.numel()
        elif i == 0:
            logits = decoder.prefill(prompt_ids, prompt_mask, samples_per_prompt)
            forward_tokens += prompt_ids[::samples_per_prompt].numel()
        else:
            logits = decoder.step(generated[live, -1], next_position)
            next_position = next_position + 1
            forward_tokens += len(live)
        token = torch.full((rows,), pad_id, dtype=torch.long, device=device)
        token[live] = next_token(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated = torch.cat([generated, token[:, None]], 1)
        if stop_at_eos:
            done |= torch.isin(token, eos)
            finished = bool(done.all())
            if all_done(finished) if all_done is not None else finished:
                break
            if retire_rows and all_done is None and int(done[live].sum()) * RETIRE_SHARE >= len(live):
                keep = (~done[live]).nonzero().squeeze(1)
                decoder.select(keep)
                next_position, live = next_position[keep], live[keep]
    return (
        generated,
        completion_mask(generated, set(eos_ids)) if stop_at_eos else torch.ones_like(generated),
        forward_tokens,
    )


def padded_forward(model, ids: torch.Tensor, mask: torch.Tensor, **options):
    """The model over left-padded rows: each row's positions start at its first real token."""
    return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), **options)


@contextmanager
def announce_tokens(model, tokens: int):
    """Tell the layers that can run two ways (SVF: rebuild W' for the current z, or run factored) how many tokens
    the call inside the block runs, so that each picks the cheaper way."""
    layers = [m for m in model.modules() if hasattr(m, "expected_tokens")]
    for layer in layers:
        layer.expected_tokens = tokens
    try:
        yield
    finally:
        for layer in layers:
            layer.expected_tokens = None


def decode_encoded(model, tokenizer, batch, **options):
    """`decode` of a batch from `encode_prompts`, ending rows at the model's EOS tokens and padding with the
    tokenizer's pad token."""
    return decode(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        eos_ids=eos_token_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
        **options,
    )


def rollout(
    model,
    tokenizer,
    prompts: Sequence[Messages | str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    reply_prefix: str = "",
    ignore_eos: bool = False,
    samples_per_prompt: int = 1,
    before_step: StepHook | None = None,
    all_done: AllDone | None = None,
) -> Rollouts:
    """Generate one completion per prompt in a single batch (greedy when temperature == 0), rows done early
    leaving the batch; `ignore_eos` always generates max_new_tokens (equal work per row, for benchmarks). With
    `samples_per_prompt` = k the prompts come as adjacent groups of k equal ones, each prefilled once (the model
    must treat them alike). A model holding one z per row needs `before_step` to give it the live rows' z."""
    k = samples_per_prompt
    if k < 1 or len(prompts) % k or any(prompts[i] != prompts[i - i % k] for i in range(len(prompts))):
        raise ValueError(f"samples_per_prompt={k}: the prompts must come in adjacent groups of {k} equal ones")
    batch = encode_prompts(tokenizer, prompts, model, max_new_tokens, reply_prefix).to(input_device(model))
    rows, width = batch["input_ids"].shape
    with announce_tokens(model, rows // k * width + rows * max_new_tokens):
        completion, mask, _ = decode_encoded(
            model,
            tokenizer,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_at_eos=not ignore_eos,
            samples_per_prompt=k,
            retire_rows=True,
            before_step=before_step,
            all_done=all_done,
        )
    texts = tokenizer.batch_decode(completion * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return Rollouts(batch["input_ids"], batch["attention_mask"], completion, mask, texts)


def generate(
    model,
    tokenizer,
    prompts: Sequence[Messages | str],
    *,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
    **options,
) -> list[str]:
    """Batched generation; deterministic for a given seed. Returns the completion texts in order. `options` go to
    `rollout` (max_new_tokens, temperature, top_p, reply_prefix, all_done...).

    Wide batches are what make CPU and GPU decoding fast (a decode step costs about the same for 8 rows as for
    64); prompts are batched by length so that little of each batch is padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(render(tokenizer, prompts[i])))
    texts: list[str] = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out = rollout(model, tokenizer, [prompts[i] for i in rows], seed=seed + start, **options)
            for i, text in zip(rows, out.texts, strict=True):
                texts[i] = text
            bar.update(len(rows))
    return texts


def completion_logits(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask_, samples_per_prompt: int = 1
) -> torch.Tensor:
    """Logits that predict each completion token, (N, C, V), in one forward pass over prompt + completion.

    With k samples per prompt (rows of one prompt adjacent and identical) the prompt runs once per prompt and its
    KV cache is shared by its k completions: the same activations, gradients flowing through the shared prefix,
    and k−1 of every k prompt forwards saved."""
    if samples_per_prompt > 1:
        return shared_prompt_logits(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask_, samples_per_prompt
        )
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask_], 1)
    # the LM head (49k-vocab on SmolLM2: a fifth of the model's FLOPs) only where a completion token is predicted
    logits = padded_forward(
        model, input_ids, attention, use_cache=False, logits_to_keep=completion_ids.shape[1] + 1
    ).logits
    return logits[:, :-1]


def shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask_, k: int) -> torch.Tensor:
    if prompt_ids.shape[0] % k or not torch.equal(prompt_ids[::k].repeat_interleave(k, 0), prompt_ids):
        raise ValueError(f"rows are not groups of {k} copies of one prompt")
    once_ids, once_mask = prompt_ids[::k], prompt_mask[::k]
    out = padded_forward(model, once_ids, once_mask, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:].repeat_interleave(k, 0)  # predicts completion token 0
    if completion_ids.shape[1] == 1:
        return first
    cache = output_cache(out)
    cache.batch_repeat_interleave(k)  # differentiable: the prompt's gradient sums over its k completions
    attention = torch.cat([prompt_mask, completion_mask_[:, :-1]], 1)
    start = prompt_mask.sum(1, keepdim=True)  # left padding: completion token j sits at position length + j
    positions = start + torch.arange(completion_ids.shape[1] - 1, device=start.device)
    rest = model(
        input_ids=completion_ids[:, :-1],
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        **{cache_kwarg(model): cache},
    ).logits
    return torch.cat([first, rest], 1)


def gather_logprobs(logits: torch.Tensor, completion_ids, completion_mask_) -> torch.Tensor:
    """log π(y_t | prefix) for every completion token, (N, C); zero where the mask is 0."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp * completion_mask_


def token_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask_) -> torch.Tensor:
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask_)
    return gather_logprobs(logits, completion_ids, completion_mask_)


@torch.no_grad()
def answer_loglik(
    model, tokenizer, prompts: Sequence[Messages | str], answers: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Mean token log-likelihood of each given answer as the assistant's reply (CEM tie-breaks, scoring)."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = encode_prompts(tokenizer, chunk, model, 0)
        tokenizer.padding_side = "right"
        try:
            ans = tokenizer(
                list(answers[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
            )
        finally:
            tokenizer.padding_side = "left"
        device = input_device(model)
        logp = token_logprobs(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            ans["input_ids"].to(device),
            ans["attention_mask"].to(device),
        )
        scores.append(logp.sum(1).cpu() / ans["attention_mask"].sum(1).clamp(min=1))
    return torch.cat(scores)


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's token split of a (context, continuation) pair: trailing spaces of the context move
    to the continuation, and the continuation's tokens are those of context + continuation after the context's
    own (so a merge across the boundary counts as continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        raise ValueError("a log-likelihood context must not be empty")
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    head = tokenizer(context, add_special_tokens=False).input_ids
    return head, whole[len(head) :]


@torch.no_grad()
def continuation_logliks(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """Σ log p(continuation | context) per pair, on raw text (no chat template: what lm-eval scores), batched by
    length with right padding."""
    encoded = [split_continuation(tokenizer, context, continuation) for context, continuation in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -sum(map(len, encoded[i])))
    out = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        inputs = [(encoded[i][0] + encoded[i][1])[:-1] for i in rows]  # the last token is only predicted
        ids = torch.full((len(rows), max(map(len, inputs))), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, row in enumerate(inputs):
            ids[j, : len(row)], mask[j, : len(row)] = torch.tensor(row), 1
        device = input_device(model)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for j, i in enumerate(rows):
            target = torch.tensor(encoded[i][1], device=logits.device)
            end = len(inputs[j])
            logp = logits[j, end - len(target) : end].float().log_softmax(-1)
            out[i] = float(logp.gather(-1, target[:, None]).sum())
    return out
