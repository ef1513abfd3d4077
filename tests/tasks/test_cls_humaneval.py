import pytest

from t2ray.tasks import SPLITS, get_task
from t2ray.tasks.base import normalize_prompt
from t2ray.tasks.cls import CLS_PROMPT, classification_messages, classification_prompt
from t2ray.tasks.humaneval import body_continuation, build_program, load_problems


def test_cls_prompts_come_from_the_same_split_of_the_source_tasks():
    cls = get_task("cls")
    sources = {n: get_task(n) for n in ("math", "code", "reasoning")}
    for split in SPLITS:
        exs = cls.examples(split)
        cats = {c: sum(ex.answer == c for ex in exs) for c in ("math", "code", "reasoning", "other")}
        assert len(set(cats.values())) == 1, cats  # balanced
        for name, task in sources.items():
            own = {classification_prompt(e.prompt) for e in task.examples(split)}
            for other_split in SPLITS:
                if other_split == split:
                    continue
                leaked = {classification_prompt(e.prompt) for e in task.examples(other_split)}
                for ex in exs:
                    assert ex.prompt not in leaked
            for ex in exs:
                if ex.answer == name:
                    assert ex.prompt in own
                    assert ex.category == name


def test_cls_reference_and_grading():
    cls = get_task("cls")
    ex = next(e for e in cls.examples("test") if e.answer == "math")
    assert cls.reference_completion(ex) == "Classification: \\boxed{math}"
    assert cls.grade(ex, "Classification: \\boxed{math}")
    assert cls.grade(ex, "This is a math question.")
    assert not cls.grade(ex, "Classification: \\boxed{code}")
    assert cls.category == "classification"


def test_classification_prompt_wraps_question():
    msgs = classification_messages("What is 2 + 2?")
    assert msgs == [{"role": "user", "content": classification_prompt("What is 2 + 2?")}]
    assert msgs[0]["content"].endswith("Question: What is 2 + 2?")
    assert "\\boxed{category}" in CLS_PROMPT.format(question="x")
    assert classification_messages("q", "sys")[0] == {"role": "system", "content": "sys"}


def test_humaneval_loads_164_real_problems():
    probs = load_problems()
    assert len(probs) == 164
    assert probs[0]["task_id"] == "HumanEval/0" and probs[0]["entry_point"] == "has_close_elements"
    task = get_task("humaneval")
    all_ids = [ex.id for s in SPLITS for ex in task.examples(s)]
    assert len(all_ids) == len(set(all_ids)) == 164


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/163"])
def test_humaneval_canonical_passes_wrong_fails(task_id):
    task = get_task("humaneval")
    ex = next(e for s in SPLITS for e in task.examples(s) if e.id == task_id)
    p = task.problem(ex)
    # the reference reply (whole function in a fenced block) passes
    assert task.grade(ex, task.reference_completion(ex))
    # a body-only completion, as the official harness expects, passes too
    assert task.grade(ex, p["canonical_solution"])
    # a wrong function fails
    wrong = f"```python\ndef {ex.entry_point}(*args, **kwargs):\n    return None\n```"
    assert not task.grade(ex, wrong)
    assert task.reward(ex, wrong) == -1.0


def test_humaneval_program_shapes():
    prompt = 'def f(x):\n    """doc"""\n'
    test = "def check(c):\n    assert c(1) == 2\n"
    full = build_program(prompt, "```python\ndef f(x):\n    return x + 1\n```", test, "f")
    assert full.rstrip().endswith("check(f)") and "return x + 1" in full
    body = build_program(prompt, "return x + 1", test, "f")
    assert "    return x + 1" in body
    assert body_continuation("    return 1") == "    return 1\n"
    assert body_continuation("```python\nreturn 1\n```") == "    return 1\n"


def test_humaneval_prompt_contains_the_original_prompt():
    task = get_task("humaneval")
    for ex in task.examples("train"):
        p = task.problem(ex)
        assert p["prompt"] in ex.prompt
        assert normalize_prompt(ex.prompt)
