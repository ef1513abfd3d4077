"""The sweep YAML: which experiment it varies, the search space over dotted keys, search algorithm, scheduler,
metric, budget. Validated here without Ray: a key that the experiment schema lacks, an empty space, an unknown
algorithm or scheduler, a metric no trial reports, and values the experiment would refuse are all named."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from t2ray.config import AdaptConfig, ExperimentConfig, Strict, deep_merge, parse_overrides, read_yaml

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")

# What trials report to Tune, per kind. RL: every key of t2ray.rl.loop.rl_step + the loop's own (iteration,
# seconds) + valid_accuracy every eval_interval (tests/tune/test_config.py checks this list against the loop).
RL_METRICS = (
    *"loss reward accuracy kl grad_norm reward_errors completion_tokens sync_bytes rollout_s update_s samples".split(),
    "iteration",
    "seconds",
    "valid_accuracy",
)
# CEM: one report per generation (best candidate's accuracy / log-likelihood on the shots, population mean),
# then valid_accuracy of the found α on the task's valid split.
CEM_METRICS = ("generation", "shots_accuracy", "shots_loglik", "mean_shots_accuracy", "valid_accuracy")
REPORTED = {"rl": RL_METRICS, "cem": CEM_METRICS}
TIME_ATTR = {"rl": "iteration", "cem": "generation"}

# PBT restarts a trial from another trial's checkpoint with a perturbed config: keys that change the shape or
# meaning of the trained parameters (or the task) cannot be mutated.
PBT_FROZEN_PREFIXES = ("svf.", "lora.", "model.", "method", "task", "seed", "name", "storage_path")


class SweepError(ValueError):
    """A sweep that cannot run as written (one user-facing line)."""


class Dist(Strict):
    """One swept key: exactly one of the distributions."""

    choice: list[Any] | None = Field(None, min_length=1, description="sampled uniformly from the list")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="[low, high): high is exclusive, as Tune's")
    grid: list[Any] | None = Field(None, min_length=1, description="every value, × num_samples")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [d for d in DISTRIBUTIONS if getattr(self, d) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        lo_hi = self.uniform or self.loguniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{self.kind}: low {lo_hi[0]} must be < high {lo_hi[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(d for d in DISTRIBUTIONS if getattr(self, d) is not None)

    @property
    def args(self):
        return getattr(self, self.kind)

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole domain when validating against the experiment schema."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        lo, hi = self.args
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def to_tune(self):
        from ray import tune

        kind, args = self.kind, self.args
        return {
            "choice": lambda: tune.choice(list(args)),
            "grid": lambda: tune.grid_search(list(args)),
            "uniform": lambda: tune.uniform(*args),
            "loguniform": lambda: tune.loguniform(*args),
            "randint": lambda: tune.randint(*args),
        }[kind]()


class SearchConfig(Strict):
    alg: Literal["random", "optuna", "hyperopt"] = "random"
    seed: int | None = Field(0, description="searcher seed (None = nondeterministic)")


class FIFOConfig(Strict):
    type: Literal["fifo"] = "fifo"


class ASHAConfig(Strict):
    type: Literal["asha"] = "asha"
    grace_period: int | None = Field(None, ge=1, description="first rung; None = eval_interval (rl) or 1 (cem)")
    reduction_factor: float = Field(2, gt=1)
    max_t: int | None = Field(None, ge=1, description="None = rl.iterations (rl) or cem.generations (cem)")
    brackets: int = Field(1, ge=1)


class PBTConfig(Strict):
    type: Literal["pbt"] = "pbt"
    perturbation_interval: int | None = Field(None, ge=1, description="None = rl.eval_interval (a checkpoint)")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)


Scheduler = typing.Annotated[FIFOConfig | ASHAConfig | PBTConfig, Field(discriminator="type")]


class Resources(Strict):
    """What the trial function itself holds. RL trials only drive a Ray Train run (whose workers ask for
    scaling.* themselves), so they hold nothing by default; CEM trials do the work, 1 CPU."""

    cpu: float | None = Field(None, ge=0, description="None = 0 for rl, 1 for cem")
    gpu: float = Field(0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict, description="e.g. {TRAIN_DRIVER: 0.01} for safe nodes")


class SweepConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["rl", "cem"] = "rl"
    base: str = Field(..., description="experiment YAML (rl) or adapt YAML (cem), relative to this file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys fixed for every trial")
    space: dict[str, Dist] = Field(default_factory=dict, description="dotted key -> distribution")
    search: SearchConfig = SearchConfig()
    scheduler: Scheduler = FIFOConfig()
    metric: str = "valid_accuracy"
    mode: Literal["max", "min"] = "max"
    scope: Literal["all", "last", "avg", "last-5-avg", "last-10-avg"] = Field(
        "all", description="which of a trial's reports ranks it: all = its best report"
    )
    num_samples: int = Field(1, ge=1, description="samples from the space (grid: repeats of the whole grid)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None = what the cluster fits at once")
    resources: Resources = Resources()
    time_budget_s: float | None = Field(None, gt=0, description="stop starting/continuing trials after this")
    max_failures: int = Field(0, ge=-1, description="Tune-level restarts of a crashed trial")
    storage_path: str = Field("runs/sweeps", description="the sweep lives in storage_path/name")
    wandb: bool = Field(True, description="Tune's WandbLoggerCallback, offline unless WANDB_MODE says otherwise")
    project: str = "t2ray-sweeps"

    @field_validator("space", "overrides", mode="before")
    @classmethod
    def _flatten(cls, value, info):
        if not isinstance(value, dict):
            return value
        return flatten(value, leaf=_is_dist if info.field_name == "space" else None)

    @property
    def time_attr(self) -> str:
        return TIME_ATTR[self.kind]


def _is_dist(value) -> bool:
    return isinstance(value, dict) and len(value) >= 1 and set(value) <= set(DISTRIBUTIONS)


def flatten(tree: dict, prefix: str = "", leaf=None) -> dict[str, Any]:
    """{'rl': {'lr': 1}} -> {'rl.lr': 1}; `leaf(value)` stops the descent (a distribution spec)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not (leaf and leaf(value)):
            out.update(flatten(value, f"{dotted}.", leaf))
        else:
            out[dotted] = value
    return out


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """{'rl.lr': 1} -> {'rl': {'lr': 1}} (values kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _submodel(annotation):
    """The pydantic model class inside an annotation (Optional[X], X | None), or None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def check_key(schema: type[BaseModel], dotted: str, what: str) -> None:
    """Raise SweepError naming `dotted` (and the closest real key) if the schema has no such value key."""
    model: type[BaseModel] | None = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:i])
            options = [f"{prefix}.{f}" if prefix else f for f in fields]
            close = difflib.get_close_matches(here, options, n=1)
            hint = (
                f" (did you mean {close[0]}?)" if close else f"; {prefix or 'the top level'} has: " + ", ".join(fields)
            )
            raise SweepError(f"{what} key {dotted!r}: the {schema.__name__} schema has no {here!r}{hint}")
        sub = _submodel(fields[part].annotation)
        if i < len(parts) - 1:
            if sub is None:
                raise SweepError(f"{what} key {dotted!r}: {here!r} is a value, not a section")
            model = sub
        elif sub is not None:
            raise SweepError(
                f"{what} key {dotted!r} is a whole section; sweep one of its keys, e.g. "
                f"{dotted}.{next(iter(sub.model_fields))}"
            )


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    return f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"


class Sweep:
    """A validated sweep: its config, its resolved base (paths absolute), and where it writes."""

    def __init__(self, config: SweepConfig, base: dict, source: Path | None, folder: Path | None = None):
        self.config, self.base, self.source = config, base, source
        self.schema: type[BaseModel] = ExperimentConfig if config.kind == "rl" else AdaptConfig
        # resolved once, in the driver, and handed to the trials in spec(): a trial runs in its own working
        # directory, where a relative storage_path would put its Train run under Ray's session folder instead
        self._dir = folder or Path(config.storage_path).expanduser().resolve() / config.name
        self._validate()

    @property
    def dir(self) -> Path:
        return self._dir

    def fixed(self) -> dict:
        """The base with the sweep's fixed overrides (what every trial starts from)."""
        return deep_merge(self.base, nest(self.config.overrides))

    def trial_data(self, values: dict[str, Any]) -> dict:
        return deep_merge(self.fixed(), nest(values))

    def _check_coherent(self) -> None:
        c = self.config
        if not c.space:
            raise SweepError(
                "space is empty: give at least one key to sweep, e.g. space: {rl.lr: {loguniform: [1.0e-4, 1.0e-2]}}"
            )
        if c.metric not in REPORTED[c.kind]:
            raise SweepError(
                f"metric {c.metric!r} is never reported by {c.kind} trials; they report: {', '.join(REPORTED[c.kind])}"
            )
        grids = [k for k, d in c.space.items() if d.kind == "grid"]
        if grids and c.search.alg != "random":
            raise SweepError(
                f"grid ({', '.join(grids)}) needs search.alg random: {c.search.alg} samples; use choice instead"
            )
        if c.scheduler.type == "pbt":
            if c.kind != "rl":
                raise SweepError("scheduler pbt needs kind rl: CEM trials keep no checkpoint to exploit")
            if c.search.alg != "random":
                raise SweepError("scheduler pbt mutates configs itself: use search.alg random")
            frozen = [k for k in c.space if k.startswith(PBT_FROZEN_PREFIXES)]
            if frozen:
                raise SweepError(
                    f"scheduler pbt cannot mutate {', '.join(frozen)}: they change what the "
                    "checkpoint holds; sweep them with fifo or asha"
                )

    def _validate(self) -> None:
        c = self.config
        self._check_coherent()
        for key in c.overrides:
            check_key(self.schema, key, "override")
        for key in c.space:
            check_key(self.schema, key, "space")
        try:
            fixed = self.schema.model_validate(self.fixed())
        except ValidationError as err:
            raise SweepError(
                f"base {c.base} with the sweep's overrides is not a valid {self.schema.__name__}: {_first_error(err)}"
            ) from None
        for key, dist in c.space.items():
            for value in dist.probe_values():
                try:
                    self.schema.model_validate(self.trial_data({key: value}))
                except ValidationError as err:
                    raise SweepError(
                        f"space key {key!r}: value {value!r} ({dist.kind}) is refused by the "
                        f"experiment: {_first_error(err)}"
                    ) from None
        if c.kind == "cem" and fixed.strategy != "fewshot":
            raise SweepError(f"kind cem needs a base with strategy: fewshot, not {fixed.strategy!r}")
        if c.kind == "rl" and c.scheduler.type == "pbt" and fixed.rl.iterations <= self.perturbation_interval:
            raise SweepError(
                f"scheduler pbt: rl.iterations ({fixed.rl.iterations}) must exceed the perturbation "
                f"interval ({self.perturbation_interval}) or no trial is ever perturbed"
            )

    # ---- values derived from the base -------------------------------------------------------------------
    def base_model(self):
        return self.schema.model_validate(self.fixed())

    def values_of(self, key: str) -> list[Any]:
        """Every value a key can take in this sweep (for choice/grid) or its fixed value."""
        if key in self.config.space and self.config.space[key].kind in ("choice", "grid"):
            return list(self.config.space[key].args)
        node: Any = self.base_model()
        for part in key.split("."):
            node = getattr(node, part)
        return [node]

    def max_of(self, key: str) -> Any:
        if key in self.config.space:
            return max(self.config.space[key].probe_values())
        return self.values_of(key)[0]

    @property
    def max_t(self) -> int:
        s = self.config.scheduler
        if getattr(s, "max_t", None):
            return s.max_t
        return int(self.max_of("rl.iterations" if self.config.kind == "rl" else "cem.generations"))

    @property
    def grace_period(self) -> int:
        s = self.config.scheduler
        if getattr(s, "grace_period", None):
            return s.grace_period
        if self.config.kind == "rl" and self.config.metric == "valid_accuracy":
            return int(self.base_model().rl.eval_interval)
        return 1

    @property
    def perturbation_interval(self) -> int:
        s = self.config.scheduler
        if getattr(s, "perturbation_interval", None):
            return s.perturbation_interval
        return int(self.base_model().rl.eval_interval) if self.config.kind == "rl" else 1

    @property
    def expected_trials(self) -> int:
        """Trials a complete sweep runs: num_samples × every grid's size."""
        n = self.config.num_samples
        for dist in self.config.space.values():
            if dist.kind == "grid":
                n *= len(dist.args)
        return n

    def trial_resources(self) -> dict[str, float]:
        r = self.config.resources
        cpu = r.cpu if r.cpu is not None else (0.0 if self.config.kind == "rl" else 1.0)
        return {"CPU": cpu, "GPU": r.gpu, **r.custom}

    def need_per_trial(self) -> dict[str, float]:
        """Cluster resources one trial occupies (its function + its Train workers or CEM actors)."""
        need = {k: v for k, v in self.trial_resources().items() if v}
        if self.config.kind == "rl":
            workers = self.max_of("scaling.num_workers")
            if any(self.values_of("scaling.use_gpu")):
                need["GPU"] = need.get("GPU", 0) + workers
            need["CPU"] = need.get("CPU", 0) + workers * self.max_of("scaling.cpus_per_worker")
            for name, amount in self.values_of("scaling.resources")[0].items():  # custom ones (fixed, not searched)
                need[name] = need.get(name, 0) + workers * amount
            base = self.base_model()
            if base.rl.rollout_engine != "hf":  # the trial's own rollout engines (rollout.num_engines ≥ 1)
                for name, amount in base.rollout.bundle(base.scaling.use_gpu).items():
                    need[name] = need.get(name, 0) + base.rollout.num_engines * amount
        else:
            actors = self.max_of("cem.actors")
            if actors > 1:
                need["CPU"] = need.get("CPU", 0) + actors
        return need

    def fingerprint(self) -> str:
        """Hash of everything that decides which trials run: a resumed sweep must match it."""
        c = self.config.model_dump(
            mode="json", exclude={"max_concurrent_trials", "time_budget_s", "wandb", "max_failures"}
        )
        return hashlib.sha256(
            json.dumps({"sweep": c, "base": self.base}, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]

    def spec(self) -> dict:
        """A plain dict the trial functions rebuild the sweep from (no paths to re-resolve)."""
        return {"config": self.config.model_dump(mode="json"), "base": self.base, "dir": str(self._dir)}

    @classmethod
    def from_spec(cls, spec: dict) -> Sweep:
        return cls(SweepConfig.model_validate(spec["config"]), spec["base"], None, Path(spec["dir"]))


def _absolute(value: str | None, *roots: Path) -> str | None:
    """A path-like value made absolute when it exists relative to cwd (as `t2ray train` resolves it) or to
    one of `roots`; names (task 'math', model 'smollm2-135m', hub ids) stay as they are."""
    if not value:
        return value
    for root in (Path.cwd(), *roots):
        candidate = (root / value).expanduser()
        if candidate.exists():
            return str(candidate.resolve())
    return value


def resolve_base(kind: str, data: dict, base_dir: Path) -> dict:
    """Make the base's file references absolute: Tune runs trials in their own working directories."""
    data = json.loads(json.dumps(data))
    if isinstance(data.get("task"), str) and data["task"].endswith((".yaml", ".yml")):  # a task file, not a name
        data["task"] = _absolute(data["task"], base_dir)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("spec"), str):
        spec = _absolute(model["spec"], base_dir)
        model["spec"] = spec if Path(spec).is_dir() else model["spec"]  # a model folder, not a preset or hub id
    if kind != "rl":  # (rl: trials run under the sweep's folder; best.yaml keeps the base's own storage_path)
        if isinstance(data.get("experts"), list):
            data["experts"] = [_absolute(e, base_dir) if isinstance(e, str) else e for e in data["experts"]]
        if isinstance(data.get("classifier_expert"), str):
            data["classifier_expert"] = _absolute(data["classifier_expert"], base_dir)
    return data


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read, validate and resolve a sweep YAML; `overrides` are dotted sweep keys (num_samples=2,
    scheduler.type=fifo, overrides.rl.iterations=3)."""
    path = Path(path)
    data = deep_merge(read_yaml(path), parse_overrides(overrides or []))
    config = SweepConfig.model_validate(data)
    base_path = (path.parent / config.base).resolve()
    if not base_path.exists():
        alt = Path(config.base).expanduser().resolve()
        if not alt.exists():
            raise SweepError(f"{path}: base {config.base!r} not found (relative to {path.parent})")
        base_path = alt
    base = resolve_base(config.kind, read_yaml(base_path), base_path.parent)
    return Sweep(config, base, path)


def dump_yaml(data: dict, header: str = "") -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body


def is_finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
