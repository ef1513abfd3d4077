"""What each Ray Train worker runs: build model + adapter, wrap in DeepSpeed, run the plain RL loop,
report metrics every iteration and a checkpoint (z + full Adam moments + loop state) every eval."""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
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


def build_adapter(cfg, model, gather=None, **patch):
    """The trained adapter on `model`; `patch`: patch_model's factor source and layer build (ZeRO-3)."""
    from t2ray.svf import model_fingerprint
    from t2ray.svf.decompose import no_gather

    gather = gather or no_gather
    model.t2ray_fingerprint = model_fingerprint(model, gather=gather)  # of the untouched base weights
    if cfg.method == "lora":
        from t2ray.lora import LoRAAdapter

        return LoRAAdapter(model, cfg.lora, cfg.svf, seed=cfg.seed)
    from t2ray.rl.trainable import SVFAdapter

    return SVFAdapter(model, cfg.svf, seed=cfg.seed, progress=False, gather=gather, **patch)


def keep_trainable_whole(ds_config: dict, largest: int) -> int | None:
    """ZeRO-3 partitions every parameter with at least `stage3_param_persistence_threshold` values; the trained
    ones (z, LoRA's A/B) must stay whole, as the loop reads and checkpoints them on each rank. Raises the threshold
    above the largest of them, `largest` values (frozen weights larger than that stay partitioned); returns the new
    value, or None."""
    zero = ds_config["zero_optimization"]
    if zero.get("stage3_param_persistence_threshold", 0) > largest:
        return None
    zero["stage3_param_persistence_threshold"] = largest + 1
    return largest + 1


def size_buckets(ds_config: dict, trained_values: int) -> int:
    """DeepSpeed allocates its gradient buckets at their configured size, 5e8 values by default whatever trains:
    1 GB per GPU (measured on an H200, bench/RESULTS.md `gpu_check`) for a z of 52k values. Every trained value
    fits one bucket of their own size (even: NCCL's 4-byte alignment of 16-bit buffers); returns it."""
    size = trained_values + trained_values % 2
    ds_config["zero_optimization"].update(reduce_bucket_size=size, allgather_bucket_size=size)
    return size


def largest_z(model, cfg) -> int:
    """The longest z-vector the SVF patch will create: min(out, in) of its largest target."""
    from t2ray.svf import select_targets

    modules = dict(model.named_modules())
    return max(
        min(modules[n].out_features, modules[n].in_features)
        for n in select_targets(model, cfg.svf.target_modules, cfg.svf.layers)
    )


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
    """Ray Train's entry: the run's place in the worker group, its checkpoint, and reports to the driver."""
    import ray.train

    from t2ray.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        )

    with checkpoint.as_directory() if checkpoint else nullcontext() as folder:
        run_worker(
            cfg,
            rank=rank,
            world=world,
            local_rank=ctx.get_local_rank(),
            resume_from=Path(folder) if folder else None,
            report=report,
            on_start=lambda state, adapter: record_placement(cfg.run_dir, rank, world, state.iteration),
            engines=loop_config.get("engines"),
        )


def select_accelerator(use_gpu: bool) -> str:
    """DeepSpeed's accelerator, always from the config (before deepspeed is imported): a DS_ACCELERATOR=cpu inherited
    from a shell that ran `make` must not put a GPU run on DeepSpeed's CPU accelerator."""
    os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    return os.environ["DS_ACCELERATOR"]


def skip_shm_all_reduce_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at its first init_distributed (≈ 30 s on every
    fresh machine, and a C++ compiler on every node) for tensor-parallel inference only, which t2ray never runs:
    marked incompatible, it is not built and ZeRO's collectives go through gloo as before."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def run_worker(
    cfg,
    *,
    rank: int,
    world: int,
    local_rank: int,
    resume_from: Path | None = None,
    report: Callable[[dict, Path | None], None] = lambda metrics, checkpoint_dir: None,
    on_start: Callable[[object, object], None] = lambda state, adapter: None,
    engines: list | None = None,
):
    """One rank of a training run, without Ray (Ray Train's worker, or a plain `torch.distributed` process such as
    bench/gpu_check.py's): the process group is already up (or world is 1). Builds the model and adapter (ZeRO-3:
    partitioned as built, each SVD once for all ranks), wraps them in DeepSpeed, runs the plain RL loop, reports
    metrics every iteration and a checkpoint (z + full Adam moments + loop state) at every evaluation; rank 0 writes
    the expert. `engines`: the run's shared rollout engine actors (rollout.num_engines ≥ 1). Returns the loop's
    final state."""
    select_accelerator(cfg.scaling.use_gpu)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # no oversubscription of shared cores
    # DeepSpeed's ZeRO calls a torch collective that torch deprecated: once per step, in every worker's log
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

    import deepspeed

    if not cfg.scaling.use_gpu:
        skip_shm_all_reduce_build()
    from t2ray.models import load_model
    from t2ray.models.loader import compute_dtype, enable_activation_checkpointing
    from t2ray.rl.loop import LoopState, Stepper, train_loop
    from t2ray.svf.decompose import no_gather
    from t2ray.tasks import get_task
    from t2ray.train.collectives import all_reduce_sum, barrier, every_rank_done, raise_if_any_rank_failed, spread
    from t2ray.train.zero3 import register_svf_external_params, shared_factors

    if cfg.scaling.use_gpu:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (z, the loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    device = f"cuda:{local_rank}" if cfg.scaling.use_gpu else "cpu"
    task = get_task(cfg.task, seed=cfg.seed)
    zero3 = cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3
    dtype = compute_dtype(cfg.model.dtype, device)
    ds_config = cfg.deepspeed.to_dict(cfg.rl.batch_size, world, cfg.rl.grad_clip, cfg.rl.lr, dtype)
    hf_ds = None
    if zero3:
        # ZeRO-3 through transformers' hook: weights are partitioned as they are built (keep the object alive).
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
        hf_ds = HfDeepSpeedConfig(ds_config)
    model, tokenizer = load_model(cfg.model.spec, dtype=dtype, device=device, seed=cfg.seed)
    if cfg.rl.activation_checkpointing:
        enable_activation_checkpointing(model)
    if zero3 and cfg.method == "svf":
        raised = keep_trainable_whole(ds_config, largest_z(model, cfg))
        adapter = build_adapter(
            cfg,
            model,
            deepspeed.zero.GatheredParameters,
            factors=shared_factors,
            # partitioned as it is built (z too: DeepSpeed keeps it whole from initialize on), in its own dtype
            place=lambda layer: deepspeed.zero.Init(module=layer, config_dict_or_path=ds_config),
        )
    else:
        adapter = build_adapter(cfg, model, deepspeed.zero.GatheredParameters if zero3 else None)
        raised = keep_trainable_whole(ds_config, max(p.numel() for p in adapter.parameters())) if zero3 else None
    if raised and rank == 0:
        print(
            f"t2ray: ZeRO-3 param_persistence_threshold raised to {raised}: every trained tensor stays whole "
            "on each rank (a partitioned one would be checkpointed as empty shards)"
        )
    state = LoopState()
    if resume_from is not None:  # before deepspeed.initialize (see restore_adapter_and_state)
        # ZeRO-3: z was partitioned as its layer was built (DeepSpeed keeps it whole from initialize on): every rank
        # loads the same checkpoint into the gathered values, rank 0's are kept
        with deepspeed.zero.GatheredParameters(adapter.parameters(), modifier_rank=0) if zero3 else nullcontext():
            restore_adapter_and_state(resume_from, adapter, state)
    if cfg.deepspeed.enabled:
        if zero3:
            register_svf_external_params(adapter.model)
        size_buckets(
            ds_config, sum(getattr(p, "ds_numel", p.numel()) for p in adapter.parameters())
        )  # ZeRO-3: whole sizes
        engine, *_ = deepspeed.initialize(model=adapter.model, model_parameters=adapter.parameters(), config=ds_config)
        stepper = DeepSpeedStepper(engine, adapter.parameters())
    else:
        stepper = Stepper(adapter.parameters(), cfg.rl.lr, cfg.rl.grad_clip)
    if resume_from is not None:
        restore_optimizer(resume_from, stepper)

    run_dir = cfg.run_dir
    on_start(state, adapter)  # set up: the loop state (resumed or new) and the adapter on its DeepSpeed model
    tracker = None
    if rank == 0:
        from t2ray.train.tracking import Tracker

        run_dir.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(run_dir, cfg.name, cfg.model_dump(), cfg.tracking.wandb, cfg.tracking.project)

    def on_iteration(st, metrics: dict) -> None:
        if rank == 0:
            tracker.log(metrics)  # the driver draws the progress bar from the reports (t2ray.train.progress)
        if "valid_accuracy" not in metrics:
            report(metrics, None)
            return
        optimizer = stepper.optimizer_state()  # collective: all ranks
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                write_checkpoint(Path(tmp), adapter, optimizer, st)
            report(metrics, Path(tmp) if rank == 0 else None)

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
        engine=start_engine(
            cfg, device, engines, rank, gather=deepspeed.zero.GatheredParameters if zero3 else no_gather
        ),
        all_done=every_rank_done if zero3 and world > 1 else None,
        agree=raise_if_any_rank_failed,
    )
    z_spread = spread(sum(float(p.detach().double().sum()) for p in adapter.parameters()))
    if rank == 0:
        best = state.best_state or adapter.state()
        metrics = {
            "best_valid_accuracy": state.best_valid,
            "best_iteration": state.best_iteration,
            "iterations": state.iteration,
            "z_rank_spread": z_spread,
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
    barrier()
    return state
