"""Sweep YAML validation (no Ray cluster): every bad input is named; the space, searchers and schedulers build."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from t2ray.tune import CEM_METRICS, RL_METRICS, SweepError, load_sweep
from t2ray.tune.config import Sweep, SweepConfig, flatten, nest

from .helpers import write_adapt_base, write_experiment, write_sweep, write_task

ROOT = Path(__file__).resolve().parents[2]
SPACE = {"rl.lr": {"loguniform": [1e-4, 1e-2]}, "rl.temperature": {"choice": [0.5, 1.0]}}


@pytest.fixture
def base(tmp_path) -> Path:
    return write_experiment(tmp_path, str(write_task(tmp_path / "task")))


def sweep_file(tmp_path, base, **fields):
    fields.setdefault("space", SPACE)
    return write_sweep(tmp_path, base.name, **fields)


def error_of(tmp_path, base, **fields) -> str:
    with pytest.raises((SweepError, ValueError)) as err:
        load_sweep(sweep_file(tmp_path, base, **fields))
    return str(err.value)


@pytest.mark.parametrize("name", ["rl-smollm2", "cem-smollm2"])
def test_shipped_sweeps_validate(name):
    sweep = load_sweep(ROOT / "experiments" / "sweeps" / f"{name}.yaml")
    assert sweep.config.name == name and sweep.config.space
    assert Path(sweep.base["task"]) == Path(sweep.base["task"])  # resolved without error
    if sweep.config.kind == "rl":
        assert sweep.max_t == 12 and sweep.grace_period == 4
        assert sweep.need_per_trial() == {"CPU": 1.0}  # one Train worker, the trial driver holds no CPU


def test_unknown_key_is_named_with_the_closest_real_key(tmp_path, base):
    msg = error_of(tmp_path, base, space={"rl.lrr": {"choice": [1e-3]}})
    assert "'rl.lrr'" in msg and "did you mean rl.lr" in msg
    msg = error_of(tmp_path, base, space={"optimizer.lr": {"choice": [1e-3]}})
    assert "'optimizer'" in msg and "the top level has" in msg
    assert "is a value, not a section" in error_of(tmp_path, base, space={"rl.lr.x": {"choice": [1]}})
    assert "whole section" in error_of(tmp_path, base, space={"rl": {"choice": [1]}})
    assert "override key 'rl.iters'" in error_of(tmp_path, base, overrides={"rl.iters": 3})


def test_empty_space_and_unknown_alg_scheduler_metric(tmp_path, base):
    assert "space is empty" in error_of(tmp_path, base, space={})
    assert "'random', 'optuna' or 'hyperopt'" in error_of(tmp_path, base, search={"alg": "bayesopt"})
    assert "'fifo', 'asha', 'pbt'" in error_of(tmp_path, base, scheduler={"type": "hyperband"})
    msg = error_of(tmp_path, base, metric="val_acc")
    assert "metric 'val_acc' is never reported by rl trials" in msg and "valid_accuracy" in msg
    assert "give exactly one of" in error_of(tmp_path, base, space={"rl.lr": {"choice": [1], "grid": [2]}})
    assert "low 0.1 must be < high 0.01" in error_of(tmp_path, base, space={"rl.lr": {"uniform": [0.1, 0.01]}})
    assert "loguniform needs low > 0" in error_of(tmp_path, base, space={"rl.lr": {"loguniform": [0, 0.01]}})


def test_values_the_experiment_refuses_are_named(tmp_path, base):
    msg = error_of(tmp_path, base, space={"rl.baseline": {"choice": ["mean", "best"]}})
    assert "'rl.baseline'" in msg and "'best'" in msg
    msg = error_of(tmp_path, base, space={"rl.lr": {"uniform": [-1.0, 0.01]}})
    assert "'rl.lr'" in msg and "-1.0" in msg
    msg = error_of(tmp_path, base, space={"scaling.num_workers": {"grid": [1, 16]}})  # batch_size 8 < 16 workers
    assert "scaling.num_workers" in msg and "16" in msg


def test_incoherent_combinations(tmp_path, base):
    assert "needs search.alg random" in error_of(
        tmp_path, base, search={"alg": "optuna"}, space={"rl.lr": {"grid": [0.1, 0.2]}}
    )
    assert "cannot mutate svf.init_mean" in error_of(
        tmp_path, base, scheduler={"type": "pbt"}, space={"svf.init_mean": {"choice": [0.1, 1.0]}}
    )
    assert "must exceed the perturbation interval" in error_of(
        tmp_path, base, scheduler={"type": "pbt", "perturbation_interval": 4}
    )


def test_nested_space_and_overrides_flatten_and_cli_style_overrides(tmp_path, base):
    path = sweep_file(
        tmp_path, base, space={"rl": {"lr": {"loguniform": [1e-4, 1e-2]}}}, overrides={"rl": {"iterations": 3}}
    )
    sweep = load_sweep(path, ["num_samples=3", "overrides.rl.eval_interval=3", "scheduler.type=asha"])
    assert list(sweep.config.space) == ["rl.lr"]
    assert sweep.config.overrides == {"rl.iterations": 3, "rl.eval_interval": 3}
    assert sweep.config.num_samples == 3 and sweep.max_t == 3
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}
    assert nest({"a.b": 1, "a.c.d": 2}) == {"a": {"b": 1, "c": {"d": 2}}}


def test_base_paths_become_absolute_and_missing_base_is_named(tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(base.read_text())
    data["task"] = "task/has-e.yaml"  # relative to the current directory, as `t2ray train` reads it
    base.write_text(yaml.safe_dump(data))
    sweep = load_sweep(sweep_file(tmp_path, base))
    assert sweep.base["task"] == str((tmp_path / "task" / "has-e.yaml").resolve())
    with pytest.raises(SweepError, match="base 'nope.yaml' not found"):
        load_sweep(write_sweep(tmp_path, "nope.yaml", space=SPACE))


def test_trial_experiment_runs_under_the_sweep_with_a_deterministic_name(tmp_path, base):
    from t2ray.tune.trials import run_name, trial_experiment

    sweep = load_sweep(sweep_file(tmp_path, base, overrides={"rl.iterations": 3}))
    cfg = trial_experiment(sweep, {"rl.lr": 0.05, "rl.temperature": 1.0}, run_name("sweep", "abc_00001"))
    assert cfg.name == "sweep-abc_00001" and cfg.rl.lr == 0.05 and cfg.rl.iterations == 3
    assert cfg.run_dir == sweep.dir / "trials" / "sweep-abc_00001"
    assert cfg.tracking.wandb is False  # Tune's wandb callback logs each trial once
    assert Sweep.from_spec(sweep.spec()).fingerprint() == sweep.fingerprint()


def test_a_trial_writes_under_the_drivers_sweep_folder_from_its_own_working_directory(tmp_path, base, monkeypatch):
    """Tune runs a trial in a working directory of its own: a relative storage_path resolved there put the trial's
    Train runs (and checkpoints) under Ray's session folder, where Tune could no longer find them."""
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(sweep_file(tmp_path, base, storage_path="runs/sweeps"))
    spec = sweep.spec()
    (tmp_path / "trial-cwd").mkdir()
    monkeypatch.chdir(tmp_path / "trial-cwd")
    assert Sweep.from_spec(spec).dir == sweep.dir == (tmp_path / "runs/sweeps" / sweep.config.name).resolve()


def test_cem_sweep_checks_its_adapt_base(tmp_path):
    task = write_task(tmp_path / "task")
    base = write_adapt_base(tmp_path, str(task), [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    ok = write_sweep(
        tmp_path,
        base.name,
        kind="cem",
        space={"cem.population": {"choice": [4, 8]}, "cem.per_module": {"choice": [False, True]}},
    )
    sweep = load_sweep(ok)
    assert sweep.max_t == 2 and sweep.config.time_attr == "generation"
    assert sweep.need_per_trial() == {"CPU": 1.0}
    bad = write_sweep(tmp_path, base.name, name="bad", kind="cem", space={"rl.lr": {"choice": [1e-3]}})
    with pytest.raises(SweepError, match="AdaptConfig schema has no 'rl'"):
        load_sweep(bad)
    with pytest.raises(SweepError, match="needs kind rl"):
        load_sweep(
            write_sweep(
                tmp_path,
                base.name,
                name="pbt",
                kind="cem",
                scheduler={"type": "pbt"},
                space={"cem.elite_ratio": {"uniform": [0.1, 0.5]}},
            )
        )
    with pytest.raises(SweepError, match="never reported by cem trials"):
        load_sweep(
            write_sweep(
                tmp_path, base.name, name="m", kind="cem", metric="reward", space={"cem.population": {"choice": [4, 8]}}
            )
        )


def test_tune_objects_build(tmp_path, base):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.hyperopt import HyperOptSearch
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float

    from t2ray.tune.runner import make_scheduler, make_searcher, param_space

    def build(**fields):
        return load_sweep(sweep_file(tmp_path, base, max_concurrent_trials=2, **fields))

    asha = build(scheduler={"type": "asha", "grace_period": 1}, overrides={"rl.iterations": 8})
    space = param_space(asha)
    assert isinstance(space["rl.lr"], Float) and isinstance(space["rl.temperature"], Categorical)
    scheduler = make_scheduler(asha)
    assert isinstance(scheduler, ASHAScheduler) and scheduler._max_t == 8
    assert [r[0] for r in scheduler._brackets[0]._rungs] == [8, 4, 2, 1]
    assert isinstance(make_searcher(asha), BasicVariantGenerator)
    assert isinstance(make_searcher(build(search={"alg": "optuna"})), OptunaSearch)
    assert isinstance(make_searcher(build(search={"alg": "hyperopt"})), HyperOptSearch)
    pbt = build(scheduler={"type": "pbt"}, overrides={"rl.iterations": 8})
    scheduler = make_scheduler(pbt)
    assert isinstance(scheduler, PopulationBasedTraining) and scheduler._perturbation_interval == 2
    assert set(scheduler._hyperparam_mutations) == {"rl.lr", "rl.temperature"}


def test_reported_metric_lists_match_what_the_loop_reports(tmp_path, tiny, tokenizer, torch_threads):
    """RL_METRICS (what a sweep may rank on) is exactly what the worker loop reports: one plain iteration with
    an evaluation, in this process, on tiny-llama."""
    from t2ray.config import load_experiment
    from t2ray.rl.loop import Stepper, train_loop
    from t2ray.rl.trainable import SVFAdapter
    from t2ray.tasks import get_task

    cfg = load_experiment(
        write_experiment(tmp_path, str(write_task(tmp_path / "task"))),
        ["rl.iterations=1", "rl.eval_interval=1", "rl.eval_limit=2"],
    )
    adapter = SVFAdapter(tiny, cfg.svf, progress=False)
    state = train_loop(
        cfg, tiny, tokenizer, get_task(cfg.task), adapter, Stepper(adapter.parameters(), cfg.rl.lr, cfg.rl.grad_clip)
    )
    assert set(state.history[0]) == set(RL_METRICS)
    assert {"generation", "valid_accuracy"} <= set(CEM_METRICS)
    assert SweepConfig.model_fields["metric"].default in RL_METRICS


def test_a_trials_history_survives_an_empty_result_json(tmp_path):
    """After a PBT exploit Tune can leave a trial's result.json empty on disk while progress.csv holds every row:
    the history is the longer of the two (the shipped PBT sweep once wrote no best.yaml for it)."""
    import pandas as pd
    from ray.air.result import Result

    from t2ray.tune.runner import _history

    (tmp_path / "result.json").write_text("")
    pd.DataFrame({"iteration": [1, 2, 3], "valid_accuracy": [0.1, None, 0.3], "trial_id": ["t0"] * 3}).to_csv(
        tmp_path / "progress.csv", index=False
    )
    empty = Result(metrics={"trial_id": "t1"}, checkpoint=None, error=None, path=str(tmp_path))
    history = _history(empty)
    assert [row["iteration"] for row in history] == [1, 2, 3] and history[-1]["trial_id"] == "t0"
    whole = pd.DataFrame({"iteration": [1, 2, 3, 4]})
    assert len(_history(Result({}, None, None, str(tmp_path), metrics_dataframe=whole))) == 4


def test_a_forwarded_checkpoint_is_copied_before_train_can_delete_it(tmp_path):
    """The Train controller copies each checkpoint as it is reported: the trial thread, waiting for Tune to take
    every report, may be more than checkpoint_keep reports behind, after Train deleted the original."""
    import json
    import queue
    import shutil

    from ray.train import Checkpoint

    from t2ray.tune.trials import ForwardToTune

    own = tmp_path / "run" / "checkpoint_000001"
    own.mkdir(parents=True)
    (own / "state.json").write_text(json.dumps({"iteration": 3}))
    forward = ForwardToTune(queue.Queue(), str(tmp_path / "run" / "tune_staging"))
    forward.sent_handle = True  # outside a Train controller: no actor handle to hand over
    forward.after_report(None, [{"iteration": 3}], Checkpoint.from_directory(str(own)))
    forward.after_report(None, [{"iteration": 4}], None)
    shutil.rmtree(own)  # Train keeps only its newest checkpoint_keep
    metrics, staged, _ = forward.queue.get_nowait()
    assert metrics == {"iteration": 3} and json.loads(Path(staged, "state.json").read_text()) == {"iteration": 3}
    assert forward.queue.get_nowait()[:2] == ({"iteration": 4}, None)
