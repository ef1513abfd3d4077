"""What each Ray Train worker runs: build model + adapter, wrap in DeepSpeed, run the plain RL loop,
report metrics every iteration and a checkpoint (z + full Adam moments + loop state) every eval."""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

CHECKPOINT_ADAPTER = "adapter.safetensors"
CHECKPOINT_BEST = "best.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
CHECKPOINT_STATE = "state.json"


class DeepSpeedStepper:
    """`backward` per micro-batch, one `step` through DeepSpeed (it all-reduces z's gradients, clips and runs Adam
    on its shard). The config sets managed_gradient_accumulation off: step() is the accumulation boundary."""

    def __init__(self, engine, params):
        self.engine, self.params = engine, params

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already weighs each micro-batch's share

    def step(self) -> float:
        self.engine.step()
        # DeepSpeed writes the new values through its flat buffers, behind autograd's back: the parameters'
        # version counters do not move, so SVF layers would keep serving generation the W' cached for the
        # old z (rollouts and evaluations would never see training). Bump them.
        torch.autograd.graph.increment_version(self.params)
        return float(self.engine.get_global_grad_norm() or 0.0)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        # Collective: every rank calls it; the moments come back whole, whatever the ZeRO stage or world size.
        from deepspeed.utils import safe_get_full_optimizer_state

        out = {}
        for i, p in enumerate(self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                value = safe_get_full_optimizer_state(p, key)
                if value is not None:
                    out[f"{key}.{i}"] = value.detach().float().cpu().reshape(-1)
        steps = [st["step"] for st in self._adam_states() if "step" in st]
        if out and steps:  # Adam's bias correction depends on it: a resumed run must not restart at step 1
            out["step"] = torch.tensor([float(steps[0])])
        return out

    def _adam_states(self) -> list[dict]:
        adam = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # ZeRO wraps torch's Adam
        return list(adam.state.values())

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if not any(key.startswith("exp_avg") for key in state):
            return
        self._create_optimizer_state()
        for i, p in enumerate(self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                if f"{key}.{i}" in state:
                    safe_set_full_optimizer_state(
                        p, state[f"{key}.{i}"].view(p.ds_shape if hasattr(p, "ds_shape") else p.shape), key
                    )
        if "step" in state:
            step = float(state["step"][0])
            for st in (st for st in self._adam_states() if "step" in st):
                st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else int(step)

    def _create_optimizer_state(self) -> None:
        """Adam allocates its moments at its first step, and DeepSpeed links them to the parameters only then
        (before it, safe_set_full_optimizer_state fails): take one step at lr 0 on zero gradients so they exist.
        Collective, like every step; the parameters do not move."""
        groups = self.engine.optimizer.param_groups
        lrs = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = 0.0
        try:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.params):  # ZeRO-3: whole while the graph is built
                zero = sum((p * 0.0).sum() for p in self.params)
            self.backward(zero)
            self.engine.step()
        finally:
            for group, lr in zip(groups, lrs, strict=True):
                group["lr"] = lr


def build_adapter(cfg, model, gather=None):
    from t2ray.svf import model_fingerprint
    from t2ray.svf.decompose import no_gather

    gather = gather or no_gather
    model.t2ray_fingerprint = model_fingerprint(model, gather=gather)  # of the untouched base weights
    if cfg.method == "lora":
        from t2ray.lora import LoRAAdapter

        return LoRAAdapter(model, cfg.lora, cfg.svf, seed=cfg.seed)
    from t2ray.rl.trainable import SVFAdapter

    return SVFAdapter(model, cfg.svf, seed=cfg.seed, progress=False, gather=gather)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def keep_trainable_whole(ds_config: dict, params) -> int | None:
    """ZeRO-3 partitions every parameter with at least `stage3_param_persistence_threshold` values; the trained
    ones (z, LoRA's A/B) must stay whole, as the loop reads and checkpoints them on each rank. Raises the threshold
    above the largest of them (frozen weights larger than that stay partitioned); returns the new value, or None."""
    zero = ds_config["zero_optimization"]
    needed = max(p.numel() for p in params) + 1
    if zero.get("stage3_param_persistence_threshold", 0) >= needed:
        return None
    zero["stage3_param_persistence_threshold"] = needed
    return needed


def every_rank_done(mine: bool) -> bool:
    """ZeRO-3 generation lockstep: True when no rank has a row still decoding (a collective, once per step)."""
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return float(all_reduce_max(torch.tensor([0.0 if mine else 1.0], device=device))) == 0.0


def z_spread_across_ranks(adapter) -> float:
    """max − min over workers of a checksum of the trained parameters: 0 when every rank holds the same z."""
    checksum = sum(float(p.detach().double().sum()) for p in adapter.parameters())
    high = all_reduce_max(torch.tensor([checksum], dtype=torch.float64))
    low = -all_reduce_max(torch.tensor([-checksum], dtype=torch.float64))
    return float(high - low)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def write_checkpoint(folder: Path, adapter, optimizer: dict[str, torch.Tensor], state) -> None:
    save_file(adapter.state(), folder / CHECKPOINT_ADAPTER)
    if state.best_state is not None:
        save_file(state.best_state, folder / CHECKPOINT_BEST)
    if optimizer:
        save_file(optimizer, folder / CHECKPOINT_OPTIMIZER)
    (folder / CHECKPOINT_STATE).write_text(
        json.dumps(
            {
                "iteration": state.iteration,
                "best_valid": state.best_valid,
                "best_iteration": state.best_iteration,
                "history": state.history,
            }
        )
    )


def restore_adapter_and_state(folder: Path, adapter, state) -> None:
    """The trained parameters and the loop state. Call it BEFORE deepspeed.initialize: DeepSpeed copies the
    parameters into its own fp32 master copy there, and its first step would overwrite anything loaded later."""
    adapter.load_state(load_file(folder / CHECKPOINT_ADAPTER))
    saved = json.loads((folder / CHECKPOINT_STATE).read_text())
    state.iteration, state.best_valid = saved["iteration"], saved["best_valid"]
    state.best_iteration, state.history = saved["best_iteration"], saved["history"]
    if (folder / CHECKPOINT_BEST).exists():
        state.best_state = load_file(folder / CHECKPOINT_BEST)


def restore_optimizer(folder: Path, stepper) -> None:
    """The Adam moments, into the stepper that wraps the (already initialised) optimizer."""
    if (folder / CHECKPOINT_OPTIMIZER).exists():
        stepper.load_optimizer_state(load_file(folder / CHECKPOINT_OPTIMIZER))


def record_placement(run_dir: Path, rank: int, world: int, resumed_at: int) -> None:
    """One line per rank and (re)start in run_dir/workers.jsonl: which node ran it, from which iteration."""
    import ray

    run_dir.mkdir(parents=True, exist_ok=True)
    line = {
        "rank": rank,
        "world_size": world,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "resumed_at": resumed_at,
        "time": time.time(),
    }
    with open(run_dir / "workers.jsonl", "a") as f:  # one short append per rank: whole lines on a shared disk
        f.write(json.dumps(line) + "\n")


def train_worker(loop_config: dict) -> None:
    import ray.train

    from t2ray.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # no oversubscription of shared cores
    # DeepSpeed's ZeRO calls a torch collective that torch deprecated: once per step, in every worker's log
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

    import deepspeed

    from t2ray.models import load_model
    from t2ray.rl.loop import LoopState, Stepper, train_loop
    from t2ray.tasks import get_task

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = f"cuda:{ctx.get_local_rank()}" if cfg.scaling.use_gpu else "cpu"
    task = get_task(cfg.task, seed=cfg.seed)
    ds_config = cfg.deepspeed.to_dict(cfg.rl.batch_size, world, cfg.rl.grad_clip, cfg.rl.lr)
    hf_ds = None
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
        # ZeRO-3 through transformers' hook: weights are partitioned as they are built (keep the object alive).
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
        hf_ds = HfDeepSpeedConfig(ds_config)
    model, tokenizer = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=device, seed=cfg.seed)
    adapter = build_adapter(cfg, model, deepspeed.zero.GatheredParameters if hf_ds is not None else None)
    if hf_ds is not None:
        raised = keep_trainable_whole(ds_config, adapter.parameters())
        if raised and rank == 0:
            print(
                f"t2ray: ZeRO-3 param_persistence_threshold raised to {raised}: every trained tensor stays whole "
                "on each rank (a partitioned one would be checkpointed as empty shards)"
            )
    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # before deepspeed.initialize (see restore_adapter_and_state)
        with checkpoint.as_directory() as folder:
            restore_adapter_and_state(Path(folder), adapter, state)
    if cfg.deepspeed.enabled:
        if hf_ds is not None:
            from t2ray.train.zero3 import register_svf_external_params

            register_svf_external_params(adapter.model)
        engine, *_ = deepspeed.initialize(model=adapter.model, model_parameters=adapter.parameters(), config=ds_config)
        stepper = DeepSpeedStepper(engine, adapter.parameters())
    else:
        stepper = Stepper(adapter.parameters(), cfg.rl.lr, cfg.rl.grad_clip)

    if checkpoint:
        with checkpoint.as_directory() as folder:
            restore_optimizer(Path(folder), stepper)

    run_dir = cfg.run_dir
    record_placement(run_dir, rank, world, state.iteration)
    tracker = None
    if rank == 0:
        from t2ray.train.tracking import Tracker

        run_dir.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(run_dir, cfg.name, cfg.model_dump(), cfg.tracking.wandb, cfg.tracking.project)

    def on_iteration(st, metrics: dict) -> None:
        is_eval = "valid_accuracy" in metrics
        if rank == 0:
            tracker.log(metrics)  # the driver draws the progress bar from the reports (t2ray.train.progress)
        if is_eval:
            optimizer = stepper.optimizer_state()  # collective: all ranks
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    write_checkpoint(Path(tmp), adapter, optimizer, st)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        else:
            ray.train.report(metrics)

    from t2ray.train.engines import start_engine

    state = train_loop(
        cfg,
        adapter.model,
        tokenizer,
        task,
        adapter,
        stepper,
        rank=rank,
        world_size=world,
        reduce=all_reduce_sum,
        state=state,
        on_iteration=on_iteration,
        engine=start_engine(cfg),
        all_done=every_rank_done if cfg.deepspeed.zero_stage == 3 and world > 1 else None,
    )
    spread = z_spread_across_ranks(adapter)
    if rank == 0:
        best = state.best_state or adapter.state()
        metrics = {
            "best_valid_accuracy": state.best_valid,
            "best_iteration": state.best_iteration,
            "iterations": state.iteration,
            "z_rank_spread": spread,
        }
        adapter.save(
            run_dir / "expert",
            best,
            name=cfg.name,
            task=cfg.task,
            training=cfg.model_dump(mode="json"),
            metrics=metrics,
        )
        tracker.finish(state.history, f"{cfg.name}: {cfg.method} on {cfg.task}")
    del hf_ds
    if dist.is_initialized():
        dist.barrier()
