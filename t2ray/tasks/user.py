"""User tasks from a YAML file (``--task path/to/task.yaml``), validated with pydantic.

Example::

    name: capitals
    data: capitals.jsonl          # JSONL rows: prompt, answer [, id, choices, tests, entry_point]
    grader: exact                 # exact | numeric | choice | regex | python-tests | math | category
    prompt_template: "{prompt} Reply with just the name."
    max_new_tokens: 16
    category: other               # math | code | reasoning | classification | other
    splits: [0.7, 0.1, 0.2]       # train/valid/test fractions (seeded shuffle)

Instead of ``data``, ``dataset`` loads rows with ``datasets.load_dataset``::

    dataset:
      format: gsm8k               # generic (rows like the JSONL) | gsm8k | mbpp | arc | math
      path: openai/gsm8k          # hub id, or...
      config: main
      data_files: {train: train.jsonl, test: test.jsonl}   # ...local files (json/jsonl/parquet/csv)

Other keys: ``pattern`` (regex grader: the first group, else the whole match, is compared with
the answer), ``system_prompt``, ``reference_template`` (the reference reply, default
``{answer}``; ``{choice}`` is the text of the right option), ``description``.
Relative paths resolve against the YAML file's folder. Every error names the file, the line and
the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .base import (
    Example,
    TaskError,
    dedupe_across_splits,
    format_choices,
    normalize_prompt,
    split_by_fractions,
)
from .common import GradedTask
from .graders import GRADERS, resolve_choice_answer

ROW_KEYS = ("id", "prompt", "answer", "choices", "tests", "entry_point")
GraderName = Literal["exact", "numeric", "choice", "regex", "python-tests", "math", "category"]
TaskCategory = Literal["math", "code", "reasoning", "classification", "other"]
_FORMAT_GRADERS = {"gsm8k": "numeric", "mbpp": "python-tests", "arc": "choice", "math": "math"}


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["generic", "gsm8k", "mbpp", "arc", "math"] = "generic"
    path: str | None = None
    config: str | list[str] | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _source(self) -> DatasetSpec:
        if not self.path and not self.data_files:
            raise ValueError("dataset needs `path` (hub id) or `data_files` (local files)")
        return self


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    data: str | None = None
    dataset: DatasetSpec | None = None
    grader: GraderName | None = None
    pattern: str | None = None
    system_prompt: str | None = None
    prompt_template: str | None = None
    reference_template: str = "{answer}"
    max_new_tokens: int = Field(default=64, ge=1, le=32768)
    category: TaskCategory = "other"
    splits: list[float] | dict[str, float] = Field(default_factory=lambda: [0.7, 0.1, 0.2])
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v):
            raise ValueError("must be letters, digits, '_', '-', '.' (no spaces or slashes)")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None and "{prompt}" not in v:
            raise ValueError("must contain the placeholder {prompt}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: list[float] | dict[str, float]) -> list[float] | dict[str, float]:
        vals = list(v.values()) if isinstance(v, dict) else v
        if isinstance(v, dict):
            unknown = set(v) - {"train", "valid", "test"}
            if unknown:
                raise ValueError(f"unknown split(s) {sorted(unknown)}; use train, valid, test")
        elif len(v) != 3:
            raise ValueError("must be three fractions [train, valid, test]")
        if any(x < 0 for x in vals) or sum(vals) <= 0:
            raise ValueError("fractions must be non-negative and not all zero")
        return v

    @model_validator(mode="after")
    def _consistency(self) -> TaskSpec:
        if (self.data is None) == (self.dataset is None):
            raise ValueError("give exactly one of `data` (a JSONL file) or `dataset`")
        if self.grader is None:
            if self.dataset is not None and self.dataset.format != "generic":
                self.grader = _FORMAT_GRADERS[self.dataset.format]  # type: ignore[assignment]
            else:
                raise ValueError("`grader` is required (exact, numeric, choice, regex, python-tests, math, category)")
        if self.grader == "regex" and not self.pattern:
            raise ValueError("the regex grader needs `pattern`")
        return self

    def fractions(self) -> tuple[float, float, float]:
        if isinstance(self.splits, dict):
            return tuple(float(self.splits.get(k, 0.0)) for k in ("train", "valid", "test"))  # type: ignore[return-value]
        return tuple(float(x) for x in self.splits)  # type: ignore[return-value]


# ---- error helpers ------------------------------------------------------------------------------


def _key_line(text: str, key: str) -> int | None:
    """1-based line of the first ``key:`` in the YAML text (for error messages)."""
    m = re.search(rf"^\s*{re.escape(key)}\s*:", text, flags=re.M)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _validation_message(path: Path, text: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if not isinstance(x, int)]
    key = ".".join(loc) if loc else ""
    line = None
    for part in reversed(loc):
        line = _key_line(text, part)
        if line:
            break
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown key"
    elif e.get("type") == "missing":
        msg = "missing required key"
    msg = re.sub(r"^(Value|Assertion) error, ", "", msg)
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: key '{key}': {msg}" if key else f"{where}: {msg}"


# ---- rows ---------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-empty line; clear errors for bad lines and keys."""
    if not path.is_file():
        raise TaskError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{lineno}: each line must be a JSON object")
            unknown = [k for k in row if k not in ROW_KEYS]
            if unknown:
                raise TaskError(f"{path}:{lineno}: unknown key '{unknown[0]}' (allowed: {', '.join(ROW_KEYS)})")
            rows.append((lineno, row))
    if not rows:
        raise TaskError(f"{path}: no rows")
    return rows


def row_to_example(row: Mapping[str, Any], where: str, default_id: str, spec: TaskSpec) -> Example:
    for key in ("prompt", "answer"):
        if key not in row or row[key] is None:
            if key == "answer" and spec.grader == "python-tests":
                continue  # code tasks may come without a reference solution
            raise TaskError(f"{where}: missing key '{key}'")
    for key in ("prompt", "answer", "tests", "entry_point", "id"):
        if row.get(key) is not None and not isinstance(row[key], (str, int, float)):
            raise TaskError(f"{where}: key '{key}' must be a string")
    if not str(row["prompt"]).strip():
        raise TaskError(f"{where}: key 'prompt' is empty")
    choices = row.get("choices")
    if choices is not None:
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, (str, int, float)) for c in choices)
        ):
            raise TaskError(f"{where}: key 'choices' must be a list of at least two strings")
        choices = tuple(str(c) for c in choices)
    answer = str(row.get("answer") if row.get("answer") is not None else "")
    if spec.grader == "choice":
        if not choices:
            raise TaskError(f"{where}: missing key 'choices' (the choice grader needs options)")
        try:
            answer = resolve_choice_answer(answer, choices)
        except TaskError:
            raise TaskError(f"{where}: key 'answer': {answer!r} is neither a letter nor one of the choices") from None
    if spec.grader == "python-tests" and not row.get("tests"):
        raise TaskError(f"{where}: missing key 'tests' (the python-tests grader runs them)")
    prompt = str(row["prompt"])
    template = spec.prompt_template or "{prompt}"
    rendered = template.replace("{prompt}", prompt)
    if choices and spec.grader == "choice":
        opts = format_choices(choices)
        rendered = rendered.replace("{choices}", opts) if "{choices}" in template else (f"{rendered}\n{opts}")
    return Example(
        id=str(row.get("id") if row.get("id") is not None else default_id),
        prompt=rendered,
        answer=answer,
        choices=choices,
        tests=str(row["tests"]) if row.get("tests") else None,
        entry_point=str(row["entry_point"]) if row.get("entry_point") else None,
        category=spec.category if spec.category != "classification" else "other",
    )


def _jsonl_splits(spec: TaskSpec, data_path: Path, seed: int) -> dict[str, list[Example]]:
    exs: list[Example] = []
    ids: dict[str, int] = {}
    prompts: set[str] = set()
    for lineno, row in read_jsonl(data_path):
        where = f"{data_path}:{lineno}"
        ex = row_to_example(row, where, f"{spec.name}/{lineno}", spec)
        if ex.id in ids:
            raise TaskError(f"{where}: key 'id': duplicate id {ex.id!r} (first on line {ids[ex.id]})")
        ids[ex.id] = lineno
        key = normalize_prompt(ex.prompt)
        if key in prompts:
            continue  # a repeated prompt would break split disjointness: keep the first
        prompts.add(key)
        exs.append(ex)
    out = split_by_fractions(exs, spec.fractions(), f"{spec.name}:{seed}")
    return dedupe_across_splits(out)


class UserTask(GradedTask):
    """A task defined by a YAML file."""

    def __init__(self, spec: TaskSpec, yaml_path: Path, seed: int = 0) -> None:
        self.spec = spec
        self.yaml_path = yaml_path
        self.seed = seed
        base = yaml_path.parent
        options = {"pattern": spec.pattern} if spec.grader == "regex" else {}
        self._dataset_task = None
        if spec.dataset is not None and spec.dataset.format != "generic":
            from .datasets import DatasetTask

            d = spec.dataset
            self._dataset_task = DatasetTask(
                spec.name,
                d.format,
                path=d.path,
                config=d.config,
                data_files=d.data_files,
                cache_dir=d.cache_dir,
                base_dir=base,
                fractions=spec.fractions(),
                seed=seed,
            )
        super().__init__(
            spec.name,
            spec.category,
            spec.grader or "exact",
            self._build,
            system_prompt=spec.system_prompt,
            max_new_tokens=spec.max_new_tokens,
            grader_options=options,
            reference_template=spec.reference_template,
            description=spec.description,
        )

    def _build(self) -> dict[str, list[Example]]:
        spec = self.spec
        if spec.data is not None:
            data_path = Path(spec.data).expanduser()
            if not data_path.is_absolute():
                data_path = self.yaml_path.parent / data_path
            out = _jsonl_splits(spec, data_path, self.seed)
        elif self._dataset_task is not None:
            out = {k: [self._apply_template(ex) for ex in v] for k, v in self._dataset_task.splits().items()}
        else:
            out = self._generic_dataset_splits()
        self._check_references(out)
        return out

    def _apply_template(self, ex: Example) -> Example:
        if not self.spec.prompt_template:
            return ex
        return Example(
            ex.id,
            self.spec.prompt_template.replace("{prompt}", ex.prompt),
            ex.answer,
            ex.choices,
            ex.tests,
            ex.entry_point,
            ex.category,
        )

    def _generic_dataset_splits(self) -> dict[str, list[Example]]:
        from .datasets import arrange_splits, load_rows

        d = self.spec.dataset
        assert d is not None
        rows, real = load_rows(
            d.path, config=d.config, data_files=d.data_files, cache_dir=d.cache_dir, base_dir=self.yaml_path.parent
        )
        by_source: dict[str, list[Example]] = {}
        for src, src_rows in rows.items():
            exs = []
            for i, row in enumerate(src_rows):
                row = {k: v for k, v in row.items() if k in ROW_KEYS}
                where = f"{self.yaml_path}: dataset row {src}/{i}"
                exs.append(row_to_example(row, where, f"{self.spec.name}/{src}/{i}", self.spec))
            by_source[src] = exs
        return arrange_splits(
            by_source,
            real,
            seed=f"{self.spec.name}:{self.seed}",
            fractions=self.spec.fractions(),
            task_name=self.spec.name,
        )

    def _check_references(self, splits: dict[str, list[Example]]) -> None:
        """The reference reply must pass the grader (catches a wrong reference_template or
        pattern early). Code tasks are not executed here."""
        if self.grader == "python-tests":
            return
        for exs in splits.values():
            for ex in exs[:5]:
                ref = self.reference_completion(ex)
                if not self.grade(ex, ref):
                    raise TaskError(
                        f"{self.yaml_path}: the reference reply {ref[:60]!r} for example "
                        f"{ex.id!r} fails the {self.grader!r} grader; fix `reference_template`"
                        + (" or `pattern`" if self.grader == "regex" else "")
                    )

    def reference_completion(self, ex: Example) -> str:
        if self._dataset_task is not None and self.spec.reference_template == "{answer}":
            return self._dataset_task.reference_completion(ex)
        return super().reference_completion(ex)


def load_task_yaml(path: str | Path, seed: int = 0) -> UserTask:
    """Parse and validate a task YAML file. A local JSONL is read and checked at once; a
    ``dataset`` is loaded lazily on first use."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskError(f"task file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TaskError(f"{p}{line}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{p}: a task file must be a YAML mapping of keys (name, data, grader, ...)")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        raise TaskError(_validation_message(p, text, exc)) from None
    if spec.grader not in GRADERS:  # pragma: no cover - Literal guards this
        raise TaskError(f"{p}: key 'grader': unknown grader {spec.grader!r}")
    task = UserTask(spec, p.resolve(), seed=seed)
    if spec.data is not None:
        task.splits()  # local JSONL: validate every row now, errors name file, line and key
    return task
