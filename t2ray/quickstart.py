"""`t2ray quickstart` (what `make demo` runs): the paper's pipeline end to end, by default on the embedded SmolLM2
and the built-in offline tasks.

decompose → train the math/code/reasoning SVF experts, the classifier expert and the LoRA baselines
(Ray Train, 2 workers, ZeRO-2) → Table 1 (base / LoRA / SVF on the trained tasks) → Table 2 (base / prompt /
classifier / few-shot / token-level on the unseen tasks, real HumanEval included) → Table 2 over the LoRA adapters
(base / each adapter / token routing every 1, 2, 4 tokens / few-shot α) → Table 3 → report.md.

Every stage writes its output under the root folder and is skipped when that output exists (re-running resumes).
The default budgets take about 49 minutes on 2 CPU cores (42 measured before the LoRA Table 2);
experiments/quickstart.yaml is a larger budget and experiments/paper-{smollm2,llama3-8b}.yaml the paper's benchmarks
(`--check` validates one and prints its stages).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import typer
from pydantic import Field, field_validator, model_validator

from t2ray.config import (
    CEMConfig,
    ExperimentConfig,
    ModelConfig,
    RoutingConfig,
    Strict,
    deep_merge,
    load_experiment,
    read_yaml,
)

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
CATEGORIES = ("math", "code", "reasoning")
EXPERTS = (*CATEGORIES, "cls")
CALIBRATED_MODEL = "smollm2-135m"


# Seconds measured on the 2-core machine with SmolLM2 in bf16 (make demo, 2026-11-30): they turn budgets into the
# minutes announced before each stage. Other tasks fall back on a per-token rate.
DECOMPOSE_S = 10
TRAIN_START_S = 42  # one Ray Train run: worker start-up, model + DeepSpeed set-up, final validation, save
# per iteration of 16 prompts (reasoning: × 4 samples; cls: ~300-token prompts)
ITERATION_S = {
    "math": 10.0,
    "code": 27.0,
    "reasoning": 16.0,
    "cls": 28.0,
    # experiments/paper-smollm2.yaml (256-token rollouts for gsm8k/mbpp), 2026-11-30
    "gsm8k": 78.0,
    "mbpp": 94.0,
    "arc-easy": 15.0,
    "cls-benchmarks": 30.0,
}
ITERATION_S_PER_TOKEN = 0.4  # other tasks: per rollout token (an iteration of 16 prompts)
# per test item, the whole stage (model load, generation, grading) of the base model
EVAL_S_PER_ITEM = {
    "math": 0.19,
    "code": 0.38,
    "reasoning": 0.2,
    "math-hard": 0.38,
    "code-hard": 0.56,
    "reasoning-hard": 0.2,
    "humaneval": 2.5,
    "gsm8k": 0.9,
    "mbpp": 2.8,
    "arc-easy": 0.25,
}
EVAL_S_PER_TOKEN = 0.0065  # other tasks: per token of the task's answer budget (max_new_tokens)
DISPATCH_S_PER_ITEM = 0.3  # both strategies' pass 1 (the classification prompt is ~270 tokens)
TABLE1_LABELS = {"base": "base", "svf": "SVF", "lora": "LoRA"}
STRATEGY_FACTOR = {
    "base": 1.0,
    "prompt": 1.6,
    "classifier": 1.6,
    "fewshot": 0.9,
    "token": 1.8,
    # LoRA adapters routed every k tokens (per-row weights in every layer), 16 items, 2026-11-30
    "lora-token1": 5.5,
    "lora-token2": 3.6,
    "lora-token4": 2.7,
}
CEM_ROW_FACTOR = 1.5  # a CEM row (one z per row, plus the reference's log-likelihood) vs a base-model item


class ExpertBudget(Strict):
    iterations: int = Field(ge=1, description="RL iterations (the LoRA baseline gets the same)")
    batch_size: int = Field(ge=2, description="prompts per iteration, over the workers")
    lr: float = Field(gt=0, description="the SVF expert's; LoRA's is lora_lr_ratio × this")
    max_new_tokens: int | None = Field(None, ge=1, description="rollout tokens; default: the category's YAML")


# Measured (bench/RESULTS.md, make_demo): short hot SVF runs vary run to run (math at 10 × 16: +16, +25, −1 points).
DEFAULT_BUDGETS = {
    "math": {"iterations": 12, "batch_size": 16, "lr": 4e-3},
    "code": {"iterations": 8, "batch_size": 8, "lr": 6e-3},
    "reasoning": {"iterations": 8, "batch_size": 8, "lr": 6e-3},
    "cls": {"iterations": 4, "batch_size": 8, "lr": 4e-3},
}  # ~300-token prompts: costly steps


class LoRATable2(Strict):
    """Table 2 over the LoRA baselines (Belofsky 2023's comparison), when the quickstart trains them."""

    enabled: bool = Field(
        True,
        description="base, each adapter alone (the best is reported), token routing every k "
        "tokens, few-shot α, on the unseen tasks",
    )
    tasks: list[str] | None = Field(None, description="unseen tasks it runs on (None: all of them)")
    limit: int = Field(16, ge=1, description="test items per task (at most Table 2's)")
    every: list[Literal[1, 2, 4]] = Field([1, 2, 4], min_length=1, description="token routing: re-route every k")


class QuickstartConfig(Strict):
    """Defaults: the whole pipeline on the built-in tasks in about 49 min on 2 CPU cores. experiments/quickstart.yaml
    is a larger budget; experiments/paper-*.yaml run the paper's benchmarks."""

    model: ModelConfig = ModelConfig()
    trained: dict[str, str] = Field(
        {c: c for c in CATEGORIES},
        validate_default=True,
        description="category → the task its expert trains on (Table 1)",
    )
    classifier_task: str = Field("cls", description="the classifier expert's task (category identification)")
    unseen: list[str] = Field(
        ["math-hard", "code-hard", "reasoning-hard", "humaneval"],
        min_length=1,
        description="Table 2's tasks: the experts never trained on them",
    )
    experts: dict[str, ExpertBudget] = Field(
        DEFAULT_BUDGETS,
        validate_default=True,
        description="RL budget per expert (math, code, reasoning, cls); keys given override only those keys",
    )
    training: dict = Field({}, description="merged over every expert's experiment YAML (scaling, deepspeed, rl…)")
    lora_lr_ratio: float = Field(0.1, gt=0, description="LoRA's lr ÷ SVF's (the paper's setups: 2e-4 vs 2e-3)")
    eval_limit: int = Field(128, ge=1, description="test items per trained-task evaluation (Table 1)")
    unseen_limit: int = Field(64, ge=1, description="test items per unseen-task evaluation (Table 2)")
    limits: dict[str, int] = Field({"humaneval": 16}, description="test items of these tasks, over the two above")
    cem: CEMConfig = CEMConfig(population=6, generations=3, shots=3)
    routing: RoutingConfig = Field(
        RoutingConfig(every=4),
        description="token-level: re-embed every 4 tokens "
        "(2 was Belofsky's best; each routing step embeds every unfinished row)",
    )
    lora: bool = Field(True, description="train the LoRA baselines for Table 1")
    # HumanEval is left out by default: 16 problems × 7 columns would cost ~10 min, and SmolLM2-135M solves none
    lora_table2: LoRATable2 = LoRATable2(tasks=["math-hard", "code-hard", "reasoning-hard"])

    @field_validator("model", mode="before")
    @classmethod
    def _spec_alone(cls, value):
        return {"spec": value} if isinstance(value, str) else value

    @field_validator("experts", mode="before")
    @classmethod
    def _over_the_defaults(cls, value):
        if not isinstance(value, dict) or not set(value) <= set(EXPERTS):
            raise ValueError(f"experts: a mapping with keys among {list(EXPERTS)}; got {value!r}")
        given = {e: b.model_dump() if isinstance(b, ExpertBudget) else b for e, b in value.items()}
        return {e: {**DEFAULT_BUDGETS[e], **given.get(e, {})} for e in EXPERTS}

    @field_validator("trained")
    @classmethod
    def _one_task_per_category(cls, value):
        if set(value) != set(CATEGORIES):
            raise ValueError(f"trained: one task for each of {list(CATEGORIES)}; got {sorted(value)}")
        for category, name in value.items():
            if task_category(name) != category:
                raise ValueError(f"trained.{category}: task {name!r} is a {task_category(name)} task")
        return value

    @field_validator("classifier_task")
    @classmethod
    def _a_classification_task(cls, value):
        if task_category(value) != "classification":
            raise ValueError(f"classifier_task: {value!r} is not a classification task (cls, cls-benchmarks)")
        return value

    @field_validator("unseen")
    @classmethod
    def _known_tasks(cls, value):
        for name in value:
            task_category(name)
        return value

    @model_validator(mode="after")
    def _lora_table2_on_unseen_tasks(self):
        runs = self.lora and self.lora_table2.enabled
        outside = [t for t in (self.lora_table2.tasks or []) if t not in self.unseen] if runs else []
        if outside:
            raise ValueError(
                f"lora_table2.tasks: {outside[0]!r} is not one of the unseen tasks {self.unseen}; set "
                "lora_table2.tasks (null: every unseen task)"
            )
        return self


def task_category(name: str) -> str:
    """The task's category; an unknown or unreachable task is a config error."""
    from t2ray.tasks import TaskError, get_task

    try:
        return get_task(name).category
    except TaskError as err:
        raise ValueError(str(err)) from None


@dataclass
class Stage:
    name: str
    minutes: float | None  # expected wall time on 2 CPU cores (None: no estimate for this model)
    output: Path
    run: Callable[[], str | None]  # may return a one-line outcome for the stage's closing line


def _about(minutes: float | None) -> str:
    return f"about {minutes:.1f} min" if minutes is not None else "no estimate"


def run_stages(stages: list[Stage], check: bool = False) -> None:
    """One line per stage with its estimate; its progress bar (drawn by this process) while it runs; then one
    line with its measured time and outcome. `check`: the plan alone."""
    left = [s for s in stages if not s.output.exists()]
    known = [s.minutes for s in left if s.minutes is not None]
    total = (
        f"about {sum(known):.0f} min on 2 CPU cores"
        if len(known) == len(left)
        else f"no time estimate (calibrated for {CALIBRATED_MODEL} on 2 CPU cores)"
    )
    typer.secho(f"quickstart: {len(stages)} stages, {len(left)} to run, {total}", bold=True)
    start_all = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            typer.echo(f"{tag}: done already")
            continue
        typer.secho(f"{tag} ({_about(stage.minutes)})", fg="cyan")
        if check:
            continue
        start = time.perf_counter()
        outcome = stage.run()
        typer.echo(f"{tag}: {(time.perf_counter() - start) / 60:.1f} min" + (f" — {outcome}" if outcome else ""))
    if not check:
        typer.secho(f"quickstart: all stages done, {(time.perf_counter() - start_all) / 60:.1f} min", bold=True)


def items_tested(qs: QuickstartConfig, task: str) -> int:
    """Test items evaluated on `task`, at most its test split."""
    from t2ray.tasks import get_task

    limit = qs.limits.get(task, qs.eval_limit if task in qs.trained.values() else qs.unseen_limit)
    return min(limit, len(get_task(task).examples("test")))


def train_minutes(cfg: ExperimentConfig) -> float:
    """Start-up + iterations (time scales with the prompts per iteration)."""
    from t2ray.tasks import get_task

    tokens = cfg.rl.max_new_tokens or get_task(cfg.task).max_new_tokens
    per_16 = ITERATION_S.get(cfg.task, ITERATION_S_PER_TOKEN * tokens)
    return (TRAIN_START_S + cfg.rl.iterations * per_16 * cfg.rl.batch_size / 16) / 60


def eval_minutes(task: str, limit: int, strategy: str = "base", cem: CEMConfig | None = None) -> float:
    from t2ray.tasks import get_task

    per_item = EVAL_S_PER_ITEM.get(task) or EVAL_S_PER_TOKEN * get_task(task).max_new_tokens
    seconds = 5 + limit * per_item * STRATEGY_FACTOR[strategy]
    if strategy == "fewshot" and cem is not None:  # every candidate answers every shot (one z per batch row)
        seconds += cem.population * cem.generations * cem.shots * per_item * CEM_ROW_FACTOR
    return seconds / 60


def expert_config(root: Path, qs: QuickstartConfig, expert: str, method: str) -> ExperimentConfig:
    """The category's experiment YAML (experiments/smollm2-<expert>.yaml), on this config's task, model and budget."""
    base = load_experiment(EXPERIMENTS / f"smollm2-{expert}.yaml").model_dump()
    budget = qs.experts[expert]
    task = qs.classifier_task if expert == "cls" else qs.trained[expert]
    rl = {
        "iterations": budget.iterations,
        "batch_size": budget.batch_size,
        # one validation, at the end (its expert is the final z): the Table 1 evaluation follows anyway
        "eval_interval": budget.iterations,
        "eval_limit": 32,
        "lr": budget.lr * (qs.lora_lr_ratio if method == "lora" else 1.0),
        **({"max_new_tokens": budget.max_new_tokens} if budget.max_new_tokens else {}),
    }
    merged = deep_merge(deep_merge(base, {"rl": rl}), qs.training)
    return ExperimentConfig.model_validate(
        {
            **merged,
            "name": f"{method}-{expert}",
            "task": task,
            "method": method,
            "storage_path": str(root),
            "model": qs.model.model_dump(),
            "tracking": {"wandb": True, "project": "t2ray-quickstart"},
        }
    )


def expert_path(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / ("expert" if cfg.method == "lora" else "expert.safetensors")


def evaluation(qs: QuickstartConfig, task: str, limit: int, out: Path, expert: Path | None = None) -> Callable[[], str]:
    """A stage's run: the base model or one expert (SVF file or LoRA folder) on the first `limit` test items of
    `task`."""

    def run() -> str:
        from t2ray.evaluate import evaluate
        from t2ray.library import load_adapted
        from t2ray.tasks import get_task

        model, tokenizer, label = load_adapted(qs.model.spec, expert=expert, dtype=qs.model.dtype)
        result = evaluate(model, tokenizer, get_task(task), limit=limit, adapter=label)
        result.save(out)
        return f"{label}: {result.accuracy:.1%} ({result.correct}/{result.n})"

    return run


def evaluation_stage(
    qs: QuickstartConfig, title: str, task: str, limit: int, out: Path, estimate, expert: Path | None = None
) -> Stage:
    return Stage(
        f"{title} on {task} ({limit} test items)",
        estimate(eval_minutes(task, limit)),
        out,
        evaluation(qs, task, limit, out, expert),
    )


def adaptation(
    qs: QuickstartConfig,
    strategy: str,
    task: str,
    limit: int,
    out: Path,
    experts: list[Path],
    classifier: Path | None = None,
    every: int | None = None,
) -> Callable[[], str]:
    """A stage: a two-pass strategy over an expert library (SVF files or LoRA folders) on `task`."""
    from t2ray.config import AdaptConfig

    routing = qs.routing if every is None else qs.routing.model_copy(update={"every": every})
    cfg = AdaptConfig(
        strategy=strategy,
        task=task,
        model=qs.model,
        experts=[str(e) for e in experts],
        classifier_expert=str(classifier) if classifier else None,
        limit=limit,
        cem=qs.cem,
        routing=routing,
    )

    def run() -> str:
        from t2ray.adapt.two_pass import run_adapt

        result = run_adapt(cfg, progress=True)
        result.save(out)
        return (
            f"{result.eval.accuracy:.1%} ({result.eval.correct}/{result.eval.n}); pass 1 {result.pass1_s:.1f} s, "
            f"pass 2 {result.pass2_s:.1f} s"
        )

    return run


def lora_table2_stages(
    qs: QuickstartConfig,
    folder: Path,
    adapters: dict[str, Path],
    limits: dict[str, int],
    estimate: Callable[[float], float | None],
) -> list[Stage]:
    """Table 2 over LoRA adapters (category -> folder), written to `folder` as COLUMN-TASK.json: each adapter alone
    (single_<category>), token routing every k (token<k>), few-shot α (fewshot); the base is Table 2's own."""
    stages = []
    library = list(adapters.values())
    for t in qs.lora_table2.tasks or qs.unseen:
        n = min(qs.lora_table2.limit, limits[t])
        for category, adapter in adapters.items():
            title, out = f"Table 2 (LoRA): the {category} adapter alone", folder / f"single_{category}-{t}.json"
            stages.append(evaluation_stage(qs, title, t, n, out, estimate, adapter))
        for every in qs.lora_table2.every:
            out = folder / f"token{every}-{t}.json"
            stages.append(
                Stage(
                    f"Table 2 (LoRA): token routing every {every} on {t}",
                    estimate(eval_minutes(t, n, f"lora-token{every}")),
                    out,
                    adaptation(qs, "token", t, n, out, library, every=every),
                )
            )
        out = folder / f"fewshot-{t}.json"
        stages.append(
            Stage(
                f"Table 2 (LoRA): few-shot α on {t}",
                estimate(eval_minutes(t, n, "fewshot", qs.cem)),
                out,
                adaptation(qs, "fewshot", t, n, out, library),
            )
        )
    return stages


def quickstart(root: Path = Path("runs/quickstart"), config: Path | None = None, check: bool = False) -> Path | None:
    """Every stage not done yet under `root`, then the report. `check`: validate the config, build every stage's
    config and print the plan; run nothing."""
    from t2ray.adapt.two_pass import dispatch_quality
    from t2ray.report import build_report, console_summary
    from t2ray.train import train

    qs = QuickstartConfig.model_validate(read_yaml(config) if config else {})
    root = root.resolve()
    if not check:
        root.mkdir(parents=True, exist_ok=True)
    spec, dtype = qs.model.spec, qs.model.dtype
    calibrated = spec == CALIBRATED_MODEL
    svf = {e: expert_config(root, qs, e, "svf") for e in EXPERTS}
    lora = {c: expert_config(root, qs, c, "lora") for c in CATEGORIES} if qs.lora else {}
    trained = list(qs.trained.values())
    limits = {t: items_tested(qs, t) for t in (*trained, *qs.unseen)}

    def estimate(minutes: float) -> float | None:
        return minutes if calibrated else None

    def training(cfg: ExperimentConfig) -> Callable[[], str]:
        def run() -> str:
            outcome = train(cfg)
            last = outcome.history[-1] if outcome.history else {}
            return f"valid accuracy {outcome.best_valid:.1%}, last rollouts {last.get('accuracy', float('nan')):.1%}"

        return run

    svf_library = [expert_path(svf[c]) for c in CATEGORIES]

    def decompose() -> str:
        from t2ray.models import load_model
        from t2ray.svf import patch_model

        layers = patch_model(load_model(spec, dtype=dtype)[0], svf["math"].svf)  # workers then hit the SVD cache
        (root / "decompose.done").touch()
        return f"{len(layers)} matrices"

    dispatched = {t: min(n, qs.unseen_limit) for t, n in limits.items()}  # pass 1 alone: the first 64 of each task

    def dispatch() -> str:
        quality = dispatch_quality(spec, expert_path(svf["cls"]), dispatched, dtype=dtype)
        (root / "dispatch.json").write_text(json.dumps(quality, indent=2))
        return ", ".join(f"{s} {quality[s]['accuracy']:.1%}" for s in ("prompt", "classifier"))

    t1, t2 = root / "table1", root / "table2"
    stages = [
        Stage(
            "decompose the MLP matrices (SVD, cached per model)",
            estimate(DECOMPOSE_S / 60),
            root / "decompose.done",
            decompose,
        )
    ]
    workers = f"Ray Train, {svf['math'].scaling.num_workers} workers, ZeRO-{svf['math'].deepspeed.zero_stage}"
    stages += [
        Stage(
            f"train the {e} SVF expert on {c.task} ({workers})", estimate(train_minutes(c)), expert_path(c), training(c)
        )
        for e, c in svf.items()
    ]
    stages += [
        Stage(
            f"train the {e} LoRA baseline on {c.task} (same loop, same budget)",
            estimate(train_minutes(c)),
            expert_path(c),
            training(c),
        )
        for e, c in lora.items()
    ]
    for category, t in qs.trained.items():
        columns = {
            "base": None,
            "svf": expert_path(svf[category]),
            **({"lora": expert_path(lora[category])} if category in lora else {}),
        }
        for column, expert in columns.items():
            stages.append(
                evaluation_stage(
                    qs, f"Table 1: {TABLE1_LABELS[column]}", t, limits[t], t1 / f"{column}-{t}.json", estimate, expert
                )
            )
    stages.append(
        Stage(
            f"dispatch quality: pass 1 of prompt and classifier on {sum(dispatched.values())} test queries",
            estimate(DISPATCH_S_PER_ITEM * sum(dispatched.values()) / 60),
            root / "dispatch.json",
            dispatch,
        )
    )
    for t in qs.unseen:
        stages.append(evaluation_stage(qs, "Table 2: base", t, limits[t], t2 / f"base-{t}.json", estimate))
        for strategy in ("prompt", "classifier", "fewshot", "token"):
            out = t2 / f"{strategy}-{t}.json"
            stages.append(
                Stage(
                    f"Table 2: {strategy} on {t}",
                    estimate(eval_minutes(t, limits[t], strategy, qs.cem)),
                    out,
                    adaptation(qs, strategy, t, limits[t], out, svf_library, expert_path(svf["cls"])),
                )
            )
    if lora and qs.lora_table2.enabled:
        stages += lora_table2_stages(
            qs, root / "table2-lora", {c: expert_path(cfg) for c, cfg in lora.items()}, limits, estimate
        )
    run_stages(stages, check=check)
    if check:
        typer.secho(f"quickstart --check: {config or 'the default config'} is valid; nothing was run", bold=True)
        return None
    report = build_report(root)
    typer.echo(console_summary(report))
    typer.secho(f"report: {report} (plots in {report.parent / 'report'})", bold=True)
    return report
