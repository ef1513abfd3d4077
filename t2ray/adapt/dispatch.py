"""Pass 1 by classification: the base model (prompt-based) or a classifier expert labels each query
code | math | reasoning | other, and the matching expert answers (other → the base model)."""
from __future__ import annotations

import torch

from t2ray.generation import generate, render
from t2ray.tasks.cls import CATEGORIES, classification_messages, parse_category

BOXED_PREFIX = "Classification: \\boxed{"


def label_token_ids(tokenizer) -> dict[str, int]:
    """First token of each label as it follows the answer prefix; they must differ for one-pass scoring."""
    prefix = render(tokenizer, "Q") + BOXED_PREFIX
    base = tokenizer(prefix, add_special_tokens=False).input_ids
    ids = {}
    for label in CATEGORIES:
        full = tokenizer(prefix + label, add_special_tokens=False).input_ids
        if full[:len(base)] != base:
            raise ValueError(f"tokenizer merges the answer prefix with {label!r}: use mode 'generate'")
        ids[label] = full[len(base)]
    if len(set(ids.values())) < len(ids):
        raise ValueError("labels share a first token for this tokenizer: use mode 'generate'")
    return ids


@torch.no_grad()
def classify(model, tokenizer, questions: list[str], *, mode: str = "score", batch_size: int = 16) -> list[str]:
    """One label per question, after the reply is started with 'Classification: \\boxed{' (small models
    otherwise answer the question instead of classifying it). `score`: one forward pass comparing the labels'
    first-token logits (no generation); `generate`: the model writes the label (the paper's boxed answer)."""
    messages = [classification_messages(q) for q in questions]
    if mode == "generate":
        texts = generate(model, tokenizer, messages, max_new_tokens=8, batch_size=batch_size,
                         reply_prefix=BOXED_PREFIX)
        return [parse_category(BOXED_PREFIX + t) or "other" for t in texts]
    if mode != "score":
        raise ValueError(f"unknown classification mode {mode!r}: score | generate")
    ids = label_token_ids(tokenizer)
    labels, label_ids = list(ids), torch.tensor(list(ids.values()))
    out: list[str] = []
    for start in range(0, len(messages), batch_size):
        texts = [render(tokenizer, m) + BOXED_PREFIX for m in messages[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
        logits = model(**batch, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]
        out += [labels[i] for i in logits[:, label_ids.to(logits.device)].argmax(-1).tolist()]
    return out
