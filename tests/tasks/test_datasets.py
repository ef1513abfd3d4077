"""Real-dataset loaders on small local files written in the published schemas."""

import json

import pytest

from t2ray.tasks import SPLITS, TaskError, get_task
from t2ray.tasks.datasets import (
    DatasetTask,
    gsm8k_answer,
    make_dataset_task,
    mbpp_entry_point,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def gsm8k_rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        a, b = i + 2, 3
        rows.append(
            {
                "question": f"Natalia sold clips to {a} friends, {b} clips each. How many clips did she sell?",
                "answer": f"She sold {a}*{b} = <<{a}*{b}={a * b}>>{a * b} clips.\n#### {a * b:,}",
            }
        )
    return rows


def test_gsm8k_local_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows(20))
    test = write_jsonl(tmp_path / "test.jsonl", gsm8k_rows(5, offset=100))
    task = make_dataset_task(
        "gsm8k", data_files={"train": str(train), "test": str(test)}, cache_dir=str(tmp_path / "cache")
    )
    assert task.name == "gsm8k" and task.category == "math" and task.grader == "numeric"
    sizes = {s: len(task.examples(s)) for s in SPLITS}
    assert sizes == {"train": 18, "valid": 2, "test": 5}  # valid carved from train (10 %)
    ex = task.examples("test")[0]
    assert ex.answer == "306"  # 102*3, from "#### 306"
    assert "How many clips" in ex.prompt and "The answer is N." in ex.prompt
    ref = task.reference_completion(ex)
    assert "<<" not in ref and ref.endswith("The answer is 306.")
    assert task.grade(ex, ref) and task.grade(ex, "so 306 clips")
    assert not task.grade(ex, "The answer is 305.")
    # deterministic
    again = make_dataset_task(
        "gsm8k", data_files={"train": str(train), "test": str(test)}, cache_dir=str(tmp_path / "cache")
    )
    assert again.examples("valid") == task.examples("valid")


def test_gsm8k_answer_with_commas():
    assert gsm8k_answer("blah\n#### 1,234") == "1234"
    with pytest.raises(TaskError):
        gsm8k_answer("no final line")


MBPP_ROWS = [
    {
        "task_id": 11,
        "text": "Write a python function to remove first and last occurrence of a given character from the string.",
        "code": (
            "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n   "
            "         s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-"
            "1,-1):  \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n        "
            "    break\r\n    return s "
        ),
        "test_list": [
            'assert remove_Occ("hello","l") == "heo"',
            'assert remove_Occ("abcda","a") == "bcd"',
            'assert remove_Occ("PHP","P") == "H"',
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 12,
        "text": "Write a function to sort a given matrix in ascending order according to the sum of its rows.",
        "code": "def sort_matrix(M):\r\n    result = sorted(M, key=sum)\r\n    return result",
        "test_list": [
            "assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], [1, 2, 3], [2, 4, 5]]",
            "assert sort_matrix([[1, 2, 3], [-2, 4, -5], [1, -1, 1]])==[[-2, 4, -5], [1, -1, 1], [1, 2, 3]]",
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 14,
        "text": "Write a python function to find the volume of a triangular prism.",
        "code": "def find_Volume(l,b,h) : \r\n    return ((l * b * h) / 2) ",
        "test_list": ["assert find_Volume(10,8,6) == 240", "assert find_Volume(3,2,2) == 6"],
        "test_setup_code": "import math",
        "challenge_test_list": [],
    },
]


def test_mbpp_local_files_and_grading(tmp_path):
    files = {
        "train": str(write_jsonl(tmp_path / "train.jsonl", MBPP_ROWS[:1])),
        "validation": str(write_jsonl(tmp_path / "validation.jsonl", MBPP_ROWS[1:2])),
        "test": str(write_jsonl(tmp_path / "test.jsonl", MBPP_ROWS[2:])),
    }
    task = make_dataset_task("mbpp", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert [len(task.examples(s)) for s in SPLITS] == [1, 1, 1]
    ex = task.examples("train")[0]
    assert ex.id == "mbpp/train/11" and ex.entry_point == "remove_Occ"
    assert "Your code should pass these tests:" in ex.prompt and MBPP_ROWS[0]["test_list"][0] in ex.prompt
    assert task.grade(ex, task.reference_completion(ex))
    assert not task.grade(ex, "```python\ndef remove_Occ(s, ch):\n    return s\n```")
    vol = task.examples("test")[0]
    assert vol.tests.startswith("import math")
    assert task.grade(vol, "def find_Volume(l, b, h):\n    return l * b * h / 2")


def test_mbpp_sanitized_schema(tmp_path):
    row = {
        "source_file": "x",
        "task_id": 2,
        "prompt": "Write a function to find the shared elements.",
        "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
        "test_imports": [],
        "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == set((4,))"],
    }
    f = write_jsonl(
        tmp_path / "s.jsonl",
        [row] * 1
        + [
            dict(row, task_id=3, prompt="Again: " + row["prompt"]),
            dict(row, task_id=4, prompt="Once more: " + row["prompt"]),
        ],
    )
    task = make_dataset_task("mbpp", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    exs = [e for s in SPLITS for e in task.examples(s)]
    assert len(exs) == 3
    assert all(e.entry_point == "similar_elements" for e in exs)
    assert task.grade(exs[0], task.reference_completion(exs[0]))


def test_mbpp_entry_point_detection():
    assert mbpp_entry_point("def f(x):\n    pass", ["assert math.isclose(f(1), 2)"]) == "f"
    assert mbpp_entry_point("def helper():\n  pass\ndef g(x):\n  pass", ["assert set(g(1)) == {1}"]) == "g"


def arc_rows():
    return [
        {
            "id": "Mercury_7175875",
            "question": (
                "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the"
                " most likely effect of this increase in rotation?"
            ),
            "choices": {
                "text": [
                    "Planetary density will decrease.",
                    "Planetary years will become longer.",
                    "Planetary days will become shorter.",
                    "Planetary gravity will become stronger.",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "C",
        },
        {
            "id": "ACTAAP_2013_5_11",
            "question": "Which of these is a source of light?",
            "choices": {"text": ["the Sun", "the Moon", "a mirror"], "label": ["1", "2", "3"]},
            "answerKey": "1",
        },
        {
            "id": "NYSEDREGENTS_2008_4_3",
            "question": "Which tool is used to measure temperature?",
            "choices": {"text": ["ruler", "thermometer", "balance", "clock"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
    ]


def test_arc_parquet_and_label_normalisation(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = arc_rows()
    for split, sub in (("train", rows[:1]), ("validation", rows[1:2]), ("test", rows[2:])):
        pq.write_table(pa.Table.from_pylist(sub), tmp_path / f"{split}.parquet")
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation", "test")}
    task = make_dataset_task("arc-challenge", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert task.grader == "choice" and task.category == "reasoning"
    sun = task.examples("valid")[0]
    assert sun.answer == "A" and sun.choices == ("the Sun", "the Moon", "a mirror")
    assert "\nA. the Sun\nB. the Moon\nC. a mirror\n" in sun.prompt
    assert task.grade(sun, "A") and task.grade(sun, "The answer is the Sun.")
    assert not task.grade(sun, "B")
    therm = task.examples("test")[0]
    assert therm.id == "arc-challenge/test/NYSEDREGENTS_2008_4_3"
    assert task.grade(therm, task.reference_completion(therm))


def test_arc_bad_answer_key(tmp_path):
    bad = dict(arc_rows()[2], answerKey="E")
    f = write_jsonl(tmp_path / "arc.jsonl", [bad] * 3)
    task = make_dataset_task("arc-easy", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TaskError, match="answerKey"):
        task.examples("test")


def math_rows():
    return [
        {
            "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
            "level": "Level 1",
            "type": "Prealgebra",
            "solution": "We have $\\frac12 + \\frac14 = \\frac{3}{4}$, so the answer is $\\boxed{\\frac{3}{4}}$.",
        },
        {
            "problem": "Solve $2x + 3 = 11$.",
            "level": "Level 1",
            "type": "Algebra",
            "solution": "Subtract 3 and divide by 2: $x = \\boxed{4}$.",
        },
        {
            "problem": "How many degrees are in a right angle?",
            "level": "Level 1",
            "type": "Geometry",
            "solution": "A right angle measures $\\boxed{90^\\circ}$.",
        },
        {"problem": "Compute $3^2$.", "level": "Level 1", "type": "Algebra", "solution": "$3^2 = \\boxed{9}$."},
        {
            "problem": "Compute $\\sqrt{16}$.",
            "level": "Level 1",
            "type": "Algebra",
            "solution": "$\\sqrt{16} = \\boxed{4}$.",
        },
    ]


def test_math_competition_schema_single_file(tmp_path):
    f = write_jsonl(tmp_path / "math.jsonl", math_rows())
    task = make_dataset_task("hendrycks-math", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    exs = {e.prompt.split("\n")[0]: e for s in SPLITS for e in task.examples(s)}
    assert len(exs) == 5  # one pool, cut 0.7/0.1/0.2
    half = exs["What is $\\frac{1}{2} + \\frac{1}{4}$?"]
    assert half.answer == "\\frac{3}{4}"
    assert task.grade(half, task.reference_completion(half))
    assert task.grade(half, "The sum is $\\boxed{\\dfrac34}$.") and task.grade(half, "\\boxed{0.75}")
    assert not task.grade(half, "\\boxed{\\frac{1}{4}}")
    angle = exs["How many degrees are in a right angle?"]
    assert task.grade(angle, "\\boxed{90}")


def test_math500_schema_with_answer_field(tmp_path):
    rows = [
        {
            "problem": f"Compute ${i} + {i}$.",
            "solution": f"It is ${2 * i}$.",
            "answer": str(2 * i),
            "subject": "Algebra",
            "level": 1,
            "unique_id": f"test/algebra/{i}.json",
        }
        for i in range(10)
    ]
    f = write_jsonl(tmp_path / "test.jsonl", rows)
    task = make_dataset_task("math-500", data_files={"test": str(f)}, cache_dir=str(tmp_path / "c"))
    assert sum(len(task.examples(s)) for s in SPLITS) == 10  # only a test split: carved by fractions
    ex = task.examples("test")[0]
    ref = task.reference_completion(ex)
    assert "\\boxed{" in ref and task.grade(ex, ref)
    assert ex.id.startswith("math-500/test/test/algebra/")


def test_missing_field_and_missing_file(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}] * 3)
    task = make_dataset_task("gsm8k", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TaskError, match="missing field"):
        task.examples("train")
    task = make_dataset_task("gsm8k", data_files=str(tmp_path / "nope.jsonl"))
    with pytest.raises(TaskError, match="not found"):
        task.examples("train")
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    with pytest.raises(TaskError, match="unsupported extension"):
        make_dataset_task("gsm8k", data_files=str(txt)).examples("train")


def test_unreachable_dataset_is_a_clear_error(tmp_path):
    task = DatasetTask("x", "gsm8k", path=str(tmp_path / "no-such-dataset"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TaskError, match="could not load dataset"):
        task.examples("train")


def test_dataset_names_resolve_lazily():
    task = get_task("gsm8k")  # no network access happens until a split is requested
    assert isinstance(task, DatasetTask) and task.grader == "numeric"
    assert get_task("arc-easy").grader == "choice"
    assert get_task("mbpp").grader == "python-tests"
    assert get_task("math-500").grader == "math"
