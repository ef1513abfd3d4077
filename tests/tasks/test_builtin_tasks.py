import pytest

from t2ray.tasks import SPLITS, Task, TaskError, get_task, list_tasks
from t2ray.tasks.base import normalize_prompt
from t2ray.tasks.graders import build_test_program, grade_python_tests
from t2ray.tasks.sandbox import run_many

SYNTHETIC = ["math", "code", "reasoning", "math-hard", "code-hard", "reasoning-hard", "cls"]
BUILTIN = [*SYNTHETIC, "humaneval"]


def test_list_tasks_has_all_names():
    names = list_tasks()
    for n in [*BUILTIN, "gsm8k", "mbpp", "arc-easy", "arc-challenge", "hendrycks-math"]:
        assert n in names


def test_unknown_task_lists_valid_names():
    with pytest.raises(TaskError, match="valid names: .*math.*code"):
        get_task("nope")


@pytest.mark.parametrize("name", BUILTIN)
def test_splits_disjoint_deterministic(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    again = get_task(name)
    ids, prompts = {}, {}
    for split in SPLITS:
        exs = task.examples(split)
        assert exs, split
        assert exs == again.examples(split)  # deterministic across instances
        for ex in exs:
            assert ex.id not in ids, (ex.id, split, ids.get(ex.id))
            ids[ex.id] = split
            key = normalize_prompt(ex.prompt)
            assert prompts.get(key, split) == split, ex.prompt
            prompts[key] = split
    with pytest.raises(TaskError, match="unknown split"):
        task.examples("dev")


@pytest.mark.parametrize("name", ["math", "code", "reasoning"])
def test_training_task_sizes(name):
    task = get_task(name)
    assert [len(task.examples(s)) for s in SPLITS] == [256, 64, 128]


@pytest.mark.parametrize("name", ["math-hard", "code-hard", "reasoning-hard", "humaneval"])
def test_unseen_task_sizes(name):
    task = get_task(name)
    assert len(task.examples("test")) == 128
    assert 8 <= len(task.examples("train")) <= 64


def test_seed_changes_items():
    a = get_task("math", seed=0).examples("test")
    b = get_task("math", seed=1).examples("test")
    assert [e.prompt for e in a] != [e.prompt for e in b]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_messages_and_reference_grades(name):
    task = get_task(name)
    for split in SPLITS:
        for ex in task.examples(split)[:20]:
            msgs = task.messages(ex)
            assert msgs[-1] == {"role": "user", "content": ex.prompt}
            assert all(m["role"] in ("system", "user") for m in msgs)
            if task.category != "code":
                ref = task.reference_completion(ex)
                assert task.grade(ex, ref), (ex, ref)
                assert task.reward(ex, ref) == 1.0
                assert task.reward(ex, "") == -1.0


@pytest.mark.parametrize("name", ["code", "code-hard"])
def test_every_code_reference_passes_its_tests(name):
    """The reference solutions pass their own tests in the sandbox (every test item, a sample
    of train/valid; run concurrently)."""
    task = get_task(name)
    exs = task.examples("train")[::8] + task.examples("valid")[::4] + task.examples("test")[::2]
    progs = [build_test_program(ex.answer, ex.tests, ex.entry_point) for ex in exs]
    results = run_many(progs, workers=4, require_completion=True)
    bad = [(ex.id, r.stderr[-200:]) for ex, r in zip(exs, results, strict=True) if not r.passed]
    assert not bad, bad[:3]
    for ex in (e for s in SPLITS for e in task.examples(s)):
        assert ex.entry_point and f"def {ex.entry_point}(" in ex.answer
        assert ex.tests.count("assert") >= 2
        assert ex.tests.splitlines()[0] in ex.prompt  # the shown test is a real one


def test_code_grade_and_reward_via_task():
    task = get_task("code")
    ex = task.examples("test")[0]
    ref = task.reference_completion(ex)
    assert ref.startswith("```python\n") and task.grade(ex, ref) and task.reward(ex, ref) == 1.0
    wrong = ref.replace("return", "return None and", 1)
    assert not task.grade(ex, wrong) and task.reward(ex, wrong) == -1.0
    assert not grade_python_tests("no code at all", ex.tests, ex.entry_point)


def test_math_examples_are_numeric_and_correct():
    task = get_task("math")
    for ex in task.examples("train"):
        assert ex.prompt.endswith("Reply with just the number.")
        assert int(ex.answer) == int(ex.answer)
        assert ex.category == "math"
    hard = get_task("math-hard")
    for ex in hard.examples("test"):
        assert "\\boxed{}" in ex.prompt
        assert hard.reference_completion(ex) == f"\\boxed{{{ex.answer}}}"


def test_reasoning_examples_well_formed():
    for name in ("reasoning", "reasoning-hard"):
        task = get_task(name)
        for split in SPLITS:
            for ex in task.examples(split):
                n = len(ex.choices)
                assert n == 4 or (name == "reasoning" and n == 2)
                assert len(set(ex.choices)) == n
                letters = "ABCD"[:n]
                assert ex.answer in letters
                for letter, text in zip(letters, ex.choices, strict=True):
                    assert f"\n{letter}. {text}" in ex.prompt
                assert task.grade(ex, ex.answer)
                assert task.grade(ex, ex.choices[letters.index(ex.answer)])
                wrong = letters[(letters.index(ex.answer) + 1) % n]
                assert not task.grade(ex, wrong)


def test_reasoning_answer_positions_balanced():
    task = get_task("reasoning")
    exs = [ex for s in SPLITS for ex in task.examples(s)]
    for n in (2, 4):
        sub = [ex for ex in exs if len(ex.choices) == n]
        counts = {c: sum(ex.answer == c for ex in sub) for c in "ABCD"[:n]}
        assert min(counts.values()) > len(sub) / (2 * n), counts


@pytest.mark.parametrize("name", ["reasoning", "reasoning-hard"])
def test_specific_questions_never_repeat_across_splits(name):
    """A specific question (fact, sequence, comparison chain...) is in one split only, even
    with its options reshuffled; generic stems repeat only with a different option set."""
    task = get_task(name)
    where: dict[str, str] = {}
    for split in SPLITS:
        for ex in task.examples(split):
            stem = ex.prompt.split("\n", 1)[0]
            generic = stem.startswith(("Question: Which of these", "Question: Which number is the"))
            key = stem + "|" + "|".join(sorted(ex.choices)) if generic else stem
            assert where.setdefault(key, split) == split, (key, split, where[key])
