"""`t2ray quickstart` (what `make demo` runs): by default a short tour of the framework on the embedded SmolLM2 and
the built-in offline tasks, each part of the mission once, every result with its interval:

decompose → train the math and code SVF experts (Ray Train, 2 workers, ZeRO-2) → Table 1 (base vs SVF, 128 held-out
items each) → pass 1 over the test queries (prompt dispatch vs the nearest-centroid router, confusion matrices) →
few-shot CEM on an unseen task → a Ray Serve endpoint with both experts, asked through the official `openai` client
with model "auto", then shut down → report.md.

experiments/reproduce-smollm2.yaml is the paper's whole pipeline on the same tasks (three experts, the classifier
expert, LoRA baselines, every Table 2 strategy; `make reproduce`), experiments/paper-{smollm2,llama3-8b}.yaml the
paper's benchmarks (`--check` validates one and prints its stages).

Every stage writes its output under the root folder and is skipped when that output exists (re-running resumes).
Before the first stage runs, a few seconds of decoding measure this machine's speed; the announced minutes are the
calibration machine's, scaled by it (start-ups as they are), then corrected by the finished stages' own times.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import typer
import yaml
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


# Seconds measured on the 2-core calibration machine (AVX512-BF16) with SmolLM2 in bf16: they turn budgets into the
# minutes announced before each stage, scaled by the speed probe's ratio (this machine's probe ÷ PROBE_S). The tour's
# stages were measured again on 2026-12-05 with the KV decoder (t2ray/kv_decode.py; its evaluations ran 0.53-0.63×
# the times of Hugging Face's step); the constants of the paper's stages (2026-11-30) are scaled by DECODER_FACTOR,
# and the pace corrects them as stages finish. Other tasks fall back on a per-token rate.
PROBE_S = 2.1  # the probe on the calibration machine, bf16, packed weights: 2.0-2.14 s over 3 runs, 2026-12-05
PROBE_ROWS, PROBE_TOKENS = 32, 16
PROBE_WEIGHT_S = 120  # the probe's say in the pace, as seconds of finished stages (see Pace)
DECOMPOSE_S = 10
EVAL_START_S = 5  # an evaluation stage's model load (fixed: Minutes)
DECODER_FACTOR = 0.6  # the KV decoder's evaluations ÷ Hugging Face's step's, on the tour (0.53-0.63)
TRAIN_START_S = 60  # one Ray Train run: worker start-up, model + DeepSpeed set-up, final validation, save (fixed)
# per iteration of 16 prompts (reasoning: × 4 samples; cls: ~300-token prompts)
ITERATION_S = {
    # the tour, 2026-12-05 (KV decoder): math 12 it × 16 in 2.6 min, code 8 × 16 (48 tokens) in 3.1
    "math": 8.0,
    "code": 21.0,
    "reasoning": 16.0,
    "cls": 28.0,
    # experiments/paper-smollm2.yaml (256-token rollouts for gsm8k/mbpp), 2026-11-30
    "gsm8k": 78.0,
    "mbpp": 94.0,
    "arc-easy": 15.0,
    "cls-benchmarks": 30.0,
}
ITERATION_S_PER_TOKEN = 0.4  # other tasks: per rollout token (an iteration of 16 prompts)
# per test item, the whole stage (model load, generation, grading) of the base model: the tour's tasks measured with
# the KV decoder (2026-12-05), the others with Hugging Face's step (2026-11-30) × DECODER_FACTOR
EVAL_S_PER_ITEM = {
    "math": 0.1,
    "code": 0.24,
    "math-hard": 0.2,
    **{
        task: seconds * DECODER_FACTOR
        for task, seconds in {
            "reasoning": 0.2,
            "code-hard": 0.56,
            "reasoning-hard": 0.2,
            "humaneval": 2.5,
            "gsm8k": 0.9,
            "mbpp": 2.8,
            "arc-easy": 0.25,
        }.items()
    },
}
EVAL_S_PER_TOKEN = 0.0065 * DECODER_FACTOR  # other tasks: per token of the task's answer budget (max_new_tokens)
DISPATCH_S_PER_ITEM = {"prompt": 0.15, "classifier": 0.15, "nearest": 0.02}  # the prompt is ~270 tokens
SERVE_S = 30.0  # Ray + Serve start, the replica loads the model and the experts, four answers, shutdown (fixed)
TABLE1_LABELS = {"base": "base", "svf": "SVF", "lora": "LoRA"}
STRATEGY_FACTOR = {
    "base": 1.0,
    "prompt": 1.6,
    "classifier": 1.6,
    "nearest": 1.1,
    "fewshot": 0.9,
    "token": 1.8,
    # LoRA adapters routed every k tokens (per-row weights in every layer), 16 items, 2026-11-30
    "lora-token1": 5.5,
    "lora-token2": 3.6,
    "lora-token4": 2.7,
}
CEM_ROW_FACTOR = 3.5  # a CEM row (one z per row, plus the reference's log-likelihood) vs a base-model item


class ExpertBudget(Strict):
    iterations: int = Field(ge=1, description="RL iterations (the LoRA baseline gets the same)")
    batch_size: int = Field(ge=2, description="prompts per iteration, over the workers")
    lr: float = Field(gt=0, description="the SVF expert's; LoRA's is lora_lr_ratio × this")
    max_new_tokens: int | None = Field(None, ge=1, description="rollout tokens; default: the category's YAML")


# Measured (bench/RESULTS.md, make_demo, tour_expert_seeds): short hot SVF runs vary run to run and machine to machine;
# math at 12 × 16 gained ≥ +15 points in 4 of 5 seeds on an AMD EPYC but −7, +17, +10 on an Intel Xeon with AMX,
# where 20 × 16 gained +17 to +31 in 5 of 5.
DEFAULT_BUDGETS = {
    "math": {"iterations": 20, "batch_size": 16, "lr": 4e-3},
    # 8 × 8 at 6e-3 was a lottery (+28.9, +7.0, −7.8 in three seeds); 48 rollout tokens hold the function
    "code": {"iterations": 8, "batch_size": 16, "lr": 4e-3, "max_new_tokens": 48},
    "reasoning": {"iterations": 8, "batch_size": 8, "lr": 6e-3},
    "cls": {"iterations": 4, "batch_size": 8, "lr": 4e-3},  # ~300-token prompts: costly steps
}


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


TABLE2_STRATEGIES = ("prompt", "classifier", "nearest", "fewshot", "token")
Table2Strategy = Literal["prompt", "classifier", "nearest", "fewshot", "token"]


class QuickstartConfig(Strict):
    """Defaults: the tour (`make demo`). experiments/reproduce-smollm2.yaml is the paper's whole pipeline on the
    built-in tasks; experiments/paper-*.yaml run it on the paper's benchmarks."""

    model: ModelConfig = ModelConfig()
    trained: dict[str, str] = Field(
        {"math": "math", "code": "code"},
        validate_default=True,
        description="category → the task its expert trains on (Table 1); any of math, code, reasoning",
    )
    classifier_task: str | None = Field(
        None, description="the classifier expert's task (cls, cls-benchmarks); None: no classifier expert"
    )
    unseen: list[str] = Field(
        ["math-hard"],
        min_length=1,
        description="Table 2's tasks: the experts never trained on them",
    )
    table2: list[Table2Strategy] = Field(
        ["fewshot"], min_length=1, description="Table 2's two-pass strategies (each next to the base model)"
    )
    dispatcher: Literal["prompt", "classifier", "nearest"] = Field(
        "nearest", description="pass 1 of the served endpoint's model 'auto'"
    )
    serve: bool = Field(True, description="serve the experts (Ray Serve, OpenAI API) and ask it four questions")
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
    lora: bool = Field(False, description="train the LoRA baselines for Table 1")
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
        if not value or not set(value) <= set(CATEGORIES):
            raise ValueError(f"trained: one task for some of {list(CATEGORIES)}; got {sorted(value)}")
        for category, name in value.items():
            if task_category(name) != category:
                raise ValueError(f"trained.{category}: task {name!r} is a {task_category(name)} task")
        return value

    @field_validator("classifier_task")
    @classmethod
    def _a_classification_task(cls, value):
        if value is not None and task_category(value) != "classification":
            raise ValueError(f"classifier_task: {value!r} is not a classification task (cls, cls-benchmarks)")
        return value

    @field_validator("unseen")
    @classmethod
    def _known_tasks(cls, value):
        for name in value:
            task_category(name)
        return value

    @model_validator(mode="after")
    def _classifier_strategies_need_its_expert(self):
        wanted = "dispatcher" if self.dispatcher == "classifier" else "table2" if "classifier" in self.table2 else None
        if wanted and self.classifier_task is None:
            raise ValueError(f"{wanted}: the classifier strategy needs classifier_task (cls or cls-benchmarks)")
        return self

    @property
    def expert_names(self) -> list[str]:
        """The SVF experts this config trains: its categories' and, when it has a task, the classifier's."""
        return [*self.trained, *(["cls"] if self.classifier_task else [])]

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


@dataclass(frozen=True)
class Minutes:
    """A stage's minutes on the calibration machine: `scaled` by this machine's speed (decoding and updates, the
    probe's kind of work) and `fixed` as they are (starting Ray Train's workers or Serve, loading a model: Python and
    I/O, which faster GEMMs do not speed up; on an Intel Xeon with AMX the probe read 0.48x and each training still
    took its minute of start-up: RESULTS make_demo_amx)."""

    scaled: float
    fixed: float = 0.0

    def __add__(self, other: Minutes) -> Minutes:
        return Minutes(self.scaled + other.scaled, self.fixed + other.fixed)

    def at(self, factor: float) -> float:
        return self.fixed + self.scaled * factor


@dataclass
class Stage:
    name: str
    minutes: Minutes | None  # expected wall time on 2 CPU cores (None: no estimate for this model)
    output: Path
    run: Callable[[], str | None]  # may return a one-line outcome for the stage's closing line


def _about(minutes: float | None) -> str:
    return f"about {minutes:.1f} min" if minutes is not None else "no estimate"


class StageFailed(RuntimeError):
    """A stage raised: one line naming the stage and the log holding its traceback."""


def run_logged(stage: Stage, tag: str, logs: Path):
    """The stage's outcome; an error is written, traceback and all, to logs/<stage>.log and said in one line."""
    import re
    import traceback

    try:
        return stage.run()
    except Exception as err:
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / (re.sub(r"[^A-Za-z0-9]+", "-", tag).strip("-")[:80] + ".log")
        log.write_text(f"{tag}\n\n{traceback.format_exc()}")
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise StageFailed(f"{tag} failed: {type(err).__name__}: {first} (traceback: {log})") from None


@dataclass
class Pace:
    """The factor on the calibration machine's minutes: the speed probe's at first, then corrected by what the
    finished stages took against what was announced for them (a probe of seconds cannot see the next ten minutes of a
    shared machine; the stages themselves can). The probe weighs as PROBE_WEIGHT_S of stages: a stage of seconds
    (a cached SVD) barely moves it, ten minutes of stages mostly decide. None: no estimate."""

    probe: float | None
    announced_s: float = 0.0
    measured_s: float = 0.0

    @property
    def factor(self) -> float | None:
        if self.probe is None:
            return None
        return self.probe * (self.measured_s + PROBE_WEIGHT_S) / (self.announced_s + PROBE_WEIGHT_S)

    def minutes(self, calibration: Minutes | None) -> float | None:
        factor = self.factor
        return calibration.at(factor) if calibration is not None and factor is not None else None

    def finished(self, calibration: Minutes | None, seconds: float) -> None:
        if calibration is not None and self.probe is not None:
            self.announced_s += calibration.at(self.probe) * 60
            self.measured_s += seconds


def run_stages(
    stages: list[Stage], check: bool = False, speed: float | None = 1.0, probe: str = "", logs: Path | None = None
) -> None:
    """One line per stage with its estimate (the calibration machine's minutes × `speed`, corrected as stages finish;
    None: no estimate); its progress bar (drawn by this process) while it runs; then one line with its measured time,
    outcome and the minutes left. `check`: the plan alone. `logs`: where a failed stage's traceback goes (default:
    raised as it is)."""
    left = [s for s in stages if not s.output.exists()]
    known = [s.minutes for s in left if s.minutes is not None]
    pace = Pace(speed)
    if speed is not None and len(known) == len(left):
        minutes = sum(m.at(speed) for m in known)
        total = f"about {minutes:.0f} min " + (f"here{probe}" if probe else "on the calibration machine")
    else:
        total = f"no time estimate (calibrated for {CALIBRATED_MODEL})"
    typer.secho(f"quickstart: {len(stages)} stages, {len(left)} to run, {total}", bold=True)
    start_all = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            typer.echo(f"{tag}: done already")
            continue
        typer.secho(f"{tag} ({_about(pace.minutes(stage.minutes))})", fg="cyan")
        if check:
            continue
        start = time.perf_counter()
        outcome = run_logged(stage, tag, logs) if logs is not None else stage.run()
        elapsed = time.perf_counter() - start
        pace.finished(stage.minutes, elapsed)
        rest = [s.minutes for s in stages[i:] if not s.output.exists()]
        to_go = pace.minutes(sum(rest, Minutes(0.0))) if rest and None not in rest else None
        typer.echo(
            f"{tag}: {elapsed / 60:.1f} min"
            + (f" — {outcome}" if outcome else "")
            + (f" ({to_go:.1f} min to go)" if to_go is not None else "")
        )
    if not check:
        typer.secho(f"quickstart: all stages done, {(time.perf_counter() - start_all) / 60:.1f} min", bold=True)


def probe_seconds(spec: str, dtype: str) -> float:
    """This machine's speed at what dominates every stage, batched generation of task answers: the best of three
    timed runs of PROBE_ROWS math prompts × PROBE_TOKENS tokens, in the dtype the stages use, after a warm-up at the
    same shapes (the first call of a shape builds its kernels)."""
    from t2ray.generation import generate
    from t2ray.models import load_model
    from t2ray.tasks import get_task

    model, tokenizer = load_model(spec, dtype=dtype)
    task = get_task("math")
    prompts = [task.messages(ex) for ex in task.examples("train")[:PROBE_ROWS]]
    generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=PROBE_ROWS)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate(model, tokenizer, prompts, max_new_tokens=PROBE_TOKENS, batch_size=PROBE_ROWS)
        times.append(time.perf_counter() - start)
    return min(times)


def machine_speed(spec: str, dtype: str) -> tuple[float, str]:
    """(the factor on the calibration minutes, what the console says about it)."""
    import torch

    from t2ray.models.loader import compute_dtype

    seconds = probe_seconds(spec, dtype)
    factor = seconds / PROBE_S
    said = f"{compute_dtype(dtype)}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    return factor, f" (speed probe {seconds:.1f} s: {factor:.2f}× the calibration machine's; {said})"


def items_tested(qs: QuickstartConfig, task: str) -> int:
    """Test items evaluated on `task`, at most its test split."""
    from t2ray.tasks import get_task

    limit = qs.limits.get(task, qs.eval_limit if task in qs.trained.values() else qs.unseen_limit)
    return min(limit, len(get_task(task).examples("test")))


def train_minutes(cfg: ExperimentConfig, budget_tokens: int | None = None) -> Minutes:
    """Start-up + iterations (time scales with the prompts per iteration, and with the rollout tokens when a budget
    sets them: ITERATION_S was measured at the experiment YAML's, or the task's own where the budget gave them)."""
    from t2ray.tasks import get_task

    default = get_task(cfg.task).max_new_tokens
    tokens = cfg.rl.max_new_tokens or default
    per_16 = ITERATION_S.get(cfg.task, ITERATION_S_PER_TOKEN * tokens)
    if cfg.task in ITERATION_S and budget_tokens:
        per_16 *= budget_tokens / default
    return Minutes(cfg.rl.iterations * per_16 * cfg.rl.batch_size / 16 / 60, TRAIN_START_S / 60)


def eval_minutes(task: str, limit: int, strategy: str = "base", cem: CEMConfig | None = None) -> Minutes:
    from t2ray.tasks import get_task

    per_item = EVAL_S_PER_ITEM.get(task) or EVAL_S_PER_TOKEN * get_task(task).max_new_tokens
    seconds = limit * per_item * STRATEGY_FACTOR[strategy]
    if strategy == "fewshot" and cem is not None:  # every candidate answers every shot (one z per batch row)
        seconds += cem.population * cem.generations * cem.shots * per_item * CEM_ROW_FACTOR
    return Minutes(seconds / 60, EVAL_START_S / 60)


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
    estimate: Callable[[Minutes], Minutes | None],
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


def served_questions(qs: QuickstartConfig) -> list[tuple[str, object]]:
    """Four test questions for the served endpoint, taken in turn from the trained tasks: (task, example)."""
    from t2ray.tasks import get_task

    tasks = list(qs.trained.values())
    return [
        (tasks[k % len(tasks)], get_task(tasks[k % len(tasks)]).examples("test")[k // len(tasks)]) for k in range(4)
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_config(qs: QuickstartConfig, experts: dict[str, Path], classifier: Path | None) -> dict:
    """A Ray Serve config file (`t2ray serve` runs it again) with the trained experts behind model 'auto'."""
    from t2ray.serve.config import IMPORT_PATH

    args = {
        "model": qs.model.model_dump(),
        "experts": {name: str(path) for name, path in experts.items()},
        **({"classifier_expert": str(classifier)} if classifier else {}),
        "auto": {"strategy": qs.dispatcher},
        "generation": {"temperature": 0.0},
        "expert_model": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
    }
    return {
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [{"name": "t2ray", "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}],
    }


def ask_the_endpoint(qs: QuickstartConfig, config: Path, out: Path, own_cluster: bool) -> str:
    """Start Ray Serve from `config`, send four test questions with model 'auto' through the official `openai`
    client, print what pass 1 chose and the answer, shut Serve down, save what happened to `out`. `own_cluster`:
    the quickstart started this Ray cluster, which goes down with Serve (serve.shutdown() alone makes the raylet
    print a spurious 'graceful_shutdown failed' error about the controller it has just killed)."""
    import openai
    import ray
    from ray import serve

    from t2ray.serve.app import run_config
    from t2ray.tasks import get_task

    info = run_config(config, num_cpus=2, blocking=False)
    expert_of = {get_task(t).category: c for c, t in qs.trained.items()}
    requests = []
    try:
        client = openai.OpenAI(base_url=info["openai_base_url"]["t2ray"], api_key="none", max_retries=0, timeout=600)
        for name, example in served_questions(qs):
            task = get_task(name)
            reply = client.chat.completions.create(
                model="auto", messages=task.messages(example), max_tokens=task.max_new_tokens, temperature=0.0
            )
            report = reply.model_extra["t2ray"]
            answer = reply.choices[0].message.content or ""
            row = {
                "task": name,
                "question": example.prompt,
                "expert": report["mixture"]["label"].removeprefix("expert:"),
                "own_expert": expert_of[task.category],
                "pass1_ms": report["timings"]["pass1_ms"],
                "answer": answer,
                "correct": task.grade(example, answer),
            }
            requests.append(row)
            question = " ".join(example.prompt.split())
            typer.echo(
                f"  {question[:70]}{'…' if len(question) > 70 else ''}\n"
                f"    → expert {row['expert']} (pass 1 {row['pass1_ms']:.0f} ms): {' '.join(answer.split())[:70]}"
            )
    finally:
        if own_cluster:
            ray.shutdown()
        else:
            serve.shutdown()
    out.write_text(json.dumps({"strategy": qs.dispatcher, "config": str(config), "requests": requests}, indent=2))
    own = sum(r["expert"] == r["own_expert"] for r in requests)
    return f"{len(requests)} of 4 answered, {own} by their own task's expert; Serve shut down"


def quickstart(root: Path = Path("runs/quickstart"), config: Path | None = None, check: bool = False) -> Path | None:
    """Every stage not done yet under `root`, then the report. `check`: validate the config, build every stage's
    config and print the plan; run nothing."""
    qs = QuickstartConfig.model_validate(read_yaml(config) if config else {})
    root = root.resolve()
    if not check:
        root.mkdir(parents=True, exist_ok=True)
    ray_was_up = ray_running()
    stages = pipeline(qs, root, own_cluster=not ray_was_up)
    speed, probe = 1.0, ""
    if qs.model.spec != CALIBRATED_MODEL:
        speed = None
    elif not check and any(not s.output.exists() for s in stages):
        typer.echo("quickstart: a few seconds of decoding to measure this machine's speed")
        speed, probe = machine_speed(qs.model.spec, qs.model.dtype)
    try:
        run_stages(stages, check=check, speed=speed, probe=probe, logs=root / "logs")
    finally:
        if not ray_was_up and ray_running():  # the cluster the stages started goes with them
            import ray

            ray.shutdown()
    if check:
        typer.secho(f"quickstart --check: {config or 'the default config'} is valid; nothing was run", bold=True)
        return None
    from t2ray.report import build_report, console_summary

    report = build_report(root)
    typer.echo(console_summary(report))
    typer.secho(f"report: {report} (plots in {report.parent / 'report'})", bold=True)
    return report


def ray_running() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def pipeline(qs: QuickstartConfig, root: Path, own_cluster: bool = False) -> list[Stage]:
    """The config's stages in order, each with its output under `root`; `own_cluster`: Ray is the quickstart's."""
    from t2ray.adapt.two_pass import dispatch_quality
    from t2ray.train import train

    spec, dtype = qs.model.spec, qs.model.dtype
    svf = {e: expert_config(root, qs, e, "svf") for e in qs.expert_names}
    lora = {c: expert_config(root, qs, c, "lora") for c in qs.trained} if qs.lora else {}
    classifier = expert_path(svf["cls"]) if "cls" in svf else None
    trained = list(qs.trained.values())
    limits = {t: items_tested(qs, t) for t in (*trained, *qs.unseen)}

    def estimate(minutes: Minutes) -> Minutes | None:
        return minutes if spec == CALIBRATED_MODEL else None

    def training(cfg: ExperimentConfig) -> Callable[[], str]:
        def run() -> str:
            outcome = train(cfg)
            last = outcome.history[-1] if outcome.history else {}
            return f"valid accuracy {outcome.best_valid:.1%}, last rollouts {last.get('accuracy', float('nan')):.1%}"

        return run

    svf_library = [expert_path(svf[c]) for c in qs.trained]
    first = svf[next(iter(qs.trained))]

    def decompose() -> str:
        from t2ray.models import load_model
        from t2ray.svf import patch_model

        layers = patch_model(load_model(spec, dtype=dtype)[0], first.svf)  # workers then hit the SVD cache
        (root / "decompose.done").touch()
        return f"{len(layers)} matrices"

    dispatched = {t: min(n, qs.unseen_limit) for t, n in limits.items()}  # pass 1 alone: the first 64 of each task
    strategies = ["prompt", *(["classifier"] if classifier else []), "nearest"]

    def dispatch() -> str:
        quality = dispatch_quality(spec, dispatched, classifier_expert=classifier, expert_tasks=trained, dtype=dtype)
        (root / "dispatch.json").write_text(json.dumps(quality, indent=2))
        return ", ".join(f"{s} {quality[s]['accuracy']:.1%}" for s in strategies)

    t1, t2 = root / "table1", root / "table2"
    stages = [
        Stage(
            "decompose the MLP matrices (SVD, cached per model)",
            estimate(Minutes(DECOMPOSE_S / 60)),
            root / "decompose.done",
            decompose,
        )
    ]
    workers = f"Ray Train, {first.scaling.num_workers} workers, ZeRO-{first.deepspeed.zero_stage}"
    stages += [
        Stage(
            f"train the {e} {what.format(c.task)}",
            estimate(train_minutes(c, qs.experts[e].max_new_tokens)),
            expert_path(c),
            training(c),
        )
        for configs, what in (
            (svf, f"SVF expert on {{}} ({workers})"),
            (lora, "LoRA baseline on {} (same loop, same budget)"),
        )
        for e, c in configs.items()
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
    queries = sum(dispatched.values())
    stages.append(
        Stage(
            f"pass 1 alone: {', '.join(strategies)} on {queries} test queries (confusion matrices)",
            estimate(Minutes(sum(DISPATCH_S_PER_ITEM[s] for s in strategies) * queries / 60)),
            root / "dispatch.json",
            dispatch,
        )
    )
    for t in qs.unseen:
        stages.append(evaluation_stage(qs, "Table 2: base", t, limits[t], t2 / f"base-{t}.json", estimate))
        for strategy in qs.table2:
            out = t2 / f"{strategy}-{t}.json"
            stages.append(
                Stage(
                    f"Table 2: {strategy} on {t}",
                    estimate(eval_minutes(t, limits[t], strategy, qs.cem)),
                    out,
                    adaptation(qs, strategy, t, limits[t], out, svf_library, classifier),
                )
            )
    if lora and qs.lora_table2.enabled:
        stages += lora_table2_stages(
            qs, root / "table2-lora", {c: expert_path(cfg) for c, cfg in lora.items()}, limits, estimate
        )
    if qs.serve:
        experts = {c: expert_path(svf[c]) for c in qs.trained}
        config = root / "serve.yaml"

        def serving() -> str:
            config.write_text(yaml.safe_dump(serve_config(qs, experts, classifier), sort_keys=False))
            return ask_the_endpoint(qs, config, root / "serve.json", own_cluster)

        stages.append(
            Stage(
                f"serve the experts (Ray Serve, OpenAI API, model 'auto' by {qs.dispatcher}): four questions",
                estimate(Minutes(0.0, SERVE_S / 60)),
                root / "serve.json",
                serving,
            )
        )
    return stages
