"""A concrete task class shared by the built-in, real-dataset and user tasks: splits built once,
graded by a named grader from :mod:`t2ray.tasks.graders`; and the recipe of the built-in generated tasks."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from .base import Example, SplitTask, TaskError, build_splits
from .graders import get_grader

T = TypeVar("T")

# Split sizes of the generated training tasks (math, code, reasoning, cls) and of the unseen ones
# (the -hard variants), which have only a few items to learn from.
TRAIN_SIZES = {"train": 256, "valid": 64, "test": 128}
UNSEEN_SIZES = {"train": 32, "valid": 16, "test": 128}


def fenced_python(code: str) -> str:
    return "```python\n" + code.strip("\n") + "\n```"


class GradedTask(SplitTask):
    """A task graded by one of the named graders.

    ``reference_template`` formats the reference reply from the example's answer (``{answer}``,
    ``{choice}`` = the text of the right option); ``python-tests`` tasks reply with the reference
    solution in a fenced block.
    """

    def __init__(
        self,
        name: str,
        category: str,
        grader: str,
        builder: Callable[[], dict[str, list[Example]]],
        *,
        system_prompt: str | None = None,
        max_new_tokens: int = 64,
        grader_options: Mapping[str, Any] | None = None,
        reference_template: str = "{answer}",
        description: str = "",
    ) -> None:
        super().__init__()
        self.name = name
        self.category = category
        self.grader = grader
        self._grade_fn = get_grader(grader)
        self._builder = builder
        self.system_prompt = system_prompt
        self.max_new_tokens = int(max_new_tokens)
        self.grader_options = dict(grader_options or {})
        self.reference_template = reference_template
        self.description = description

    def build_splits(self) -> dict[str, list[Example]]:
        return self._builder()

    def grade(self, ex: Example, completion: str) -> bool:
        return bool(self._grade_fn(ex, completion, **self.grader_options))

    def reference_completion(self, ex: Example) -> str:
        if self.grader == "python-tests":
            if not ex.answer.strip():
                raise TaskError(f"task {self.name!r}: example {ex.id!r} has no reference solution")
            return fenced_python(ex.answer)
        choice = ""
        if ex.choices:
            letter = ex.answer.strip().upper()
            idx = ord(letter) - ord("A") if len(letter) == 1 else -1
            choice = ex.choices[idx] if 0 <= idx < len(ex.choices) else ex.answer
        try:
            return self.reference_template.format(answer=ex.answer, choice=choice)
        except (KeyError, IndexError, ValueError) as exc:
            raise TaskError(f"task {self.name!r}: bad reference_template {self.reference_template!r}: {exc}") from None


def generated_task(
    name: str,
    category: str,
    grader: str,
    draw: Callable[[random.Random], Example],
    sizes: dict[str, int],
    seed: int,
    *,
    key: Callable[[Example], str] | None = None,
    **options: Any,
) -> GradedTask:
    """A built-in offline task: its splits are distinct examples drawn from ``draw`` with an RNG seeded by
    ``name`` and ``seed`` (:func:`~t2ray.tasks.base.build_splits`, ``key`` says what else counts as a repeat);
    ``options`` go to :class:`GradedTask`."""
    return GradedTask(name, category, grader, lambda: build_splits(name, draw, sizes, seed, key=key), **options)


def pick_family(families: Sequence[Callable[[random.Random], T]]) -> Callable[[random.Random], T]:
    """A draw that picks one of ``families`` uniformly, then draws from it with the same RNG."""
    return lambda r: r.choice(families)(r)
