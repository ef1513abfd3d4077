"""The decode step alone: t2ray's KV decoder against Hugging Face's forward with its growing cache, side by side.

    .venv/bin/python bench/decode_step.py [--batches 8,32] [--dtypes auto,float32] [--compile] [--no-write]

SmolLM2-135M-Instruct, random prompt tokens (one row left-padded by 10), in the dtype `auto` picks here and in fp32.
Per batch size: the prefill's seconds and the mean milliseconds of a decode step (greedy, after the prefill) for both
steps (t2ray/kv_decode.py: KVDecoder and HFDecoder), each the best of --rounds interleaved rounds, and their ratios.
`--compile` adds the KV step under torch.compile (dynamic shapes), with its compile seconds.
Writes the table to bench/RESULTS.md under "## decode_step".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import command_line, publish, stamp  # noqa: E402

from t2ray.kv_decode import HFDecoder, KVDecoder  # noqa: E402
from t2ray.models import compute_dtype, load_model  # noqa: E402


def timed(decoder, ids, mask, steps: int) -> tuple[float, float]:
    """(prefill seconds, mean seconds per decode step)."""
    with torch.no_grad():
        start = time.perf_counter()
        token = decoder.prefill(ids, mask).argmax(-1)
        prefill = time.perf_counter() - start
        position = mask.sum(1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            token = decoder.step(token, position).argmax(-1)
            position = position + 1
        return prefill, (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also the KV step under torch.compile")
    ap.add_argument("--dtypes", default="auto,float32")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_start = os.getloadavg()[0]
    lines = [
        "| dtype | B | prefill s: HF | KV | step ms: HF | KV | HF ÷ KV: prefill | step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    compiled_rows = []
    for dtype in dict.fromkeys(compute_dtype(d) for d in args.dtypes.split(",")):
        model, _ = load_model("smollm2-135m", dtype=dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            ids = torch.randint(100, 10000, (batch, args.prompt), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            mask[0, :10] = 0
            capacity = args.prompt + args.steps + 1
            make = {
                "HF": lambda m=model: HFDecoder(m),
                "KV": lambda m=model, b=batch, c=capacity: KVDecoder(m, b, c),
            }
            best = {name: (float("inf"), float("inf")) for name in make}
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for name in list(make) if round_ % 2 else list(make)[::-1]:
                    prefill, step = timed(make[name](), ids, mask, args.steps)
                    if round_:
                        best[name] = (min(best[name][0], prefill), min(best[name][1], step))
            (hp, hs), (kp, ks) = best["HF"], best["KV"]
            lines.append(
                f"| {dtype} | {batch} | {hp:.2f} | {kp:.2f} | {1e3 * hs:.1f} | {1e3 * ks:.1f} | {hp / kp:.2f} | "
                f"{hs / ks:.2f} |"
            )
            print(lines[-1], flush=True)
            if args.compile:
                decoder = KVDecoder(model, batch, capacity)
                decoder._forward = torch.compile(decoder._forward, dynamic=True)
                start = time.perf_counter()
                timed(decoder, ids, mask, 1)
                first = time.perf_counter() - start
                decoder = KVDecoder(model, batch, capacity)
                decoder._forward = torch.compile(decoder._forward, dynamic=True)
                _, step = timed(decoder, ids, mask, args.steps)
                compiled_rows.append(f"| {dtype} | {batch} | {first:.0f} | {1e3 * step:.1f} | {ks / step:.2f} |")
                print(compiled_rows[-1], flush=True)
    header = [
        f"{stamp()}, `{command_line()}`; `torch.backends.cpu.get_cpu_capability()` = "
        f"{torch.backends.cpu.get_cpu_capability()}, 2 torch threads, load average {load_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end; SmolLM2-135M-Instruct, {args.prompt}-token prompts, {args.steps} greedy "
        f"steps, best of {args.rounds} interleaved rounds.",
        "",
    ]
    if compiled_rows:
        lines += [
            "",
            "torch.compile of the KV step (inductor, dynamic shapes):",
            "",
            "| dtype | B | compile + first step s | step ms | eager KV ÷ compiled |",
            "|---|---:|---:|---:|---:|",
            *compiled_rows,
        ]
    publish("decode_step", header + lines, not args.no_write)


if __name__ == "__main__":
    main()
