"""Tiny experts for serving tests: tiny-llama (seed 0) patched on its MLP, random p, saved with tasks."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
import torch

from t2ray.experts import Expert, Mixture, save_expert, save_mixture
from t2ray.models import load_model
from t2ray.svf import SVFConfig, base_model_info, patch_model, trainable_params

TASKS = {"math": "math", "code": "code", "reasoning": "reasoning", "cls": "cls"}


def make_experts(folder: Path) -> dict[str, Path]:
    """math / code / reasoning experts and a cls (classifier) expert, z well away from the init."""
    model, _ = load_model("tiny-llama")
    patch_model(model, SVFConfig(target_modules="mlp"), progress=False)
    info = base_model_info(model)
    paths = {}
    for seed, (name, task) in enumerate(TASKS.items()):
        g = torch.Generator().manual_seed(100 + seed)
        params = {k: v + 2 * torch.randn(v.shape, generator=g) for k, v in trainable_params(model).items()}
        paths[name] = save_expert(
            Expert(name=name, params=params, base_model=info.model_id, fingerprint=info.fingerprint, task=task),
            folder / f"{name}.safetensors",
        )
    paths["mixture"] = save_mixture(
        Mixture(experts=[str(paths["math"]), str(paths["reasoning"])], alpha=[0.6, 0.4], name="math-reasoning"),
        folder / "math-reasoning.json",
    )
    return paths


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory, t2ray_cache) -> dict[str, Path]:
    return make_experts(tmp_path_factory.mktemp("serve_experts"))


def tiny_args(paths: dict[str, Path], **overrides) -> dict:
    """Serve args for tiny-llama with the tiny experts (small budgets, small replicas)."""
    args = {
        "model": {"spec": "tiny-llama"},
        "experts": {n: str(paths[n]) for n in ("math", "code", "reasoning")},
        "classifier_expert": str(paths["cls"]),
        "mixtures": {
            "math-code": {"weights": {"math": 0.5, "code": 0.5}},
            **({"math-reasoning": {"file": str(paths["mixture"])}} if "mixture" in paths else {}),
        },
        "generation": {"max_tokens_default": 8, "max_tokens_limit": 64},
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01, "torch_threads": 1},
        "expert_model": {
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0.5},
            "max_ongoing_requests": 64,
            "health_check_period_s": 2,
            "health_check_timeout_s": 30,
        },
        "dispatcher": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 256},
        "retries": 3,
    }
    for key, value in overrides.items():
        args[key] = value
    return args


def random_weights(rng: random.Random) -> dict[str, float]:
    names = rng.sample(["math", "code", "reasoning"], rng.randint(1, 3))
    return {n: round(rng.uniform(0.05, 1.0), 3) for n in names}


async def run_load(url: str, key: str, n: int, concurrency: int, on_done=None) -> list[tuple[dict, int, dict | None]]:
    """n chat requests to `url`, each with its own random mixture, at most `concurrency` in flight; a request that got
    no HTTP answer is (plan, 0, {"error": ...})."""
    rng = random.Random(0)
    plans = [random_weights(rng) for _ in range(n)]
    results: list = [None] * n
    gate = asyncio.Semaphore(concurrency)
    done = 0
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=180) as c:

        async def one(i: int):
            nonlocal done
            async with gate:
                body = {
                    "model": "auto",
                    "messages": [{"role": "user", "content": f"question {i}"}],
                    "max_tokens": 4,
                    "t2ray": {"weights": plans[i]},
                }
                try:
                    r = await c.post("/v1/chat/completions", json=body)
                    results[i] = (plans[i], r.status_code, r.json())
                except httpx.HTTPError as err:
                    results[i] = (plans[i], 0, {"error": repr(err)})
                done += 1
                if on_done is not None:
                    await on_done(done)

        await asyncio.gather(*(one(i) for i in range(n)))
    return results
