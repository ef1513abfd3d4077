"""`t2ray report` on a run folder filled by real (tiny) evaluations and a real two-pass run."""

from __future__ import annotations

import json

import pytest
import torch

from t2ray.adapt.two_pass import run_adapt
from t2ray.config import AdaptConfig
from t2ray.evaluate import evaluate
from t2ray.experts import Expert, save_expert
from t2ray.library import load_adapted
from t2ray.models import load_model
from t2ray.report import build_report
from t2ray.svf import base_model_info, patch_model, trainable_params
from t2ray.tasks import get_task


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model, _ = load_model("tiny-llama")
    patch_model(model, progress=False)
    info = base_model_info(model)
    experts = []
    for task in ("math", "code", "reasoning"):
        params = {k: v + torch.randn_like(v) for k, v in trainable_params(model).items()}
        experts.append(
            str(
                save_expert(
                    Expert(name=task, params=params, base_model=info.model_id, fingerprint=info.fingerprint, task=task),
                    root / f"{task}.safetensors",
                )
            )
        )
    for column, expert in (("base", None), ("svf", experts[0])):
        net, tok, label = load_adapted("tiny-llama", expert=expert)
        evaluate(net, tok, get_task("math"), limit=2, adapter=label, progress=False).save(
            root / "table1" / f"{column}-math.json"
        )
    cfg = AdaptConfig(strategy="prompt", task="math-hard", model={"spec": "tiny-llama"}, experts=experts, limit=2)
    run_adapt(cfg, progress=False).save(root / "table2" / "prompt-math-hard.json")
    (root / "svf-math").mkdir()
    (root / "svf-math" / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps({"iteration": i, "accuracy": 0.1 * i, **({"valid_accuracy": 0.1 * i} if i % 2 == 0 else {})})
            for i in range(1, 5)
        )
    )
    return root


def test_report_writes_tables_csv_json_and_plots(run_dir):
    report = build_report(run_dir).read_text()
    assert "## Table 1" in report and "## Table 2" in report and "## Table 3" in report
    assert "| math |" in report and "| math-hard |" in report
    for name in (
        "table1.png",
        "table2.png",
        "learning_curves.png",
        "table1.csv",
        "table2.csv",
        "table3.csv",
        "tables.json",
    ):
        assert (run_dir / "report" / name).stat().st_size > 0
    tables = json.loads((run_dir / "report" / "tables.json").read_text())
    assert tables["table1"]["header"] == ["task", "base", "svf"]  # no LoRA run: no LoRA column, nothing invented


def test_report_refuses_an_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no table1"):
        build_report(tmp_path)
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "missing")


def records(correct: list[int]) -> list[dict]:
    return [{"id": f"q{i}", "correct": bool(c)} for i, c in enumerate(correct)]


def test_fewshot_reading_pairs_fewshot_with_the_better_single_strategy():
    from t2ray.report import fewshot_reading

    table2 = {
        ("prompt", "a"): {"accuracy": 0.2, "records": records([1] * 20 + [0] * 80)},
        ("classifier", "a"): {"accuracy": 0.3, "records": records([1] * 30 + [0] * 70)},
        ("fewshot", "a"): {"accuracy": 0.6, "records": records([1] * 60 + [0] * 40)},
        ("prompt", "b"): {"accuracy": 0.5, "records": records([1, 0] * 4)},
        ("fewshot", "b"): {"accuracy": 0.375, "records": records([1, 0, 0, 1, 0, 0, 1, 0])},
        ("base", "c"): {"accuracy": 0.1, "records": records([0] * 8)},
    }
    a, b = fewshot_reading(table2)  # task c has no few-shot result: no line
    assert a.startswith("- a: few-shot vs classifier") and "+30.0 points" in a and a.endswith("significantly better.")
    assert "n = 100 paired items" in a
    assert b.startswith("- b: few-shot vs prompt") and "-12.5 points" in b and b.endswith("not distinguishable.")


def test_confusion_counts_per_class_accuracy_and_refuses_bad_input():
    from t2ray.adapt.dispatch import confusion

    c = confusion(["math", "math", "code", "reasoning"], ["math", "other", "code", "math"])
    assert c["labels"] == ["code", "math", "reasoning", "other"]
    assert c["counts"] == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert c["per_class"] == {"code": 1.0, "math": 0.5, "reasoning": 0.0} and c["accuracy"] == 0.5
    assert confusion(["math"], ["gibberish"])["counts"][1][3] == 1  # an unparsable label counts as other
    with pytest.raises(ValueError, match="2 true categories but 1"):
        confusion(["math", "code"], ["math"])
    with pytest.raises(ValueError, match="unknown true categories"):
        confusion(["poetry"], ["math"])


def test_report_shows_dispatch_confusion_and_cem_fitness(run_dir, tmp_path):
    """A real pass 1 (tiny-llama, its own classifier expert) and a real CEM search feed the report."""
    import shutil

    from t2ray.adapt.two_pass import dispatch_quality

    root = tmp_path / "run"
    shutil.copytree(run_dir, root)
    quality = dispatch_quality(
        "tiny-llama",
        {"math": 3, "code": 2, "humaneval": 1},
        classifier_expert=root / "math.safetensors",
        expert_tasks=["math", "code"],
    )
    assert quality["prompt"]["n"] == quality["classifier"]["n"] == quality["nearest"]["n"] == 6
    # the nearest centroid of the math and code experts' training questions: the sentence embedder tells them apart
    assert quality["nearest"]["per_class"] == {"math": 1.0, "code": 1.0}
    assert quality["categories"] == {"math": "math", "code": "code", "humaneval": "code"}
    assert sum(map(sum, quality["classifier"]["counts"])) == 6
    (root / "dispatch.json").write_text(json.dumps(quality))
    experts = [str(root / f"{t}.safetensors") for t in ("math", "code", "reasoning")]
    cfg = AdaptConfig(
        strategy="fewshot",
        task="math-hard",
        model={"spec": "tiny-llama"},
        experts=experts,
        limit=2,
        cem={"population": 2, "generations": 2, "shots": 2},
    )
    run_adapt(cfg, progress=False).save(root / "table2" / "fewshot-math-hard.json")
    report = build_report(root).read_text()
    assert "## Dispatch quality" in report and "**classifier**" in report and "per-class accuracy" in report
    for name in ("dispatch_confusion.png", "cem_fitness.png", "dispatch_prompt.csv", "dispatch_classifier.csv"):
        assert (root / "report" / name).stat().st_size > 0
    assert "- math-hard: few-shot vs prompt" in report or "- math-hard: few-shot and prompt" in report


def test_wilson_interval_is_honest_at_the_edges():
    from t2ray.report import wilson_interval

    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)  # p ± 2·s.e. would claim [0, 0]
    low, high = wilson_interval(64, 128)
    assert (low, high) == (pytest.approx(0.4145, abs=1e-3), pytest.approx(0.5855, abs=1e-3))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_difference_and_its_reading():
    from t2ray.report import paired_difference, significance_reading

    def result(correct):
        return {
            "accuracy": sum(correct) / len(correct),
            "n": len(correct),
            "correct": sum(correct),
            "records": [{"id": f"q{i}", "correct": c} for i, c in enumerate(correct)],
        }

    base = result([False] * 60 + [True] * 40)
    better = result([True] * 40 + [False] * 20 + [True] * 40)  # +40 points, every change in its favour
    noisy = result([True] * 5 + [False] * 55 + [True] * 35 + [False] * 5)  # 5 gained, 5 lost: 0 points
    mean, low, high, n = paired_difference(better, base)
    assert (mean, n) == (pytest.approx(0.4), 100) and low > 0.3
    mean, low, high, _ = paired_difference(noisy, base)
    assert mean == 0 and low < 0 < high
    assert paired_difference(better, {"records": []}) is None
    lines = significance_reading(
        {("base", "t"): base, ("svf", "t"): better, ("lora", "t"): noisy}, ("base", "lora", "svf")
    )
    assert lines[0].startswith("- t, lora: +0.0 points") and lines[0].endswith(
        "not distinguishable from the base model."
    )
    assert lines[1].startswith("- t, svf: +40.0 points") and "significantly better than" in lines[1]


def test_no_differing_item_is_said_plainly():
    from t2ray.report import _cell, significance_reading

    same = {
        ("base", "t"): {"accuracy": 0.0, "correct": 0, "n": 3, "records": records([0, 0, 0])},
        ("prompt", "t"): {"accuracy": 0.0, "correct": 0, "n": 3, "records": records([0, 0, 0])},
    }
    assert _cell(same, "prompt", "t").endswith("Δ +0.0 (no item differs)")
    assert significance_reading(same, ("base", "prompt")) == [
        "- t, prompt: graded like the base model on every one of the 3 items."
    ]
