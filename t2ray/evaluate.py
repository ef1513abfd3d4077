"""Accuracy of a (possibly adapted) model on a task split; JSON results."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t2ray.generation import RawText, continuation_logliks, generate
from t2ray.tasks.base import Example, Task, choice_labels
from t2ray.tasks.graders import resolve_choice_answer
from t2ray.tasks.sandbox import SandboxUnavailable


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
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. acc_norm beside accuracy (= acc)

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
    except SandboxUnavailable:  # no OS sandbox for model-written code: a set-up problem, not a wrong answer
        raise
    except Exception as err:  # noqa: BLE001 — user graders may raise anything
        return False, f"{type(err).__name__}: {err}"


def grade_all(task: Task, examples: list[Example], completions: list[str]) -> list[tuple[bool, str | None]]:
    # Code graders wait on sandbox subprocesses: threads overlap them.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda pair: safe_grade(task, *pair), zip(examples, completions, strict=True)))


COMPLETION_STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval's gsm8k `until`


def cut_at_stop(text: str, stops: tuple[str, ...] = COMPLETION_STOP) -> str:
    """The text before the first stop string (lm-eval's `until`)."""
    return min((text.split(stop)[0] for stop in stops), key=len)


MODES = ("generate", "completion", "loglik")


def evaluate(
    model,
    tokenizer,
    task: Task,
    *,
    mode: str = "generate",
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    adapter: str = "base",
    progress: bool = True,
) -> EvalResult:
    """Accuracy on `split` (its first `limit` items), by `mode`:

    - generate: greedy generation from the task's chat prompt, graded leniently;
    - completion: the model continues each item's bare context ("Question: …\nAnswer:", no chat template) and the
      text is cut at COMPLETION_STOP, as lm-evaluation-harness's generation tasks do; the task's grader grades it;
    - loglik: multiple choice by log-likelihood, as lm-evaluation-harness's `acc` and `acc_norm`: every choice,
      after a space, continues the item's context; `acc` picks the highest Σ log p, `acc_norm` the highest per
      character of the choice. No generation, so small models get a signal where they cannot yet answer in format.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: {' | '.join(MODES)}")
    examples = task.examples(split)[:limit]
    if mode == "completion" and any(ex.context is None for ex in examples):
        raise ValueError(f"{task.name}: completion mode needs items with a context (gsm8k, arc-easy, arc-challenge)")
    if mode == "loglik" and (missing := [ex.id for ex in examples if not ex.choices or not ex.context]):
        raise ValueError(
            f"{task.name}: log-likelihood evaluation needs multiple-choice items with a context "
            f"(arc-easy, arc-challenge); {missing[0]} has none"
        )
    start = time.perf_counter()
    if mode == "loglik":
        records = _choice_records(model, tokenizer, examples, batch_size, progress, f"loglik {task.name}/{split}")
    else:
        records = _graded_records(
            model,
            tokenizer,
            task,
            examples,
            mode == "completion",
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            desc=f"eval {task.name}/{split}",
        )
    correct = sum(r["correct"] for r in records)
    n = max(1, len(records))
    return EvalResult(
        task=task.name,
        split=split,
        accuracy=correct / n,
        n=len(records),
        correct=correct,
        seconds=time.perf_counter() - start,
        adapter=adapter,
        records=records,
        metrics={"acc_norm": sum(r["correct_norm"] for r in records) / n} if mode == "loglik" else {},
    )


def _graded_records(
    model, tokenizer, task: Task, examples: list[Example], completion: bool, **generation
) -> list[dict]:
    """Greedy completions (of the bare contexts, cut at COMPLETION_STOP, for `completion`), each graded."""
    prompts = [RawText(ex.context) if completion else task.messages(ex) for ex in examples]
    completions = generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, **generation)
    if completion:
        completions = [cut_at_stop(text) for text in completions]
    grades = grade_all(task, examples, completions)
    return [
        {
            "id": ex.id,
            "prompt": ex.prompt,
            "answer": ex.answer,
            "completion": text,
            "correct": ok,
            **({"grader_error": err} if err else {}),
        }
        for ex, text, (ok, err) in zip(examples, completions, grades, strict=True)
    ]


def _choice_records(
    model, tokenizer, examples: list[Example], batch_size: int, progress: bool, desc: str
) -> list[dict]:
    """Every choice's log-likelihood after its item's context; the picks by Σ log p and by log p per character."""
    from tqdm.auto import tqdm

    pairs = [(ex.context, " " + choice) for ex in examples for choice in ex.choices]
    scores: list[float] = []
    with tqdm(total=len(pairs), desc=desc, unit="choice", disable=not progress) as bar:
        for first in range(0, len(pairs), 8 * batch_size):
            chunk = pairs[first : first + 8 * batch_size]
            scores += continuation_logliks(model, tokenizer, chunk, batch_size=batch_size)
            bar.update(len(chunk))
    records, at = [], 0
    for ex in examples:
        lls = scores[at : at + len(ex.choices)]
        at += len(ex.choices)
        letters, gold = choice_labels(len(ex.choices)), resolve_choice_answer(ex.answer, ex.choices)
        pick = letters[max(range(len(lls)), key=lls.__getitem__)]
        pick_norm = letters[max(range(len(lls)), key=lambda k: lls[k] / len(ex.choices[k]))]
        records.append(
            {
                "id": ex.id,
                "prompt": ex.context,
                "answer": ex.answer,
                "logliks": lls,
                "completion": pick,
                "correct": pick == gold,
                "correct_norm": pick_norm == gold,
            }
        )
    return records
