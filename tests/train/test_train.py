"""`t2ray.train` on a real local Ray cluster: 2 DeepSpeed workers training tiny-llama on a learnable task.

Covers ZeRO-2, ZeRO-3 (weights partitioned, z whole), LoRA through the same loop, resume of a stopped run,
a worker SIGKILLed mid-run, the refusals that must come before anything starts, and the SVDs as Ray tasks.
One cluster for the whole module (starting one costs seconds on 2 shared cores).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ray_env import checkpoint_registered, interrupted_once, logged, while_watching
from rl.learnable import LEARNABLE_RL, mean, rewards, write_learnable_task
from safetensors.torch import load_file

from t2ray.config import ExperimentConfig, deep_merge
from t2ray.experts import expert_info, load_expert
from t2ray.svf import model_fingerprint, select_targets
from t2ray.svf.decompose import svd_cache_dir, svd_factors
from t2ray.train import TrainError, train
from t2ray.train.decompose import decompose_distributed, missing_targets

# the module, not the function the package re-exports under the same name
decompose_mod = importlib.import_module("t2ray.svf.decompose")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def learn_task(tmp_path_factory) -> Path:
    return write_learnable_task(tmp_path_factory.mktemp("task"))


def make_config(tmp_path: Path, task: Path, name: str, **overrides) -> ExperimentConfig:
    base = {
        "name": name,
        "task": str(task),
        "seed": 0,
        "method": "svf",
        "model": {"spec": "tiny-llama"},
        "svf": {"target_modules": "mlp"},
        "rl": {
            **LEARNABLE_RL,
            "iterations": 20,
            "batch_size": 8,
            "eval_interval": 10,
            "eval_limit": 4,
            "eval_batch_size": 4,
        },
        "deepspeed": {"enabled": True, "zero_stage": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"wandb": False},
        "storage_path": str(tmp_path / "runs"),
        "max_failures": 0,
        "checkpoint_keep": 2,
    }
    return ExperimentConfig.model_validate(deep_merge(base, overrides))


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Ray Train's checkpoint folders under the run, by the iteration their state.json records."""
    out = {}
    for folder in run_dir.glob("checkpoint_*"):
        state = folder / "state.json"
        if state.exists():
            out[json.loads(state.read_text())["iteration"]] = folder
    return out


def assert_learned(history: list[dict], margin: float = 0.5) -> None:
    r = rewards(history)
    first, last = mean(r[:5]), mean(r[-5:])
    assert last - first >= margin, f"reward did not go up: first 5 {first:+.2f}, last 5 {last:+.2f}: {r}"


def assert_svf_expert(outcome, cfg: ExperimentConfig, tiny_base) -> dict:
    from t2ray.svf import base_model_info

    assert outcome.expert_path == cfg.run_dir / "expert.safetensors" and outcome.expert_path.exists()
    meta = expert_info(outcome.expert_path)
    assert meta["name"] == cfg.name and meta["task"] == cfg.task
    assert meta["metrics"]["iterations"] == cfg.rl.iterations
    assert meta["metrics"]["z_rank_spread"] == 0.0  # both ranks ended with identical z
    assert meta["training"]["deepspeed"]["zero_stage"] == cfg.deepspeed.zero_stage
    # trained on the untouched tiny-llama (seed 0): the expert loads onto it, one 64-vector per MLP matrix
    expert = load_expert(outcome.expert_path, base_model_info(tiny_base[0]))
    assert len(expert.params) == 6 and all(p.shape == (64,) for p in expert.params.values())
    assert max(float((p - 0.1).abs().max()) for p in expert.params.values()) > 0.5  # z moved off its init
    return meta


# ---------------------------------------------------------------- ZeRO-2, stopped after 10 iterations and resumed


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, learn_task, tmp_path_factory):
    """ZeRO-2 on 2 workers: 10 iterations, the driver returns (stopped); the same name + storage_path with 20
    iterations resumes from the checkpoint at 10. A negligible kl_coef makes every iteration report
    KL(base‖π), a measure of how far z is from the base model, to check that z carried over."""
    tmp = tmp_path_factory.mktemp("zero2")
    rl = {"eval_interval": 5, "kl_coef": 1e-6}
    first = make_config(tmp, learn_task, "zero2", rl={**rl, "iterations": 10})
    train(first)
    rows = logged(first.run_dir)
    second = make_config(tmp, learn_task, "zero2", rl={**rl, "iterations": 20})
    outcome = train(second)
    return second, rows, outcome


def test_zero2_two_workers_learn(zero2_run, tiny_base):
    cfg, _, outcome = zero2_run
    assert [m["iteration"] for m in outcome.history] == list(range(1, 21))
    assert_learned(outcome.history)
    assert_svf_expert(outcome, cfg, tiny_base)
    assert all(m["samples"] == 4 for m in outcome.history)  # each worker: half the batch of 8
    assert [m["iteration"] for m in outcome.history if "valid_accuracy" in m] == [5, 10, 15, 20]
    assert (cfg.run_dir / "learning_curve.png").exists() and (cfg.run_dir / "config.yaml").exists()
    ckpts = checkpoints(cfg.run_dir)
    assert sorted(ckpts) == [15, 20]  # checkpoint_keep: 2
    for name in ("adapter.safetensors", "optimizer.safetensors", "state.json"):
        assert (ckpts[20] / name).exists(), name
    moments = load_file(ckpts[20] / "optimizer.safetensors")
    step = moments.pop("step")
    assert float(step) == 20  # 10 steps, resumed at Adam's step 10 (not 1), 10 more
    assert {k.split(".")[0] for k in moments} == {"exp_avg", "exp_avg_sq"} and len(moments) == 12
    assert all(t.shape == (64,) for t in moments.values())  # whole moments, not a rank's shard


def test_resume_after_the_driver_stopped(zero2_run):
    cfg, first_rows, outcome = zero2_run
    assert [m["iteration"] for m in first_rows] == list(range(1, 11))
    new_rows = logged(cfg.run_dir)[len(first_rows) :]
    assert new_rows, "the resumed run logged nothing"
    assert new_rows[0]["iteration"] == 11, [m["iteration"] for m in new_rows]  # did not restart from 1
    assert [m["iteration"] for m in new_rows] == list(range(11, 21))
    assert expert_info(outcome.expert_path)["metrics"]["iterations"] == 20
    # z carried over (and DeepSpeed's own fp32 copy of it): right after the resume the policy is as far from
    # the base model as before the stop, not back at the initial z
    kl = {m["iteration"]: m["kl"] for m in outcome.history}
    assert kl[10] > 100 * abs(kl[1]), kl
    for it in (11, 12, 13):
        assert kl[it] > 0.2 * kl[10], kl


def test_ctrl_c_exits_130_and_the_same_command_resumes(ray_cluster, learn_task, tmp_path):
    """`t2ray train` stopped with Ctrl-C once a checkpoint is registered: exit 130 and one line saying how to go on
    (Ray Train's own handler used to end the driver with exit 1 and nothing said); the same config then resumes."""
    # 40 iterations of ~0.2 s: the stop lands mid-run even on a fast machine (with 12, CI's run had finished)
    iterations = 40
    cfg = make_config(tmp_path, learn_task, "ctrl-c", rl={"iterations": iterations, "eval_interval": 2})
    path = tmp_path / "ctrl-c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    cli = Path(sys.executable).with_name("t2ray")
    gcs = ray_cluster.get_runtime_context().gcs_address
    command = [str(cli), "train", str(path), "--address", gcs]
    code, err = interrupted_once(command, lambda: checkpoint_registered(cfg.run_dir), timeout=180)
    assert code == 130, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and "run the same command again to resume" in said[0], err[-3000:]
    stopped_at = logged(cfg.run_dir)[-1]["iteration"]
    assert stopped_at < iterations
    outcome = train(cfg)
    assert [m["iteration"] for m in outcome.history] == list(range(1, iterations + 1))
    resumed = [json.loads(line) for line in (cfg.run_dir / "workers.jsonl").read_text().splitlines()]
    assert max(r["resumed_at"] for r in resumed) >= 2  # from a checkpoint, not from the start


# ---------------------------------------------------------------- ZeRO-3, a worker SIGKILLed mid-run


def _train_workers() -> list:
    """This cluster's RayTrainWorker processes (descendants of this driver: never another user's)."""
    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def zero3_killed_run(ray_cluster, learn_task, tmp_path_factory):
    """ZeRO-3 on 2 workers (threshold 1000: every tiny-llama weight, ≥ 4096 values, is partitioned; each z,
    64 values, stays whole). Once the first checkpoint is registered a helper thread SIGKILLs one RayTrainWorker;
    with max_failures 1 the run must restart from that checkpoint and finish."""
    tmp = tmp_path_factory.mktemp("zero3")
    cfg = make_config(
        tmp,
        learn_task,
        "zero3",
        max_failures=1,
        rl={"eval_interval": 5},
        deepspeed={"zero_stage": 3, "param_persistence_threshold": 1000},
    )
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> bool:
        workers = _train_workers() if checkpoint_registered(cfg.run_dir) else []
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.append(workers[-1].pid)
        return bool(workers)

    outcome = while_watching(lambda: train(cfg), kill_a_worker_after_the_first_checkpoint, interval=0.02)
    return cfg, outcome, killed


def test_zero3_two_workers_learn(zero3_killed_run, tiny_base):
    cfg, outcome, _ = zero3_killed_run
    assert [m["iteration"] for m in outcome.history] == list(range(1, 21))
    assert_learned(outcome.history)
    assert_svf_expert(outcome, cfg, tiny_base)
    moments = load_file(checkpoints(cfg.run_dir)[20] / "optimizer.safetensors")
    assert float(moments.pop("step")) == 20  # Adam's count survived the killed worker's restart
    assert len(moments) == 12 and all(t.shape == (64,) for t in moments.values())


def test_worker_killed_mid_run_restarts_from_the_checkpoint(zero3_killed_run):
    cfg, outcome, killed = zero3_killed_run
    assert killed, "no RayTrainWorker was killed (the run ended before a checkpoint appeared?)"
    assert outcome.expert_path.exists()
    assert expert_info(outcome.expert_path)["metrics"]["iterations"] == 20
    iterations = [m["iteration"] for m in logged(cfg.run_dir)]
    assert iterations.count(1) == 1, f"training restarted from scratch: {iterations}"
    assert set(iterations) == set(range(1, 21))
    # the new worker group started right after a checkpoint (5, 10, 15), not from 1
    restarts = [i + 1 for i in range(len(iterations) - 1) if iterations[i + 1] <= iterations[i]]
    assert all(iterations[i] - 1 in (5, 10, 15) for i in restarts), iterations
    # an iteration done again after the restart samples with the same seed from the same restored z: same reward
    rows = logged(cfg.run_dir)
    for i in restarts:
        first_time = next(m for m in rows[:i] if m["iteration"] == rows[i]["iteration"])
        assert rows[i]["reward"] == first_time["reward"], (rows[i], first_time)


# ---------------------------------------------------------------- LoRA through the same loop


def test_lora_through_the_same_loop(ray_cluster, learn_task, tmp_path, tiny_base):
    import copy

    from t2ray.lora import LORA_META_FILE, load_lora_expert

    cfg = make_config(
        tmp_path,
        learn_task,
        "lora",
        method="lora",
        lora={"r": 2, "alpha": 4},
        rl={"iterations": 4, "eval_interval": 2, "lr": 0.01},
    )
    outcome = train(cfg)
    assert outcome.expert_path == cfg.run_dir / "expert" and outcome.expert_path.is_dir()
    meta = json.loads((outcome.expert_path / LORA_META_FILE).read_text())
    assert meta["kind"] == "t2ray-lora-expert" and meta["metrics"]["iterations"] == 4
    assert meta["metrics"]["z_rank_spread"] == 0.0  # the same consistency check for LoRA weights
    assert [m["iteration"] for m in outcome.history] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in outcome.history)
    peft = load_lora_expert(copy.deepcopy(tiny_base[0]), outcome.expert_path)
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # B starts at 0: it trained


# ---------------------------------------------------------------- refusals before anything starts


def test_more_workers_than_cpus_is_refused_before_anything_starts(ray_cluster, learn_task, tmp_path):
    cfg = make_config(tmp_path, learn_task, "too-many", scaling={"num_workers": 3}, rl={"batch_size": 6})
    with pytest.raises(TrainError, match=r"3 workers need 3 CPUs but the cluster has 2"):
        train(cfg)
    assert not cfg.run_dir.exists()
    cfg = make_config(tmp_path, learn_task, "too-fat", scaling={"num_workers": 2, "cpus_per_worker": 1.5})
    with pytest.raises(TrainError, match=r"need 3 CPUs"):
        train(cfg)
    assert not cfg.run_dir.exists()


def test_task_without_a_training_split_is_refused(ray_cluster, tmp_path):
    task = write_learnable_task(tmp_path / "task", name="no-train", train_split=False)
    cfg = make_config(tmp_path, task, "no-train")
    with pytest.raises(TrainError, match="has no training split"):
        train(cfg)
    assert not cfg.run_dir.exists()


# ---------------------------------------------------------------- the SVDs as Ray tasks (t2ray.train.decompose)


def test_two_ray_tasks_fill_the_cache_a_local_decompose_hits(ray_cluster, tiny, tmp_path, monkeypatch, torch_threads):
    monkeypatch.setenv("T2RAY_CACHE", str(tmp_path / "cache"))  # an empty cache (svd_cache_dir reads it)
    fingerprint = model_fingerprint(tiny)
    targets = select_targets(tiny, "all")
    folder = svd_cache_dir(fingerprint, torch.float32)
    assert folder.is_relative_to(tmp_path / "cache")
    assert not folder.exists()

    summary = decompose_distributed(tiny, "all", None, fingerprint=fingerprint, workers=2)
    assert summary == {"matrices": 14, "computed": 14, "cache": str(folder)}
    assert sorted(p.stem for p in folder.glob("*.safetensors")) == sorted(targets)
    assert not list(folder.glob("*.tmp*"))  # atomic writes only

    # a local decompose is now a pure cache hit: it never computes an SVD, and returns the stored tensors
    def no_svd(*args, **kwargs):
        raise AssertionError("local decompose recomputed an SVD instead of reading the cache")

    monkeypatch.setattr(decompose_mod, "svd_factors", no_svd)
    cached = decompose_mod.decompose(tiny, targets, fingerprint=fingerprint, progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("T2RAY_CACHE", str(tmp_path / "cache"))

    modules = dict(tiny.named_modules())
    for name in targets:
        local = svd_factors(modules[name].weight)  # what a local run would have computed
        assert cached[name].q.shape == local.q.shape and cached[name].s.shape == local.s.shape
        # same LAPACK call on the same weights (1 thread here, as in the 1-CPU Ray task)
        torch.testing.assert_close(cached[name].s, local.s, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(cached[name].q, local.q, rtol=0, atol=1e-5, msg=name)

    # and a second distributed run has nothing to do
    again = decompose_distributed(tiny, "all", None, fingerprint=fingerprint, workers=2)
    assert again["computed"] == 0


def test_distributed_resumes_matrix_by_matrix(ray_cluster, tiny, tmp_path, monkeypatch):
    """An interrupted run left some matrices: only the missing ones are computed."""
    monkeypatch.setenv("T2RAY_CACHE", str(tmp_path / "cache"))
    fingerprint = model_fingerprint(tiny)
    mlp = select_targets(tiny, "mlp")
    decompose_mod.decompose(tiny, mlp[:2], fingerprint=fingerprint, progress=False)  # a partial local run
    summary = decompose_distributed(tiny, "mlp", None, fingerprint=fingerprint, workers=2)
    assert summary["matrices"] == 6 and summary["computed"] == 4
    assert missing_targets(tiny, mlp, svd_cache_dir(fingerprint, torch.float32)) == []
