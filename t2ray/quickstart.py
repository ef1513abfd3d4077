"""`t2ray quickstart` (what `make demo` runs): the paper's pipeline end to end on the embedded SmolLM2.

decompose → train the math/code/reasoning SVF experts, the classifier expert and the LoRA baselines
(Ray Train, 2 workers, ZeRO-2) → Table 1 (base / LoRA / SVF on the trained tasks) → Table 2 (base / prompt /
classifier / few-shot / token-level on the unseen tasks, real HumanEval included) → Table 3 → report.md.

Every stage writes its output under runs/quickstart and is skipped when that output exists (re-running
resumes). Budgets are sized for ≤ 25 minutes on 2 CPU cores; experiments/quickstart.yaml overrides them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import typer
from pydantic import Field

from t2ray.config import CEMConfig, ExperimentConfig, Strict, load_experiment, read_yaml

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
TRAINED = ("math", "code", "reasoning")
UNSEEN = ("math-hard", "code-hard", "reasoning-hard", "humaneval")


# Seconds measured on 2 CPU cores with SmolLM2 (make demo, 2026-11-26): they turn budgets into the minutes shown.
ROLLOUT_AND_UPDATE_S = {"math": (5.0, 1.0), "code": (11.0, 1.75), "reasoning": (5.0, 1.0), "cls": (10.0, 3.75)}
EVAL_S_PER_ITEM = {"math": 0.42, "code": 0.63, "reasoning": 0.34, "math-hard": 1.2, "code-hard": 1.9,
                   "reasoning-hard": 0.4, "humaneval": 6.0}
TABLE1_LABELS = {"base": "base", "svf": "SVF", "lora": "LoRA"}
STRATEGY_FACTOR = {"base": 1.0, "prompt": 1.6, "classifier": 1.6, "fewshot": 1.1, "token": 1.9}


class QuickstartConfig(Strict):
    """Defaults: the whole pipeline in ≤ 25 min on 2 CPU cores, so every budget is small and the tables are
    noisy; experiments/quickstart.yaml is a larger budget (about an hour) with steadier numbers."""
    model: str = "smollm2-135m"
    iterations: int = Field(5, ge=1, description="RL iterations per expert (LoRA gets the same budget)")
    batch_size: int = Field(4, ge=2, description="prompts per RL iteration, over the 2 workers")
    # Few, small steps barely move z at the paper's lr (2e-3): 5 steps at 6e-3 go about as far as 15 at 2e-3.
    svf_lr: float = Field(6e-3, gt=0)
    lora_lr: float = Field(6e-4, gt=0, description="LoRA's own lr, scaled like SVF's from its 2e-4")
    eval_limit: int = Field(32, ge=1, description="test items per trained-task evaluation")
    unseen_limit: int = Field(8, ge=1, description="test items per unseen-task evaluation")
    humaneval_limit: int = Field(2, ge=1, description="HumanEval problems (384-token answers: ~6 s each)")
    cem: CEMConfig = CEMConfig(population=4, generations=2, shots=2)
    lora: bool = Field(True, description="train the LoRA baselines for Table 1")


@dataclass
class Stage:
    name: str
    minutes: float                # expected wall time on 2 CPU cores
    output: Path
    run: Callable[[], None]


def run_stages(stages: list[Stage]) -> None:
    left = [s for s in stages if not s.output.exists()]
    typer.secho(f"quickstart: {len(stages)} stages, {len(left)} to run, about {sum(s.minutes for s in left):.0f} min "
                "on 2 CPU cores", bold=True)
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            typer.echo(f"{tag}: done already")
            continue
        typer.secho(f"{tag} (about {stage.minutes:.1f} min)", fg="cyan")
        start = time.perf_counter()
        stage.run()
        typer.echo(f"{tag}: {time.perf_counter() - start:.0f} s")


def train_minutes(task: str, qs: QuickstartConfig) -> float:
    """Ray Train start-up + iterations (a rollout, then an update per prompt on each worker) + one validation."""
    rollout, update = ROLLOUT_AND_UPDATE_S[task]
    return (25 + qs.iterations * (rollout + update * qs.batch_size / 2) + 10) / 60


def eval_minutes(task: str, limit: int, strategy: str = "base", cem: CEMConfig | None = None) -> float:
    seconds = 5 + limit * EVAL_S_PER_ITEM[task] * STRATEGY_FACTOR[strategy]
    if strategy == "fewshot" and cem is not None:  # every candidate answers every shot (one z per batch row)
        seconds += cem.population * cem.generations * cem.shots * EVAL_S_PER_ITEM[task] * 1.25
    return seconds / 60


def expert_config(root: Path, qs: QuickstartConfig, task: str, method: str) -> ExperimentConfig:
    base = load_experiment(EXPERIMENTS / f"smollm2-{'cls' if task == 'cls' else task}.yaml")
    name = f"{method}-{task}"
    return ExperimentConfig.model_validate({
        **base.model_dump(), "name": name, "method": method, "storage_path": str(root),
        "model": {"spec": qs.model},
        # one validation, at the end (its expert is the final z): the Table 1 evaluation follows anyway
        "rl": {**base.rl.model_dump(), "iterations": qs.iterations, "batch_size": qs.batch_size,
               "eval_interval": qs.iterations, "eval_limit": 32, "lr": qs.lora_lr if method == "lora" else qs.svf_lr},
        "tracking": {"wandb": True, "project": "t2ray-quickstart"}})


def expert_path(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / ("expert" if cfg.method == "lora" else "expert.safetensors")


def quickstart(root: Path = Path("runs/quickstart"), config: Path | None = None) -> Path:
    from t2ray.adapt.two_pass import run_adapt
    from t2ray.adapters import load_adapted
    from t2ray.config import AdaptConfig
    from t2ray.evaluate import evaluate
    from t2ray.report import build_report
    from t2ray.tasks import get_task
    from t2ray.train import train

    qs = QuickstartConfig.model_validate(read_yaml(config) if config else {})
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    svf = {t: expert_config(root, qs, t, "svf") for t in (*TRAINED, "cls")}
    lora = {t: expert_config(root, qs, t, "lora") for t in TRAINED} if qs.lora else {}

    def evaluation(task: str, out: Path, limit: int, expert: Path | None = None) -> Callable[[], None]:
        def run() -> None:
            model, tokenizer, label = load_adapted(qs.model, expert=expert)
            result = evaluate(model, tokenizer, get_task(task), limit=limit, adapter=label)
            result.save(out)
            typer.echo(f"    {label} on {task}: {result.accuracy:.1%} ({result.correct}/{result.n})")
        return run

    def adaptation(strategy: str, task: str, out: Path) -> Callable[[], None]:
        def run() -> None:
            cfg = AdaptConfig(strategy=strategy, task=task, model={"spec": qs.model},
                              experts=[str(expert_path(svf[t])) for t in TRAINED],
                              classifier_expert=str(expert_path(svf["cls"])),
                              limit=qs.humaneval_limit if task == "humaneval" else qs.unseen_limit, cem=qs.cem)
            result = run_adapt(cfg, progress=True)
            result.save(out)
            typer.echo(f"    {strategy} on {task}: {result.eval.accuracy:.1%}; pass 1 {result.pass1_s:.1f} s, "
                       f"pass 2 {result.pass2_s:.1f} s")
        return run

    def decompose() -> None:
        from t2ray.models import load_model
        from t2ray.svf import patch_model

        patch_model(load_model(qs.model)[0], svf["math"].svf)  # workers then hit the SVD cache
        (root / "decompose.done").touch()

    t1, t2 = root / "table1", root / "table2"
    stages = [Stage("decompose the MLP matrices (SVD, cached per model)", 0.5, root / "decompose.done", decompose)]
    stages += [Stage(f"train the {t} SVF expert (Ray Train, 2 workers, ZeRO-2)", train_minutes(t, qs),
                     expert_path(c), lambda c=c: train(c)) for t, c in svf.items()]
    stages += [Stage(f"train the {t} LoRA baseline (same loop, same budget)", train_minutes(t, qs),
                     expert_path(c), lambda c=c: train(c)) for t, c in lora.items()]
    for t in TRAINED:
        columns = {"base": None, "svf": expert_path(svf[t]), **({"lora": expert_path(lora[t])} if t in lora else {})}
        for column, expert in columns.items():
            out = t1 / f"{column}-{t}.json"
            stages.append(Stage(f"Table 1: {TABLE1_LABELS[column]} on {t}", eval_minutes(t, qs.eval_limit), out,
                                evaluation(t, out, qs.eval_limit, expert)))
    for t in UNSEEN:
        limit = qs.humaneval_limit if t == "humaneval" else qs.unseen_limit
        stages.append(Stage(f"Table 2: base on {t}", eval_minutes(t, limit), t2 / f"base-{t}.json",
                            evaluation(t, t2 / f"base-{t}.json", limit)))
        for strategy in ("prompt", "classifier", "fewshot", "token"):
            stages.append(Stage(f"Table 2: {strategy} on {t}", eval_minutes(t, limit, strategy, qs.cem),
                                t2 / f"{strategy}-{t}.json", adaptation(strategy, t, t2 / f"{strategy}-{t}.json")))
    run_stages(stages)
    report = build_report(root)
    typer.echo(report.read_text())
    typer.secho(f"report: {report}", bold=True)
    return report
