"""Two-pass inference cost on SmolLM2-135M-Instruct: pass-1 ÷ pass-2 time per strategy, and CEM wall time with
2 Ray actors ÷ 1 actor.

    .venv/bin/python bench/two_pass.py [--experts DIR] [--limit 16] [--no-write]

Experts: DIR/svf-{math,code,reasoning}/expert.safetensors (+ svf-cls) when given (e.g. runs/quickstart), else
random small perturbations of z (timing does not depend on what the experts learned; the output says which).
Token-level routing vs a fixed expert is measured by bench/token_routing.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import command_line, publish, stamp  # noqa: E402

from t2ray.adapt.two_pass import run_adapt  # noqa: E402
from t2ray.config import AdaptConfig  # noqa: E402
from t2ray.experts import Expert, save_expert  # noqa: E402
from t2ray.models import load_model  # noqa: E402
from t2ray.svf import base_model_info, patch_model, trainable_params  # noqa: E402


def random_library(folder: Path) -> dict[str, str]:
    model, _ = load_model("smollm2-135m")
    patch_model(model, progress=False)
    info = base_model_info(model)
    g = torch.Generator().manual_seed(0)
    paths = {}
    for task in ("math", "code", "reasoning", "cls"):
        params = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in trainable_params(model).items()}
        paths[task] = str(
            save_expert(
                Expert(
                    name=f"random-{task}",
                    params=params,
                    base_model=info.model_id,
                    fingerprint=info.fingerprint,
                    task=task,
                ),
                folder / f"{task}.safetensors",
            )
        )
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=Path, default=None)
    ap.add_argument("--task", default="math-hard")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.experts:
            paths = {
                t: str(args.experts / f"svf-{t}" / "expert.safetensors") for t in ("math", "code", "reasoning", "cls")
            }
            source = f"trained experts from {args.experts}"
        else:
            paths, source = random_library(Path(tmp)), "random z perturbations (timing only)"
        base = dict(
            task=args.task,
            model={"spec": "smollm2-135m"},
            limit=args.limit,
            experts=[paths[t] for t in ("math", "code", "reasoning")],
            classifier_expert=paths["cls"],
        )
        rows = []
        for strategy, mode in (("prompt", "score"), ("prompt", "generate"), ("classifier", "score")):
            r = run_adapt(AdaptConfig(strategy=strategy, classify_mode=mode, **base), progress=False)
            rows.append(f"| {strategy} ({mode}) | {r.pass1_s:.2f} | {r.pass2_s:.2f} | {r.pass1_s / r.pass2_s:.1%} |")
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        cem = dict(population=8, generations=2, shots=4)
        walls = {}
        for actors in (1, 2):
            cfg = AdaptConfig(strategy="fewshot", cem={**cem, "actors": actors}, **{**base, "limit": 1})
            start = time.perf_counter()
            r = run_adapt(cfg, progress=False)
            walls[actors] = (time.perf_counter() - start, r.pass1_s)
        ray.shutdown()
    text = f"""`{command_line()}` — {stamp()}

SmolLM2-135M-Instruct on CPU, {args.task}, {args.limit} queries, experts: {source}. Pass 1 = deciding the
mixture (classification), pass 2 = answering with it (generation, one materialised W' per chosen expert).

| strategy (pass-1 mode) | pass 1 (s) | pass 2 (s) | pass 1 ÷ pass 2 (goal ≤ 5 % for prompt/score; paper 13–47 %) |
|---|---:|---:|---:|
{chr(10).join(rows)}

Few-shot CEM (population {cem["population"]}, {cem["generations"]} generations, {cem["shots"]} shots), search time:
1 actor {walls[1][1]:.1f} s, 2 actors {walls[2][1]:.1f} s → **2 actors ÷ 1 actor = {walls[2][1] / walls[1][1]:.2f}**
(actor start-up included; 2 cores).
"""
    publish("two_pass", text, not args.no_write)


if __name__ == "__main__":
    main()
