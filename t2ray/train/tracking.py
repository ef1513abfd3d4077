"""Rank-0 tracking: metrics.jsonl, a learning-curve PNG, and wandb (offline unless WANDB_MODE says otherwise)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def plot_learning_curve(history: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [m["iteration"] for m in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot(its, [m["accuracy"] for m in history], label="train accuracy (rollouts)", alpha=0.6)
    evals = [m for m in history if "valid_accuracy" in m]
    ax.plot([m["iteration"] for m in evals], [m["valid_accuracy"] for m in evals], "o-", label="valid accuracy")
    ax.set(xlabel="iteration", ylabel="accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class Tracker:
    def __init__(self, run_dir: Path, name: str, config: dict, use_wandb: bool, project: str):
        self.run_dir = run_dir
        self.metrics_file = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if use_wandb:
            import wandb

            self.wandb_run = wandb.init(
                project=project,
                name=name,
                id=f"{name}-{hashlib.md5(str(run_dir).encode()).hexdigest()[:8]}",
                dir=str(run_dir),
                config=config,
                resume="allow",
                mode=os.environ.get("WANDB_MODE", "offline"),
            )

    def log(self, metrics: dict) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=int(metrics["iteration"]))

    def finish(self, history: list[dict], title: str) -> None:
        if history:
            plot_learning_curve(history, self.run_dir / "learning_curve.png", title)
        if self.wandb_run is not None:
            self.wandb_run.finish()
