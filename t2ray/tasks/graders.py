"""Lenient graders: they grade the answer, not its wrapping.

Each grader is a plain function of the completion and the reference; :data:`GRADERS` maps the
names used in task YAML files (``exact``, ``numeric``, ``choice``, ``regex``, ``python-tests``,
``math``, ``category``) to functions with the uniform signature
``grade(example, completion, **options) -> bool``.
"""

from __future__ import annotations

import ast
import math as _math
import re
import textwrap
from collections.abc import Callable, Sequence

from .base import Example, TaskError, choice_labels
from .sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, run_python

# --------------------------------------------------------------------------------------------
# text helpers

_NUM_RE = re.compile(
    r"(?<![\w.])[-−]?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?!\.\d))?"
    r"|(?<![\w.])[-−]?\.\d+"
)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        # "\boxed 5" form
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[idx:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def parse_number(token: str) -> float | None:
    """``"1,234"``, ``"$5"``, ``"-3.50"``, ``"3/4"``, ``"\\frac{3}{4}"``, ``"12."`` → float."""
    t = token.strip().replace("−", "-").replace("$", "").replace("\\!", "")
    t = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", t)
    t = t.replace("{", "").replace("}", "").replace(" ", "").rstrip(".")
    t = t.replace("\\%", "").rstrip("%")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    m = re.fullmatch(r"\(?(-?\d+(?:\.\d+)?)\)?/\(?(-?\d+(?:\.\d+)?)\)?", t)
    if m:
        den = float(m.group(2))
        return float(m.group(1)) / den if den != 0 else None
    try:
        val = float(t)
    except ValueError:
        return None
    return val if _math.isfinite(val) else None


def numbers_in(text: str) -> list[float]:
    vals = []
    for m in _NUM_RE.finditer(text):
        v = parse_number(m.group(0))
        if v is not None:
            vals.append(v)
    return vals


def extract_final_number(text: str) -> float | None:
    """The final numeric answer of a completion: a ``\\boxed{}`` value if there is one, else the
    number after ``####``, else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        v = parse_number(boxed)
        if v is not None:
            return v
        nums = numbers_in(boxed)
        if nums:
            return nums[-1]
    if "####" in text:
        nums = numbers_in(text.rsplit("####", 1)[1])
        if nums:
            return nums[0]
    nums = numbers_in(text)
    return nums[-1] if nums else None


def numbers_equal(a: float, b: float, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    return _math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def normalize_text(text: str) -> str:
    t = text.strip()
    t = re.sub(r"^\s*(?:final\s+)?answer\s*[:：]\s*", "", t, flags=re.I)
    prev = None
    while prev != t:  # peel wrappers in any order: **Paris**.  "Paris."  `Paris`!
        prev = t
        t = t.strip().strip("*_`\"'“”‘’").strip().rstrip(".!。").strip()
    return " ".join(t.split()).casefold()


# --------------------------------------------------------------------------------------------
# graders on plain values


def grade_exact(completion: str, answer: str) -> bool:
    """Equal after normalising case, whitespace, quotes, markdown and a trailing period; the
    whole reply, its last non-empty line, its first line or a ``\\boxed{}`` may carry it."""
    target = normalize_text(answer)
    if not target:
        return False
    candidates = [completion]
    lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
    if lines:
        candidates += [lines[0], lines[-1]]
    boxed = last_boxed(completion)
    if boxed is not None:
        candidates.append(boxed)
    return any(normalize_text(c) == target for c in candidates)


def grade_numeric(completion: str, answer: str | float) -> bool:
    """The final number of the completion (boxed, after ``####``, else the last one) equals the
    answer, tolerant of commas, ``$``, a trailing ``.``, fractions and float formatting."""
    target = answer if isinstance(answer, (int, float)) else extract_final_number(str(answer))
    if target is None:
        raise TaskError(f"numeric grader: reference answer {answer!r} is not a number")
    got = extract_final_number(completion)
    return got is not None and numbers_equal(got, float(target))


_LETTER_PATTERNS = (
    # at the very start: "B", "(B)", "**B**", "B.", "B)", "B: text", "B. text"
    r"\A\W*\(?\**([{L}])\**\)?(?:[ \t]*[.):\]]|[ \t]*(?:\n|\Z))",
    # "the answer is B", "Answer: (B)", "option B", "correct choice is **B**"
    r"(?i:answer|option|choice)(?:\s*(?i:is|would be|should be|:|=|-))*\s*[\"'*(\[]*\s*"
    r"([{L}])\b(?![\w'])",
    r"\(([{L}])\)",
    r"\\boxed\{\s*(?:\\text\{)?\s*([{L}])\s*\}?\s*\}",
)


def choice_letter(completion: str, choices: Sequence[str]) -> str | None:
    """Which option a completion picks: a leading/explicit letter, else the first option text
    it mentions, else a bare leading letter. None when it picks nothing recognisable."""
    labels = choice_labels(len(choices))
    letters = "".join(labels)
    text = completion.strip()
    if not text:
        return None
    for pat in _LETTER_PATTERNS:
        m = re.search(pat.replace("{L}", letters), text)
        if m:
            return m.group(1)
    # the option text itself (first one mentioned wins; longer options first on ties)
    named = named_options(text, choices)
    if named:
        return min(named, key=lambda lab: (named[lab], -len(normalize_text(choices[labels.index(lab)])), lab))
    m = re.match(r"^\W*([" + letters + r"])\s", text)  # "B elephant"
    if m:
        return m.group(1)
    m = re.search(r"(?<![\w.])([" + letters + r"])[.)](?:\s|$)", text)  # "I think it is C."
    if m:
        return m.group(1)
    return None


def named_options(completion: str, choices: Sequence[str]) -> dict[str, int]:
    """The options whose text the completion mentions: letter -> where it first does."""
    low = completion.casefold()
    found = {}
    for lab, opt in zip(choice_labels(len(choices)), choices, strict=True):
        o = normalize_text(opt)
        m = re.search(r"(?<!\w)" + re.escape(o) + r"(?!\w)", low) if o else None
        if m:
            found[lab] = m.start()
    return found


def named_option_reward(completion: str, answer: str, choices: Sequence[str]) -> float:
    """A training reward for multiple choice (SPEC §5: a small model often names the right option's text under
    the wrong letter): +1 when graded right, 0 when it names the right option's text and no other option's,
    −1 otherwise. The evaluation keeps grade_choice."""
    if grade_choice(completion, answer, choices):
        return 1.0
    return 0.0 if set(named_options(completion, choices)) == {resolve_choice_answer(answer, choices)} else -1.0


def resolve_choice_answer(answer: str, choices: Sequence[str]) -> str:
    """The reference letter: ``answer`` may be a letter or the option text."""
    labels = choice_labels(len(choices))
    a = answer.strip()
    if a.upper() in labels and len(a) == 1:
        return a.upper()
    na = normalize_text(a)
    for lab, opt in zip(labels, choices, strict=True):
        if normalize_text(opt) == na:
            return lab
    raise TaskError(f"choice grader: answer {answer!r} is neither a letter nor one of the options")


def grade_choice(completion: str, answer: str, choices: Sequence[str]) -> bool:
    """The completion picks the reference option, by letter or by option text."""
    if not choices:
        raise TaskError("choice grader: the example has no choices")
    return choice_letter(completion, choices) == resolve_choice_answer(answer, choices)


def grade_regex(completion: str, answer: str, pattern: str) -> bool:
    """The last match of ``pattern`` (its first group, if it has groups) equals ``answer`` after
    normalisation (or numerically, when both are numbers)."""
    try:
        rx = re.compile(pattern, flags=re.I | re.S)
    except re.error as exc:
        raise TaskError(f"regex grader: bad pattern {pattern!r}: {exc}") from None
    matches = list(rx.finditer(completion))
    if not matches:
        return False
    m = matches[-1]
    got = m.group(1) if rx.groups else m.group(0)
    if got is None:
        return False
    if normalize_text(got) == normalize_text(answer):
        return True
    a, b = parse_number(got), parse_number(answer)
    return a is not None and b is not None and numbers_equal(a, b)


# --- math (MATH / competition-style boxed answers) -------------------------------------------

_UNITS = r"(?:degrees?|units?|cm|meters?|inches|inch|feet|ft|dollars?|cents?|sq|square|mph)"


def normalize_math_answer(ans: str) -> str:
    """A light version of the MATH benchmark's answer normalisation."""
    s = ans.strip()
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\{\s*" + _UNITS + r"\s*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def extract_math_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"(?:final answer|answer)\s*(?:is|:)\s*\$?([^\n$]+?)\$?\s*(?:\.|$)", text, re.I)
    if m:
        return m[-1]
    nums = _NUM_RE.findall(text)
    return nums[-1] if nums else None


def grade_math(completion: str, answer: str) -> bool:
    """MATH-style: the last ``\\boxed{}`` (else "answer is ...", else the last number) equals
    the reference after normalisation, or numerically."""
    got = extract_math_answer(completion)
    if got is None:
        return False
    ref = last_boxed(answer) or answer
    a, b = normalize_math_answer(got), normalize_math_answer(ref)
    if a == b and a:
        return True
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return numbers_equal(x, y)
    return False


# --- categories (task identification) ---------------------------------------------------------

CATEGORIES: tuple[str, ...] = ("code", "math", "reasoning", "other")
_CATEGORY_ALIASES = {
    "code": "code",
    "coding": "code",
    "programming": "code",
    "python": "code",
    "math": "math",
    "maths": "math",
    "mathematics": "math",
    "mathematical": "math",
    "arithmetic": "math",
    "reasoning": "reasoning",
    "logic": "reasoning",
    "logical": "reasoning",
    "other": "other",
    "others": "other",
}
_CAT_WORD = re.compile(r"[a-z]+")


def parse_category(completion: str) -> str | None:
    """The category a completion names: the word in the last ``\\boxed{}``, else the last
    category word (or alias) anywhere in the text."""
    boxed = last_boxed(completion)
    if boxed is not None:
        for w in reversed(_CAT_WORD.findall(boxed.casefold())):
            if w in _CATEGORY_ALIASES:
                return _CATEGORY_ALIASES[w]
    for w in reversed(_CAT_WORD.findall(completion.casefold())):
        if w in _CATEGORY_ALIASES:
            return _CATEGORY_ALIASES[w]
    return None


def grade_category(completion: str, answer: str) -> bool:
    return parse_category(completion) == _CATEGORY_ALIASES.get(answer.strip().casefold(), answer)


# --- python code ------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CODE_START = re.compile(r"^(?:def |class |import |from |@|async def |[A-Za-z_]\w*\s*=)")


def _compiles(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _trim_to_compilable(code: str) -> str:
    """Drop trailing lines (prose after the code) until the code parses."""
    lines = code.rstrip().splitlines()
    for end in range(len(lines), 0, -1):
        cand = "\n".join(lines[:end])
        if _compiles(cand):
            return cand
    return code


def code_blocks(completion: str) -> list[str]:
    """The bodies of fenced python (or untagged) blocks, in order; an unterminated final block
    (generation cut off) counts."""
    return [body for lang, body in _FENCE_RE.findall(completion) if lang.lower() in ("", "python", "py", "python3")]


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """Python code from a reply: fenced blocks (preferring python/untagged ones and the ones
    defining ``entry_point``), else the text from the first code-looking line on, trimmed of
    trailing prose; dedented."""
    blocks = code_blocks(completion)
    if blocks:
        bodies = [textwrap.dedent(b).strip("\n") for b in blocks]
        if entry_point:
            defining = [b for b in bodies if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b)]
            if defining:
                # helper blocks before it may be needed; keep blocks that compile
                idx = bodies.index(defining[-1])
                keep = [b for b in bodies[:idx] if _compiles(b) and "def " in b]
                return "\n\n".join([*keep, defining[-1]])
        good = [b for b in bodies if _compiles(b)]
        return "\n\n".join(good or bodies)
    text = completion.replace("\r\n", "\n")
    lines = text.split("\n")
    for i, ln in enumerate(lines):
        if not _CODE_START.match(ln.strip()):
            continue
        code = _trim_to_compilable(textwrap.dedent("\n".join(lines[i:])).strip("\n"))
        if _compiles(code):
            return code
    return textwrap.dedent(text).strip("\n")


def build_test_program(code: str, tests: str, entry_point: str | None = None, prefix: str = "") -> str:
    """``prefix`` (imports / a prompt) + the code + the tests (+ ``check(entry_point)`` when the
    tests define a HumanEval-style ``check`` function)."""
    parts = []
    if prefix:
        parts.append(prefix.rstrip("\n"))
    parts.append(code.rstrip("\n"))
    parts.append(tests.rstrip("\n"))
    if entry_point and re.search(r"^def\s+check\s*\(", tests, re.M):
        parts.append(f"check({entry_point})")
    return "\n\n".join(parts) + "\n"


def grade_python_tests(
    completion: str,
    tests: str,
    entry_point: str | None = None,
    *,
    prefix: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> bool:
    """Extract the code and run it with the tests in the sandbox; passes iff exit code 0."""
    if not tests or not tests.strip():
        raise TaskError("python-tests grader: the example has no tests")
    code = extract_code(completion, entry_point)
    if entry_point and not re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(|\b{re.escape(entry_point)}\s*=", code):
        return False  # the function under test is not even defined: skip the subprocess
    program = build_test_program(code, tests, entry_point, prefix)
    return run_python(program, timeout_s=timeout_s, memory_mb=memory_mb, require_completion=True).passed


# --------------------------------------------------------------------------------------------
# registry: uniform (example, completion, **options) -> bool

GraderFn = Callable[..., bool]


def _g_exact(ex: Example, completion: str, **_: object) -> bool:
    return grade_exact(completion, ex.answer)


def _g_numeric(ex: Example, completion: str, **_: object) -> bool:
    return grade_numeric(completion, ex.answer)


def _g_choice(ex: Example, completion: str, **_: object) -> bool:
    if not ex.choices:
        raise TaskError(f"choice grader: example {ex.id!r} has no choices")
    return grade_choice(completion, ex.answer, ex.choices)


def _g_regex(ex: Example, completion: str, *, pattern: str | None = None, **_: object) -> bool:
    if not pattern:
        raise TaskError("regex grader needs a `pattern`")
    return grade_regex(completion, ex.answer, pattern)


def _g_python(ex: Example, completion: str, *, prefix: str = "", **opts: object) -> bool:
    if not ex.tests:
        raise TaskError(f"python-tests grader: example {ex.id!r} has no tests")
    kw = {k: v for k, v in opts.items() if k in ("timeout_s", "memory_mb")}
    return grade_python_tests(completion, ex.tests, ex.entry_point, prefix=prefix, **kw)


def _g_math(ex: Example, completion: str, **_: object) -> bool:
    return grade_math(completion, ex.answer)


def _g_category(ex: Example, completion: str, **_: object) -> bool:
    return grade_category(completion, ex.answer)


GRADERS: dict[str, GraderFn] = {
    "exact": _g_exact,
    "numeric": _g_numeric,
    "choice": _g_choice,
    "regex": _g_regex,
    "python-tests": _g_python,
    "math": _g_math,
    "category": _g_category,
}


def get_grader(name: str) -> GraderFn:
    try:
        return GRADERS[name]
    except KeyError:
        raise TaskError(f"unknown grader {name!r}; valid graders: {', '.join(sorted(GRADERS))}") from None
