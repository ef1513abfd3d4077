"""A user task (YAML + JSONL) that the random tiny-llama can learn with RL in ~20 iterations.

Why this design: tiny-llama's logits are h·E with |h| = 8 (after the final RMSNorm) and embedding entries
of std 0.02, so every logit lies within about ±1.3 whatever z is. At temperature 1 the policy is therefore
uniform over 49k tokens up to a factor of a few, and no text reward can move. At temperature 0.05 the same
logits span ±25: the base model then degenerately repeats the last prompt token ("\\n") — reward −1 on
every sample — and REINFORCE without a baseline pushes that down, after which the peaky z (SVF can
magnify one singular direction up to Σs/s₁ times) concentrates the policy on tokens containing an "e".
Measured single-process (batch 8, lr 0.3): mean reward of the first 5 iterations −0.55…−0.8, of
iterations 16–20 +0.05…+1.0 over 5 seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "rock",
    "fish",
    "bird",
    "rain",
    "star",
    "moon",
    "leaf",
    "wind",
    "fire",
    "snow",
    "sand",
    "wave",
]

# RL settings under which the task is learnable (see the module docstring).
LEARNABLE_RL = {"temperature": 0.05, "lr": 0.3, "baseline": "none", "grad_clip": 1.0, "max_new_tokens": 3}


def write_learnable_task(folder: Path, *, name: str = "has-e", train_split: bool = True) -> Path:
    """`folder/<name>.yaml` + JSONL: +1 when the completion contains an "e" (case-insensitive), else −1.

    128 distinct prompts → 96 train / 16 valid / 16 test. `train_split=False` gives a task with no training
    split (splits train 0), for the launcher's refusal.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Say a word about the {w} number {i}.", "answer": "e"} for i in range(8) for w in WORDS]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = "{train: 0.75, valid: 0.125, test: 0.125}" if train_split else "{train: 0, valid: 0.5, test: 0.5}"
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ndata: {name}.jsonl\ngrader: regex\npattern: '(e)'\nmax_new_tokens: 3\nsplits: {splits}\n"
    )
    return path


def rewards(history: list[dict]) -> list[float]:
    return [float(m["reward"]) for m in history]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)
