"""LoRA mixtures, t2ray vs PEFT: tokens/s of t2ray's LoRA mixer against PEFT's mixed-adapter batches and a merged
adapter, and the outputs of t2ray's exact mixture against PEFT's merges.

    .venv/bin/python bench/lora_mixing.py [--model smollm2-135m] [--dtype bfloat16] [--batch 8] [--tokens 32]
        [--repeats 3] [--adapters DIR DIR DIR] [--strength 0.03] [--peft-model-dtype] [--threads 1] [--no-write]

Adapters: by default K = 3 seeded random LoRA adapters on t2ray's LoRA targets (the SVF default target modules,
r = 16, alpha = 32 as LoRAConfig): A as PEFT initialises it, B ~ N(0, 1) rescaled so that ‖scale·B A‖_F is
--strength (3 %) of ‖W‖_F in every matrix — enough to change greedy outputs, small enough to keep them sensible.
PEFT writes them with ``save_pretrained`` (safetensors) and both libraries read those folders. ``--adapters``
takes trained adapter folders instead (e.g. runs/quickstart/lora-{math,code,reasoning}/expert, in that order: row
i is a test prompt of math / code / reasoning for i % 3 = 0 / 1 / 2 and uses adapter i % K).

Variants (row i uses adapter i % K; "equal weights" = 1/K each): (a) the base model; (b) t2ray's LoRA mixer with
one-hot rows; (c) PEFT's mixed-adapter batch, ``generate(..., adapter_names=[...])``; (d) PEFT's
``add_weighted_adapter(..., combination_type="cat")`` of the K adapters at equal weights, served unmerged on every
row; (e) t2ray's mixer at the same equal weights (the same mixture as (d)). Primed variants run the same thing
through the other decode loop (below). The goal: (b) ≥ 1.0× (c) tokens/s, with identical greedy outputs.

Every variant decodes greedily, the same chat prompts with the same left padding (``encode_prompts``), and exactly
--tokens new tokens per row: EOS is ignored the same way everywhere — t2ray's loop with ``stop_at_eos=False``, HF
``generate`` with ``eos_token_id=None`` — so an EOS is an ordinary argmax token and decoding goes on after it (no
``min_new_tokens``, which would mask EOS and change the argmax). t2ray's mixer runs through its own decode loop
(what ``generate_weighted`` does; that function always stops at EOS and returns only texts, so the bench repeats
its three lines) and also through HF ``generate``, the loop PEFT uses, so the layer cost is compared with the loop
held equal. Tokens/s = rows × tokens / seconds of a whole batch (tokenizing and prefill included); variants run
interleaved in a rotating order after one warm-up round; ratios use medians. PEFT runs as shipped: on a bf16
base its loaded adapters keep float32 weights, so the mixed batch (c) runs the LoRA path in float32
(``autocast_adapter_dtype=True``; ``--peft-model-dtype`` turns that off), while the ``cat`` merge it builds (d) is
in the model's dtype; t2ray's mixture layer always computes in the model's dtype.

Correctness: the greedy token ids of t2ray's one-hot rows against PEFT's mixed batch, row by row, in the bench
dtype and in float32; and in float32 the last-token logits of t2ray's equal-weight mixture against PEFT's
``add_weighted_adapter`` merges of the same adapters and weights: ``cat`` (exact: Σ_k w_k scale_k B_k A_k) and
``linear`` (equal ranks only; Σ_i √(w_i s_i) B_i · Σ_j √(w_j s_j) A_j, which adds the cross terms B_i A_j).
One torch thread by default (a 2-thread pool on a shared 2-core machine spins against other processes).
Prints a markdown table and writes it to bench/RESULTS.md under "## lora_mixing".
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best, command_line, interleaved, median, publish, stamp  # noqa: E402

from t2ray.console import set_verbosity  # noqa: E402

set_verbosity(False)  # before transformers is imported: it reads its verbosity then

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from t2ray.adapt.token_routing import LoRAMixer, greedy_decode  # noqa: E402
from t2ray.config import LoRAConfig  # noqa: E402
from t2ray.generation import encode_prompts, on_live_rows  # noqa: E402
from t2ray.lora.layer import lora_mixture_layers  # noqa: E402
from t2ray.models import load_model  # noqa: E402
from t2ray.svf import SVFConfig, select_targets  # noqa: E402
from t2ray.tasks import get_task  # noqa: E402

TASKS = ("math", "code", "reasoning")
HF, T2 = "HF `generate`", "t2ray decode"


def random_adapters(model, folder: Path, k: int, strength: float) -> list[Path]:
    """K seeded random LoRA adapters on t2ray's LoRA targets, saved by PEFT into folder/a0 … folder/a{K-1}."""
    targets = SVFConfig()
    lora = LoRAConfig()
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, target_modules=select_targets(model, targets.target_modules, targets.layers)
    )
    names = [f"a{i}" for i in range(k)]
    torch.manual_seed(0)  # PEFT draws A from the global generator
    wrapped = get_peft_model(copy.deepcopy(model).float(), config, adapter_name=names[0])
    for name in names[1:]:
        wrapped.add_adapter(name, config)
    with torch.no_grad():
        for i, name in enumerate(names):
            g = torch.Generator().manual_seed(1000 + i)
            for layer in wrapped.modules():
                if isinstance(layer, LoraLayer) and name in layer.lora_A:
                    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                    b.copy_(torch.randn(b.shape, generator=g))
                    # the relative size of ΔW, not a raw σ: W's norm differs between matrices and models
                    b.mul_(strength * layer.base_layer.weight.norm() / (layer.scaling[name] * b @ a).norm())
    wrapped.save_pretrained(folder)  # adapters not called "default" go to folder/<name>
    return [folder / name for name in names]


def build(model, folders: list[Path], peft_float32: bool = True):
    """t2ray's mixture on one copy of `model`, PEFT with the K adapters and their equal-weight merges on another
    (peft_float32: PEFT's default autocast_adapter_dtype, float32 adapter weights on a half-precision base)."""
    k = len(folders)
    mixed = copy.deepcopy(model)
    mixer = LoRAMixer(mixed, folders)
    wrapped = PeftModel.from_pretrained(
        copy.deepcopy(model), folders[0], adapter_name="a0", autocast_adapter_dtype=peft_float32
    )
    for i, folder in enumerate(folders[1:], 1):
        wrapped.load_adapter(folder, adapter_name=f"a{i}", autocast_adapter_dtype=peft_float32)
    names = [f"a{i}" for i in range(k)]
    wrapped.add_weighted_adapter(names, [1 / k] * k, "cat", combination_type="cat")
    if len({wrapped.peft_config[n].r for n in names}) == 1:  # PEFT's linear merge needs equal ranks
        wrapped.add_weighted_adapter(names, [1 / k] * k, "linear", combination_type="linear")
    wrapped.set_adapter("cat")  # what runs when no adapter_names are given
    return mixed, mixer, wrapped


def hf_generate(model, tokenizer, prompts, n: int, **extra) -> torch.Tensor:
    """New token ids (B, n) from HF/PEFT `generate`: greedy, EOS an ordinary token (eos_token_id=None)."""
    batch = encode_prompts(tokenizer, prompts, model, n)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id, **extra
        )
    return out[:, batch["input_ids"].shape[1] :]


def t2ray_generate(model, tokenizer, prompts, n: int, mixer=None, weights=None) -> torch.Tensor:
    """New token ids (B, n) from t2ray's decode loop; with a mixer, exactly generate_weighted but for EOS."""
    if mixer is None:
        return greedy_decode(model, tokenizer, prompts, max_new_tokens=n, stop_at_eos=False)[0]
    try:
        return greedy_decode(
            model,
            tokenizer,
            prompts,
            max_new_tokens=n,
            stop_at_eos=False,
            before_step=on_live_rows(lambda live: mixer.set_weights(weights[live])),
        )[0]
    finally:
        mixer.reset()


def mixed_hf_generate(model, tokenizer, prompts, n: int, mixer, weights) -> torch.Tensor:
    """t2ray's mixture layers under HF `generate` (no row leaves its batch there, so (B, K) weights stay aligned)."""
    mixer.set_weights(weights)
    try:
        return hf_generate(model, tokenizer, prompts, n)
    finally:
        mixer.reset()


def last_logits(model, tokenizer, prompts) -> torch.Tensor:
    """Float32 logits of the next token after each prompt (left padding: positions from the attention mask)."""
    batch = encode_prompts(tokenizer, prompts, model, 0)
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=positions,
            logits_to_keep=1,
        )
    return out.logits[:, -1].float()


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> str:
    rows = int((ours == theirs).all(1).sum())
    return f"{rows}/{len(ours)} rows identical ({float((ours == theirs).float().mean()):.0%} of tokens)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32", "float16"),
        help="compute dtype of the timed runs (correctness is also checked in float32)",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument(
        "--adapters",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="PEFT LoRA adapter folders (at least 2) instead of random ones",
    )
    ap.add_argument("--strength", type=float, default=0.03, help="random adapters: ‖ΔW‖_F / ‖W‖_F per matrix")
    ap.add_argument(
        "--peft-model-dtype",
        action="store_true",
        help="PEFT's loaded adapters in the model's dtype (autocast_adapter_dtype=False), not float32",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own default)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    if args.adapters is not None and len(args.adapters) < 2:
        ap.error("--adapters needs at least 2 folders to mix")
    if args.threads:
        torch.set_num_threads(args.threads)
    # PEFT's notes on merged/multiple adapters are about training, transformers' deprecations about PEFT's calls
    warnings.filterwarnings("ignore", module=r"(peft|transformers)\.")

    t0 = time.perf_counter()

    def log(what: str) -> None:
        print(f"  [{time.perf_counter() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    log(f"{args.model} loaded ({args.dtype})")
    tmp = tempfile.TemporaryDirectory(prefix="lora_mixing-")
    folders = args.adapters or random_adapters(model, Path(tmp.name), 3, args.strength)
    k = len(folders)
    log(f"{k} adapters ({'given' if args.adapters else 'random, saved by PEFT'})")
    mixed, mixer, wrapped = build(model, folders, peft_float32=not args.peft_model_dtype)
    log("t2ray mixture patched, PEFT adapters loaded and merged")

    tasks = [get_task(name) for name in TASKS]
    prompts = [tasks[i % 3].messages(tasks[i % 3].examples("test")[i // 3]) for i in range(args.batch)]
    prompt_tokens = encode_prompts(tokenizer, prompts, model, args.tokens)["attention_mask"].sum(1)
    n = args.tokens
    one_hot = torch.eye(k)[[i % k for i in range(args.batch)]]  # row i: adapter i % K
    equal = torch.full((args.batch, k), 1 / k)
    adapter_names = [f"a{i % k}" for i in range(args.batch)]

    A, A2 = "(a) base model", "(a') base model"
    C = "(c) PEFT mixed batch: `adapter_names`, one adapter per row"
    B, B2 = "(b) t2ray mixer, one-hot rows (adapter i % K)", "(b') t2ray mixer, one-hot rows"
    D = "(d) PEFT `cat`-merged adapter, equal weights"
    E, E2 = "(e) t2ray mixer, equal weights", "(e') t2ray mixer, equal weights"
    loop = {A: HF, A2: T2, C: HF, B: T2, B2: HF, D: HF, E: T2, E2: HF}
    base_of = {name: A if loop[name] == HF else A2 for name in loop}
    peft_of = {B: C, B2: C, E: D, E2: D}
    outputs: dict[str, torch.Tensor] = {}
    calls = {
        A: lambda: hf_generate(model, tokenizer, prompts, n),
        A2: lambda: t2ray_generate(model, tokenizer, prompts, n),
        C: lambda: hf_generate(wrapped, tokenizer, prompts, n, adapter_names=adapter_names),
        B: lambda: t2ray_generate(mixed, tokenizer, prompts, n, mixer, one_hot),
        B2: lambda: mixed_hf_generate(mixed, tokenizer, prompts, n, mixer, one_hot),
        D: lambda: hf_generate(wrapped, tokenizer, prompts, n),
        E: lambda: t2ray_generate(mixed, tokenizer, prompts, n, mixer, equal),
        E2: lambda: mixed_hf_generate(mixed, tokenizer, prompts, n, mixer, equal),
    }

    def timed(name):
        def run():
            start = time.perf_counter()
            outputs[name] = calls[name]()
            log(f"{name}: {time.perf_counter() - start:.2f} s")

        return run

    times = interleaved({name: timed(name) for name in calls}, args.repeats, warmup=1)

    # float32 checks: on the bench's own models when they are float32, else on float32 copies
    if args.dtype == "float32":
        model32, mixed32, mixer32, wrapped32 = model, mixed, mixer, wrapped
        match32 = {B: outputs[B], C: outputs[C]}
    else:
        model32 = load_model(args.model, dtype="float32")[0]
        mixed32, mixer32, wrapped32 = build(model32, folders)
        log("float32 copies built")
        match32 = {
            B: t2ray_generate(mixed32, tokenizer, prompts, n, mixer32, one_hot),
            C: hf_generate(wrapped32, tokenizer, prompts, n, adapter_names=adapter_names),
        }
        log("float32 generations (b) and (c)")
    base_logits = last_logits(model32, tokenizer, prompts)
    mixer32.set_weights(equal)
    try:
        ours = last_logits(mixed32, tokenizer, prompts)
    finally:
        mixer32.reset()
    merged = {}
    for merge in ("cat", "linear"):
        if merge in wrapped32.peft_config:
            wrapped32.set_adapter(merge)
            merged[merge] = last_logits(wrapped32, tokenizer, prompts)
    log("float32 logits")

    tokens = args.batch * n
    load = os.getloadavg()
    if args.adapters:
        adapters = "adapters " + ", ".join(f"`{f}`" for f in folders)
    else:
        lora = LoRAConfig()
        adapters = (
            f"{k} **random** LoRA adapters (r = {lora.r}, alpha = {lora.alpha}, B rescaled to "
            f"‖ΔW‖_F = {args.strength:g}·‖W‖_F per matrix; seeded, saved by PEFT)"
        )
    matrices = len(lora_mixture_layers(mixed))
    rounds = f"{args.repeats} timed round{'s' * (args.repeats != 1)}"
    if args.peft_model_dtype:
        peft_note = f"PEFT with `autocast_adapter_dtype=False` (its loaded adapters in {args.dtype})."
    elif args.dtype == "float32":
        peft_note = "PEFT as shipped."
    else:
        peft_note = (
            f"PEFT as shipped: its loaded adapters in float32, so (c) runs their LoRA path in float32 on "
            f"the {args.dtype} base; the `cat` merge it builds is {args.dtype}."
        )
    lines = [
        f"`{command_line()}` — {stamp()}",
        "",
        f"{args.model} ({args.dtype}, CPU, torch threads: {torch.get_num_threads()}, {os.cpu_count()} cores, "
        f"load average {load[0]:.1f} at the end); {adapters} on {matrices} matrices. Batch {args.batch} test "
        f"prompts of math / code / reasoning in turn ({int(prompt_tokens.min())}–{int(prompt_tokens.max())} prompt "
        f"tokens with the chat template, left-padded alike for every variant), {n} new tokens per row, greedy, EOS "
        f"ignored alike (an ordinary token; `stop_at_eos=False` / `eos_token_id=None`). {rounds} after one warm-up "
        f"round, variants interleaved in a rotating order; tokens/s = rows × tokens / batch seconds (prefill "
        f"included); ratios use medians. {peft_note} torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}.",
        "",
        "| variant | decode loop | s / batch (median) | s / batch (best) | tokens/s (median) | tokens/s (best) | "
        "vs base, same loop | vs PEFT |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in (A, A2, C, B, B2, D, E, E2):
        med = median(times[name])
        base = median(times[base_of[name]])
        versus = f"{median(times[peft_of[name]]) / med:.2f}×" if name in peft_of else "–"
        lines.append(
            f"| {name} | {loop[name]} | {med:.2f} | {best(times[name]):.2f} | {tokens / med:,.0f} | "
            f"{tokens / best(times[name]):,.0f} | {base / med:.2f}× | {versus} |"
        )
    cat_diff = float((ours - merged["cat"]).abs().max())
    linear = (
        f"{float((ours - merged['linear']).abs().max()):.3g} — its cross terms B_i A_j (i ≠ j)"
        if "linear" in merged
        else "n/a (ranks differ: PEFT's `linear` merge needs equal ranks)"
    )
    lines += [
        "",
        f"- **Goal: (b) ≥ 1.0× (c) tokens/s → {median(times[C]) / median(times[B]):.2f}×** "
        f"(same loop, (b') / (c): {median(times[C]) / median(times[B2]):.2f}×); equal-weight mixture "
        f"(e) / (d): {median(times[D]) / median(times[E]):.2f}×, (e') / (d): "
        f"{median(times[D]) / median(times[E2]):.2f}×. Ratios are tokens/s (higher = t2ray faster).",
        f"- Single-adapter rows, greedy ids of (b) vs (c): {args.dtype}: {agreement(outputs[B], outputs[C])}"
        + ("" if args.dtype == "float32" else f"; float32: {agreement(match32[B], match32[C])}")
        + f". (b) rows whose output differs from the base model's (a'): "
        f"{int((outputs[B] != outputs[A2]).any(1).sum())}/{args.batch}.",
        f"- Exact mixture, float32, last-token logits of the {args.batch} prompts, equal weights 1/{k}: "
        f"max |t2ray (e) − PEFT `cat` merge| = {cat_diff:.3g}; max |t2ray (e) − PEFT `linear` merge| = {linear}. "
        f"Scale: max |mixture − base model| = {float((ours - base_logits).abs().max()):.3g}.",
    ]
    publish("lora_mixing", lines, not args.no_write)
    tmp.cleanup()


if __name__ == "__main__":
    main()
