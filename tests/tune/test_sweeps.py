"""Real Ray Tune sweeps on tiny-llama, one 2-CPU Ray cluster for the module:
an RL sweep whose trials are Ray Train + DeepSpeed runs (ASHA stops the weak ones), a CEM sweep interrupted
with Ctrl-C and resumed, and the best configuration exported as a YAML that runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .helpers import make_experts, write_adapt_base, write_experiment, write_sweep, write_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(t2ray_cache):
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_cpus(ray) -> float:
    for _ in range(50):  # resources return asynchronously after a run ends
        if ray.available_resources().get("CPU", 0) >= 2:
            break
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


def test_rl_sweep_with_asha_stops_weak_trials_and_exports_a_runnable_best(cluster, tmp_path, torch_threads):
    from t2ray.config import load_experiment
    from t2ray.tune import load_sweep, run_sweep

    task = write_task(tmp_path / "task")
    base = write_experiment(tmp_path, str(task), iterations=4, eval_interval=2)
    # Temperature 1.0 samples tokens ~uniformly (an "e" is common: reward > −1); at 0.05 the base model repeats
    # "\n" (reward −1): ASHA must stop 0.05 trials that reach a rung after a 1.0 trial.
    path = write_sweep(
        tmp_path,
        base.name,
        name="asha",
        space={"rl.temperature": {"grid": [1.0, 0.05]}, "rl.lr": {"grid": [0.3, 0.01]}},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        metric="reward",
        mode="max",
        max_concurrent_trials=2,
    )
    sweep = load_sweep(path)
    outcome = run_sweep(sweep)

    trials = outcome.trials
    assert len(trials) == 4 and all(t["status"] == "TERMINATED" for t in trials), trials
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped, f"ASHA stopped nothing: {trials}"
    assert all(t["iterations"] < 4 for t in stopped)
    assert any(t["iterations"] == 4 for t in trials)
    best = outcome.best
    assert best["config/rl.temperature"] == 1.0 and best["reward"] > -1
    assert Path(best["expert"]).is_file()  # the best trial's Train run wrote its expert
    assert free_cpus(cluster) == 2, "a stopped trial's Train run kept its workers"

    files = outcome.files
    rows = Path(files["results_csv"]).read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("trial_id,status,iterations,stopped_early,reward")
    assert "stopped early" in Path(files["results_md"]).read_text()
    assert Path(files["plot"]).stat().st_size > 10_000

    # The best configuration is a runnable experiment: the same config the best trial's Train run used ...
    cfg = load_experiment(outcome.best_config)
    trial_cfg = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    ignore = {"name", "storage_path", "tracking"}
    assert {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ignore} == {
        k: v for k, v in trial_cfg.items() if k not in ignore
    }
    assert cfg.name == "tiny-best" and cfg.rl.temperature == 1.0

    # ... and it runs (one iteration of the worker loop, in this process).
    from t2ray.models import load_model
    from t2ray.rl.loop import Stepper, train_loop
    from t2ray.rl.trainable import SVFAdapter
    from t2ray.tasks import get_task

    cfg = load_experiment(outcome.best_config, ["rl.iterations=1", "rl.eval_limit=2"])
    model, tokenizer = load_model(cfg.model.spec, seed=cfg.seed)
    adapter = SVFAdapter(model, cfg.svf, progress=False)
    state = train_loop(
        cfg, model, tokenizer, get_task(cfg.task), adapter, Stepper(adapter.parameters(), cfg.rl.lr, cfg.rl.grad_clip)
    )
    assert state.iteration == 1 and "valid_accuracy" in state.history[-1]


def _results_with(tune_dir: Path, key: str) -> list[Path]:
    found = []
    for result in tune_dir.glob("*/result.json"):
        if any(key in json.loads(line) for line in result.read_text().splitlines() if line.strip()):
            found.append(result)
    return found


def test_cem_sweep_interrupted_then_resumed(cluster, tmp_path, torch_threads):
    from t2ray.library import load_mixture
    from t2ray.tune import load_sweep, run_sweep

    task = write_task(tmp_path / "task")
    experts = make_experts(tmp_path / "experts", n=2)
    base = write_adapt_base(tmp_path, str(task), experts)
    path = write_sweep(
        tmp_path,
        base.name,
        name="cem",
        kind="cem",
        search={"alg": "hyperopt", "seed": 0},  # the README's variant of the shipped CEM sweep, across a resume
        num_samples=8,
        max_concurrent_trials=1,
        space={
            "cem.population": {"choice": [4, 6]},
            "cem.per_module": {"choice": [False, True]},
            "cem.normalize": {"choice": [False, True]},
        },
        wandb=True,
    )
    sweep = load_sweep(path)
    tune_dir = sweep.dir / "tune"

    # Start the sweep as a user would, on this module's cluster, and press Ctrl-C after its first trial.
    cli = Path(sys.executable).with_name("t2ray")
    address = cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [str(cli), "tune", str(path), "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deadline = time.monotonic() + 240
        while not _results_with(tune_dir, "valid_accuracy") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        finished = _results_with(tune_dir, "valid_accuracy")
        assert finished, "no CEM trial finished in time"
        lines_before = {p.parent.name: len(p.read_text().splitlines()) for p in finished}
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "**Incomplete**" in (sweep.dir / "results.md").read_text(), "the sweep was not interrupted"
    # Ctrl-C: exit 130, one line that says so and how to resume; the trial Tune stopped is not counted as finished
    # (it used to be: "complete": true, exit 0), and no traceback at exit (wandb's callback had one)
    assert proc.returncode == 130, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and "run the same command again to resume" in said[0], err[-3000:]
    assert "of 8 trials finished" in said[0] and "Traceback" not in err and "Stop signal received" not in err
    assert not said[0].startswith("interrupted: 8 of 8"), said

    # Same command again (here in-process): Tune restores the experiment and runs only what is left.
    outcome = run_sweep(load_sweep(path))
    assert outcome.resumed and outcome.complete
    trials = outcome.trials
    assert len(trials) == 8 and all(t["status"] == "TERMINATED" for t in trials), trials
    assert all(t["valid_accuracy"] is not None and t["generations"] == 2 for t in trials)
    for name, lines in lines_before.items():  # the trial finished before Ctrl-C was not run again
        assert len((tune_dir / name / "result.json").read_text().splitlines()) == lines

    best = yaml.safe_load(outcome.best_config.read_text())
    assert best["strategy"] == "fewshot" and best["cem"]["population"] in (4, 6)
    mixture, loaded = load_mixture(sweep.dir / "best-mixture.json")
    assert len(loaded) == 2 and mixture.metadata["trial"] == outcome.best["trial_id"]
    assert list((sweep.dir).glob("wandb/offline-run-*")), "the wandb callback wrote no offline run"
