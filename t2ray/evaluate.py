"""Accuracy of a (possibly adapted) model on a task split; JSON results."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t2ray.generation import generate
from t2ray.tasks.base import Example, Task


@dataclass
class EvalResult:
    task: str
    split: str
    accuracy: float
    n: int
    correct: int
    seconds: float
    adapter: str = "base"
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "records"}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


def safe_grade(task: Task, example: Example, completion: str) -> tuple[bool, str | None]:
    """Grade without letting a grader crash the run: an exception counts as wrong and is recorded."""
    try:
        return bool(task.grade(example, completion)), None
    except Exception as err:  # noqa: BLE001 — user graders may raise anything
        return False, f"{type(err).__name__}: {err}"


def grade_all(task: Task, examples: list[Example], completions: list[str]) -> list[tuple[bool, str | None]]:
    # Code graders wait on sandbox subprocesses: threads overlap them.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda pair: safe_grade(task, *pair), zip(examples, completions)))


def evaluate(model, tokenizer, task: Task, *, split: str = "test", limit: int | None = None, batch_size: int = 64,
             seed: int = 0, adapter: str = "base", progress: bool = True) -> EvalResult:
    """Greedy generation on `split` (first `limit` items) and lenient grading."""
    examples = task.examples(split)[:limit]
    start = time.perf_counter()
    completions = generate(model, tokenizer, [task.messages(ex) for ex in examples],
                           max_new_tokens=task.max_new_tokens, batch_size=batch_size, seed=seed,
                           progress=progress, desc=f"eval {task.name}/{split}")
    grades = grade_all(task, examples, completions)
    correct = sum(ok for ok, _ in grades)
    records = [{"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "completion": text, "correct": ok,
                **({"grader_error": err} if err else {})}
               for ex, text, (ok, err) in zip(examples, completions, grades)]
    return EvalResult(task=task.name, split=split, accuracy=correct / max(1, len(examples)), n=len(examples),
                      correct=correct, seconds=time.perf_counter() - start, adapter=adapter, records=records)
