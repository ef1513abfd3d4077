import json
from pathlib import Path

import pytest

from t2ray.tasks import SPLITS, TaskError, get_task
from t2ray.tasks.user import load_task_yaml

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Cuba", "Havana"),
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_rows(path: Path, rows) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def capitals(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "capitals.jsonl", [{"prompt": f"What is the capital of {c}?", "answer": a} for c, a in CAPITALS])
    return write(
        tmp_path / "capitals.yaml",
        (
            "name: capitals\n"
            "data: data/capitals.jsonl\n"
            "grader: exact\n"
            "prompt_template: '{prompt} Reply with just the name.'\n"
            "system_prompt: You are a geography teacher.\n"
            "max_new_tokens: 16\n"
            "splits: [0.6, 0.2, 0.2]\n"
        ),
    )


def test_good_yaml_task(capitals):
    task = get_task(str(capitals))
    assert task.name == "capitals" and task.max_new_tokens == 16 and task.category == "other"
    sizes = [len(task.examples(s)) for s in SPLITS]
    assert sizes == [6, 2, 2]
    all_ex = [e for s in SPLITS for e in task.examples(s)]
    assert len({e.id for e in all_ex}) == 10
    ex = task.examples("test")[0]
    assert ex.prompt.endswith("? Reply with just the name.")
    msgs = task.messages(ex)
    assert msgs[0] == {"role": "system", "content": "You are a geography teacher."}
    assert task.grade(ex, task.reference_completion(ex))
    assert task.grade(ex, f"**{ex.answer}**.")
    assert task.reward(ex, "Atlantis") == -1.0
    # deterministic, and the seed changes the split
    assert get_task(str(capitals)).examples("test") == task.examples("test")
    other = [e.id for e in get_task(str(capitals), seed=5).examples("train")]
    assert other != [e.id for e in task.examples("train")]


def test_choice_regex_numeric_and_code_yaml(tmp_path):
    write_rows(
        tmp_path / "mc.jsonl",
        [
            {
                "id": f"q{i}",
                "prompt": f"Which is bigger than {i}?",
                "choices": [str(i - 1), str(i + 1)],
                "answer": str(i + 1),
            }
            for i in range(1, 11)
        ],
    )
    mc = load_task_yaml(write(tmp_path / "mc.yaml", "name: mc\ndata: mc.jsonl\ngrader: choice\ncategory: reasoning\n"))
    ex = mc.examples("train")[0]
    assert ex.answer == "B" and "\nA. " in ex.prompt and "\nB. " in ex.prompt  # options appended
    assert mc.grade(ex, "B") and mc.grade(ex, ex.choices[1]) and not mc.grade(ex, "A")

    write_rows(
        tmp_path / "rx.jsonl", [{"prompt": f"Spell {w}", "answer": w} for w in ("cat", "dog", "cow", "pig", "hen")]
    )
    rx = load_task_yaml(
        write(
            tmp_path / "rx.yaml",
            (
                "name: rx\ndata: rx.jsonl\ngrader: regex\npattern: 'ANSWER:\\s*(\\w+)'\n"
                "reference_template: 'ANSWER: {answer}'\nsplits: {train: 3, valid: 1, test: 1}\n"
            ),
        )
    )
    ex = rx.examples("test")[0]
    assert rx.grade(ex, f"hmm... ANSWER: {ex.answer}") and not rx.grade(ex, ex.answer)

    write_rows(tmp_path / "num.jsonl", [{"prompt": f"{i}+{i}?", "answer": 2 * i} for i in range(5)])
    num = load_task_yaml(write(tmp_path / "num.yaml", "name: num\ndata: num.jsonl\ngrader: numeric\n"))
    ex = num.examples("test")[0]
    assert num.grade(ex, f"It is {ex.answer}.")

    write_rows(
        tmp_path / "code.jsonl",
        [
            {
                "prompt": f"Write inc_{k}(x) returning x + {k}.",
                "answer": f"def inc_{k}(x):\n    return x + {k}",
                "tests": f"assert inc_{k}(1) == {1 + k}",
                "entry_point": f"inc_{k}",
            }
            for k in range(5)
        ],
    )
    code = load_task_yaml(
        write(tmp_path / "code.yaml", "name: code-y\ndata: code.jsonl\ngrader: python-tests\ncategory: code\n")
    )
    ex = code.examples("test")[0]
    assert code.grade(ex, code.reference_completion(ex))
    assert not code.grade(ex, "def inc(x): return x")


def test_dataset_key_with_known_format(tmp_path):
    rows = [{"question": f"What is {i} times 2?", "answer": f"{i}*2={2 * i}\n#### {2 * i}"} for i in range(10)]
    write_rows(tmp_path / "g.jsonl", rows)
    task = load_task_yaml(
        write(
            tmp_path / "g.yaml",
            ("name: my-gsm8k\ndataset:\n  format: gsm8k\n  data_files: g.jsonl\nmax_new_tokens: 128\n"),
        )
    )
    assert task.grader == "numeric"  # from the format
    ex = task.examples("test")[0]
    assert task.grade(ex, task.reference_completion(ex))
    assert task.max_new_tokens == 128


def test_dataset_key_generic_rows(tmp_path):
    write_rows(
        tmp_path / "rows.jsonl",
        [{"prompt": f"Say {w}", "answer": w, "extra": 1} for w in ("a1", "b2", "c3", "d4", "e5")],
    )
    task = load_task_yaml(
        write(tmp_path / "gen.yaml", ("name: gen\ndataset:\n  data_files: {train: rows.jsonl}\ngrader: exact\n"))
    )
    exs = [e for s in SPLITS for e in task.examples(s)]
    assert sorted(e.answer for e in exs) == ["a1", "b2", "c3", "d4", "e5"]


BAD_CASES = [
    ("name: [unclosed\n", r"bad.yaml:2: invalid YAML"),
    ("name: t\ngrader: exact\ndata: d.jsonl\n  oops: 1\n", r"bad.yaml:4: invalid YAML"),
    ("- a\n- b\n", r"must be a YAML mapping"),
    ("name: t\ndata: d.jsonl\ngrader: exact\ncolour: red\n", r"bad.yaml:4: key 'colour': unknown key"),
    ("data: d.jsonl\ngrader: exact\n", r"key 'name': missing required key"),
    ("name: t\ndata: d.jsonl\n", r"`grader` is required"),
    ("name: t\ndata: d.jsonl\ngrader: fuzzy\n", r"bad.yaml:3: key 'grader'"),
    ("name: t\ndata: d.jsonl\ngrader: regex\n", r"needs `pattern`"),
    ("name: t\ndata: d.jsonl\ngrader: regex\npattern: '('\n", r"key 'pattern': invalid regular"),
    (
        "name: t\ndata: d.jsonl\ngrader: exact\nprompt_template: 'no placeholder'\n",
        r"key 'prompt_template'.*\{prompt\}",
    ),
    ("name: t\ndata: d.jsonl\ngrader: exact\nsplits: [0.5, 0.5]\n", r"key 'splits'"),
    ("name: t\ndata: d.jsonl\ngrader: exact\nmax_new_tokens: 0\n", r"bad.yaml:4: key 'max_new_tokens'"),
    ("name: t\ngrader: exact\n", r"exactly one of `data`"),
    ("name: bad name\ndata: d.jsonl\ngrader: exact\n", r"bad.yaml:1: key 'name'"),
    ("name: t\ndata: missing.jsonl\ngrader: exact\n", r"data file not found"),
    ("name: t\ndataset:\n  format: gsm8k\n  bogus: 1\n", r"key 'dataset.bogus': unknown key"),
    ("name: t\ndataset:\n  format: gsm8k\n", r"dataset needs `path`"),
]


@pytest.mark.parametrize("text, message", BAD_CASES)
def test_malformed_yaml(tmp_path, text, message):
    write_rows(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(TaskError, match=message):
        load_task_yaml(write(tmp_path / "bad.yaml", text))


BAD_ROWS = [
    ('{"prompt": "p", "answer": "a"}\n{"prompt": "q", "answer": \n', r"d.jsonl:2: invalid JSON"),
    ('{"prompt": "p", "answer": "a"}\n[1, 2]\n', r"d.jsonl:2: each line must be a JSON object"),
    ('{"prompt": "p", "answer": "a", "colour": "red"}\n', r"d.jsonl:1: unknown key 'colour'"),
    ('{"prompt": "p"}\n', r"d.jsonl:1: missing key 'answer'"),
    ('{"answer": "a"}\n', r"d.jsonl:1: missing key 'prompt'"),
    (
        '{"prompt": "p", "answer": "a", "id": "x"}\n{"prompt": "q", "answer": "b", "id": "x"}\n',
        r"d.jsonl:2: key 'id': duplicate id",
    ),
    ('{"prompt": "", "answer": "a"}\n', r"d.jsonl:1: key 'prompt' is empty"),
    ("\n\n", r"d.jsonl: no rows"),
]


@pytest.mark.parametrize("rows, message", BAD_ROWS)
def test_malformed_jsonl(tmp_path, rows, message):
    write(tmp_path / "d.jsonl", rows)
    with pytest.raises(TaskError, match=message):
        load_task_yaml(write(tmp_path / "t.yaml", "name: t\ndata: d.jsonl\ngrader: exact\n"))


def test_grader_specific_row_errors(tmp_path):
    write(tmp_path / "d.jsonl", '{"prompt": "p", "answer": "a"}\n')
    with pytest.raises(TaskError, match=r"d.jsonl:1: missing key 'choices'"):
        load_task_yaml(write(tmp_path / "c.yaml", "name: t\ndata: d.jsonl\ngrader: choice\n"))
    with pytest.raises(TaskError, match=r"d.jsonl:1: missing key 'tests'"):
        load_task_yaml(write(tmp_path / "p.yaml", "name: t\ndata: d.jsonl\ngrader: python-tests\n"))
    write(tmp_path / "e.jsonl", '{"prompt": "p", "answer": "z", "choices": ["x", "y"]}\n')
    with pytest.raises(TaskError, match=r"e.jsonl:1: key 'answer'"):
        load_task_yaml(write(tmp_path / "e.yaml", "name: t\ndata: e.jsonl\ngrader: choice\n"))


def test_reference_template_checked(tmp_path):
    write_rows(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(5)])
    with pytest.raises(TaskError, match="fails the 'regex' grader"):
        load_task_yaml(
            write(tmp_path / "t.yaml", ("name: t\ndata: d.jsonl\ngrader: regex\npattern: 'ANSWER: (\\w+)'\n"))
        )


def test_missing_yaml_file(tmp_path):
    with pytest.raises(TaskError, match="task file not found"):
        get_task(str(tmp_path / "nope.yaml"))


def test_packaged_example_task():
    example = Path(__file__).resolve().parents[2] / "t2ray" / "tasks" / "data" / "capitals.yaml"
    task = get_task(str(example))
    assert len(task.examples("test")) >= 10
    ex = task.examples("test")[0]
    assert task.grade(ex, task.reference_completion(ex))
