"""Short training recipes for the demo's experts: train each, then greedy accuracy on the held-out test split.

    .venv/bin/python bench/expert_recipes.py "math svf rl.iterations=10 rl.batch_size=16 rl.lr=4e-3" \\
        "code svf rl.iterations=8 rl.batch_size=8 rl.lr=6e-3" [--limit 128] [--root runs/bench-recipes]

Each argument is `TASK METHOD OVERRIDE...`: `t2ray train experiments/smollm2-TASK.yaml --set method=METHOD
--set OVERRIDE...` (2 workers, ZeRO-2, the YAML's recipe otherwise), timed end to end, then the expert answers the
first --limit test items greedily. Prints one markdown row per recipe with the base model's accuracy beside it;
a recipe already on disk under --root is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, stamp  # noqa: E402

from t2ray.config import load_experiment  # noqa: E402
from t2ray.evaluate import evaluate  # noqa: E402
from t2ray.library import load_adapted  # noqa: E402
from t2ray.tasks import get_task  # noqa: E402
from t2ray.train import train  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def accuracy(task: str, expert: Path | None, limit: int) -> float:
    model, tokenizer, label = load_adapted("smollm2-135m", expert=expert)
    return evaluate(model, tokenizer, get_task(task), limit=limit, adapter=label, progress=False).accuracy


def run(spec: str, root: Path, limit: int) -> dict:
    task, method, *overrides = spec.split()
    name = f"{task}-{method}-{hashlib.md5(spec.encode()).hexdigest()[:8]}"
    record = root / name / "recipe.json"
    if record.exists():
        return json.loads(record.read_text())
    cfg = load_experiment(
        EXPERIMENTS / f"smollm2-{task}.yaml",
        [f"name={name}", f"method={method}", f"storage_path={root}", "tracking.wandb=false", *overrides],
    )
    start = time.perf_counter()
    outcome = train(cfg)
    result = {
        "spec": spec,
        "minutes": (time.perf_counter() - start) / 60,
        "accuracy": accuracy(task, outcome.expert_path, limit),
    }
    record.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help='"TASK METHOD OVERRIDE..." (quote each recipe)')
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--root", type=Path, default=Path("runs/bench-recipes"))
    args = parser.parse_args()
    print(f"`{command_line()}` — {stamp()}, load average {os.getloadavg()[0]:.2f} at start\n")
    base = {}
    print("| task | method | overrides | wall min (`t2ray train`) | test accuracy | Δ vs base (points) |")
    print("|---|---|---|---:|---:|---:|")
    for spec in args.recipes:
        task, method, *overrides = spec.split()
        if task not in base:
            base[task] = accuracy(task, None, args.limit)
        r = run(spec, args.root.resolve(), args.limit)
        print(
            f"| {task} | {method} | {' '.join(overrides)} | {r['minutes']:.1f} | {r['accuracy']:.1%} | "
            f"{100 * (r['accuracy'] - base[task]):+.1f} |",
            flush=True,
        )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
