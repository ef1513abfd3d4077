"""The task protocol: examples, splits, chat messages, grading and rewards.

Tasks know nothing about models. A model-side caller needs only:

* ``task.examples(split)``: a deterministic list of :class:`Example` (``split`` is one of
  ``"train"``, ``"valid"``, ``"test"``; the three are disjoint by id and by prompt text);
* ``task.messages(ex)``: the chat messages to feed the chat template;
* ``task.grade(ex, completion)`` / ``task.reward(ex, completion)``: lenient grading of the
  answer (not its wrapping) and the ±1 RL reward;
* ``task.reference_completion(ex)``: a correct reply in the format the prompt asks for.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

SPLITS: tuple[str, ...] = ("train", "valid", "test")
EXAMPLE_CATEGORIES: tuple[str, ...] = ("math", "code", "reasoning", "other")
TASK_CATEGORIES: tuple[str, ...] = ("math", "code", "reasoning", "classification", "other")


class TaskError(ValueError):
    """A clear, one-line error about a task, its data or its configuration."""


@dataclass(frozen=True)
class Example:
    """One task item.

    ``prompt`` is the user-message text. ``answer`` is the reference answer as text (for code
    tasks a reference solution when one is known, else ``""``). ``tests``/``entry_point`` are
    set for code tasks; ``choices`` for multiple-choice tasks (``answer`` is then a letter), with
    ``context``, when known, the bare text a log-likelihood evaluation continues with each choice
    (lm-evaluation-harness's ``doc_to_text``, e.g. ``"Question: …\nAnswer:"``).
    """

    id: str
    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    tests: str | None = None
    entry_point: str | None = None
    category: str = ""
    context: str | None = None


class Task(ABC):
    """A task: splits of examples, chat formatting, a grader and a reward."""

    name: str = ""
    category: str = "other"
    system_prompt: str | None = None
    max_new_tokens: int = 64

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """The examples of ``split`` (``train``/``valid``/``test``); deterministic."""

    def messages(self, ex: Example) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": ex.prompt})
        return msgs

    @abstractmethod
    def grade(self, ex: Example, completion: str) -> bool:
        """True when ``completion`` answers ``ex`` correctly (lenient about the wrapping)."""

    def reward(self, ex: Example, completion: str) -> float:
        return 1.0 if self.grade(ex, completion) else -1.0

    @abstractmethod
    def reference_completion(self, ex: Example) -> str:
        """A correct assistant reply in the format the prompt asks for."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, category={self.category!r})"


def check_split_name(split: str, task_name: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"task {task_name!r}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


class SplitTask(Task):
    """A task whose three splits are built once (lazily) by :meth:`build_splits`.

    The built splits are validated: each must be non-empty (else a clear :class:`TaskError`
    names the missing split), and ids and prompt texts must be disjoint across splits.
    """

    def __init__(self) -> None:
        self._splits: dict[str, list[Example]] | None = None

    @abstractmethod
    def build_splits(self) -> dict[str, list[Example]]:
        """Return ``{"train": [...], "valid": [...], "test": [...]}``."""

    def splits(self) -> dict[str, list[Example]]:
        if self._splits is None:
            built = self.build_splits()
            validate_splits(built, self.name)
            self._splits = built
        return self._splits

    def examples(self, split: str) -> list[Example]:
        check_split_name(split, self.name)
        exs = self.splits().get(split) or []
        if not exs:
            raise TaskError(f"task {self.name!r}: split {split!r} is missing or empty")
        return list(exs)


def validate_splits(splits: dict[str, list[Example]], task_name: str) -> None:
    """Raise :class:`TaskError` when an id repeats anywhere or a prompt is in two splits."""
    seen_ids: dict[str, str] = {}
    seen_prompts: dict[str, str] = {}
    for split, exs in splits.items():
        for ex in exs:
            if ex.id in seen_ids:
                raise TaskError(
                    f"task {task_name!r}: duplicate example id {ex.id!r} (in {seen_ids[ex.id]!r} and {split!r})"
                )
            seen_ids[ex.id] = split
            key = normalize_prompt(ex.prompt)
            if key in seen_prompts and seen_prompts[key] != split:
                raise TaskError(
                    f"task {task_name!r}: prompt of {ex.id!r} appears in both {seen_prompts[key]!r} and {split!r}"
                )
            seen_prompts.setdefault(key, split)


def normalize_prompt(text: str) -> str:
    return " ".join(text.split()).casefold()


def dedupe_across_splits(
    splits: dict[str, list[Example]], priority: Sequence[str] = ("test", "valid", "train")
) -> dict[str, list[Example]]:
    """Drop repeated prompts: within a split keep the first, across splits the higher-priority
    split (test, then valid, then train) keeps the prompt, so no test prompt leaks into train."""
    taken: set[str] = set()
    out: dict[str, list[Example]] = {}
    for split in priority:
        kept = []
        for ex in splits.get(split, []):
            key = normalize_prompt(ex.prompt)
            if key in taken:
                continue
            taken.add(key)
            kept.append(ex)
        out[split] = kept
    return {k: out[k] for k in SPLITS if k in out}


def split_by_fractions(
    items: Sequence[Example], fractions: Sequence[float], seed: int | str
) -> dict[str, list[Example]]:
    """Deterministically shuffle ``items`` and cut them into train/valid/test by ``fractions``.

    Every split with a positive fraction gets at least one item when there are enough items.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise TaskError(f"splits must be three non-negative fractions, got {list(fractions)}")
    total = float(sum(fractions))
    fr = [f / total for f in fractions]
    order = list(items)
    random.Random(f"split:{seed}").shuffle(order)
    n = len(order)
    counts = [int(round(f * n)) for f in fr]
    for i, f in enumerate(fr):  # every requested split non-empty when possible
        if f > 0 and counts[i] == 0 and n >= sum(1 for x in fr if x > 0):
            counts[i] = 1
    while sum(counts) > n:  # trim the largest
        counts[counts.index(max(counts))] -= 1
    counts[0] += n - sum(counts)  # rounding slack to train
    a, b = counts[0], counts[0] + counts[1]
    return {"train": order[:a], "valid": order[a:b], "test": order[b:]}


def generate_unique(
    make: Callable[[random.Random], Example | None],
    n: int,
    rng: random.Random,
    *,
    max_tries: int | None = None,
    task_name: str = "",
    key: Callable[[Example], str] | None = None,
) -> list[Example]:
    """Call ``make(rng)`` until ``n`` examples with distinct prompts exist, returned shuffled
    (ids are reassigned by the caller). ``make`` may return None to reject a draw. ``key``
    (default: the normalised prompt) decides what else counts as a repeat, e.g. the same
    question with reshuffled options."""
    out: list[Example] = []
    seen: set[str] = set()
    tries = 0
    limit = max_tries if max_tries is not None else 200 * n + 1000
    while len(out) < n:
        tries += 1
        if tries > limit:
            raise TaskError(f"task {task_name!r}: could only generate {len(out)} distinct prompts of {n}")
        ex = make(rng)
        if ex is None:
            continue
        p = normalize_prompt(ex.prompt)
        k = "key:" + key(ex) if key is not None else p
        if k in seen or p in seen:
            continue
        seen.update((k, p))
        out.append(ex)
    # Shuffle: draws late in the loop are skewed toward the families that are not yet
    # exhausted; shuffling keeps every split drawn from the same mixture.
    rng.shuffle(out)
    return out


def assign_splits(pool: Iterable[Example], sizes: dict[str, int], prefix: str) -> dict[str, list[Example]]:
    """Cut an already shuffled pool into consecutive splits and give stable ids
    ``{prefix}/{split}/{i}``."""
    pool = list(pool)
    need = sum(sizes.values())
    if len(pool) < need:
        raise TaskError(f"task {prefix!r}: pool of {len(pool)} < requested {need} examples")
    out: dict[str, list[Example]] = {}
    pos = 0
    for split in SPLITS:
        k = sizes.get(split, 0)
        out[split] = [_with_id(ex, f"{prefix}/{split}/{i}") for i, ex in enumerate(pool[pos : pos + k])]
        pos += k
    return out


def build_splits(
    name: str,
    make: Callable[[random.Random], Example | None],
    sizes: dict[str, int],
    seed: int,
    key: Callable[[Example], str] | None = None,
) -> dict[str, list[Example]]:
    """Seeded pool of distinct examples from ``make``, cut into splits with stable ids: the shared recipe of
    every procedurally generated task."""
    pool = generate_unique(make, sum(sizes.values()), random.Random(f"{name}:{seed}"), task_name=name, key=key)
    return assign_splits(pool, sizes, name)


def _with_id(ex: Example, new_id: str) -> Example:
    return replace(ex, id=new_id)


def choice_labels(n: int) -> tuple[str, ...]:
    if n > 26:
        raise TaskError(f"at most 26 choices are supported, got {n}")
    return tuple(chr(ord("A") + i) for i in range(n))


def format_choices(choices: Sequence[str]) -> str:
    return "\n".join(f"{lab}. {text}" for lab, text in zip(choice_labels(len(choices)), choices, strict=True))
