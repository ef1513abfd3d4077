"""Small files for sweep tests: a task tiny-llama can learn, an experiment on it, tiny experts for CEM."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "rock",
    "fish",
    "bird",
    "rain",
    "star",
    "moon",
    "leaf",
    "wind",
    "fire",
    "snow",
    "sand",
    "wave",
]


def write_task(folder: Path, name: str = "has-e") -> Path:
    """A user task: +1 when the completion contains an "e" (see tests/rl/learnable.py for why tiny-llama
    can learn it: at temperature 0.05 the base model repeats "\\n", reward −1; at 1.0 it samples ~uniformly)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Say a word about the {w} number {i}.", "answer": "e"} for i in range(8) for w in WORDS]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ndata: {name}.jsonl\ngrader: regex\npattern: '(e)'\nmax_new_tokens: 3\n"
        "splits: {train: 0.75, valid: 0.125, test: 0.125}\n"
    )
    return path


def write_experiment(folder: Path, task: str, **rl) -> Path:
    """A 1-worker tiny-llama experiment (ZeRO-2 on CPU), a few iterations."""
    data = {
        "name": "tiny",
        "task": task,
        "model": {"spec": "tiny-llama"},
        "rl": {
            "iterations": 4,
            "batch_size": 8,
            "temperature": 0.05,
            "lr": 0.3,
            "baseline": "none",
            "grad_clip": 1.0,
            "max_new_tokens": 3,
            "eval_interval": 2,
            "eval_limit": 8,
            **rl,
        },
        "scaling": {"num_workers": 1},
        "tracking": {"wandb": False},
        "storage_path": str(folder / "runs"),
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_sweep(folder: Path, base: str, name: str = "sweep", **fields) -> Path:
    data = {"name": name, "kind": "rl", "base": base, "storage_path": str(folder / "sweeps"), "wandb": False, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_experts(folder: Path, n: int = 2, seed: int = 0) -> list[Path]:
    """n SVF experts for tiny-llama (seed 0): patched MLP matrices with random p, saved in the expert format."""
    import torch

    from t2ray.experts import Expert, save_expert
    from t2ray.models import load_model
    from t2ray.svf import SVFConfig, base_model_info, patch_model, trainable_params

    model, _ = load_model("tiny-llama", seed=0)
    patch_model(model, SVFConfig(target_modules="mlp"), progress=False)
    info = base_model_info(model)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for k in range(n):
        params = {m: torch.randn(p.shape, generator=g) * 2 for m, p in trainable_params(model).items()}
        expert = Expert(
            name=f"e{k}", params=params, base_model=info.model_id, fingerprint=info.fingerprint, task="has-e"
        )
        paths.append(save_expert(expert, folder / f"e{k}.safetensors"))
    return paths


def write_adapt_base(folder: Path, task: str, experts: list[Path], **cem) -> Path:
    data = {
        "strategy": "fewshot",
        "task": task,
        "model": {"spec": "tiny-llama"},
        "experts": [str(p) for p in experts],
        "split": "test",
        "limit": 8,
        "batch_size": 16,
        "cem": {"population": 4, "generations": 2, "shots": 4, **cem},
    }
    path = folder / "fewshot.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
