"""Training throughput on SmolLM2-135M-Instruct: SVF vs PEFT LoRA r=16 vs the frozen base (the limit).

    .venv/bin/python bench/train_throughput.py [--batch 16] [--seq 64] [--repeats 3] [--no-write]

Same batch, same target modules (the MLP of all 30 layers). One fwd+bwd of the RL loss per call:
  SVF as it trains (factored: z applied on activations), SVF with W' rebuilt under autograd every step (the
  path training took before; shown for the ratio), LoRA r=16 (α 32), and the frozen base with gradients only
  to the input embeddings (no weight gradients: the cost every method pays at least). Also: rollout tokens/s with
  SVF weights ÷ base (generation with W' materialized once), and bytes synced per step with z-only sync ÷ all weights.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import best, command_line, interleaved, median, publish, stamp  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from t2ray.generation import rollout  # noqa: E402
from t2ray.models import load_model  # noqa: E402
from t2ray.rl.rollout import z_message  # noqa: E402
from t2ray.svf import SVFConfig, patch_model, select_targets, set_mode, svf_layers, use_trainable  # noqa: E402


def fwd_bwd(model, ids, params_for_grad):
    def run():
        for p in params_for_grad:
            p.grad = None
        logits = model(input_ids=ids, use_cache=False).logits
        loss = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).mean()
        loss.backward()

    return run


def frozen_base_fwd_bwd(model, ids):
    embed = model.get_input_embeddings()

    def run():
        inputs = embed(ids).detach().requires_grad_()
        logits = model(inputs_embeds=inputs, use_cache=False).logits
        (-torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).mean()).backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    base, tokenizer = load_model("smollm2-135m")
    svf = copy.deepcopy(base)
    patch_model(svf, SVFConfig(target_modules="mlp"), progress=False)
    svf_params = use_trainable(svf)
    lora = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=select_targets(base, "mlp"))
    )
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def svf_through_weight():
        run = fwd_bwd(svf, ids, svf_params)
        layers = list(svf_layers(svf).values())

        def go():
            for layer in layers:  # instance attribute shadows SVFLinear.forward for this call only
                layer.forward = lambda x, layer=layer: F.linear(
                    x, layer.adapted_weight(layer.z()), layer.base_layer.bias
                )
            try:
                run()
            finally:
                for layer in layers:
                    del layer.forward

        return go

    times = interleaved(
        {
            "frozen base (limit)": frozen_base_fwd_bwd(base, ids),
            "LoRA r=16": fwd_bwd(lora, ids, lora_params),
            "SVF (as it trains)": fwd_bwd(svf, ids, svf_params),
            "SVF, autograd through W'": svf_through_weight(),
        },
        args.repeats,
    )
    tokens = args.batch * args.seq
    tps = {k: tokens / best(v) for k, v in times.items()}

    prompts = ["Write one sentence about the sea."] * args.batch
    set_mode(svf, "materialized")
    gen = interleaved(
        {
            "base": lambda: rollout(base, tokenizer, prompts, max_new_tokens=args.gen_tokens, seed=0),
            "SVF": lambda: rollout(svf, tokenizer, prompts, max_new_tokens=args.gen_tokens, seed=0),
        },
        args.repeats,
    )
    z_bytes = len(z_message(svf, 0))
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())

    rows = [
        f"| {k} | {median(v):.2f} | {tps[k]:.0f} | {tps[k] / tps['frozen base (limit)']:.2f} |"
        for k, v in times.items()
    ]
    text = f"""`{command_line()}` — {stamp()}

SmolLM2-135M-Instruct fp32 on CPU ({torch.get_num_threads()} threads), MLP of all 30 layers adapted,
batch {args.batch} × {args.seq} tokens, fwd+bwd of a token log-likelihood loss; best of {args.repeats}
interleaved rounds (median shown).

| variant | median s / step | tokens/s (best) | ÷ frozen base |
|---|---:|---:|---:|
{chr(10).join(rows)}

| measure | value |
|---|---:|
| **SVF ÷ LoRA** (goal ≥ 0.8) | {tps["SVF (as it trains)"] / tps["LoRA r=16"]:.2f} |
| **SVF ÷ frozen base** | {tps["SVF (as it trains)"] / tps["frozen base (limit)"]:.2f} |
| SVF ÷ SVF with autograd through W' | {tps["SVF (as it trains)"] / tps["SVF, autograd through W'"]:.2f} |
| rollout tokens/s, SVF (W' materialized) ÷ base (goal ≥ 0.95) | {best(gen["base"]) / best(gen["SVF"]):.2f} |
| bytes synced per step: z only | {z_bytes:,} |
| … ÷ all weights ({weight_bytes:,} bytes) | {z_bytes / weight_bytes:.2e} |
"""
    publish("train_throughput", text, not args.no_write)


if __name__ == "__main__":
    main()
