"""What only a GPU shows, in one command (≤ 10 minutes on one GPU), one line per check (bench/GPU.md):

    python bench/gpu_check.py [--model smollm2-135m | FOLDER] [--random] [--out DIR]

1. env        the GPU, torch, CUDA, NCCL.
2. zero3      t2ray's training worker (t2ray.train.worker.run_worker: the code Ray Train runs) as 2 NCCL ranks on
              this GPU (1 rank when NCCL refuses two on one device), ZeRO-3, bf16 weights, activation checkpointing,
              SVF on every MLP matrix: a CPU tensor handed to NCCL, an fp32 zero.Init, a whole factor on a rank
              or a hang between ranks would show here. Per rank: iterations, s/iteration, dtypes, whole factor bytes,
              peak memory (the allocator's own counter).
3. plan       that peak beside `t2ray plan`'s prediction for the same run.
4. rollout    decode tokens/s through t2ray.generation (the one decode loop) at B = 1, 8, 32: base, materialised W',
              a z per row (the KV step replayed as CUDA graphs), the base model with the step run eagerly
              (T2RAY_CUDA_GRAPHS=0) and with Hugging Face's forward as the step; Hugging Face's generate for reference.
              `graphs`: graphed against eager greedy tokens, and the captures' count and seconds. Then the replica
              engine on the worker's GPU, and (where vllm is installed) rollout tokens/s through t2ray's vLLM engine
              at tensor parallel 1 vs the in-process decode, same prompts and z.

`--random`: a randomly initialised model of the same shape as --model's config (a machine without the weights:
the checks measure mechanics and speed, not accuracy). Results: one JSON line per check in DIR/gpu_check.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def line(out: Path, check: str, ok: bool, **fields) -> None:
    record = {"check": check, "ok": ok, **fields}
    with open(out / "gpu_check.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    shown = ", ".join(f"{k} {v}" for k, v in fields.items())
    print(f"{'ok  ' if ok else 'FAIL'} {check:8s} {shown}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_copy(spec: str, folder: Path) -> str:
    """A seeded random model with `spec`'s config and tokenizer, saved as a model folder (bf16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from t2ray.models.loader import load_tokenizer, resolve

    source = resolve(spec, 0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer(spec).save_pretrained(folder)
    return str(folder)


def experiment(model: str, storage: Path, iterations: int) -> dict:
    return {
        "name": "gpu-check",
        "task": "math",
        "model": {"spec": model, "dtype": "bfloat16"},
        "svf": {"target_modules": "mlp"},
        "rl": {
            "iterations": iterations,
            "batch_size": 16,
            "micro_batch_size": 8,
            "samples_per_prompt": 2,
            "baseline": "group",
            "max_new_tokens": 32,
            "eval_interval": iterations,
            "eval_limit": 16,
            "eval_batch_size": 16,
            "activation_checkpointing": True,
        },
        "deepspeed": {"enabled": True, "zero_stage": 3},
        "scaling": {"num_workers": 2, "use_gpu": True},
        "tracking": {"wandb": False},
        "storage_path": str(storage),
    }


def phase_peaks(result: dict) -> None:
    """Record, per phase of an iteration (rollout, update, evaluation), the allocator's peak above what was
    allocated when the phase began: what each phase adds to the resident weights, factors and optimizer."""
    from t2ray.rl import loop
    from t2ray.rl.rollout import InProcessEngine

    def measured(name, fn):
        def call(*args, **kwargs):
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                return fn(*args, **kwargs)
            finally:
                peak = torch.cuda.max_memory_allocated()
                result[f"{name}_added_gib"] = max(result.get(f"{name}_added_gib", 0.0), (peak - before) / 2**30)
                result["train_peak_gib"] = max(result.get("train_peak_gib", 0.0), peak / 2**30)

        return call

    loop._update = measured("update", loop._update)
    loop.sharded_accuracy = measured("evaluation", loop.sharded_accuracy)
    InProcessEngine.generate = measured("rollout", InProcessEngine.generate)


def zero3_rank(rank: int, world: int, port: int, config: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # every rank on the one GPU
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", 0))
    result: dict = {"rank": rank}
    times: list[float] = []
    try:
        from t2ray.config import ExperimentConfig
        from t2ray.train.worker import run_worker

        def on_start(state, adapter):
            whole_factor = sum(  # held now, or kept whole once first gathered (ZeRO-3's persistent parameters)
                getattr(p, "ds_numel", p.numel()) * p.element_size()
                for n, p in adapter.model.named_parameters()
                if n.endswith("svf_q") and (p.numel() > 0 or getattr(p, "ds_persist", False))
            )
            frozen = {
                str(getattr(p, "ds_tensor", p).dtype) for n, p in adapter.model.named_parameters() if "svf_p" not in n
            }
            result.update(
                whole_factor_bytes=whole_factor,
                frozen_dtypes=sorted(frozen),
                z_dtypes=sorted({str(p.dtype) for p in adapter.parameters()}),
                setup_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                resident_gib=torch.cuda.memory_allocated() / 2**30,
            )
            torch.cuda.reset_peak_memory_stats()
            times.append(time.perf_counter())

        cfg = ExperimentConfig.model_validate(config)
        cfg.scaling.num_workers = world
        phase_peaks(result)
        state = run_worker(cfg, rank=rank, world=world, local_rank=0, on_start=on_start)
        result.update(
            iterations=state.iteration,
            s_per_iteration=(time.perf_counter() - times[0]) / state.iteration,
        )
    except Exception as err:  # noqa: BLE001 — reported as the check's line
        result["error"] = f"{type(err).__name__}: {err}"[:500]
        result["traceback"] = traceback.format_exc()[-2500:]
    Path(out, f"zero3-rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def run_zero3(model: str, out: Path, world: int, iterations: int) -> list[dict]:
    folder = out / f"zero3-world{world}"
    folder.mkdir(exist_ok=True)
    context = mp.start_processes(
        zero3_rank,
        args=(world, free_port(), experiment(model, folder / "runs", iterations), str(folder)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 300
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                return [{"error": "timed out (ranks waiting on each other?)"}]
    except mp.ProcessRaisedException as err:  # a rank that failed before its own report (the process group)
        return [{"error": str(err).strip().splitlines()[-1]}]
    return [json.loads(p.read_text()) for p in sorted(folder.glob("zero3-rank*.json"))]


def check_zero3(model: str, out: Path, work: Path, iterations: int) -> list[dict]:
    ranks = run_zero3(model, work, 2, iterations)
    errors = [r["error"] for r in ranks if "error" in r]
    if errors and any("Duplicate GPU" in e or "ncclInvalidUsage" in e or "invalid usage" in e.lower() for e in errors):
        line(out, "zero3", True, note="NCCL refuses 2 ranks on one GPU: 1 rank", reason=errors[0][:160])
        ranks = run_zero3(model, work, 1, iterations)
        errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        line(
            out,
            "zero3",
            False,
            error=errors[0],
            traceback=next((r.get("traceback") for r in ranks if "traceback" in r), ""),
        )
        return ranks
    for r in ranks:
        line(
            out,
            "zero3",
            r["iterations"] == iterations
            and r["whole_factor_bytes"] == 0
            and r["frozen_dtypes"] == ["torch.bfloat16"]
            and r["z_dtypes"] == ["torch.float32"],
            rank=r["rank"],
            world=len(ranks),
            iterations=r["iterations"],
            s_per_iteration=round(r["s_per_iteration"], 2),
            frozen=r["frozen_dtypes"],
            z=r["z_dtypes"],
            whole_factor_bytes=r["whole_factor_bytes"],
            setup_peak_gib=round(r["setup_peak_gib"], 3),
            train_peak_gib=round(r["train_peak_gib"], 3),
            resident_gib=round(r["resident_gib"], 3),
            added_gib={k.removesuffix("_added_gib"): round(v, 3) for k, v in r.items() if k.endswith("_added_gib")},
        )
    return ranks


def math_prompt_tokens(model: str) -> int:
    """The longest prompt of the math task's train split, in tokens (chat template included): the update's width."""
    from t2ray.generation import render
    from t2ray.models.loader import load_tokenizer
    from t2ray.tasks import get_task

    tokenizer, task = load_tokenizer(model), get_task("math")
    texts = [render(tokenizer, task.messages(ex)) for ex in task.examples("train")[:256]]
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def planned_peak(model: str, world: int) -> object:
    """`t2ray plan` for the zero3 check's run, on `world` ranks of one GPU."""
    from t2ray.config import ExperimentConfig
    from t2ray.plan import experiment_run, plan_run

    cfg = ExperimentConfig.model_validate(experiment(model, Path("."), 1))
    cfg.scaling.num_workers = world
    total = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 80
    return plan_run(model, experiment_run(cfg, math_prompt_tokens(model)), total)


def check_plan(model: str, out: Path, ranks: list[dict]) -> None:
    """The planner's rows grouped as the phases hold them, beside the allocator's measurement of each phase."""
    if not ranks or "error" in ranks[0]:
        line(out, "plan", False, error="no zero3 measurement")
        return
    rows = planned_peak(model, len(ranks)).rows

    def summed(*starts: str) -> float:
        return sum(v for k, v in rows.items() if k.startswith(starts))

    predicted = {
        "resident": summed("frozen", "SVF factors", "trained"),
        "rollout": summed("rollout", "ZeRO-3"),
        "update": summed("activations", "logits", "one layer", "ZeRO-3"),
        "total": sum(rows.values()),
    }
    rank = max(ranks, key=lambda r: r["train_peak_gib"])
    measured = {
        "resident": rank["resident_gib"],
        "rollout": rank.get("rollout_added_gib", 0.0),
        "update": rank.get("update_added_gib", 0.0),
        "total": rank["train_peak_gib"],
    }
    ratios = {k: round(predicted[k] / measured[k], 2) if measured[k] else None for k in predicted}
    line(
        out,
        "plan",
        abs(ratios["total"] - 1) <= 0.15,
        predicted_gib={k: round(v, 3) for k, v in predicted.items()},
        measured_gib={k: round(v, 3) for k, v in measured.items()},
        predicted_over_measured=ratios,
        rows={k: round(v, 3) for k, v in rows.items()},
    )


def check_rollout(model: str, out: Path) -> None:
    from t2ray.generation import rollout
    from t2ray.models import load_model
    from t2ray.svf import SVFConfig, patch_model, set_mode, set_z
    from t2ray.tasks import get_task

    net, tokenizer = load_model(model, dtype="bfloat16", device="cuda")
    plain, _ = load_model(model, dtype="bfloat16", device="cuda")
    math = get_task("math")
    prompts = [math.messages(ex) for ex in math.examples("test")[:32]]
    layers = patch_model(net, SVFConfig(target_modules="mlp"), progress=False)

    def tokens_per_s(call, batch: int) -> float:
        call(8)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        call(64)
        torch.cuda.synchronize()
        return round(batch * 64 / (time.perf_counter() - start), 1)

    for batch in (1, 8, 32):
        rows = prompts[:batch]
        speeds = {}
        for mode, shape in (("base", None), ("materialized", ()), ("z per row", (batch,))):
            set_z(
                net,
                None
                if shape is None
                else {n: 0.5 + torch.rand(*shape, layer.rank, device="cuda") for n, layer in layers.items()},
            )
            set_mode(net, "factored" if mode == "z per row" else "materialized")
            speeds[mode] = tokens_per_s(
                lambda n, rows=rows: rollout(net, tokenizer, rows, max_new_tokens=n, ignore_eos=True), batch
            )
        set_z(net, None)
        set_mode(net, "materialized")
        # the same loop with the KV step run eagerly, and with Hugging Face's forward as its step
        for name, variable, value in (
            ("base, eager step", "T2RAY_CUDA_GRAPHS", "0"),
            ("base, HF step", "T2RAY_DECODE", "hf"),
        ):
            with environment(variable, value):
                speeds[name] = tokens_per_s(
                    lambda n, rows=rows: rollout(net, tokenizer, rows, max_new_tokens=n, ignore_eos=True), batch
                )
        encoded = tokenizer.apply_chat_template(
            rows, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        ).to("cuda")
        speeds["HF generate"] = tokens_per_s(
            lambda n, encoded=encoded: plain.generate(**encoded, max_new_tokens=n, min_new_tokens=n, do_sample=False),
            batch,
        )
        speeds["graphs ÷ eager step"] = round(speeds["base"] / speeds["base, eager step"], 2)
        line(out, "rollout", True, batch=batch, tokens_per_s=speeds)
    check_graphs(out, net, tokenizer, prompts)
    check_replica(model, out, net, layers, prompts[:8])
    check_engine(model, out, net, layers, tokenizer, prompts)


@contextmanager
def environment(variable: str, value: str):
    before = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def check_graphs(out: Path, net, tokenizer, prompts) -> None:
    """graphs: the KV step replayed as CUDA graphs against the same step run eagerly: greedy agreement over 32
    prompts × 64 tokens (bf16, ≥ 95 % of positions) and what capturing cost this process (t2ray.cuda_graphs.STATS)."""
    from t2ray.cuda_graphs import STATS
    from t2ray.generation import rollout

    graphed = rollout(net, tokenizer, prompts, max_new_tokens=64, ignore_eos=True).completion_ids
    with environment("T2RAY_CUDA_GRAPHS", "0"):
        eager = rollout(net, tokenizer, prompts, max_new_tokens=64, ignore_eos=True).completion_ids
    agreement = (graphed == eager).float().mean().item()
    line(
        out,
        "graphs",
        agreement >= 0.95 and STATS.replays > 0 and not STATS.failures,
        agreement=round(agreement, 3),
        captures=STATS.captures,
        capture_s=round(STATS.capture_seconds, 2),
        replays=STATS.replays,
        eager_steps=STATS.eager_steps,
        failures=STATS.failures[:3],
    )


def check_engine(model: str, out: Path, net, layers, tokenizer, prompts) -> None:
    """rollout_engine: vllm at tensor parallel 1 (what one GPU shows): rollout tokens/s through t2ray's VLLMEngine
    after one z sync vs the in-process decode at the same z, same 32 prompts (each row stops at EOS), and how often
    their greedy tokens agree (bf16, different kernels)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        line(out, "engine", True, skipped="vllm is not installed in this python (`pip install vllm`)")
        return
    from t2ray.generation import rollout
    from t2ray.rl.rollout import z_message
    from t2ray.rl.vllm_engine import VLLMEngine
    from t2ray.svf import set_mode, set_z

    z = {n: 0.5 + torch.rand(layer.rank, device="cuda") for n, layer in layers.items()}
    set_z(net, z)
    set_mode(net, "materialized")
    start = time.perf_counter()
    engine = VLLMEngine(model, {"target_modules": "mlp"}, dtype="bfloat16", gpu_memory_utilization=0.3)
    start_s = time.perf_counter() - start
    sent = engine.receive(z_message(net, 1))

    def timed(call) -> tuple[float, torch.Tensor, torch.Tensor]:
        call()  # warm-up
        torch.cuda.synchronize()
        begin = time.perf_counter()
        roll = call()
        torch.cuda.synchronize()
        return (
            int(roll.completion_mask.sum()) / (time.perf_counter() - begin),
            roll.completion_ids,
            roll.completion_mask,
        )

    def ours():
        return rollout(net, tokenizer, prompts, max_new_tokens=64)

    def theirs():
        return engine.generate(prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0)

    (hf_rate, hf_ids, hf_mask), (engine_rate, engine_ids, _) = timed(ours), timed(theirs)
    width = min(hf_ids.shape[1], engine_ids.shape[1])
    same = ((hf_ids[:, :width].cpu() == engine_ids[:, :width].cpu()) & hf_mask[:, :width].cpu().bool()).sum()
    agreement = float(same / hf_mask[:, :width].sum().clamp(min=1))
    line(
        out,
        "engine",
        agreement >= 0.8,
        start_s=round(start_s, 1),
        bytes_sent=sent,
        tokens_per_s={"vLLM engine tp=1": round(engine_rate, 1), "in-process": round(hf_rate, 1)},
        engine_over_in_process=round(engine_rate / hf_rate, 2),
        agreement=round(agreement, 3),
    )


def check_replica(model: str, out: Path, net, layers, prompts) -> None:
    """rollout_engine: replica on a GPU lives in the worker's process, on the worker's GPU, and answers as the
    trainer does after one z sync (bf16: agreement, not identity)."""
    from t2ray.generation import rollout
    from t2ray.rl.rollout import ReplicaEngine
    from t2ray.svf import SVFConfig, set_mode, set_z
    from t2ray.train.engines import LocalReplica

    z = {n: 0.5 + torch.rand(layer.rank, device="cuda") for n, layer in layers.items()}
    set_z(net, z)
    set_mode(net, "materialized")
    engine = LocalReplica(ReplicaEngine(model, SVFConfig(target_modules="mlp"), "bfloat16", device="cuda"))
    sent = engine.sync(net, 1)
    trainer = rollout(net, engine.replica.tokenizer, prompts, max_new_tokens=32).completion_ids
    replica = engine.generate(prompts, max_new_tokens=32, temperature=0, top_p=1, seed=0).completion_ids
    width = min(trainer.shape[1], replica.shape[1])
    agreement = (trainer[:, :width].cpu() == replica[:, :width].cpu()).float().mean().item()
    device = next(engine.replica.model.parameters()).device.type
    line(out, "replica", device == "cuda" and agreement >= 0.9, device=device, bytes_sent=sent, agreement=agreement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random", action="store_true", help="a random model of --model's shape")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", default="runs/gpu_check", help="where gpu_check.jsonl is written")
    parser.add_argument("--work", default=None, help="runs and the random model (default: a temporary folder)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["zero3", "plan", "rollout"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    line(
        out,
        "env",
        True,
        gpu=props.name,
        memory_gib=round(props.total_memory / 2**30, 1),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        nccl=".".join(map(str, torch.cuda.nccl.version())),
        capability=f"{props.major}.{props.minor}",
    )
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    model = random_copy(args.model, work / "random-model") if args.random else args.model
    ranks = []
    for check in ("zero3", "plan", "rollout"):
        if check in args.skip:
            continue
        start = time.perf_counter()
        try:
            if check == "zero3":
                ranks = check_zero3(model, out, work, args.iterations)
            elif check == "plan":
                check_plan(model, out, ranks)
            else:
                check_rollout(model, out)
        except Exception as err:  # noqa: BLE001 — one failed check does not hide the others
            line(
                out, check, False, error=f"{type(err).__name__}: {err}"[:400], traceback=traceback.format_exc()[-1500:]
            )
        print(f"     {check} took {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
