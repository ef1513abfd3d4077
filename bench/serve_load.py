"""Serving load: requests/s and p50/p99 latency of the t2ray Serve app under a bounded asyncio/httpx load.

    .venv/bin/python bench/serve_load.py [--model smollm2-135m] [--requests 96] [--concurrency 16]
                                         [--max-tokens 32] [--rounds 3] [--expert NAME=PATH ...] [--no-write]

Scenarios (every request generates exactly --max-tokens tokens, greedy, `ignore_eos`, so they do equal work):
  (a) base    model "base" (SVF layers off: the untouched weights)
  (b) expert  model "math" (one expert: hot, so served from the materialised-W' LRU)
  (c) mixed   every request its own random mixture of the 3 experts (z per batch row, factored mode)
  (d) auto    model "auto", prompt dispatch (pass 1 = one scoring forward of the base model, then pass 2)
Scenarios are interleaved in rounds (rotating order) so load from other processes hits them alike.
Without --expert, three random SVF experts (math/code/reasoning tasks, z near the init) are written to a temp
folder: throughput does not depend on what the experts learned. Ray runs locally with 2 CPUs, one ExpertModel
replica holding both, on 127.0.0.1:8000.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from common import command_line, stamp, write_section  # noqa: E402
from t2ray.models import compute_dtype  # noqa: E402

URL = "http://127.0.0.1:8000"
SCENARIOS = ("base", "expert", "mixed", "auto")
LABELS = {"base": "(a) base model", "expert": "(b) one expert (math)", "mixed": "(c) a different mixture per request",
          "auto": "(d) auto: prompt dispatch + expert"}


def random_experts(model_spec: str, folder: Path) -> dict[str, str]:
    import torch

    from t2ray.experts import Expert, save_expert
    from t2ray.models import load_model
    from t2ray.svf import SVFConfig, base_model_info, patch_model, trainable_params

    model, _ = load_model(model_spec)
    patch_model(model, SVFConfig(target_modules="mlp"), progress=False)
    info = base_model_info(model)
    paths = {}
    for seed, task in enumerate(("math", "code", "reasoning")):
        g = torch.Generator().manual_seed(seed)
        params = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in trainable_params(model).items()}
        paths[task] = str(save_expert(Expert(name=task, params=params, base_model=info.model_id,
                                             fingerprint=info.fingerprint, task=task), folder / f"{task}.safetensors"))
    return paths


def prompts(n: int) -> list[list[dict]]:
    from t2ray.tasks import get_task

    pool = []
    for name in ("math", "code", "reasoning"):
        task = get_task(name)
        pool += [task.messages(ex) for ex in task.examples("test")[:n]]
    random.Random(0).shuffle(pool)
    return pool


def body_for(scenario: str, messages, rng: random.Random, max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if scenario == "base":
        return {**body, "model": "base"}
    if scenario == "expert":
        return {**body, "model": "math"}
    if scenario == "mixed":
        weights = {n: round(rng.uniform(0.05, 1.0), 4) for n in ("math", "code", "reasoning")}
        return {**body, "model": "auto", "t2ray": {"weights": weights}}
    return {**body, "model": "auto"}


async def load(scenario: str, n: int, concurrency: int, pool, max_tokens: int, seed: int):
    """n requests with at most `concurrency` in flight: (wall seconds, per-request latencies, reports)."""
    rng = random.Random(seed)
    bodies = [body_for(scenario, pool[(seed + i) % len(pool)], rng, max_tokens) for i in range(n)]
    gate = asyncio.Semaphore(concurrency)
    latencies, reports, errors = [], [], []
    async with httpx.AsyncClient(base_url=URL, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def one(body):
            async with gate:
                t = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(r.text[:200])
                    return
                data = r.json()
                if data["usage"]["completion_tokens"] != max_tokens:
                    errors.append(f"{data['usage']['completion_tokens']} tokens, not {max_tokens}")
                reports.append(data["t2ray"])

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{scenario}: {len(errors)} failed requests, e.g. {errors[0]}")
    return wall, latencies, reports


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--expert", action="append", default=[], help="NAME=PATH (math, code, reasoning)")
    ap.add_argument("--requests", type=int, default=96, help="per scenario, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the replica (1: on a shared 2-core "
                    "machine a 2-thread pool spins against other jobs and was 10x slower here)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    from t2ray.serve.app import build_app

    load_start = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    t0 = time.perf_counter()
    experts = dict(e.split("=", 1) for e in args.expert) or random_experts(args.model, Path(tmp.name))
    serve_args = {
        "model": {"spec": args.model}, "experts": experts,
        "generation": {"max_tokens_default": args.max_tokens, "max_tokens_limit": max(1024, args.max_tokens)},
        "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": 0.02,
                     "torch_threads": args.threads},
        "expert_model": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 2}, "max_ongoing_requests": 64},
        "api_key_env": None,
    }
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(build_app(serve_args), name="bench", route_prefix="/")
        startup = time.perf_counter() - t0
        pool = prompts(32)
        per_round = max(1, args.requests // args.rounds)
        for scenario in SCENARIOS:  # warm-up: first batches, the expert's W' built, pass-1 path exercised
            asyncio.run(load(scenario, args.concurrency, args.concurrency, pool, args.max_tokens, 10_000))
        results = {s: {"wall": 0.0, "lat": [], "reports": []} for s in SCENARIOS}
        for r in range(args.rounds):
            order = SCENARIOS[r % len(SCENARIOS):] + SCENARIOS[:r % len(SCENARIOS)]
            for scenario in order:
                wall, lat, reports = asyncio.run(load(scenario, per_round, args.concurrency, pool, args.max_tokens,
                                                      r * per_round))
                results[scenario]["wall"] += wall
                results[scenario]["lat"] += lat
                results[scenario]["reports"] += reports
                print(f"round {r + 1} {scenario}: {per_round / wall:.2f} req/s", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    rows, summary = [], {}
    for scenario in SCENARIOS:
        res = results[scenario]
        n = len(res["lat"])
        rps = n / res["wall"]
        modes = sorted({rep["weights_mode"] for rep in res["reports"]})
        summary[scenario] = {"rps": rps, "p50": pct(res["lat"], 0.5), "p99": pct(res["lat"], 0.99),
                             "pass1": statistics.mean(rep["timings"]["pass1_ms"] for rep in res["reports"]),
                             "batch": statistics.mean(rep["batch_size"] for rep in res["reports"])}
        s = summary[scenario]
        rows.append(f"| {LABELS[scenario]} | {n} | {rps:.2f} | {rps * args.max_tokens:.0f} | {s['p50']:.2f} | "
                    f"{s['p99']:.2f} | {s['batch']:.1f} | {', '.join(modes)} | {s['pass1']:.0f} |")
    ratio = summary["mixed"]["rps"] / summary["base"]["rps"]
    added_p50 = summary["auto"]["p50"] - summary["expert"]["p50"]
    cats = {}
    for rep in results["auto"]["reports"]:
        cats[rep.get("category")] = cats.get(rep.get("category"), 0) + 1
    load_end = os.getloadavg()[0]
    lines = [
        f"`{command_line()}` — {stamp()}",
        "",
        f"{args.model} ({compute_dtype('auto')}: the serve config's dtype auto, CPU), Ray Serve on 127.0.0.1: one Dispatcher + one ExpertModel replica (2 CPUs, "
        f"{args.threads} torch thread{'s' if args.threads > 1 else ''}) on a 2-core machine shared with other "
        f"jobs (load average {load_start:.1f} at the start, {load_end:.1f} at the end). "
        f"SVF on the MLP of every layer, 3 experts ({'given' if args.expert else 'random, z near the init'}). "
        f"Closed loop: {args.concurrency} requests in flight, {len(results['base']['lat'])} timed requests per "
        f"scenario in {args.rounds} interleaved rounds after a warm-up; each request = a chat prompt from the "
        f"math/code/reasoning test splits + exactly {args.max_tokens} greedy tokens (`ignore_eos`); "
        f"continuous batching up to {args.max_batch_size} rows (mean batch: the rows decoding beside a request, per token). Startup (Ray, Serve, model, experts) {startup:.0f} s. "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "| scenario | requests | req/s | tokens/s | p50 s | p99 s | mean batch | weights | pass 1 ms (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
        *rows,
        "",
        "| measure | value |",
        "|---|---:|",
        f"| (b) ÷ (a) requests/s (goal ≥ 0.97) | {summary['expert']['rps'] / summary['base']['rps']:.2f} |",
        f"| (c) ÷ (a) requests/s (goal ≥ 0.9) | {ratio:.2f} |",
        f"| (d) ÷ (a) requests/s (goal ≥ 0.8) | {summary['auto']['rps'] / summary['base']['rps']:.2f} |",
        f"| worst p99 ÷ p50 (goal ≤ 2) | {max(s['p99'] / s['p50'] for s in summary.values()):.2f} |",
        f"| (d) added p50 latency vs (b) | {added_p50:+.2f} s |",
        f"| (d) pass 1 (classification forward), mean per request | {summary['auto']['pass1']:.0f} ms |",
        f"| (d) categories chosen | {', '.join(f'{k}: {v}' for k, v in sorted(cats.items()))} |",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("serve_load", text)
        print("\nwritten to bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
