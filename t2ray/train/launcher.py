"""Driver side of `t2ray train`: validate, start (or join) Ray, run TorchTrainer, hand back the expert."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import yaml

from t2ray.config import ExperimentConfig
from t2ray.console import VERBOSE_ENV, ray_log_options
from t2ray.ray_auth import enable_token_auth

FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "WANDB_MODE",
    "WANDB_API_KEY",
    "T2RAY_CACHE",
    "TORCH_EXTENSIONS_DIR",
    VERBOSE_ENV,
)


class TrainError(RuntimeError):
    """Training could not start or did not finish (one-line, user-facing)."""


@dataclass
class TrainOutcome:
    run_dir: Path
    expert_path: Path
    history: list[dict]

    @property
    def best_valid(self) -> float:
        evals = [m["valid_accuracy"] for m in self.history if "valid_accuracy" in m]
        return max(evals, default=float("nan"))


def ensure_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # Inside a Ray job (`t2ray submit`, `ray job submit`) the job's runtime_env already carries the environment,
    # and Ray refuses a second one that names the same variables.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    env = {} if in_job else {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    enable_token_auth(create=address is None and not in_job)  # a cluster t2ray starts is token-protected
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, **ray_log_options())


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse what the cluster can never place (Ray Train would wait for it forever), engines included."""
    import ray

    s, r = cfg.scaling, cfg.rollout
    total = ray.cluster_resources()
    engines = r.num_engines if cfg.rl.rollout_engine != "hf" else 0
    bundle = r.bundle(s.use_gpu)
    worker = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    for kind in ("GPU", "CPU") if s.use_gpu else ("CPU",):
        need, have = s.num_workers * worker[kind] + engines * bundle.get(kind, 0), total.get(kind, 0)
        if need > have:
            also = f" and {engines} rollout engine(s) of {bundle}" if engines else ""
            raise TrainError(
                f"{s.num_workers} workers{also} need {need:g} {kind}s but the cluster has {have:g}; "
                f"lower scaling.num_workers or scaling.cpus_per_worker" + (" or rollout.num_engines" if engines else "")
            )
    if engines and not any(
        n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in bundle.items()) for n in ray.nodes()
    ):
        raise TrainError(f"no node can hold one rollout engine ({bundle}): an engine's GPUs must be on one node")
    for name, amount in s.resources.items():
        if s.num_workers * amount > total.get(name, 0):
            raise TrainError(
                f"{s.num_workers} workers need {s.num_workers * amount:g} of resource {name!r} but the "
                f"cluster has {total.get(name, 0):g} (nodes started with --resources='{{\"{name}\": N}}')"
            )
    if s.placement_strategy == "STRICT_SPREAD":
        worker = s.per_worker() | ({"GPU": 1} if s.use_gpu else {})
        hosts = [n for n in ray.nodes() if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in worker.items())]
        if len(hosts) < s.num_workers:
            raise TrainError(
                f"placement STRICT_SPREAD puts each of the {s.num_workers} workers on its own node, but "
                f"only {len(hosts)} node(s) can hold one ({worker}); use SPREAD or PACK, or add nodes"
            )


def check_task(cfg: ExperimentConfig) -> None:
    from t2ray.tasks import get_task

    task = get_task(cfg.task, seed=cfg.seed)
    try:
        train = task.examples("train")
    except ValueError as err:
        raise TrainError(f"task {cfg.task!r} has no training split: {err}") from None
    if not train:
        raise TrainError(f"task {cfg.task!r} has an empty training split")
    from t2ray.rl.loop import reward_function

    try:
        reward_function(task, cfg.rl.reward)
    except ValueError as err:
        raise TrainError(str(err)) from None


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[int, dict] = {}
    for row in rows:  # a resumed run re-logs iterations after its last checkpoint: keep the latest
        latest[row["iteration"]] = row
    return [latest[i] for i in sorted(latest)]


def scaling_config(cfg: ExperimentConfig):
    """Ray Train's placement of the run's workers (the engines have a placement group of their own)."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=cfg.scaling.per_worker(),
        placement_strategy=cfg.scaling.placement_strategy,
    )


def make_trainer(cfg: ExperimentConfig, worker, loop_config: dict, callbacks: list | None = None):
    """The TorchTrainer of one run (plain `t2ray train` and every Tune trial): writes the run's config.yaml."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint_keep),
            callbacks=callbacks or [],
        ),
    )


@contextmanager
def rollout_engines(cfg: ExperimentConfig):
    """The run's shared rollout engines (rollout.num_engines ≥ 1), placed and started before the trainers and
    stopped after them; None when each worker has its own."""
    if cfg.rl.rollout_engine == "hf" or cfg.rollout.num_engines == 0:
        yield None
        return
    from t2ray.train.engines import EnginePool, EngineStartError

    r, gpu = cfg.rollout, cfg.scaling.use_gpu
    what = f"{r.num_engines} {cfg.rl.rollout_engine} rollout engine(s) of {r.bundle(gpu)}, tensor parallel {r.tp(gpu)}"
    print(f"t2ray: starting {what}", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        pool = EnginePool(cfg)
    except EngineStartError as err:
        raise TrainError(str(err)) from None
    where = "; ".join(f"{p['node'][:8]} GPUs {p['gpus'] or '-'}" for p in pool.placements)
    print(f"t2ray: rollout engines ready in {time.monotonic() - start:.0f} s ({where})", file=sys.stderr, flush=True)
    try:
        yield pool.handles
    finally:
        pool.close()


def train(cfg: ExperimentConfig, *, address: str | None = None, progress: bool = True) -> TrainOutcome:
    """Run (or resume: same storage_path and name) an expert's training on Ray Train; `progress`: the driver
    draws a bar from the workers' reports."""
    cfg = cfg.with_absolute_paths()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # report() waits on this poll
    check_task(cfg)
    from t2ray.models.loader import resolve

    resolve(cfg.model.spec, cfg.seed)  # build local model caches once here, not in every worker at the same time
    ensure_ray(address)
    check_resources(cfg)
    from t2ray.train.progress import DriverProgress
    from t2ray.train.worker import train_worker

    run_dir = cfg.run_dir
    with (
        rollout_engines(cfg) as engines,
        DriverProgress(cfg.name, cfg.rl.iterations) if progress else nullcontext() as bar,
    ):
        loop_config = {"experiment": cfg.model_dump(mode="json"), "engines": engines}
        trainer = make_trainer(cfg, train_worker, loop_config, callbacks=[bar.callback] if bar else None)
        try:
            result = trainer.fit()
        except SystemExit:  # Ray Train's own Ctrl-C handler aborts the run, then exits the driver
            raise KeyboardInterrupt from None
    if result.error and "user interrupt" in str(result.error):  # its graceful abort (a first Ctrl-C)
        raise KeyboardInterrupt
    if result.error:
        raise TrainError(f"training {cfg.name} failed: {result.error}")
    expert = run_dir / ("expert" if cfg.method == "lora" else "expert.safetensors")
    if not expert.exists():
        raise TrainError(f"training {cfg.name} finished without writing {expert}")
    return TrainOutcome(run_dir=run_dir, expert_path=expert, history=read_history(run_dir))
