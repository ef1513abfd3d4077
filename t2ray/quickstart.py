"""`t2ray quickstart` (what `make demo` runs): the main job end to end on the embedded SmolLM2.

Stages are resumable: each writes its output under runs/quickstart and is skipped when that output exists.
Each stage prints what it will do and roughly how long it takes on 2 CPU cores before it starts.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import typer

from t2ray.config import load_experiment

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@dataclass
class Stage:
    name: str
    minutes: float                # expected wall time on 2 CPU cores
    output: Path
    run: Callable[[], None]


def run_stages(stages: list[Stage]) -> None:
    total = sum(s.minutes for s in stages if not s.output.exists())
    typer.secho(f"quickstart: {len(stages)} stages, about {total:.0f} min left on 2 CPU cores", bold=True)
    for i, stage in enumerate(stages, 1):
        if stage.output.exists():
            typer.echo(f"[{i}/{len(stages)}] {stage.name}: done already ({stage.output})")
            continue
        typer.secho(f"[{i}/{len(stages)}] {stage.name} (about {stage.minutes:g} min)", fg="cyan")
        start = time.perf_counter()
        stage.run()
        typer.echo(f"[{i}/{len(stages)}] {stage.name}: {time.perf_counter() - start:.0f} s")


def eval_stage(model_spec: str, task: str, out: Path, limit: int | None, expert: Path | None = None):
    def run() -> None:
        from t2ray.adapters import load_adapted
        from t2ray.evaluate import evaluate
        from t2ray.tasks import get_task

        model, tokenizer, label = load_adapted(model_spec, expert=expert)
        result = evaluate(model, tokenizer, get_task(task), limit=limit, batch_size=32, adapter=label)
        result.save(out)
        typer.echo(f"    {label} on {task}: accuracy {result.accuracy:.1%} ({result.correct}/{result.n})")
    return run


def quickstart(root: Path = Path("runs/quickstart"), *, eval_limit: int | None = None) -> Path:
    from t2ray.train import train

    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    model = "smollm2-135m"
    math_cfg = load_experiment(EXPERIMENTS / "smollm2-math.yaml", [f"storage_path={root}"])
    expert = math_cfg.run_dir / "expert.safetensors"

    def decompose() -> None:
        from t2ray.models import load_model
        from t2ray.svf import base_model_info, patch_model

        net, _ = load_model(model)
        patch_model(net, math_cfg.svf)
        info = base_model_info(net)
        (root / "decompose.json").write_text(json.dumps(
            {"model": model, "fingerprint": info.fingerprint, "matrices": len(info.module_ranks),
             "z_values": sum(info.module_ranks.values())}, indent=2))

    stages = [
        Stage("decompose SmolLM2 MLP matrices (SVD, cached)", 0.5, root / "decompose.json", decompose),
        Stage("evaluate the base model on math", 1, root / "eval" / "base-math.json",
              eval_stage(model, "math", root / "eval" / "base-math.json", eval_limit)),
        Stage("train the math SVF expert (Ray Train, 2 workers, ZeRO-2)", 8, expert, lambda: train(math_cfg)),
        Stage("evaluate the math expert", 1, root / "eval" / "svf-math.json",
              eval_stage(model, "math", root / "eval" / "svf-math.json", eval_limit, expert)),
    ]
    run_stages(stages)
    report = root / "report.md"
    rows = [json.loads((root / "eval" / f"{name}-math.json").read_text()) for name in ("base", "svf")]
    lines = ["# t2ray quickstart", "", "| model | task | accuracy | n |", "|---|---|---|---|"]
    lines += [f"| {r['adapter']} | {r['task']} | {r['accuracy']:.1%} | {r['n']} |" for r in rows]
    lines += ["", f"Learning curve: {math_cfg.run_dir / 'learning_curve.png'}"]
    report.write_text("\n".join(lines) + "\n")
    typer.echo(report.read_text())
    return report
