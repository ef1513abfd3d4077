"""What pass 1 costs a serving replica, and what folding it into the decode step could save (issue 16, item 3).

    .venv/bin/python bench/pass1_cost.py [--rows 16] [--repeats 5] [--threads 2] [--no-write]

On the replica's own objects (ExpertLibrary, DecodeBatch; SmolLM2, bf16 where native, three random SVF experts as
`bench/serve_load.py` uses), timed interleaved over --repeats rounds after a warm-up, medians:
  (s) one decode step of --rows rows, each with its own mixture (scenario (c): the factored path);
  (f) the prefill of one request joining that batch (its pass-2 prompt);
  (p) pass 1 of --rows questions in one batch (the prompt strategy's scoring, the shared prefix of the
      classification prompt cached: what `@serve.batch` runs when that many requests arrive together), its
      questions grouped by length into forwards (`length_groups`);
  (p1) the same questions in one forward, each padded to the longest (what (p) was before the grouping);
  (o) a decode step of a single row: an upper bound on what one forward costs beyond its tokens' arithmetic,
      the most that running pass 1 *inside* a decode step's forward could save per pass-1 batch (the tokens
      are the same either way; HF's eager attention would also have to pad the decode rows to the questions'
      length, which costs more than it saves).
A request that decodes T tokens at --rows in flight costs the replica about C(T) = f + T·s/rows; `auto` adds
p/rows. Predicted (d) ÷ (c) = C / (C + p/rows), and at best with pass 1 fused, C / (C + (p − o)/rows).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import tempfile
from functools import partial
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import command_line, medians_after_warmup, publish, stamp, timed  # noqa: E402
from serve_load import prompts, random_experts, random_mixture  # noqa: E402

from t2ray.adapt.dispatch import PrefixScorer, classification_ids, length_groups  # noqa: E402
from t2ray.serve.engine import DecodeBatch, ExpertLibrary, GenRequest, MixtureRef  # noqa: E402


def mixed_requests(pool: list, rng: random.Random, tokens: int) -> list[GenRequest]:
    """A different random mixture per request, as scenario (c) sends them."""
    requests = []
    for messages in pool:
        weights = random_mixture(rng)
        requests.append(
            GenRequest(
                MixtureRef("mixed", tuple(weights), tuple(weights.values())),
                messages=messages,
                max_tokens=tokens,
                temperature=0,
                ignore_eos=True,
            )
        )
    return requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pass1_cost_") as tmp:
        lib = ExpertLibrary("smollm2-135m", random_experts("smollm2-135m", Path(tmp)))
    one_forward = PrefixScorer(lib.model, lib.tokenizer, forward_cost_tokens=math.inf)  # (p1)
    pool, rng = prompts(64), random.Random(0)
    rounds, padding = [], {"p": [], "p1": []}
    for r in range(args.repeats + 1):  # round 0 warms up
        offset = (r * (args.rows + 1)) % (len(pool) - args.rows - 1)
        batch = pool[offset : offset + args.rows + 1]
        running = DecodeBatch(lib, [lib.prepare(q) for q in mixed_requests(batch[:-1], rng, 64)])
        running.prefill()
        for _ in range(8):
            running.step()
        s = timed(running.step)
        joining = DecodeBatch(lib, [lib.prepare(q) for q in mixed_requests(batch[-1:], rng, 64)])
        f = timed(joining.prefill)
        joining.close()
        running.close()
        questions = [messages[-1]["content"] for messages in batch[:-1]]
        p = timed(partial(lib.classify, questions, use_classifier=False))
        p1 = timed(partial(one_forward.classify, questions))  # lib.classify left the base model in place
        lengths = [len(classification_ids(lib.tokenizer, q)) - len(one_forward.prefix_ids) for q in questions]
        for arm, cost in (("p", PrefixScorer.FORWARD_COST_TOKENS), ("p1", math.inf)):
            groups = length_groups(lengths, cost)
            padding[arm].append(1 - sum(lengths) / sum(len(g) * max(lengths[i] for i in g) for g in groups))
        single = DecodeBatch(
            lib,
            [lib.prepare(GenRequest(MixtureRef(), messages=batch[0], max_tokens=8, temperature=0, ignore_eos=True))],
        )
        single.prefill()
        single.step()
        o = timed(single.step)
        single.close()
        rounds.append({"s": s, "f": f, "p": p, "p1": p1, "o": o})
    med = medians_after_warmup(rounds)
    n = args.rows
    rows = []
    for tokens in (32, 128, 512):
        cost = med["f"] + tokens * med["s"] / n
        plain = cost / (cost + med["p"] / n)
        fused = cost / (cost + (med["p"] - med["o"]) / n)
        rows.append(f"| {tokens} | {1000 * cost:.0f} | {1000 * med['p'] / n:.0f} | {plain:.2f} | {fused:.2f} |")
    load_end = os.getloadavg()[0]
    text = "\n".join(
        [
            f"`{command_line()}` — {stamp()}",
            "",
            f"SmolLM2-135M-Instruct (bf16 where native, CPU, {args.threads} torch threads), three random SVF experts; "
            f"load average {load_start:.1f} before, {load_end:.1f} at the end; medians of {args.repeats} "
            "rounds after a "
            f"warm-up. torch {torch.__version__}, Python {platform.python_version()}.",
            "",
            "| measure | ms (median) |",
            "|---|---:|",
            f"| (s) decode step, {n} rows, a mixture per row (factored) | {1000 * med['s']:.1f} |",
            f"| (f) prefill of one joining request (pass 2's prompt) | {1000 * med['f']:.1f} |",
            f"| (p) pass 1 of {n} questions in one batch (prompt strategy, prefix cached) | {1000 * med['p']:.1f} |",
            f"| (p) ÷ {n}: pass 1 per request | {1000 * med['p'] / n:.1f} |",
            f"| (p1) the same in one forward, padded to the longest | {1000 * med['p1']:.1f} |",
            f"| **(p) ÷ (p1)**; padding share of the tokens, grouped vs one forward | **{med['p'] / med['p1']:.2f}**; "
            f"{100 * mean(padding['p']):.0f} % vs {100 * mean(padding['p1']):.0f} % |",
            f"| (o) decode step of one row (bounds what fusing pass 1 into a step saves per batch) | "
            f"{1000 * med['o']:.1f} |",
            "",
            f"Per request at {n} in flight, for T generated tokens: C = f + T·s/{n} (the replica's time "
            "for (c)), pass 1 "
            "adds p/rows; predicted (d) ÷ (c) without and with pass 1 fused into the decode step's forward:",
            "",
            "| T tokens | C ms | pass 1 ms | (d) ÷ (c) | fused, at best |",
            "|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    publish("pass1_cost", text, not args.no_write)


if __name__ == "__main__":
    main()
