"""Rollout engines as Ray actors: each holds its own weights + SVF factors and receives only z per step."""
from __future__ import annotations

from t2ray.rl.rollout import encode_z


class ActorEngine:
    """RolloutEngine over a Ray actor handle (ReplicaEngine on CPU, VLLMEngine on a GPU)."""

    def __init__(self, handle):
        self.handle = handle

    def sync(self, z, version) -> int:
        import ray

        return ray.get(self.handle.receive.remote(encode_z(z, version)))

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed):
        import ray

        return ray.get(self.handle.generate.remote(list(prompts), max_new_tokens=max_new_tokens,
                                                   temperature=temperature, top_p=top_p, seed=seed))


def start_engine(cfg) -> ActorEngine | None:
    """None for the in-process engine; else a new actor for this worker."""
    import ray

    from t2ray.rl.rollout import ReplicaEngine, VLLMEngine

    kind = cfg.rl.rollout_engine
    if kind == "hf":
        return None
    if kind == "vllm":
        if not cfg.scaling.use_gpu:
            raise RuntimeError("rl.rollout_engine: vllm needs GPUs (scaling.use_gpu: true); use replica on CPU")
        actor = ray.remote(num_gpus=0.5)(VLLMEngine).remote(cfg.model.spec, cfg.svf.model_dump(), dtype=cfg.model.dtype)
    else:
        # num_cpus=0: it shares its worker's CPU (the worker waits while it generates)
        actor = ray.remote(num_cpus=0)(ReplicaEngine).remote(cfg.model.spec, cfg.svf.model_dump(), cfg.model.dtype)
    return ActorEngine(actor)
