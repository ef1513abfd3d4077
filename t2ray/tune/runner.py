"""Driver side of `t2ray tune`: build the Tuner (search space, searcher, scheduler, wandb), run or resume the
sweep, and write its results (CSV, markdown, plot, best config as a runnable YAML)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from t2ray.console import verbose
from t2ray.tune.config import Sweep, SweepError, dump_yaml, nest

TUNE_DIR = "tune"  # the Tune experiment inside the sweep folder (Tuner.restore path)


@dataclass
class SweepOutcome:
    sweep_dir: Path
    trials: list[dict]
    best: dict | None
    best_config: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    resumed: bool = False
    expected: int = 0
    interrupted: bool = False  # Ctrl-C: Tune stopped the running trials, which count as unfinished

    @property
    def finished(self) -> int:
        return sum(t["status"] in ("TERMINATED", "ERROR") for t in self.trials)

    @property
    def complete(self) -> bool:
        return self.finished >= self.expected

    def summary(self) -> dict:
        stopped = [t for t in self.trials if t["stopped_early"]]
        return {
            "sweep_dir": str(self.sweep_dir),
            "trials": len(self.trials),
            "stopped_early": len(stopped),
            "errored": sum(t["status"] == "ERROR" for t in self.trials),
            "resumed": self.resumed,
            "interrupted": self.interrupted,
            "complete": self.complete,
            "finished": self.finished,
            "expected": self.expected,
            "best": self.best,
            "best_config": str(self.best_config) if self.best_config else None,
            **{k: str(v) for k, v in self.files.items()},
        }


def param_space(sweep: Sweep) -> dict:
    return {key: dist.to_tune() for key, dist in sweep.config.space.items()}


def make_searcher(sweep: Sweep):
    c = sweep.config
    if c.search.alg == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # It takes the concurrency limit itself (TuneConfig's applies only to Searchers).
        return BasicVariantGenerator(random_state=c.search.seed, max_concurrent=concurrency(sweep))
    if c.search.alg == "optuna":
        from t2ray.tune.searchers import OptunaOnEvaluations

        return OptunaOnEvaluations(seed=c.search.seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=c.search.seed, n_initial_points=max(1, min(20, c.num_samples // 2)))


def make_scheduler(sweep: Sweep):
    s = sweep.config.scheduler
    if s.type == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    if s.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr=sweep.config.time_attr,
            max_t=sweep.max_t,
            grace_period=sweep.grace_period,
            reduction_factor=s.reduction_factor,
            brackets=s.brackets,
        )
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining(
        time_attr=sweep.config.time_attr,
        perturbation_interval=sweep.perturbation_interval,
        hyperparam_mutations=param_space(sweep),
        quantile_fraction=s.quantile_fraction,
        resample_probability=s.resample_probability,
        require_attrs=False,
    )


def concurrency(sweep: Sweep) -> int:
    """max_concurrent_trials, or as many trials as the cluster holds at once (Train runs wait for all their
    workers; more trial drivers than that only queue)."""
    import ray

    if sweep.config.max_concurrent_trials:
        return sweep.config.max_concurrent_trials
    have = ray.cluster_resources()
    fits = [have.get(k, 0) // v for k, v in sweep.need_per_trial().items() if v]
    return int(max(1, min(fits, default=sweep.config.num_samples)))


def check_cluster(sweep: Sweep) -> None:
    import ray

    have = ray.cluster_resources()
    short = {k: v for k, v in sweep.need_per_trial().items() if v > have.get(k, 0)}
    if short:
        needs = ", ".join(f"{v:g} {k}" for k, v in short.items())
        has = ", ".join(f"{have.get(k, 0):g} {k}" for k in short)
        raise SweepError(
            f"one trial of {sweep.config.name} needs {needs} but the cluster has {has}; lower "
            "scaling.num_workers / scaling.cpus_per_worker (overrides) or resources"
        )


def check_inputs(sweep: Sweep) -> None:
    """Files the trials need, checked before any trial starts (CEM: the experts)."""
    if sweep.config.kind != "cem":
        return
    cfg = sweep.base_model()
    missing = [e for e in [*cfg.experts, cfg.classifier_expert] if e and not Path(e).exists()]
    if missing:
        raise SweepError(
            f"expert {missing[0]} not found: train the experts first (e.g. `t2ray train "
            "experiments/smollm2-math.yaml`, or `t2ray quickstart`) or fix experts: in "
            f"{sweep.config.base}"
        )


def prepare_models(sweep: Sweep) -> None:
    """Build local model caches once here, not in every trial at the same time."""
    from t2ray.models.loader import resolve

    specs = sweep.values_of("model.spec")
    seeds = sweep.values_of("seed") if sweep.config.kind == "rl" else [0]
    for spec in specs:
        for seed in seeds:
            resolve(spec, seed)


def trainable(sweep: Sweep):
    from ray import tune

    from t2ray.tune.trials import cem_trial, rl_trainable, rl_trial

    if sweep.config.kind == "rl":
        fn = rl_trainable(tune.with_parameters(rl_trial, spec=sweep.spec()))
    else:
        fn = tune.with_parameters(cem_trial, spec=sweep.spec())
    resources = {k: v for k, v in sweep.trial_resources().items() if v}
    # A trial that only drives a Train run holds no CPU; Tune needs a non-empty request: 1 MiB of memory.
    return tune.with_resources(fn, resources or {"memory": 2**20})


def progress_callback(sweep: Sweep):
    """The sweep's bar, drawn by the driver from Tune's own events (Tune's status tables only with --verbose):
    trials ended of those expected, how many run, the best metric so far."""
    from ray.tune import Callback
    from tqdm.auto import tqdm

    metric, best_of = sweep.config.metric, (max if sweep.config.mode == "max" else min)

    class SweepProgress(Callback):
        def __init__(self):
            self.bar, self.best = None, None

        def __getstate__(self):  # pickled with the Tuner (a resumed sweep draws a new bar)
            return {**self.__dict__, "bar": None}

        def _draw(self, trials) -> None:
            if self.bar is None:
                self.bar = tqdm(
                    total=sweep.expected_trials, desc=f"tune {sweep.config.name}", unit="trial", dynamic_ncols=True
                )
            self.bar.n = sum(str(t.status) in ("TERMINATED", "ERROR") for t in trials)
            running = sum(str(t.status) == "RUNNING" for t in trials)
            best = "" if self.best is None else f", best {metric} {self.best:.3f}"
            self.bar.set_postfix_str(f"{running} running{best}", refresh=False)
            self.bar.refresh()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if _finite(result.get(metric)):
                value = float(result[metric])
                self.best = value if self.best is None else best_of(self.best, value)
            self._draw(trials)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._draw(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._draw(trials)

        on_trial_error = on_trial_complete

        def on_experiment_end(self, trials, **info):
            self._draw(trials)
            self.bar.close()
            self.bar = None

    return SweepProgress()


RUNNING_TRIALS: set[str] = (
    set()
)  # this driver's running trials (a module global: a resumed Tuner unpickles its callbacks)


def running_trials_callback():
    from ray.tune import Callback

    class RunningTrials(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            RUNNING_TRIALS.add(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            RUNNING_TRIALS.discard(trial.trial_id)

        on_trial_error = on_trial_complete

    return RunningTrials()


class StopSignal(logging.Filter):
    """Tune catches Ctrl-C itself: it stops the running trials (marked TERMINATED like finished ones), saves its state
    and returns normally. This filter on Tune's logger notices its "Stop signal received" line, notes the trials
    running then (they are unfinished), and keeps Tune's two warnings off the console unless --verbose."""

    def __init__(self):
        super().__init__()
        self.received, self.stopped = False, set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "Stop signal received" in text:
            self.received, self.stopped = True, set(RUNNING_TRIALS)
        return verbose() or not ("Stop signal received" in text or "has been interrupted" in text)


def callbacks(sweep: Sweep) -> list:
    found = [running_trials_callback(), *([] if verbose() else [progress_callback(sweep)])]
    if not sweep.config.wandb:
        return found
    from ray.air.integrations.wandb import WandbLoggerCallback

    class WandbCallback(WandbLoggerCallback):
        """Ray's callback, except that an interrupted sweep (Ctrl-C) ends promptly: the logging actors of trials
        still running are told to finish too (Ray waits upload_timeout — 30 min — for them otherwise); and the
        logging actors are not restartable: Ray's core prints an error line per trial for its max_restarts=-1
        (ray#53727: such a restart fails anyway when its arguments are gone); a lost actor loses only its logs."""

        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            if self._remote_logger_class is None:
                import ray
                from ray.air.integrations.wandb import WANDB_ENV_VAR
                from ray.air.util.node import _force_on_current_node

                key = {WANDB_ENV_VAR: os.environ[WANDB_ENV_VAR]} if WANDB_ENV_VAR in os.environ else {}
                self._remote_logger_class = ray.remote(
                    num_cpus=0, **_force_on_current_node(), runtime_env={"env_vars": key}
                )(self._logger_actor_cls)
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

        def on_experiment_end(self, trials, **info):
            for trial in list(getattr(self, "_trial_logging_actors", {})):
                try:
                    self._signal_logging_actor_stop(trial=trial)
                except Exception:  # noqa: BLE001 — best effort: the wait below still ends at the timeout
                    pass
            super().on_experiment_end(trials, **info)

        def __del__(self):
            # Ray's asks ray.is_initialized(): at interpreter exit (after an interrupted sweep) `ray` may already be
            # torn down, and the traceback ('NoneType' object has no attribute 'is_initialized') hid the real ending
            with contextlib.suppress(Exception):
                super().__del__()

    mode = os.environ.get("WANDB_MODE", "offline")
    (sweep.dir / "wandb").mkdir(parents=True, exist_ok=True)
    return found + [
        WandbCallback(
            project=sweep.config.project,
            group=sweep.config.name,
            mode=mode,
            dir=str(sweep.dir),
            excludes=["alpha", "t2ray_run"],
            upload_timeout=60 if mode in ("offline", "disabled") else 600,
        )
    ]


def _state_file(sweep: Sweep) -> Path:
    return sweep.dir / "sweep.json"


def run_sweep(sweep: Sweep, *, address: str | None = None, fresh: bool = False) -> SweepOutcome:
    """Run the sweep, or resume it (same storage_path and name) when an earlier run was interrupted."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Metrics are validated against what trials report when the sweep is loaded; valid_accuracy arrives only
    # with evaluations, so Tune's every-result metric check would refuse the iterations in between.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not verbose():  # Tune's new console prints its "Configuration for experiment" box even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    from t2ray.train.launcher import ensure_ray

    tune_dir = sweep.dir / TUNE_DIR
    state = _state_file(sweep)
    if fresh:
        for sub in (TUNE_DIR, "trials"):
            shutil.rmtree(sweep.dir / sub, ignore_errors=True)
        state.unlink(missing_ok=True)
    check_inputs(sweep)
    prepare_models(sweep)
    ensure_ray(address)
    check_cluster(sweep)
    resumed = tune.Tuner.can_restore(str(tune_dir))
    if resumed:
        saved = json.loads(state.read_text()) if state.exists() else {}
        if saved.get("fingerprint") != sweep.fingerprint():
            raise SweepError(
                f"{sweep.dir} holds a sweep with other settings; resume it with the same YAML, "
                "or pass --fresh (deletes it) or choose another name"
            )
        tuner = tune.Tuner.restore(
            str(tune_dir), trainable(sweep), resume_unfinished=True, resume_errored=True, param_space=param_space(sweep)
        )
    else:
        sweep.dir.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"fingerprint": sweep.fingerprint(), **sweep.spec()}, indent=2))
        if sweep.source:
            shutil.copyfile(sweep.source, sweep.dir / "sweep.yaml")
        c = sweep.config
        limit = None if c.search.alg == "random" else concurrency(sweep)  # the random searcher holds its own
        tuner = tune.Tuner(
            trainable(sweep),
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=c.metric,
                mode=c.mode,
                search_alg=make_searcher(sweep),
                scheduler=make_scheduler(sweep),
                num_samples=c.num_samples,
                max_concurrent_trials=limit,
                time_budget_s=c.time_budget_s,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(sweep.dir),
                callbacks=callbacks(sweep),
                failure_config=tune.FailureConfig(max_failures=c.max_failures),
                verbose=1 if verbose() else 0,
            ),
        )
    RUNNING_TRIALS.clear()
    stop = StopSignal()
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(stop)
    try:
        grid = tuner.fit()
    finally:
        tune_log.removeFilter(stop)
    outcome = export_results(sweep, grid, interrupted=stop.stopped if stop.received else None)
    outcome.resumed = resumed
    return outcome


# ----------------------------------------------------------------------------------------------- results


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return _clean(x.item())
    return x


def _score(series, scope: str, mode: str):
    values = [float(v) for v in series if v is not None and _finite(v)]
    if not values:
        return None
    if scope == "all":
        return max(values) if mode == "max" else min(values)
    if scope == "last":
        return values[-1]
    if scope == "avg":
        return sum(values) / len(values)
    n = 5 if scope == "last-5-avg" else 10
    return sum(values[-n:]) / len(values[-n:])


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _statuses(grid) -> list[str]:
    try:
        return [str(t.status) for t in grid._experiment_analysis.trials]
    except AttributeError:  # another Ray version: errors are still known
        return ["ERROR" if r.error else "TERMINATED" for r in grid]


def _history(result) -> list[dict]:
    """Every result the trial reported. Tune reads result.json when it exists, but after a PBT exploit it can be left
    empty on disk while progress.csv holds every row: the longer of the two."""
    import pandas as pd

    frame = result.metrics_dataframe
    history = frame.to_dict("records") if frame is not None and len(frame) else []
    progress = Path(result.path) / "progress.csv"
    if progress.is_file() and progress.stat().st_size:
        try:
            rows = pd.read_csv(progress).to_dict("records")
        except (pd.errors.ParserError, pd.errors.EmptyDataError):
            rows = []
        if len(rows) > len(history):
            return rows
    return history


def trial_rows(sweep: Sweep, grid) -> list[dict]:
    """One row per trial: status, whether a scheduler stopped it early, iterations used, its score."""
    c = sweep.config
    time_attr = c.time_attr
    rows = []
    for result, status in zip(grid, _statuses(grid), strict=True):
        history = _history(result)
        trial_id = (  # the trial's own rows first: PBT copies the cloned trial's last result, its id included
            (history[-1].get("trial_id") if history else None)
            or (result.metrics or {}).get("trial_id")
            or Path(result.path).name
        )
        steps = [h[time_attr] for h in history if _finite(h.get(time_attr))]
        used = int(max(steps)) if steps else 0
        score = _score([h.get(c.metric) for h in history], c.scope, c.mode)
        last = next((h.get(c.metric) for h in reversed(history) if _finite(h.get(c.metric))), None)
        status = "ERROR" if result.error else status
        row = {
            "trial_id": trial_id,
            "status": status,
            f"{time_attr}s": used,
            "stopped_early": bool(status == "TERMINATED" and used < sweep.max_t),
            c.metric: _clean(score),
            f"{c.metric}_last": _clean(last),
            "seconds": round(float((result.metrics or {}).get("time_total_s") or 0.0), 2),
        }
        row.update({f"config/{k}": result.config.get(k) for k in c.space})
        if c.kind == "rl":
            from t2ray.tune.trials import RUN_KEY, run_name

            current = next((h[RUN_KEY] for h in reversed(history) if isinstance(h.get(RUN_KEY), str)), None)
            run = sweep.dir / "trials" / (current or run_name(c.name, trial_id))
            row["run_dir"] = str(run)
            row["expert"] = str(run / "expert.safetensors") if (run / "expert.safetensors").exists() else None
        else:
            row["alpha"] = next((h.get("alpha") for h in reversed(history) if h.get("alpha")), None)
        row["error"] = str(result.error).splitlines()[0][:200] if result.error else None
        row["_history"] = history
        rows.append(row)
    rows.sort(key=lambda r: (r[c.metric] is None, -(r[c.metric] or 0) if c.mode == "max" else (r[c.metric] or 0)))
    return rows


def write_table(sweep: Sweep, rows: list[dict]) -> tuple[Path, Path]:
    import csv

    finished = sum(r["status"] in ("TERMINATED", "ERROR") for r in rows)
    columns = [k for k in rows[0] if not k.startswith("_")] if rows else ["trial_id"]
    csv_path = sweep.dir / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    c = sweep.config
    shown = [k for k in columns if k not in ("run_dir", "expert", "alpha", "error")]
    fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        f"# Sweep {c.name}",
        "",
        f"{c.kind} trials on `{c.base}`: {len(rows)} trials, search {c.search.alg}, scheduler "
        f"{c.scheduler.type}, metric {c.metric} ({c.mode}, scope {c.scope}); "
        f"{sum(r['stopped_early'] for r in rows)} stopped early.",
        "",
        *(
            [
                f"**Incomplete**: {finished} of {sweep.expected_trials} trials finished (interrupted, or the time "
                "budget ran out): run the same command again to resume.",
                "",
            ]
            if finished < sweep.expected_trials
            else []
        ),
        "| " + " | ".join(k.removeprefix("config/") for k in shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in shown) + " |" for r in rows]
    md_path = sweep.dir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot(sweep: Sweep, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = sweep.config
    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=110)
    for i, row in enumerate(rows):
        points = [
            (h[c.time_attr], h[c.metric])
            for h in row["_history"]
            if _finite(h.get(c.time_attr)) and _finite(h.get(c.metric))
        ]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        label = ", ".join(f"{k.split('.')[-1]}={_short(row.get(f'config/{k}'))}" for k in c.space)
        style = "--" if row["stopped_early"] else "-"
        (line,) = ax.plot(xs, ys, style, marker="o", ms=3, label=("★ " if i == 0 else "") + label, alpha=0.85)
        if row["stopped_early"]:
            ax.plot(xs[-1], ys[-1], "x", color=line.get_color(), ms=8)
    ax.set(
        xlabel=c.time_attr,
        ylabel=c.metric,
        title=f"{c.name}: {c.scheduler.type} ({sum(r['stopped_early'] for r in rows)}/{len(rows)} stopped early, x)",
    )
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = sweep.dir / "sweep.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v


def write_best(sweep: Sweep, best: dict) -> Path:
    """The best trial's full configuration as a runnable YAML: `t2ray train best.yaml` (rl); for cem an adapt
    config (and the α it found as a mixture file)."""
    c = sweep.config
    values = {k: best.get(f"config/{k}") for k in c.space}
    data = sweep.trial_data(values)
    full = sweep.schema.model_validate(data).model_dump(mode="json")
    header = (
        f"Best trial {best['trial_id']} of sweep {c.name} ({c.metric} = {best[c.metric]}, {c.mode}).\n"
        f"Swept values: {json.dumps(values)}\n"
    )
    if c.kind == "rl":
        data["name"] = f"{sweep.base.get('name', 'experiment')}-best"
        header += "Run it: t2ray train best.yaml\n"
    else:
        header += (
            "Run it: t2ray adapt --strategy fewshot " + _adapt_flags(full) + "\n"
            "(or run_adapt(AdaptConfig(**yaml.safe_load(open('best.yaml'))))); the α this trial found is in "
            "best-mixture.json: t2ray eval --task " + str(full["task"]) + " --mixture best-mixture.json\n"
        )
    path = sweep.dir / "best.yaml"
    path.write_text(dump_yaml(data, header))
    if c.kind == "cem" and best.get("alpha"):
        from t2ray.experts import Mixture, save_mixture

        save_mixture(
            Mixture(
                experts=list(full["experts"]),
                alpha=json.loads(best["alpha"]),
                name=f"{c.name}-best",
                task=full["task"],
                metadata={"sweep": c.name, "trial": best["trial_id"], "cem": full["cem"], c.metric: best[c.metric]},
            ),
            sweep.dir / "best-mixture.json",
        )
    return path


def _adapt_flags(data: dict) -> str:
    cem = data["cem"]
    flags = [
        f"--task {data['task']}",
        *(f"--expert {e}" for e in data["experts"]),
        f"--model {data['model']['spec']}",
        f"--shots {cem['shots']}",
        f"--population {cem['population']}",
        f"--generations {cem['generations']}",
        f"--elite-ratio {cem['elite_ratio']}",
        f"--seed {cem['seed']}",
    ]
    if cem["per_module"]:
        flags.append("--per-module")
    return " ".join(flags)


def export_results(sweep: Sweep, grid, interrupted: set[str] | None = None) -> SweepOutcome:
    """The results' table, plot and best configuration. `interrupted`: the ids of the trials Ctrl-C stopped (None:
    no Ctrl-C): they are INTERRUPTED, not finished, and resume with the sweep."""
    rows = trial_rows(sweep, grid)
    for row in rows:
        if any(trial_id in str(row["trial_id"]) for trial_id in interrupted or ()):
            row["status"] = "INTERRUPTED"
    csv_path, md_path = write_table(sweep, rows)
    png = plot(sweep, rows)
    c = sweep.config
    best = next((r for r in rows if r[c.metric] is not None), None)
    best_yaml = write_best(sweep, best) if best else None
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    best_public = next((r for r in public if best and r["trial_id"] == best["trial_id"]), None)
    files = {"results_csv": csv_path, "results_md": md_path, "plot": png}
    (sweep.dir / "best.json").write_text(json.dumps({"best": best_public, "trials": public}, indent=2, default=str))
    return SweepOutcome(
        sweep_dir=sweep.dir,
        trials=public,
        best=best_public,
        best_config=best_yaml,
        files=files,
        expected=sweep.expected_trials,
        interrupted=interrupted is not None,
    )


def best_values(best: dict, sweep: Sweep) -> dict:
    return nest({k: best.get(f"config/{k}") for k in sweep.config.space})
