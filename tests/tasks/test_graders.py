import pytest

from t2ray.tasks import TaskError
from t2ray.tasks.base import Example
from t2ray.tasks.graders import (
    GRADERS,
    choice_letter,
    extract_code,
    extract_final_number,
    get_grader,
    grade_category,
    grade_choice,
    grade_exact,
    grade_math,
    grade_numeric,
    grade_python_tests,
    grade_regex,
    last_boxed,
    parse_category,
    parse_number,
)


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("85", "85"),
        ("47 + 38 = 85", "85"),
        ("The answer is 85.", "85"),
        ("The total is $1,234.", "1234"),
        ("It costs $5", "5"),
        ("x = -3", "-3"),
        ("so the result is 2.50", "2.5"),
        ("Final: \\boxed{42} (I checked 41 and 43)", "42"),
        ("reasoning...\n#### 72", "72"),
        ("half of it: 3/4", "0.75"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
    ],
)
def test_numeric_accepts(completion, answer):
    assert grade_numeric(completion, answer)


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("47 + 38 = 84", "85"),
        ("85 is close but the answer is 86", "85"),
        ("no number here", "85"),
        ("", "85"),
        ("\\boxed{41}, though 42 is also possible", "42"),
        ("version2 is 3", "2"),
    ],
)
def test_numeric_rejects(completion, answer):
    assert not grade_numeric(completion, answer)


def test_numeric_bad_reference():
    with pytest.raises(TaskError):
        grade_numeric("5", "five")


def test_parse_helpers():
    assert parse_number("1,000,000") == 1_000_000
    assert parse_number("12.") == 12
    assert parse_number("−7") == -7
    assert parse_number("abc") is None
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("nothing") is None
    assert extract_final_number("10 apples, 20 pears, so 30") == 30


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("Paris", True),
        ("paris.", True),
        ("**Paris**", True),
        ("Answer: Paris", True),
        ("Paris\nIt is the capital of France.", True),
        ("The capital is \\boxed{Paris}", True),
        ("London", False),
        ("Paris or London", False),
        ("", False),
    ],
)
def test_exact(completion, ok):
    assert grade_exact(completion, "Paris") is ok


CHOICES = ("a mouse", "an elephant", "a cat", "a dog")


@pytest.mark.parametrize(
    "completion, letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("**B**", "B"),
        ("B. an elephant", "B"),
        ("B\nbecause elephants are heavy", "B"),
        ("The answer is B", "B"),
        ("Answer: (B)", "B"),
        ("The correct option is B, an elephant.", "B"),
        ("An elephant is the heaviest.", "B"),
        ("an elephant", "B"),
        ("I think it is B.", "B"),
        ("\\boxed{B}", "B"),
        ("A mouse is tiny, an elephant is not.", "A"),  # first option mentioned
        ("A", "A"),
        ("It is none of them.", None),
    ],
)
def test_choice_letter(completion, letter):
    assert choice_letter(completion, CHOICES) == letter


def test_choice_grade_letter_or_text_answer():
    assert grade_choice("B", "B", CHOICES)
    assert grade_choice("an elephant", "an elephant", CHOICES)  # reference given as text
    assert not grade_choice("C", "B", CHOICES)
    assert not grade_choice("a dog", "B", CHOICES)
    with pytest.raises(TaskError):
        grade_choice("B", "a horse", CHOICES)


def test_regex():
    assert grade_regex("blah\nAnswer: Paris", "Paris", r"Answer:\s*(\w+)")
    assert grade_regex("Answer: 3.0", "3", r"Answer:\s*([\d.]+)")
    assert grade_regex("Answer: x. Final answer: Paris", "paris", r"answer:\s*(\w+)")  # last match
    assert not grade_regex("Answer: London", "Paris", r"Answer:\s*(\w+)")
    assert not grade_regex("Paris", "Paris", r"Answer:\s*(\w+)")
    assert grade_regex("the code is 1234", "1234", r"\d{4}")  # no group: whole match
    with pytest.raises(TaskError):
        grade_regex("x", "x", "(")


@pytest.mark.parametrize(
    "completion, answer, ok",
    [
        ("so $x = \\boxed{\\dfrac{1}{2}}$", "\\frac{1}{2}", True),
        ("\\boxed{0.5}", "\\frac12", True),
        ("\\boxed{90^\\circ}", "90", True),
        ("\\boxed{5 \\text{ cm}}", "5", True),
        ("The final answer is 12.", "12", True),
        ("\\boxed{x = 3}", "3", True),
        ("\\boxed{\\sqrt{2}}", "\\sqrt2", True),
        ("\\boxed{3}", "4", False),
        ("no answer", "4", False),
    ],
)
def test_math(completion, answer, ok):
    assert grade_math(completion, answer) is ok


@pytest.mark.parametrize(
    "completion, cat",
    [
        ("Classification: \\boxed{math}", "math"),
        ("Classification: \\boxed{Code}", "code"),
        ("\\boxed{others}", "other"),
        ("This is a reasoning question.", "reasoning"),
        ("It involves programming, so code.", "code"),
        ("Classification: \\boxed{mathematics}", "math"),
        ("I am not sure.", None),
    ],
)
def test_parse_category(completion, cat):
    assert parse_category(completion) == cat


def test_grade_category():
    assert grade_category("Classification: \\boxed{math}", "math")
    assert not grade_category("Classification: \\boxed{code}", "math")
    # the boxed answer wins over words elsewhere
    assert grade_category("Not code or reasoning: \\boxed{math}", "math")


def test_extract_code_variants():
    fenced = "Here you go:\n```python\ndef f(x):\n    return x + 1\n```\nThis adds one."
    assert extract_code(fenced, "f") == "def f(x):\n    return x + 1"
    raw = "Sure! Here is the function.\ndef f(x):\n    return x + 1\nThis adds one to x."
    assert extract_code(raw, "f") == "def f(x):\n    return x + 1"
    unterminated = "```python\ndef f(x):\n    return x + 1"
    assert extract_code(unterminated, "f") == "def f(x):\n    return x + 1"
    two = "```python\nimport math\n```\nthen\n```python\ndef f(x):\n    return math.floor(x)\n```"
    assert "def f" in extract_code(two, "f")


TESTS = "assert add_3(1) == 4\nassert add_3(-3) == 0"


def test_python_tests_grader():
    good = "```python\ndef add_3(x):\n    return x + 3\n```"
    bad = "```python\ndef add_3(x):\n    return x + 4\n```"
    assert grade_python_tests(good, TESTS, "add_3")
    assert grade_python_tests("def add_3(x): return x + 3", TESTS, "add_3")
    assert not grade_python_tests(bad, TESTS, "add_3")
    assert not grade_python_tests("I don't know.", TESTS, "add_3")
    assert not grade_python_tests("```python\ndef add_3(x):\n    while True: pass\n```", TESTS, "add_3", timeout_s=1)
    with pytest.raises(TaskError):
        grade_python_tests(good, "", "add_3")


def test_registry_uniform_signature():
    assert set(GRADERS) >= {"exact", "numeric", "choice", "regex", "python-tests"}
    ex = Example(id="1", prompt="q", answer="B", choices=CHOICES)
    assert get_grader("choice")(ex, "B")
    assert get_grader("regex")(Example("2", "q", "7"), "Answer: 7", pattern=r"Answer: (\d+)")
    code = Example("3", "q", "", tests=TESTS, entry_point="add_3")
    assert get_grader("python-tests")(code, "def add_3(x):\n    return x + 3")
    with pytest.raises(TaskError, match="valid graders"):
        get_grader("fuzzy")
    with pytest.raises(TaskError):
        get_grader("regex")(Example("2", "q", "7"), "7")  # no pattern


def test_python_tests_early_exit_is_not_a_pass():
    hack = "```python\nimport sys\ndef add_3(x):\n    return 0\nsys.exit(0)\n```"
    assert not grade_python_tests(hack, TESTS, "add_3")
