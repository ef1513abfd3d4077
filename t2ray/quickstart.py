"""`t2ray quickstart` (what `make demo` runs): the paper's pipeline end to end on the embedded SmolLM2.

decompose → train the math/code/reasoning SVF experts, the classifier expert and the LoRA baselines
(Ray Train, 2 workers, ZeRO-2) → Table 1 (base / LoRA / SVF on the trained tasks) → Table 2 (base / prompt /
classifier / few-shot / token-level on the unseen tasks, real HumanEval included) → Table 3 → report.md.

Every stage writes its output under runs/quickstart and is skipped when that output exists (re-running
resumes). The default budgets take about 42 minutes on 2 CPU cores; experiments/quickstart.yaml overrides them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import typer
from pydantic import Field, field_validator

from t2ray.config import CEMConfig, ExperimentConfig, RoutingConfig, Strict, load_experiment, read_yaml

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
TRAINED = ("math", "code", "reasoning")
UNSEEN = ("math-hard", "code-hard", "reasoning-hard", "humaneval")


# Seconds measured on the 2-core machine with SmolLM2 in bf16 (make demo, 2026-11-30): they turn budgets into the
# minutes announced before each stage.
DECOMPOSE_S = 10
TRAIN_START_S = 42           # one Ray Train run: worker start-up, model + DeepSpeed set-up, final validation, save
# per iteration of 16 prompts (reasoning: × 4 samples; cls: ~300-token prompts)
ITERATION_S = {"math": 10.0, "code": 27.0, "reasoning": 16.0, "cls": 28.0}
# per test item, the whole stage (model load, generation, grading) of the base model
EVAL_S_PER_ITEM = {"math": 0.19, "code": 0.38, "reasoning": 0.2, "math-hard": 0.38, "code-hard": 0.56,
                   "reasoning-hard": 0.2, "humaneval": 2.5}
DISPATCH_S_PER_ITEM = 0.3    # both strategies' pass 1 (the classification prompt is ~270 tokens)
TABLE1_LABELS = {"base": "base", "svf": "SVF", "lora": "LoRA"}
STRATEGY_FACTOR = {"base": 1.0, "prompt": 1.6, "classifier": 1.6, "fewshot": 0.9, "token": 1.8}
CEM_ROW_FACTOR = 1.5         # a CEM row (one z per row, plus the reference's log-likelihood) vs a base-model item


EXPERTS = (*TRAINED, "cls")


class ExpertBudget(Strict):
    iterations: int = Field(ge=1, description="RL iterations (the LoRA baseline gets the same)")
    batch_size: int = Field(ge=2, description="prompts per iteration, over the 2 workers")
    lr: float = Field(gt=0, description="the SVF expert's; LoRA's is lora_lr_ratio × this")


# Measured (bench/RESULTS.md, make_demo): short hot SVF runs vary run to run (math at 10 × 16: +16, +25, −1 points).
DEFAULT_BUDGETS = {"math": {"iterations": 12, "batch_size": 16, "lr": 4e-3},
                   "code": {"iterations": 8, "batch_size": 8, "lr": 6e-3},
                   "reasoning": {"iterations": 8, "batch_size": 8, "lr": 6e-3},
                   "cls": {"iterations": 4, "batch_size": 8, "lr": 4e-3}}  # ~300-token prompts: costly steps


class QuickstartConfig(Strict):
    """Defaults: the whole pipeline in about 42 min on 2 CPU cores; experiments/quickstart.yaml is a larger budget."""
    model: str = "smollm2-135m"
    experts: dict[str, ExpertBudget] = Field(
        DEFAULT_BUDGETS, validate_default=True,
        description="RL budget per expert; keys given in a YAML override only those keys")
    lora_lr_ratio: float = Field(0.1, gt=0, description="LoRA's lr ÷ SVF's (the paper's setups: 2e-4 vs 2e-3)")
    eval_limit: int = Field(128, ge=1, description="test items per trained-task evaluation (Table 1)")
    unseen_limit: int = Field(64, ge=1, description="test items per unseen-task evaluation (Table 2)")
    humaneval_limit: int = Field(16, ge=1, description="HumanEval problems (384-token answers)")
    cem: CEMConfig = CEMConfig(population=6, generations=3, shots=3)
    routing: RoutingConfig = Field(RoutingConfig(every=4), description="token-level: re-embed every 4 tokens "
                                   "(2 was Belofsky's best; each routing step embeds every unfinished row)")
    lora: bool = Field(True, description="train the LoRA baselines for Table 1")

    @field_validator("experts", mode="before")
    @classmethod
    def _over_the_defaults(cls, value):
        if not isinstance(value, dict) or not set(value) <= set(EXPERTS):
            raise ValueError(f"experts: a mapping with keys among {list(EXPERTS)}; got {value!r}")
        given = {e: b.model_dump() if isinstance(b, ExpertBudget) else b for e, b in value.items()}
        return {e: {**DEFAULT_BUDGETS[e], **given.get(e, {})} for e in EXPERTS}


@dataclass
class Stage:
    name: str
    minutes: float                # expected wall time on 2 CPU cores
    output: Path
    run: Callable[[], str | None]  # may return a one-line outcome for the stage's closing line


def run_stages(stages: list[Stage]) -> None:
    """One line per stage with its estimate; its progress bar (drawn by this process) while it runs; then one
    line with its measured time and outcome."""
    left = [s for s in stages if not s.output.exists()]
    typer.secho(f"quickstart: {len(stages)} stages, {len(left)} to run, about {sum(s.minutes for s in left):.0f} min "
                "on 2 CPU cores", bold=True)
    start_all = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            typer.echo(f"{tag}: done already")
            continue
        typer.secho(f"{tag} (about {stage.minutes:.1f} min)", fg="cyan")
        start = time.perf_counter()
        outcome = stage.run()
        typer.echo(f"{tag}: {(time.perf_counter() - start) / 60:.1f} min" + (f" — {outcome}" if outcome else ""))
    typer.secho(f"quickstart: all stages done, {(time.perf_counter() - start_all) / 60:.1f} min", bold=True)


def unseen_limit(qs: QuickstartConfig, task: str) -> int:
    return qs.humaneval_limit if task == "humaneval" else qs.unseen_limit


def train_minutes(cfg: ExperimentConfig) -> float:
    """Start-up + iterations (time scales with the prompts per iteration)."""
    return (TRAIN_START_S + cfg.rl.iterations * ITERATION_S[cfg.task] * cfg.rl.batch_size / 16) / 60


def eval_minutes(task: str, limit: int, strategy: str = "base", cem: CEMConfig | None = None) -> float:
    seconds = 5 + limit * EVAL_S_PER_ITEM[task] * STRATEGY_FACTOR[strategy]
    if strategy == "fewshot" and cem is not None:  # every candidate answers every shot (one z per batch row)
        seconds += cem.population * cem.generations * cem.shots * EVAL_S_PER_ITEM[task] * CEM_ROW_FACTOR
    return seconds / 60


def expert_config(root: Path, qs: QuickstartConfig, task: str, method: str) -> ExperimentConfig:
    base = load_experiment(EXPERIMENTS / f"smollm2-{'cls' if task == 'cls' else task}.yaml")
    name, budget = f"{method}-{task}", qs.experts[task]
    return ExperimentConfig.model_validate({
        **base.model_dump(), "name": name, "method": method, "storage_path": str(root),
        "model": {"spec": qs.model},
        # one validation, at the end (its expert is the final z): the Table 1 evaluation follows anyway
        "rl": {**base.rl.model_dump(), "iterations": budget.iterations, "batch_size": budget.batch_size,
               "eval_interval": budget.iterations, "eval_limit": 32,
               "lr": budget.lr * (qs.lora_lr_ratio if method == "lora" else 1.0)},
        "tracking": {"wandb": True, "project": "t2ray-quickstart"}})


def expert_path(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / ("expert" if cfg.method == "lora" else "expert.safetensors")


def quickstart(root: Path = Path("runs/quickstart"), config: Path | None = None) -> Path:
    from t2ray.adapt.two_pass import dispatch_quality, run_adapt
    from t2ray.adapters import load_adapted
    from t2ray.config import AdaptConfig
    from t2ray.evaluate import evaluate
    from t2ray.report import build_report, console_summary
    from t2ray.tasks import get_task
    from t2ray.train import train

    qs = QuickstartConfig.model_validate(read_yaml(config) if config else {})
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    svf = {t: expert_config(root, qs, t, "svf") for t in EXPERTS}
    lora = {t: expert_config(root, qs, t, "lora") for t in TRAINED} if qs.lora else {}
    limits = {**{t: qs.eval_limit for t in TRAINED}, **{t: unseen_limit(qs, t) for t in UNSEEN}}

    def training(cfg: ExperimentConfig) -> Callable[[], str]:
        def run() -> str:
            outcome = train(cfg)
            last = outcome.history[-1] if outcome.history else {}
            return f"valid accuracy {outcome.best_valid:.1%}, last rollouts {last.get('accuracy', float('nan')):.1%}"
        return run

    def evaluation(task: str, out: Path, expert: Path | None = None) -> Callable[[], str]:
        def run() -> str:
            model, tokenizer, label = load_adapted(qs.model, expert=expert)
            result = evaluate(model, tokenizer, get_task(task), limit=limits[task], adapter=label)
            result.save(out)
            return f"{label}: {result.accuracy:.1%} ({result.correct}/{result.n})"
        return run

    def adaptation(strategy: str, task: str, out: Path) -> Callable[[], str]:
        def run() -> str:
            cfg = AdaptConfig(strategy=strategy, task=task, model={"spec": qs.model},
                              experts=[str(expert_path(svf[t])) for t in TRAINED],
                              classifier_expert=str(expert_path(svf["cls"])), limit=limits[task], cem=qs.cem,
                              routing=qs.routing)
            result = run_adapt(cfg, progress=True)
            result.save(out)
            return (f"{result.eval.accuracy:.1%} ({result.eval.correct}/{result.eval.n}); pass 1 {result.pass1_s:.1f} s, "
                    f"pass 2 {result.pass2_s:.1f} s")
        return run

    def decompose() -> str:
        from t2ray.models import load_model
        from t2ray.svf import patch_model

        layers = patch_model(load_model(qs.model)[0], svf["math"].svf)  # workers then hit the SVD cache
        (root / "decompose.done").touch()
        return f"{len(layers)} matrices"

    dispatched = {t: min(limits[t], qs.unseen_limit) for t in limits}  # pass 1 alone: the first 64 of each task

    def dispatch() -> str:
        quality = dispatch_quality(qs.model, expert_path(svf["cls"]), dispatched)
        (root / "dispatch.json").write_text(json.dumps(quality, indent=2))
        return ", ".join(f"{s} {quality[s]['accuracy']:.1%}" for s in ("prompt", "classifier"))

    t1, t2 = root / "table1", root / "table2"
    stages = [Stage("decompose the MLP matrices (SVD, cached per model)", DECOMPOSE_S / 60, root / "decompose.done",
                    decompose)]
    stages += [Stage(f"train the {t} SVF expert (Ray Train, 2 workers, ZeRO-2)", train_minutes(c), expert_path(c),
                     training(c)) for t, c in svf.items()]
    stages += [Stage(f"train the {t} LoRA baseline (same loop, same budget)", train_minutes(c), expert_path(c),
                     training(c)) for t, c in lora.items()]
    for t in TRAINED:
        columns = {"base": None, "svf": expert_path(svf[t]), **({"lora": expert_path(lora[t])} if t in lora else {})}
        for column, expert in columns.items():
            out = t1 / f"{column}-{t}.json"
            stages.append(Stage(f"Table 1: {TABLE1_LABELS[column]} on {t} ({limits[t]} test items)",
                                eval_minutes(t, limits[t]), out, evaluation(t, out, expert)))
    stages.append(Stage(f"dispatch quality: pass 1 of prompt and classifier on {sum(dispatched.values())} test "
                        "queries", DISPATCH_S_PER_ITEM * sum(dispatched.values()) / 60, root / "dispatch.json",
                        dispatch))
    for t in UNSEEN:
        out = t2 / f"base-{t}.json"
        stages.append(Stage(f"Table 2: base on {t} ({limits[t]} test items)", eval_minutes(t, limits[t]), out,
                            evaluation(t, out)))
        for strategy in ("prompt", "classifier", "fewshot", "token"):
            out = t2 / f"{strategy}-{t}.json"
            stages.append(Stage(f"Table 2: {strategy} on {t}", eval_minutes(t, limits[t], strategy, qs.cem), out,
                                adaptation(strategy, t, out)))
    run_stages(stages)
    report = build_report(root)
    typer.echo(console_summary(report))
    typer.secho(f"report: {report} (plots in {report.parent / 'report'})", bold=True)
    return report
