"""Pass 1 by classification: the base model (prompt-based) or a classifier expert labels each query
code | math | reasoning | other, and the matching expert answers (other → the base model)."""

from __future__ import annotations

import copy
import math

import torch

from t2ray.generation import cache_kwarg, generate, output_cache, render
from t2ray.kv_decode import KVDecoder, input_device, left_padded, unsupported_reason
from t2ray.tasks.cls import CATEGORIES, classification_messages, parse_category

BOXED_PREFIX = "Classification: \\boxed{"


def label_token_ids(tokenizer) -> dict[str, int]:
    """First token of each label as it follows the answer prefix; they must differ for one-pass scoring."""
    prefix = render(tokenizer, "Q") + BOXED_PREFIX
    base = tokenizer(prefix, add_special_tokens=False).input_ids
    ids = {}
    for label in CATEGORIES:
        full = tokenizer(prefix + label, add_special_tokens=False).input_ids
        if full[: len(base)] != base:
            raise ValueError(f"tokenizer merges the answer prefix with {label!r}: use mode 'generate'")
        ids[label] = full[len(base)]
    if len(set(ids.values())) < len(ids):
        raise ValueError("labels share a first token for this tokenizer: use mode 'generate'")
    return ids


def classification_ids(tokenizer, question: str) -> list[int]:
    """The token ids pass 1 reads for a question: classification prompt + the answer's start."""
    text = render(tokenizer, classification_messages(question)) + BOXED_PREFIX
    return tokenizer(text, add_special_tokens=False).input_ids


def length_groups(lengths: list[int], forward_cost: float) -> list[list[int]]:
    """Rows (indices into `lengths`) grouped into padded forwards at the least total cost, Σ over groups of
    forward_cost + rows × longest, in tokens. Sorted by length, the best groups are contiguous runs: O(n²)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)  # best[j]: the j shortest rows' cost
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + forward_cost + (j - i) * lengths[order[j - 1]]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


class PrefixScorer:
    """Score mode with the classification prompt's shared prefix run once per model state ("base", an expert's
    name...): each question then costs its own ~20 tokens instead of the whole ~270-token prompt. Questions are
    grouped by length into forwards (`length_groups`) so that short ones are not padded to the longest.

    The tokens are exactly those of the full prompt (tokenized whole, then the prefix checked); a question
    whose tokens do not start with the cached prefix is scored without the cache."""

    SLOT = "T2RAYQUESTIONSLOT"
    # What one more forward costs in padded tokens: on the CPU a forward's fixed cost (~50 ms for SmolLM2-135M)
    # is ~25 of its prefill tokens (bench/pass1_cost.py). math.inf: one forward for the whole batch.
    FORWARD_COST_TOKENS = 25.0

    def __init__(self, model, tokenizer, forward_cost_tokens: float = FORWARD_COST_TOKENS):
        self.model, self.tokenizer = model, tokenizer
        self.forward_cost_tokens = forward_cost_tokens
        text = render(tokenizer, classification_messages(self.SLOT))
        before = tokenizer(text[: text.index(self.SLOT)], add_special_tokens=False).input_ids
        self.prefix_ids = before[:-1]  # its last token may merge with the question's first
        ids = label_token_ids(tokenizer)
        self.labels, self.label_ids = list(ids), torch.tensor(list(ids.values()))
        # the KV decoder's step (packed weights, inference mode) where it runs; else Hugging Face's forward
        self.kv = unsupported_reason(model) is None
        self._caches: dict[str, object] = {}

    def _prefix_cache(self, state: str):
        """The prefix's keys and values (KV decoder: (layers, kv_heads, P, head_dim) each; else HF's cache)."""
        if state not in self._caches:
            prefix = torch.tensor([self.prefix_ids], device=input_device(self.model))
            if self.kv:
                decoder = KVDecoder(self.model, 1, prefix.shape[1])
                decoder.prefill(prefix, torch.ones_like(prefix))
                self._caches[state] = decoder.row_cache(0)
            else:
                self._caches[state] = output_cache(self.model(input_ids=prefix, use_cache=True, logits_to_keep=1))
        return self._caches[state]

    def _suffix_logits(self, suffixes: list[list[int]], state: str) -> torch.Tensor:
        """(N, vocab) last logits of prefix + each suffix, in one forward over the cached prefix."""
        P, device = len(self.prefix_ids), input_device(self.model)
        ids, mask = left_padded(suffixes, self.tokenizer.pad_token_id, device)
        if self.kv:
            prefix = tuple(t[:, None].expand(-1, len(suffixes), -1, -1, -1) for t in self._prefix_cache(state))
            return KVDecoder(self.model, len(suffixes), P + ids.shape[1]).prefill(ids, mask, prefix=prefix)
        cache = copy.deepcopy(self._prefix_cache(state))
        cache.batch_repeat_interleave(len(suffixes))
        return self.model(  # padding sits between the prefix and each suffix, masked
            input_ids=ids,
            attention_mask=torch.cat([mask.new_ones(len(suffixes), P), mask], 1),
            position_ids=(P + mask.cumsum(1) - 1) * mask,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg(self.model): cache},
        ).logits[:, -1]

    @torch.no_grad()
    def scores(self, questions: list[str], *, state: str = "base") -> torch.Tensor:
        """(N, 4) logits of the labels' first tokens after each question's classification prompt."""
        P, model, device = len(self.prefix_ids), self.model, input_device(self.model)
        rows = [classification_ids(self.tokenizer, q) for q in questions]
        out = torch.empty(len(rows), len(self.labels))
        label_ids = self.label_ids.to(device)
        cached = [i for i, ids in enumerate(rows) if ids[:P] == self.prefix_ids and len(ids) > P]
        for group in length_groups([len(rows[i]) - P for i in cached], self.forward_cost_tokens):
            members = [cached[g] for g in group]
            out[members] = self._suffix_logits([rows[i][P:] for i in members], state)[:, label_ids].float().cpu()
        for i in sorted(set(range(len(rows))) - set(cached)):  # no shared prefix: the whole prompt
            logits = model(input_ids=torch.tensor([rows[i]], device=device), logits_to_keep=1).logits[0, -1]
            out[i] = logits[label_ids].float().cpu()
        return out

    def classify(self, questions: list[str], *, state: str = "base", batch_size: int = 64) -> list[str]:
        labels = []
        for start in range(0, len(questions), batch_size):
            best = self.scores(questions[start : start + batch_size], state=state).argmax(-1)
            labels += [self.labels[k] for k in best.tolist()]
        return labels


@torch.no_grad()
def classify(model, tokenizer, questions: list[str], *, mode: str = "score", batch_size: int = 64) -> list[str]:
    """One label per question, after the reply is started with 'Classification: \\boxed{' (small models
    otherwise answer the question instead of classifying it). `score`: one forward pass comparing the labels'
    first-token logits (no generation); `generate`: the model writes the label (the paper's boxed answer)."""
    if mode == "generate":
        texts = generate(
            model,
            tokenizer,
            [classification_messages(q) for q in questions],
            max_new_tokens=8,
            batch_size=batch_size,
            reply_prefix=BOXED_PREFIX,
        )
        return [parse_category(BOXED_PREFIX + t) or "other" for t in texts]
    if mode != "score":
        raise ValueError(f"unknown classification mode {mode!r}: score | generate")
    return PrefixScorer(model, tokenizer).classify(questions, batch_size=batch_size)


def confusion(true: list[str], predicted: list[str]) -> dict:
    """Pass 1's dispatch quality: counts[i][j] = queries of true category i labelled j (labels: CATEGORIES),
    per-class accuracy (recall) over the categories that occur, and the overall accuracy."""
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true categories but {len(predicted)} predictions")
    unknown = sorted(set(true) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown true categories {unknown}: expected {list(CATEGORIES)}")
    index = {label: k for k, label in enumerate(CATEGORIES)}
    counts = [[0] * len(CATEGORIES) for _ in CATEGORIES]
    for t, p in zip(true, predicted, strict=True):
        counts[index[t]][index.get(p, index["other"])] += 1
    per_class = {
        label: row[k] / sum(row) for k, (label, row) in enumerate(zip(CATEGORIES, counts, strict=True)) if sum(row)
    }
    correct = sum(counts[k][k] for k in range(len(CATEGORIES)))
    return {
        "labels": list(CATEGORIES),
        "counts": counts,
        "per_class": per_class,
        "n": len(true),
        "accuracy": correct / max(1, len(true)),
    }
