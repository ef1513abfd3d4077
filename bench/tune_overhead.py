"""Ray Tune sweep overhead on tiny-llama, and what ASHA saves over FIFO.

    .venv/bin/python bench/tune_overhead.py [--trials 3] [--iterations 6] [--no-write]

1. Overhead per trial: the same RL experiment (1 Ray Train worker, DeepSpeed ZeRO-2 on CPU) timed as plain work
   in one process (load model, SVF patch, the loop with its evaluations), then as trials of a FIFO sweep run one
   at a time; overhead = sweep wall time per trial − the plain work.
2. ASHA vs FIFO: one sweep (temperature × lr × model seed, 8 trials) run with each scheduler; trial-iterations
   used (Σ over trials of the iterations Tune saw), and the best trial and score each found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from common import command_line, publish, stamp  # noqa: E402

WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "rock",
    "fish",
    "bird",
    "rain",
    "star",
    "moon",
    "leaf",
    "wind",
    "fire",
    "snow",
    "sand",
    "wave",
]


def write_files(root: Path, iterations: int) -> Path:
    """The has-e task (tests/rl/learnable.py) and a 1-worker tiny-llama experiment on it."""
    rows = [{"prompt": f"Say a word about the {w} number {i}.", "answer": "e"} for i in range(8) for w in WORDS]
    (root / "has-e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "has-e.yaml").write_text(
        "name: has-e\ndata: has-e.jsonl\ngrader: regex\npattern: '(e)'\n"
        "max_new_tokens: 3\nsplits: {train: 0.75, valid: 0.125, test: 0.125}\n"
    )
    exp = {
        "name": "bench",
        "task": str(root / "has-e.yaml"),
        "model": {"spec": "tiny-llama"},
        "rl": {
            "iterations": iterations,
            "batch_size": 8,
            "temperature": 1.0,
            "lr": 0.3,
            "baseline": "none",
            "grad_clip": 1.0,
            "max_new_tokens": 3,
            "eval_interval": max(1, iterations // 2),
            "eval_limit": 8,
        },
        "scaling": {"num_workers": 1},
        "tracking": {"wandb": False},
        "storage_path": str(root / "runs"),
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def sweep_file(root: Path, name: str, space: dict, **fields) -> Path:
    data = {
        "name": name,
        "kind": "rl",
        "base": "bench.yaml",
        "space": space,
        "metric": "reward",
        "mode": "max",
        "storage_path": str(root / "sweeps"),
        "wandb": False,
        **fields,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def plain_work(experiment: Path) -> tuple[float, float]:
    """(load + patch seconds, loop seconds) of the experiment in this process, no Ray."""
    import torch

    from t2ray.config import load_experiment
    from t2ray.models import load_model
    from t2ray.rl.loop import Stepper, train_loop
    from t2ray.rl.trainable import SVFAdapter
    from t2ray.tasks import get_task

    torch.set_num_threads(1)  # as a Ray Train worker with cpus_per_worker 1
    cfg = load_experiment(experiment)
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model.spec, seed=cfg.seed)
    adapter = SVFAdapter(model, cfg.svf, progress=False)
    t1 = time.perf_counter()
    train_loop(
        cfg, model, tokenizer, get_task(cfg.task), adapter, Stepper(adapter.parameters(), cfg.rl.lr, cfg.rl.grad_clip)
    )
    return t1 - t0, time.perf_counter() - t1


def first_report_s(outcome) -> list[float]:
    """Per trial: seconds from the trial function's start to its first reported iteration."""
    out = []
    for t in outcome.trials:
        progress = Path(outcome.sweep_dir) / "tune"
        for result in progress.glob(f"*{t['trial_id']}*/result.json"):
            first = json.loads(result.read_text().splitlines()[0])
            out.append(float(first["time_total_s"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3, help="trials of the overhead sweep (run one at a time)")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import ray

    from t2ray.tune import load_sweep, run_sweep

    root = Path(tempfile.mkdtemp(prefix="t2ray-tune-bench-"))
    experiment = write_files(root, args.iterations)
    load_s, loop_s = plain_work(experiment)
    load_s2, loop_s2 = plain_work(experiment)  # second run: caches warm, as in the trials
    load_s, loop_s = min(load_s, load_s2), min(loop_s, loop_s2)
    work = load_s + loop_s

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fifo1 = sweep_file(
            root, "overhead", {"rl.lr": {"grid": [0.3 * 0.5**i for i in range(args.trials)]}}, max_concurrent_trials=1
        )
        start = time.perf_counter()
        overhead = run_sweep(load_sweep(fifo1))
        per_trial = (time.perf_counter() - start) / args.trials
        first = first_report_s(overhead)
        tune_total = [t["seconds"] for t in overhead.trials]

        space = {"rl.temperature": {"grid": [1.0, 0.05]}, "rl.lr": {"grid": [0.3, 0.03]}, "seed": {"grid": [0, 1]}}
        runs = {}
        for scheduler in ("fifo", "asha"):
            sched = (
                {"type": "fifo"} if scheduler == "fifo" else {"type": "asha", "grace_period": 1, "reduction_factor": 2}
            )
            path = sweep_file(
                root, f"cmp-{scheduler}", space, scheduler=sched, scope="last-5-avg", max_concurrent_trials=2
            )
            t0 = time.perf_counter()
            outcome = run_sweep(load_sweep(path))
            runs[scheduler] = (outcome, time.perf_counter() - t0)
    finally:
        ray.shutdown()

    def used(outcome) -> int:
        return sum(t["iterations"] for t in outcome.trials)

    def best(outcome) -> str:
        b = outcome.best
        cfg = ", ".join(f"{k.removeprefix('config/')}={v}" for k, v in b.items() if k.startswith("config/"))
        return f"{b['reward']:+.3f} ({cfg})"

    fifo, asha = runs["fifo"][0], runs["asha"][0]
    ratio = used(asha) / used(fifo)
    same_score = abs(fifo.best["reward"] - asha.best["reward"]) < 1e-9
    same_config = best(fifo).split(" (", 1)[1] == best(asha).split(" (", 1)[1]
    load = os.getloadavg()[0]
    first_s = sum(first) / max(1, len(first))
    text = f"""`{command_line()}` — {stamp()}

tiny-llama (random 2-layer Llama, SmolLM2 tokenizer), the has-e task (tests/rl/learnable.py), batch 8, 3 new
tokens, {args.iterations} iterations with 2 evaluations (8 valid items); each trial = one Ray Train run, 1 worker,
DeepSpeed ZeRO-2 on CPU (gloo), checkpoint at each evaluation. Local Ray, 2 CPUs, 2 cores shared with other
work (load average {load:.1f} at the end: timings are inflated accordingly, ratios less so). Ray
{ray.__version__}.

**Overhead per trial** (FIFO sweep of {args.trials} trials, one at a time):

| | seconds |
|---|---:|
| plain work in one process: load tiny-llama + SVF patch | {load_s:.1f} |
| plain work in one process: {args.iterations} iterations + evaluations | {loop_s:.1f} |
| **plain work (the training itself)** | **{work:.1f}** |
| Tune trial, end to end (sweep wall time ÷ trials) | {per_trial:.1f} |
| … of which the trial function ran (Tune's time_total_s, mean) | {sum(tune_total) / len(tune_total):.1f} |
| … trial start → first iteration reported (Train controller, worker, DeepSpeed, model; mean) | {first_s:.1f} |
| **Tune + Train overhead per trial** | **{per_trial - work:.1f}** |

The plain work runs in an interpreter that has already imported torch/transformers/DeepSpeed; a trial starts
fresh processes (Tune trial actor, metrics queue, Train controller, worker) that import them, then DeepSpeed
initialises gloo — that, not the per-iteration reporting (≈ 0.1 s with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1),
is the overhead, and it is fixed per trial: it matters for 6 tiny iterations, not for a SmolLM2 trial of
minutes.

**ASHA vs FIFO** (same sweep: temperature {{1.0, 0.05}} × lr {{0.3, 0.03}} × model seed {{0, 1}} = 8 trials,
metric mean reward of the last 5 iterations, 2 trials at a time; ASHA grace 1, reduction factor 2):

| scheduler | trial-iterations used | trials stopped early | wall time (s) | best trial (score, config) |
|---|---:|---:|---:|---|
| FIFO | {used(fifo)} | {sum(t["stopped_early"] for t in fifo.trials)} | {runs["fifo"][1]:.0f} | {best(fifo)} |
| ASHA | {used(asha)} | {sum(t["stopped_early"] for t in asha.trials)} | {runs["asha"][1]:.0f} | {best(asha)} |

ASHA ÷ FIFO trial-iterations: **{ratio:.2f}**; best score equal: {same_score}; same best configuration:
{same_config}. Wall time shrinks less than iterations because each trial's fixed start-up cost (above) is paid by
stopped trials too.
"""
    publish("tune_overhead", text, not args.no_write)


if __name__ == "__main__":
    main()
