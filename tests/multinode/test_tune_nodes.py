"""Ray Tune across nodes: a 2-trial RL sweep whose Train workers need the `trainer` resource (the two worker nodes
only); a worker node running trials is killed mid-sweep: Tune restarts the failed trials (FailureConfig) on the
remaining capacity, each resuming its own Train run from its checkpoint, and the sweep completes with best.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray_env import checkpoint_registered, placements, while_watching  # tests/ray_env.py
from tune.helpers import write_experiment, write_sweep, write_task  # tests/tune/helpers.py

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_node_killed_mid_sweep(three_nodes, tmp_path):
    from t2ray.tune import load_sweep, run_sweep

    task = write_task(tmp_path / "task")
    base = write_experiment(tmp_path, str(task), iterations=6, eval_interval=2)
    data = yaml.safe_load(base.read_text())
    data["scaling"]["resources"] = {"trainer": 1}
    base.write_text(yaml.safe_dump(data, sort_keys=False))
    path = write_sweep(
        tmp_path,
        base.name,
        name="nodes",
        num_samples=2,
        max_failures=2,
        space={"rl.lr": {"choice": [0.1, 0.3]}},
        search={"alg": "random", "seed": 0},
        scheduler={"type": "fifo"},
        metric="valid_accuracy",
        mode="max",
    )
    sweep = load_sweep(path)
    trials = sweep.dir / "trials"
    events: dict[str, object] = {}

    def kill_a_node_running_a_trial() -> bool:
        running = [
            run for run in trials.glob("*") if checkpoint_registered(run) and not (run / "expert.safetensors").exists()
        ]
        placed = [p for run in running for p in placements(run)]
        if placed:
            node_id = placed[-1]["node_id"]
            events["runs"] = [run.name for run in running if node_id in {p["node_id"] for p in placements(run)}]
            events["killed"] = three_nodes.kill(three_nodes.node_of(node_id))
        return bool(placed)

    outcome = while_watching(lambda: run_sweep(sweep), kill_a_node_running_a_trial, interval=0.1)
    assert "killed" in events, "no node was killed (every trial ended before its first checkpoint?)"
    summary = outcome.summary()
    assert summary["finished"] == 2 and summary["errored"] == 0 and outcome.complete, summary
    assert outcome.best_config is not None and Path(outcome.best_config).is_file()
    # the trials that lost their node started again from their own checkpoint, not from iteration 1
    for name in events["runs"]:
        restarts = [p["resumed_at"] for p in placements(trials / name)][1:]
        assert restarts and all(at > 0 for at in restarts), (name, placements(trials / name))
        assert (trials / name / "expert.safetensors").exists()
    print(f"\nnode killed mid-sweep: {len(events['runs'])} trial(s) on it restarted from their checkpoints")
