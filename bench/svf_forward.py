"""SVF forward cost on SmolLM2-135M-Instruct: base vs materialized (one z) vs factored (a z per row).

    .venv/bin/python bench/svf_forward.py [--batch 8] [--seq 128] [--repeats 3] [--no-write]

SVF on the MLP matrices of all 30 layers (90 matrices, 51,840 z values). Timed variants run interleaved,
in a rotating order, so machine noise hits all of them alike; ratios use the best round (median shown too).
Also reports the decomposition's extra memory and the max |logit difference| at z = 1 (SPEC §3: exact up to
fp32 rounding). Prints a markdown table and writes it to bench/RESULTS.md under "## svf_forward".
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import publish  # noqa: E402

from t2ray.models import load_model  # noqa: E402
from t2ray.svf import SVFConfig, patch_model, set_mode, set_z, svf_layers  # noqa: E402


def forward(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def z_for(layers, seed: int, batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: 0.5 + torch.rand(*batch, layer.rank, generator=g) for name, layer in layers.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, _ = load_model("smollm2-135m")
    base = copy.deepcopy(model)  # the untouched model: no wrapper, no flag checks
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    layers = patch_model(model, SVFConfig(target_modules="mlp"), progress=False)
    patch_s = time.perf_counter() - t0  # SVD of 90 matrices, or cache hits on later runs
    n_z = sum(layer.rank for layer in layers.values())

    # ---- memory: the decomposition (q, s) against the base weights
    decomposition_bytes = sum(
        layer.q.numel() * layer.q.element_size() + layer.s.numel() * layer.s.element_size() for layer in layers.values()
    )
    target_bytes = sum(
        layer.base_layer.weight.numel() * layer.base_layer.weight.element_size() for layer in layers.values()
    )
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())

    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()

    # ---- exactness at z = 1 (both modes) against the base model
    ref = forward(base, ids)
    ones = {name: torch.ones(layer.rank) for name, layer in layers.items()}
    max_diff = {}
    for mode in ("materialized", "factored"):
        set_mode(model, mode)
        set_z(model, ones)
        max_diff[mode] = float((forward(model, ids) - ref).abs().max())
    logit_scale = float(ref.abs().max())
    half = args.batch // 2 or 1  # fp32 noise floor: the same base model, the batch run in two halves
    noise_floor = (
        float((torch.cat([forward(base, ids[:half]), forward(base, ids[half:])]) - ref).abs().max())
        if args.batch > 1
        else float("nan")
    )
    del ref

    # ---- throughput, interleaved: one model copy per variant, each set up once (W' built in the warm-up)
    z_one = z_for(layers, seed=1)
    z_rows = z_for(layers, seed=2, batch=(args.batch,))
    setups = {
        "SVF materialized, one z (W' cached)": ("materialized", z_one),
        "SVF factored, one z": ("factored", z_one),
        f"SVF factored, a different z per row ({args.batch})": ("factored", z_rows),
    }
    models = {"base (unpatched)": base}
    for name, (mode, z) in setups.items():
        variant = copy.deepcopy(model)
        set_mode(variant, mode)
        set_z(variant, z)
        models[name] = variant
    del model
    forwards = {name: (lambda m=m: forward(m, ids)) for name, m in models.items()}

    def rebuild() -> None:
        """W' for all target matrices, as after a new z or an optimizer step (the materialized mode's extra)."""
        with torch.no_grad():
            for name, layer in layers.items():
                layer.adapted_weight(z_one[name])

    REBUILD = f"build W' for all {len(layers)} matrices"
    jobs = {**forwards, REBUILD: rebuild}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    cpu_times: dict[str, list[float]] = {name: [] for name in jobs}  # CPU seconds of this process, all threads
    names = list(jobs)
    for round_ in range(args.repeats + 1):  # round 0 warms up
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            jobs[name]()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if round_:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
            print(f"  round {round_} {name}: {elapsed:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr)

    mat_layers = svf_layers(models["SVF materialized, one z (W' cached)"]).values()
    w_cache_bytes = sum(
        layer._weight_cache[1].numel() * layer._weight_cache[1].element_size()
        for layer in mat_layers
        if layer._weight_cache is not None
    )
    best = {name: min(ts) for name, ts in times.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    cpu = {name: statistics.median(ts) for name, ts in cpu_times.items()}
    base_name = "base (unpatched)"

    # ---- report
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        f"`{shlex.join(['.venv/bin/python', 'bench/svf_forward.py', *sys.argv[1:]])}` — {now}",
        "",
        f"SmolLM2-135M-Instruct (fp32, CPU, torch threads: {torch.get_num_threads()}, {os.cpu_count()} cores; "
        f"load average {load[0]:.1f} / {load[2]:.1f} (1 / 15 min) at the end), SVF on the MLP of all 30 layers: "
        f"{len(layers)} matrices, {n_z:,} z values. Forward = one no-grad pass over batch {args.batch} × {args.seq} "
        f"tokens with all logits (no KV cache). {args.repeats} timed rounds after 1 warm-up, variants interleaved "
        f"in a rotating order; ratios use the best round (noise only adds time), medians shown alongside. "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        *(
            [
                f"**Contended machine** (load average {load[0]:.1f} on {os.cpu_count()} cores): wall "
                "times are noisy and "
                "a multi-thread pool spins against other processes; rerun with `--threads 1` and read the CPU column.",
                "",
            ]
            if load[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1
            else []
        ),
        "Throughput ratios are base time / variant time (> 1: faster than base). CPU = this process's CPU "
        "seconds (median), which other processes' load disturbs less than wall time.",
        "",
        "| variant | wall s / forward (best) | wall s (median) | CPU s (median) | tokens/s (best) "
        "| ratio to base, wall best | wall median | CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in forwards:
        lines.append(
            f"| {name} | {best[name]:.3f} | {median[name]:.3f} | {cpu[name]:.3f} | {tokens / best[name]:,.0f} | "
            f"{best[base_name] / best[name]:.3f} | {median[base_name] / median[name]:.3f} | "
            f"{cpu[base_name] / cpu[name]:.3f} |"
        )
    lines += [
        "",
        "| measure | value |",
        "|---|---:|",
        f"| decomposition (q + s buffers, fp32) | {decomposition_bytes / 2**20:.1f} MiB |",
        f"| … ratio to the adapted weights ({target_bytes / 2**20:.1f} MiB) | "
        f"{decomposition_bytes / target_bytes:.3f} |",
        f"| … ratio to all base weights ({model_bytes / 2**20:.1f} MiB) | {decomposition_bytes / model_bytes:.3f} |",
        f"| materialized mode's cached W' (one z), ratio to the adapted weights | {w_cache_bytes / target_bytes:.3f} |",
        f"| max \\|logit diff\\| vs base at z = 1, materialized | {max_diff['materialized']:.2e} |",
        f"| max \\|logit diff\\| vs base at z = 1, factored | {max_diff['factored']:.2e} |",
        f"| fp32 noise floor: base, batch in two halves vs whole | {noise_floor:.2e} |",
        f"| max \\|logit\\| of the base (scale) | {logit_scale:.1f} |",
        f"| {REBUILD} (new z or optimizer step): wall best / median, CPU | {best[REBUILD]:.3f} s / "
        f"{median[REBUILD]:.3f} s, {cpu[REBUILD]:.3f} s ({cpu[REBUILD] / cpu[base_name]:.2f} × a base forward's CPU) |",
        f"| model load / patch (SVD or cache hit) | {load_s:.1f} s / {patch_s:.1f} s |",
    ]
    publish("svf_forward", lines, not args.no_write)


if __name__ == "__main__":
    main()
