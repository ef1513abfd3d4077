"""Ray Train across nodes: 2 DeepSpeed workers (ZeRO-2) on 2 different nodes (placement STRICT_SPREAD or SPREAD,
custom resource `trainer`), checkpoints on storage every node sees; one worker node killed mid-run (its raylet and
every process on it): the run restarts on the remaining capacity from the last checkpoint, redoes at most one
checkpoint interval, and ends with the same z as a run that was never interrupted. And the driver killed: the same
command resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from ray_env import checkpoint_registered, logged, placements, while_watching  # tests/ray_env.py
from rl.learnable import LEARNABLE_RL, write_learnable_task
from safetensors.torch import load_file

from t2ray.config import ExperimentConfig
from t2ray.train import TrainError, train

pytestmark = pytest.mark.slow
INTERVAL = 5  # iterations between checkpoints (each validation writes one)


@pytest.fixture(scope="module")
def learn_task(tmp_path_factory) -> Path:
    return write_learnable_task(tmp_path_factory.mktemp("task"))


def spread_config(storage: Path, task: Path, name: str, batch_size: int = 8, **scaling) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "task": str(task),
            "seed": 0,
            "model": {"spec": "tiny-llama"},
            "rl": {
                **LEARNABLE_RL,
                "iterations": 15,
                "batch_size": batch_size,
                "eval_interval": INTERVAL,
                "eval_limit": 4,
                "eval_batch_size": 4,
            },
            "deepspeed": {"zero_stage": 2},
            "scaling": {
                "num_workers": 2,
                "cpus_per_worker": 1,
                "placement_strategy": "STRICT_SPREAD",
                "resources": {"trainer": 1},
                **scaling,
            },
            "tracking": {"wandb": False},
            "storage_path": str(storage),
            "max_failures": 2,
            "checkpoint_keep": 3,
        }
    )


@pytest.fixture(scope="module")
def uninterrupted(three_nodes, learn_task, tmp_path_factory):
    cfg = spread_config(tmp_path_factory.mktemp("shared"), learn_task, "uninterrupted")
    return cfg, train(cfg, progress=False)


def test_strict_spread_puts_one_worker_on_each_worker_node(three_nodes, uninterrupted):
    cfg, outcome = uninterrupted
    placed = placements(cfg.run_dir)
    assert sorted(p["rank"] for p in placed) == [0, 1]
    assert len({p["node_id"] for p in placed}) == 2, placed
    assert {p["node_id"] for p in placed} <= {n.node_id for n in three_nodes.workers}  # never the head (no trainer)
    assert outcome.expert_path.exists() and len(outcome.history) == 15


def test_more_workers_than_nodes_under_strict_spread_is_refused(three_nodes, learn_task, tmp_path):
    cfg = spread_config(tmp_path, learn_task, "three", batch_size=12, num_workers=3)
    with pytest.raises(TrainError, match=r"STRICT_SPREAD puts each of the 3 workers on its own node, but only 2"):
        train(cfg, progress=False)


def test_a_worker_node_killed_mid_run_resumes_from_the_checkpoint_with_the_same_z(
    three_nodes, uninterrupted, learn_task, tmp_path
):
    reference, ref_outcome = uninterrupted
    # SPREAD: one worker per node while there are two; after the loss both fit on the surviving node (trainer: 2)
    cfg = spread_config(tmp_path / "shared", learn_task, "node-loss", placement_strategy="SPREAD")
    events: dict[str, float] = {}

    def kill_a_node_after_the_first_checkpoint() -> bool:
        if checkpoint_registered(cfg.run_dir):
            rank1 = next(p for p in placements(cfg.run_dir) if p["rank"] == 1)
            events["killed"] = three_nodes.kill(three_nodes.node_of(rank1["node_id"]))
        return "killed" in events

    outcome = while_watching(lambda: train(cfg, progress=False), kill_a_node_after_the_first_checkpoint)
    assert "killed" in events, "no node was killed (the run ended before its first checkpoint was registered?)"

    placed = placements(cfg.run_dir)
    restarted = [p for p in placed if p["resumed_at"] > 0]
    assert len(placed) == 4 and len(restarted) == 2, placed  # one worker group, then one restart
    assert len({p["node_id"] for p in placed if p["resumed_at"] == 0}) == 2, placed  # spread over both nodes
    assert len({p["node_id"] for p in restarted}) == 1, placed  # then both on the surviving node
    resumed_at = restarted[0]["resumed_at"]
    assert resumed_at % INTERVAL == 0, placed
    iterations = [m["iteration"] for m in logged(cfg.run_dir)]
    assert set(iterations) == set(range(1, 16)) and iterations.count(1) == 1, iterations
    redone = len(iterations) - len(set(iterations))
    assert redone <= INTERVAL, f"{redone} iterations redone: {iterations}"

    # The same seed from the same checkpoint: the z of the run that lost a node is the uninterrupted run's z.
    ours, theirs = load_file(outcome.expert_path), load_file(ref_outcome.expert_path)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name

    recovery = {
        "node_killed_to_workers_restarted_s": round(min(p["time"] for p in restarted) - events["killed"], 1),
        "resumed_from_iteration": resumed_at,
        "iterations_redone": redone,
    }
    print(f"\nnode loss during training: {recovery}")
    (tmp_path / "recovery.json").write_text(json.dumps(recovery))


def test_the_driver_killed_then_the_same_command_resumes(three_nodes, learn_task, tmp_path):
    """`t2ray train` SIGKILLed after the first checkpoint (its Train controller and workers go with it); the same
    command, typed again, continues from that checkpoint."""
    cfg = spread_config(tmp_path / "shared", learn_task, "driver-killed", placement_strategy="SPREAD")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    command = [
        str(Path(sys.executable).with_name("t2ray")),
        "train",
        str(experiment),
        "--address",
        three_nodes.cluster.address,
    ]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if checkpoint_registered(cfg.run_dir):
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the run ended before its first checkpoint was registered"
    driver.kill()
    driver.wait()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    placed = placements(cfg.run_dir)
    assert placed[-1]["resumed_at"] >= INTERVAL, placed  # the second driver's workers started from the checkpoint
    iterations = [m["iteration"] for m in logged(cfg.run_dir)]
    assert set(iterations) == set(range(1, 16)) and iterations.count(1) == 1, iterations
