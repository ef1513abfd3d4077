"""A z per row on the KV decoder: the rescaled form (two products) against the factored form (three), on packed weights.

    .venv/bin/python bench/z_per_row.py [--batches 1,8,32] [--tokens 64] [--rounds 4] [--no-write]

SmolLM2-135M-Instruct in the dtype `auto` picks, SVF on the MLP of every layer, z in [0.5, 1.5) per row:
  * base            the plain model (the ceiling);
  * three products  the factored form, (x + ((x Q) ⊙ d) Qᵀ) Wᵀ, its products on packed weights (the decoder's form
                    before `SVFLinear.rescaled`, still the training and eager form);
  * rescaled        what the decoder runs: ((x Q) ⊙ c·z) (W Q)ᵀ.
Greedy decode through `t2ray.generation.rollout` at each batch size, then the serve replica's batch of 16 requests,
each its own mixture of 3 random experts (bench/serve_load.py's scenario (c)), 32 greedy tokens through `DecodeBatch`.
Variants run in interleaved rounds, rotating the order, each timed call right after a warm one of its own; the best
round counts. Writes bench/RESULTS.md "## z_per_row".
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import command_line, cpu_description, interleaved, publish, stamp  # noqa: E402
from generation import random_z  # noqa: E402
from serve_load import random_experts  # noqa: E402

from t2ray import kv_decode  # noqa: E402
from t2ray.generation import rollout  # noqa: E402
from t2ray.models import compute_dtype, load_model, load_tokenizer  # noqa: E402
from t2ray.serve.engine import DecodeBatch, ExpertLibrary, GenRequest, MixtureRef  # noqa: E402
from t2ray.svf import SVFConfig, patch_model, set_z  # noqa: E402
from t2ray.tasks import get_task  # noqa: E402

RESCALED = kv_decode._factored_svf


def three_products(module, x: torch.Tensor, xq: torch.Tensor | None = None) -> torch.Tensor:
    """The factored form with its products on packed weights, kept apart from the rescaled form's."""
    factors = kv_decode._FACTORS.setdefault(module, {})

    def gemm(role, h, w, bias=None, transposed=False):
        return kv_decode.packed_gemm(f"factored-{role}", [w], h, bias, cache=factors, transposed=transposed)

    return module.factored(x, module.current_delta(x.dtype), gemm, xq)


@contextmanager
def form(forward):
    kv_decode._factored_svf = forward
    try:
        yield
    finally:
        kv_decode._factored_svf = RESCALED


def decoding(model, tokenizer, prompts: list, tokens: int):
    return lambda: rollout(model, tokenizer, prompts, max_new_tokens=tokens, ignore_eos=True)


def variants(base_call, per_row_call) -> dict:
    def with_form(forward):
        def run():
            with form(forward):
                per_row_call()

        return run

    return {"base": base_call, "three products": with_form(three_products), "rescaled": with_form(RESCALED)}


def row(label: str, times: dict[str, list[float]], work: float) -> str:
    speed = {name: work / min(t) for name, t in times.items()}
    base, three, rescaled = speed["base"], speed["three products"], speed["rescaled"]
    return (
        f"| {label} | {base:.0f} | {three:.0f} | {rescaled:.0f} | {three / base:.2f} | **{rescaled / base:.2f}** "
        f"| {rescaled / three:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    batches = [int(b) for b in args.batches.split(",")]
    task = get_task("math")
    prompts = [task.messages(ex) for ex in task.examples("train")[: max(batches)]]
    tokenizer, dtype = load_tokenizer("smollm2-135m"), compute_dtype("auto")
    base, _ = load_model("smollm2-135m", dtype=dtype)
    per_row, _ = load_model("smollm2-135m", dtype=dtype)
    patch_model(per_row, SVFConfig(target_modules="mlp"), progress=False)

    lines = [
        "| batch | base tok/s | three products | rescaled | three ÷ base | rescaled ÷ base | rescaled ÷ three |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in batches:
        set_z(per_row, random_z(per_row, batch, seed=2))
        rows = prompts[:batch]
        times = interleaved(
            variants(decoding(base, tokenizer, rows, args.tokens), decoding(per_row, tokenizer, rows, args.tokens)),
            args.rounds,
            warm_each=True,
        )
        lines.append(row(f"decode B={batch}", times, batch * args.tokens))
        print(lines[-1], flush=True)

    experts = random_experts("smollm2-135m", Path(tempfile.mkdtemp()))
    library = ExpertLibrary("smollm2-135m", experts, dtype="auto")
    messages = [task.messages(ex) for ex in task.examples("test")[:16]]
    rng = random.Random(0)  # each request its own mixture, weights as serve_load's scenario (c) draws them
    mixtures = [MixtureRef("mix", tuple(experts), tuple(rng.uniform(0.05, 1) for _ in experts)) for _ in messages]

    def serve_batch(refs) -> None:
        items = [
            library.prepare(GenRequest(r, messages=m, max_tokens=32, temperature=0, ignore_eos=True))
            for r, m in zip(refs, messages, strict=True)
        ]
        batch = DecodeBatch(library, items)
        batch.prefill()
        while not batch.done:
            batch.step()

    serve_variants = variants(lambda: serve_batch([MixtureRef()] * 16), lambda: serve_batch(mixtures))
    times = interleaved(serve_variants, args.rounds, warm_each=True)
    lines.append(row("serve replica, 16 mixtures", times, 16 * 32))
    print(lines[-1], flush=True)
    load_end = os.getloadavg()
    lines = [
        f"{stamp()}, `{command_line()}`; {cpu_description()}, {torch.get_num_threads()} torch threads, {dtype}, load "
        f"average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; SmolLM2-135M-Instruct, SVF on every MLP "
        f"matrix, {args.tokens} greedy tokens per decode row (the serve batch: 32, prefill included), best of "
        f"{args.rounds} interleaved rounds, each timed call after a warm one of its own; tokens/s.",
        "",
        *lines,
    ]
    publish("z_per_row", lines, not args.no_write)


if __name__ == "__main__":
    main()
