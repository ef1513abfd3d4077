"""`t2ray quickstart` end to end on tiny-llama with the smallest budgets: every stage of the real pipeline
(Ray Train experts, Table 1 and 2 evaluations, every two-pass strategy, real HumanEval, the report), then a
re-run that finds every stage done."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from t2ray.cli import app
from t2ray.quickstart import TRAINED, UNSEEN

pytestmark = pytest.mark.slow

BUDGET = """model: tiny-llama
experts: {math: {iterations: 2}, code: {iterations: 2}, reasoning: {iterations: 2, batch_size: 4}, cls: {iterations: 2}}
eval_limit: 3
unseen_limit: 2
humaneval_limit: 1
cem: {population: 2, generations: 1, shots: 2}
lora: false
"""


def test_quickstart_runs_every_stage_then_resumes(ray_cluster, tmp_path):
    config, root = tmp_path / "budget.yaml", tmp_path / "qs"
    config.write_text(BUDGET)
    runner = CliRunner()
    result = runner.invoke(app, ["quickstart", "--root", str(root), "--config", str(config)])
    assert result.exit_code == 0, result.output
    for task in TRAINED:
        for column in ("base", "svf"):
            assert json.loads((root / "table1" / f"{column}-{task}.json").read_text())["n"] == 3
    for task in UNSEEN:
        n = 1 if task == "humaneval" else 2
        for column in ("base", "prompt", "classifier", "fewshot", "token"):
            saved = json.loads((root / "table2" / f"{column}-{task}.json").read_text())
            assert saved["n"] == n, (column, task)
    report = (root / "report.md").read_text()
    assert all(f"Table {i}" in report for i in (1, 2, 3)) and (root / "report" / "learning_curves.png").exists()
    assert "## Dispatch quality" in report and json.loads((root / "dispatch.json").read_text())["classifier"]["n"] == \
        6 * 2 + 1  # the first unseen_limit (2) test queries of every trained and unseen task, HumanEval's 1
    assert (root / "report" / "dispatch_confusion.png").exists() and (root / "report" / "cem_fitness.png").exists()
    assert "Table 1" in result.output and "per-class accuracy" in result.output  # the tables are printed too
    assert "quickstart: all stages done" in result.output

    again = runner.invoke(app, ["quickstart", "--root", str(root), "--config", str(config)])
    assert again.exit_code == 0, again.output
    assert "0 to run" in again.output and again.output.count("done already") == result.output.count("(about ")
