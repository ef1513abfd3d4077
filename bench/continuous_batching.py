"""What continuous batching's per-row KV cache costs on SmolLM2: the copy that merges joining rows into a running
batch (left-padding every layer's keys/values to one length) and the padding it leaves, beside a decode step.

    .venv/bin/python bench/continuous_batching.py [--rows 15] [--joining 1] [--tokens 16] [--repeats 5] [--no-write]

A batch of --rows chat prompts decodes --tokens steps; then --joining new prompts are prefilled and merged in
(`DecodeBatch.merge`). Timed, interleaved over --repeats rounds: (a) one decode step of the running batch, (b) the
joining rows' prefill, (c) the merge itself (the cache copy a paged KV cache would avoid), (d) one decode step of
the merged batch. If (c) is small beside (a) and (b), a per-row cache is the right choice on this engine: a paged
cache saves only (c), once per join. Base model, bf16 where native, greedy, EOS ignored.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import command_line, medians_after_warmup, publish, stamp, timed  # noqa: E402

from t2ray.serve.engine import DecodeBatch, ExpertLibrary, GenRequest, MixtureRef  # noqa: E402
from t2ray.tasks import get_task  # noqa: E402


def requests(n: int, offset: int, tokens: int) -> list[GenRequest]:
    task = get_task("math")
    return [
        GenRequest(MixtureRef(), messages=task.messages(ex), max_tokens=tokens + 8, temperature=0, ignore_eos=True)
        for ex in task.examples("test")[offset : offset + n]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--joining", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16, help="decode steps of the running batch before the join")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = ExpertLibrary("smollm2-135m", {})
    rounds = []
    for r in range(args.repeats + 1):  # round 0 warms up
        running = DecodeBatch(lib, [lib.prepare(q) for q in requests(args.rows, 0, args.tokens)])
        running.prefill()
        for _ in range(args.tokens):
            running.step()
        a = timed(running.step)
        joining = DecodeBatch(lib, [lib.prepare(q) for q in requests(args.joining, 100 + r, args.tokens)])
        b = timed(joining.prefill)
        c = timed(partial(running.merge, joining))
        d = timed(running.step)
        running.close()
        rounds.append(dict(zip("abcd", (a, b, c, d), strict=True)))
    med = medians_after_warmup(rounds)
    cache_len = running.attn.shape[1]
    load = os.getloadavg()[0]
    text = "\n".join(
        [
            f"`{command_line()}` — {stamp()}",
            "",
            f"SmolLM2-135M-Instruct (bf16 where native, CPU, {args.threads} torch threads, load average "
            f"{load:.1f} at the "
            f"end): {args.rows} rows decoding (math test prompts, {args.tokens} tokens in), {args.joining} joining; "
            f"medians of {args.repeats} rounds after a warm-up; cache length after the merge {cache_len}. "
            f"torch {torch.__version__}, Python {platform.python_version()}.",
            "",
            "| measure | ms (median) | ÷ (a) a decode step |",
            "|---|---:|---:|",
            f"| (a) decode step, {args.rows} rows | {1000 * med['a']:.1f} | 1.00 |",
            f"| (b) prefill of the {args.joining} joining row(s) | {1000 * med['b']:.1f} | {med['b'] / med['a']:.2f} |",
            f"| (c) merge: the KV-cache copy (what a paged cache avoids) | {1000 * med['c']:.1f} | "
            f"{med['c'] / med['a']:.2f} |",
            f"| (d) decode step after the merge, {args.rows + args.joining} rows | {1000 * med['d']:.1f} | "
            f"{med['d'] / med['a']:.2f} |",
        ]
    )
    publish("continuous_batching_kv_cache", text, not args.no_write)


if __name__ == "__main__":
    main()
