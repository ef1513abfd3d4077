"""SVF vs LoRA at equal budget on the math task, in one or more compute dtypes, several seeds, held-out accuracy.

    .venv/bin/python bench/train_math.py [--seeds 0 1] [--methods svf lora] [--dtypes auto float32] [--limit 128]

Each run is `t2ray train experiments/smollm2-math.yaml --set seed=S --set method=M --set model.dtype=D`
(2 workers, ZeRO-2, the YAML's budget; LoRA r=16 on the same MLP matrices with lr 2e-4, everything else equal),
timed end to end (Ray start-up, training, validation, checkpoints). Then the base model and every expert
answer the first --limit items of the held-out test split greedily (in the compute dtype `auto` picks, for
every expert alike). Runs and evaluations already on disk under --root are reused, so a bench resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, publish, stamp  # noqa: E402

from t2ray.config import load_experiment  # noqa: E402
from t2ray.evaluate import evaluate  # noqa: E402
from t2ray.library import load_adapted  # noqa: E402
from t2ray.models import compute_dtype  # noqa: E402
from t2ray.tasks import get_task  # noqa: E402
from t2ray.train import train  # noqa: E402

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "smollm2-math.yaml"
METHOD_OVERRIDES = {"svf": [], "lora": ["rl.lr=2e-4"]}


def timed_training(root: Path, method: str, seed: int, dtype: str) -> tuple[Path, float, dict]:
    cfg = load_experiment(
        EXPERIMENT,
        [
            f"name=math-{method}-{dtype}-s{seed}",
            f"seed={seed}",
            f"method={method}",
            f"model.dtype={dtype}",
            f"storage_path={root}",
            *METHOD_OVERRIDES[method],
        ],
    )
    record = cfg.run_dir / "bench_timing.json"
    if record.exists():
        saved = json.loads(record.read_text())
        return Path(saved["expert"]), saved["minutes"], saved["last"]
    start = time.perf_counter()
    outcome = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    last = outcome.history[-1] if outcome.history else {}
    record.write_text(json.dumps({"expert": str(outcome.expert_path), "minutes": minutes, "last": last}))
    return outcome.expert_path, minutes, last


def trained_values(expert: Path) -> int:
    """Numbers the expert trains: z-vectors (SVF file) or the LoRA A/B matrices (PEFT folder)."""
    from safetensors import safe_open

    with safe_open(str(expert / "adapter_model.safetensors" if expert.is_dir() else expert), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def test_accuracy(root: Path, label: str, expert: Path | None, limit: int) -> float:
    out = root / f"test-{label}.json"
    if not out.exists():
        model, tokenizer, adapter = load_adapted("smollm2-135m", expert=expert)
        evaluate(model, tokenizer, get_task("math"), limit=limit, adapter=adapter).save(out)
    return json.loads(out.read_text())["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=["svf", "lora"], choices=sorted(METHOD_OVERRIDES))
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["auto"],
        choices=["auto", "float32", "bfloat16"],
        help="training compute dtypes (auto: bf16 where native)",
    )
    ap.add_argument("--limit", type=int, default=128, help="held-out test items (the split has 128)")
    ap.add_argument("--root", type=Path, default=Path("runs/bench-train-math"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)

    base = test_accuracy(root, "base", None, args.limit)
    rows = [f"| base | — | — | — | {base:.1%} | — | — |"]
    gains: dict[str, list[float]] = {}
    minutes_by: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    load_start = os.getloadavg()[0]
    for method in args.methods:
        for dtype in args.dtypes:
            key = f"{method} {compute_dtype(dtype)}"
            for seed in args.seeds:
                expert, minutes, last = timed_training(root, method, seed, dtype)
                acc = test_accuracy(root, f"{method}-{dtype}-s{seed}", expert, args.limit)
                gains.setdefault(key, []).append(acc - base)
                minutes_by.setdefault(key, []).append(minutes)
                sizes[method] = trained_values(expert)
                s_per_it = last.get("seconds", float("nan"))
                rows.append(
                    f"| {method} | {compute_dtype(dtype)} | {seed} | {minutes:.1f} | {acc:.1%} | "
                    f"{100 * (acc - base):+.1f} | {s_per_it:.1f} |"
                )
                print(rows[-1], flush=True)
    means = "; ".join(
        f"{k}: {100 * sum(g) / len(g):+.1f} points in {sum(minutes_by[k]) / len(g):.1f} min "
        f"({sizes[k.split()[0]]:,} trained values)"
        for k, g in gains.items()
    )
    rl = load_experiment(EXPERIMENT).rl
    text = f"""`{command_line()}` — {stamp()}, load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end

`t2ray train experiments/smollm2-math.yaml --set seed=S --set method=M --set model.dtype=D` (2 Ray Train workers
× 1 CPU, DeepSpeed ZeRO-2, {rl.iterations} iterations × {rl.batch_size} prompts × {rl.samples_per_prompt} samples,
temperature {rl.temperature}, {rl.baseline} baseline; LoRA r=16 α=32 on the same MLP matrices, lr 2e-4), then
greedy accuracy on the first {args.limit} items of the held-out math test split (evaluated in
{compute_dtype("auto")} for every expert).

| method | train dtype | seed | wall min (`t2ray train`) | test accuracy | Δ vs base (points) | s / iteration (last) |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Mean over seeds — {means}.
"""
    publish("train_smollm2_math", text, not args.no_write)


if __name__ == "__main__":
    main()
