import json

import pytest

from t2ray.calibrate import Accuracy, base_accuracy, main
from t2ray.tasks import get_task


def test_accuracy_value():
    assert Accuracy("math", "test", 3, 12, 1.0).accuracy == 0.25
    assert Accuracy("math", "test", 0, 0, 0.0).accuracy == 0.0


@pytest.mark.slow
def test_base_accuracy_runs_end_to_end(tmp_path, capsys):
    """Greedy generation + grading on a tiny random model (the real calibration uses
    smollm2-135m: python -m t2ray.calibrate math code reasoning --n 64)."""
    from t2ray.models import load_model

    model, tok = load_model("tiny-llama")
    task = get_task("reasoning")
    rows: list[dict] = []
    acc = base_accuracy(task, model, tok, n=4, batch_size=4, completions=rows)
    assert acc.total == 4 and 0 <= acc.correct <= 4 and len(rows) == 4
    assert {r["id"] for r in rows} == {e.id for e in task.examples("test")[:4]}
    dump = tmp_path / "out.jsonl"
    main(["math", "--model", "tiny-llama", "--n", "2", "--batch-size", "2", "--dump", str(dump)])
    assert "math" in capsys.readouterr().out
    assert len([json.loads(x) for x in dump.read_text().splitlines()]) == 2
