"""The `t2ray` command line: parse, call library code, print. No logic lives here."""

from __future__ import annotations

import json
import sys
import time
from functools import wraps
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Transformer² self-adaptive LLMs on Ray.")
experts_app = typer.Typer(no_args_is_help=True, help="Inspect and import SVF expert files.")
app.add_typer(experts_app, name="experts")


INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def interrupted(what: str) -> typer.Exit:
    """One line on stderr (Ctrl-C: what was kept, how to go on) and the exit code of an interrupted command."""
    typer.secho(f"interrupted: {what}; run the same command again to resume", err=True, fg="yellow")
    return typer.Exit(INTERRUPTED)


def user_errors(fn):
    """Turn user mistakes (bad spec, file, shape...) into a one-line message and exit code 2, no traceback; Ctrl-C
    into one line and exit code 130."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            raise interrupted(
                f"t2ray {fn.__name__.rstrip('_')} stopped (finished stages and checkpoints are kept)"
            ) from None
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
            typer.secho(f"error: invalid config: {problems}", err=True, fg="red")
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
            typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(2)

    return wrapper


@app.callback()
def console_options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="also show Ray, Train, DeepSpeed and transformers logs (or T2RAY_VERBOSE=1)"
    ),
):
    """Transformer² self-adaptive LLMs on Ray."""
    from t2ray.console import apply_env_defaults, set_verbosity
    from t2ray.console import verbose as verbose_env

    apply_env_defaults()
    set_verbosity(verbose or verbose_env())


def drop_unset(options: dict) -> dict:
    """Only the options given on the command line, so that they override a YAML and nothing else."""
    kept = {k: drop_unset(v) if isinstance(v, dict) else v for k, v in options.items() if v is not None}
    return {k: v for k, v in kept.items() if v != {}}


def emit(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
@user_errors
def decompose(
    model: str = typer.Option("smollm2-135m", help="model spec"),
    modules: str = typer.Option("mlp", help="mlp | attn | all | comma-separated module names"),
    layers: str | None = typer.Option(None, help="layer ranges, e.g. '0-14,20'"),
    dtype: str = typer.Option("float32", help="SVD precision: float32 | float64"),
    workers: int = typer.Option(1, min=1, help=">1: run the SVDs as Ray tasks (resumable per matrix)"),
    address: str | None = typer.Option(None, help="Ray cluster address for --workers"),
):
    """SVD of the target matrices, cached per base-model fingerprint (a re-run is a cache hit)."""
    import torch

    from t2ray.models import load_model
    from t2ray.svf import SVFConfig, model_fingerprint, patch_model

    config = SVFConfig(
        target_modules=modules if modules in ("mlp", "attn", "all") else modules.split(","),
        layers=layers,
        svd_dtype=dtype,
    )
    net, _ = load_model(model)
    start = time.perf_counter()
    if workers > 1:
        from t2ray.train.decompose import decompose_distributed
        from t2ray.train.launcher import ensure_ray

        ensure_ray(address)
        net.t2ray_fingerprint = model_fingerprint(net)
        decompose_distributed(
            net,
            config.target_modules,
            config.layers,
            fingerprint=net.t2ray_fingerprint,
            workers=workers,
            dtype=getattr(torch, dtype),
        )
    layers_ = patch_model(net, config)
    emit(
        {
            "model": model,
            "fingerprint": net.t2ray_fingerprint,
            "matrices": len(layers_),
            "z_values": sum(layer.rank for layer in layers_.values()),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )


@app.command("eval")
@user_errors
def eval_(
    model: str = typer.Option("smollm2-135m", help="model spec"),
    task: str = typer.Option(..., help="task name or path to a task YAML"),
    expert: Path | None = typer.Option(None, help="expert file (.safetensors) or LoRA expert folder"),
    mix: str | None = typer.Option(
        None, help="mixture as PATH:weight,PATH:weight (SVF expert files or LoRA adapter folders)"
    ),
    mixture: Path | None = typer.Option(None, help="mixture file (.json), e.g. from adapt --mixture-out"),
    split: str = typer.Option("test"),
    limit: int | None = typer.Option(None, min=1),
    batch_size: int = typer.Option(64, min=1, help="rows generated together (wider is faster per token)"),
    seed: int = 0,
    dtype: str = typer.Option("auto", help="auto (bf16 where native) | float32 | bfloat16"),
    allow_transfer: bool = typer.Option(False, help="apply experts of another base model with equal shapes"),
    mode: str = typer.Option(
        "generate",
        help="generate (chat prompt, greedy, graded) | completion (the "
        "bare 'Question: …\\nAnswer:' continued, as lm-eval) | loglik "
        "(multiple choice: lm-eval's acc and acc_norm)",
    ),
    out: Path | None = typer.Option(None, help="write the full result JSON here"),
):
    """Accuracy of the base model, an expert, or a mixture on a task split."""
    from t2ray.evaluate import MODES, evaluate
    from t2ray.library import load_adapted
    from t2ray.tasks import get_task

    if mode not in MODES:  # before the model loads
        raise ValueError(f"--mode {mode!r}: {' | '.join(MODES)}")
    the_task = get_task(task, seed=seed)
    net, tokenizer, label = load_adapted(
        model, expert=expert, mix=mix, mixture=mixture, allow_transfer=allow_transfer, dtype=dtype
    )
    result = evaluate(
        net, tokenizer, the_task, mode=mode, split=split, limit=limit, batch_size=batch_size, seed=seed, adapter=label
    )
    if out:
        result.save(out)
    emit(result.summary())


@app.command()
@user_errors
def train(
    experiment: Path = typer.Argument(..., help="experiment YAML"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set rl.lr=1e-3"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start a local one)"),
):
    """Train an SVF (or LoRA) expert with RL on Ray Train + DeepSpeed; re-running resumes."""
    from t2ray.config import load_experiment
    from t2ray.train import train as run_training

    outcome = run_training(load_experiment(experiment, set_), address=address)
    emit(
        {
            "run_dir": str(outcome.run_dir),
            "expert": str(outcome.expert_path),
            "best_valid_accuracy": outcome.best_valid,
            "iterations": len(outcome.history),
        }
    )


@app.command()
@user_errors
def adapt(
    config: Path | None = typer.Option(None, help="adapt YAML (the options below override it)"),
    strategy: str | None = typer.Option(None, help="prompt | classifier | nearest | fewshot | token"),
    task: str | None = typer.Option(None, help="task name or task YAML"),
    expert: list[Path] | None = typer.Option(None, help="expert file; repeat for the library"),
    model: str | None = typer.Option(None, help="model spec (default smollm2-135m)"),
    dtype: str | None = typer.Option(None, help="auto (bf16 where native) | float32 | bfloat16"),
    batch_size: int | None = typer.Option(None, min=1, help="rows generated together (default 64)"),
    classifier_expert: Path | None = typer.Option(None, help="cls expert (strategy classifier)"),
    mode: str | None = typer.Option(None, help="pass-1 classification: score | generate"),
    split: str | None = typer.Option(None, help="train | valid | test (default test)"),
    limit: int | None = typer.Option(None, min=1),
    shots: int | None = typer.Option(None, help="fewshot: k examples (10)"),
    population: int | None = typer.Option(None, help="fewshot: CEM population (32)"),
    generations: int | None = typer.Option(None, help="fewshot: CEM generations (50)"),
    elite_ratio: float | None = None,
    per_module: bool | None = None,
    actors: int | None = typer.Option(None, help="fewshot: Ray actors (1)"),
    every: int | None = typer.Option(None, help="token: re-route every k tokens (1, 2, 4; default 2)"),
    recompute_prefix: bool | None = typer.Option(None, help="token: the original's no-KV-cache mode"),
    allow_transfer: bool | None = None,
    seed: int | None = None,
    out: Path | None = typer.Option(None, help="write the full result JSON here"),
    mixture_out: Path | None = typer.Option(None, help="fewshot: save the found α as a mixture file"),
):
    """Two-pass self-adaptation on a task split: pass 1 picks the expert mixture, pass 2 answers."""
    options = dict(locals())  # the options by name: those of the cem and routing sections are named as their fields
    from t2ray.adapt.two_pass import run_adapt, save_found_mixture
    from t2ray.config import AdaptConfig, CEMConfig, RoutingConfig, deep_merge, read_yaml

    given = {
        "strategy": strategy,
        "task": task,
        "experts": [str(e) for e in expert] if expert else None,
        "model": {"spec": model, "dtype": dtype},
        "batch_size": batch_size,
        "classifier_expert": str(classifier_expert) if classifier_expert else None,
        "classify_mode": mode,
        "split": split,
        "limit": limit,
        "allow_transfer": allow_transfer,
        "cem": {name: options.get(name) for name in CEMConfig.model_fields},
        "routing": {name: options.get(name) for name in RoutingConfig.model_fields},
    }
    cfg = AdaptConfig.model_validate(deep_merge(read_yaml(config) if config else {}, drop_unset(given)))
    if cfg.cem.actors > 1:
        from t2ray.train.launcher import ensure_ray

        ensure_ray()
    result = run_adapt(cfg)
    if out:
        result.save(out)
    if mixture_out and result.alpha is not None:
        save_found_mixture(result, cfg, mixture_out)
    emit(result.summary())


@app.command()
@user_errors
def report(run_dir: Path = typer.Argument(..., help="a run folder with table1/ and/or table2/ results")):
    """Tables 1–3 of the paper (markdown + CSV + JSON) and plots from a run folder."""
    from t2ray.report import build_report

    path = build_report(run_dir)
    typer.echo(path.read_text())
    typer.echo(f"written: {path}")


@experts_app.command("show")
@user_errors
def experts_show(path: Path):
    """Print an expert file's metadata as JSON."""
    from t2ray.experts import expert_info

    emit(expert_info(path))


@experts_app.command("import")
@user_errors
def experts_import(
    policy: Path = typer.Argument(..., help="official Transformer² policy_params.pt"),
    out: Path = typer.Option(..., help="expert file to write"),
    model: str = typer.Option("smollm2-135m"),
    name: str | None = None,
    task: str | None = None,
):
    """Convert an official Transformer² policy_params.pt into a t2ray expert file."""
    from t2ray.experts import import_official, save_expert
    from t2ray.models import load_model
    from t2ray.svf import base_model_info

    net, _ = load_model(model)
    expert = import_official(policy, base_model_info(net), name=name or policy.stem, task=task)
    emit({"written": str(save_expert(expert, out)), "modules": len(expert.modules)})


@app.command()
@user_errors
def quickstart(
    root: Path = typer.Option(Path("runs/quickstart"), help="where every stage writes (resumable)"),
    config: Path | None = typer.Option(
        None, help="overrides: experiments/reproduce-smollm2.yaml, experiments/paper-*.yaml"
    ),
    check: bool = typer.Option(False, help="validate the config and print the stages; run nothing"),
):
    """The tour (`make demo`): experts, Table 1, pass 1, few-shot, a served endpoint, report; --config
    experiments/reproduce-smollm2.yaml runs the paper's whole pipeline."""
    from t2ray.quickstart import quickstart as run

    run(root, config, check=check)


@app.command("plan")
@user_errors
def plan_(
    config: Path | None = typer.Argument(
        None, help="an experiment YAML or a Serve config (it has `applications:`): as --experiment or --serve"
    ),
    model: str = typer.Option(
        "llama3-8b",
        help="a preset (smollm2-135m | llama3-8b | mistral-7b | llama3-70b), a model folder, a config.json or a hub id",
    ),
    gpus: int = typer.Option(1, min=1),
    gpu_mem_gb: float = typer.Option(80, min=1),
    zero: int = typer.Option(2, min=0, max=3),
    modules: str = typer.Option("mlp", help="mlp | attn | all"),
    dtype: str = "bfloat16",
    micro_batch: int = 8,
    seq_len: int = 1024,
    rollout_engine: str = typer.Option("hf", help="hf (same process) | vllm (separate engine)"),
    activation_checkpointing: bool = typer.Option(True, help="recompute each layer in the backward"),
    experiment: Path | None = typer.Option(
        None, help="plan this experiment YAML as it is set (its model, workers, ZeRO stage, batches, checkpointing)"
    ),
    prompt_len: int = typer.Option(768, help="with --experiment: the prompt tokens of a row"),
    serve: Path | None = typer.Option(
        None, help="plan one model replica of this Serve config instead (its model, num_gpus, batching, experts)"
    ),
):
    """Memory per GPU for SVF training (or, with --serve, of a served replica), counted on the real model code (meta
    device), and whether it fits."""
    from t2ray.plan import experiment_run, plan_run
    from t2ray.plan import plan as make_plan

    if config is not None:
        from t2ray.config import read_yaml

        if experiment is not None or serve is not None:
            raise ValueError("give the YAML once: as the argument, or as --experiment / --serve")
        if "applications" in read_yaml(config):
            serve = config
        else:
            experiment = config
    if serve is not None:
        from t2ray.serve.capacity import plan_serve

        plans = plan_serve(serve, gpu_mem_gb)
        for p in plans:
            b, gpus = p.args.batching, p.args.replica_gpus
            where = f"{gpus}×{gpu_mem_gb:g} GB" if p.args.model.device.startswith("cuda") else f"cpu, {gpu_mem_gb:g} GB"
            span = f"GPU {p.gpu} of {gpus}, " if gpus > 1 else ""
            typer.echo(
                f"{p.app}: {p.args.model.spec} in {p.dtype}, one replica on {where} ({span}layers "
                f"{p.layers[0]}-{p.layers[-1]}), {p.experts}, {b.max_batch_size} rows, batching.mode {b.mode}"
            )
            for note in p.notes:
                typer.echo(f"  note: {note}")
            typer.echo(p.plan.table())
            fits = p.plan.fits
            typer.secho("fits" if fits else "does NOT fit", fg="green" if fits else "red", bold=True)
        if not all(p.plan.fits for p in plans):
            raise typer.Exit(1)
        return
    if experiment is not None:
        from t2ray.config import load_experiment

        cfg = load_experiment(experiment)
        run = experiment_run(cfg, prompt_len)
        model, gpus, zero, modules = cfg.model.spec, run.gpus, run.zero, run.modules
        result = plan_run(model, run, gpu_mem_gb)
    else:
        result = make_plan(
            model,
            gpus=gpus,
            gpu_mem_gb=gpu_mem_gb,
            zero=zero,
            modules=modules,
            dtype=dtype,
            micro_batch=micro_batch,
            seq_len=seq_len,
            rollout_engine=rollout_engine,
            checkpointing=activation_checkpointing,
        )
    typer.echo(f"{model}, {gpus}×{gpu_mem_gb:g} GB, ZeRO-{zero}, SVF on {modules} ({result.z_values:,} z values)")
    if result.engine_rows:
        typer.echo(
            f"  + {run.engines} rollout engine(s) × {run.engine_gpus} GPUs of their own (z applier on {run.applier_on})"
        )
    typer.echo(result.table())
    typer.secho("fits" if result.fits else "does NOT fit", fg="green" if result.fits else "red", bold=True)
    if not result.fits:
        raise typer.Exit(1)


@app.command()
def tasks():
    """List the built-in and real-dataset task names."""
    from t2ray.tasks import list_tasks

    emit(list_tasks())


# ---- sweeps and jobs (t2ray/tune, t2ray/jobs.py) ------------------------------------------------------------
jobs_app = typer.Typer(no_args_is_help=True, help="Status, logs and stop of jobs submitted with `t2ray submit`.")
app.add_typer(jobs_app, name="jobs")


@app.command("tune")
@user_errors
def tune_(
    sweep: Path = typer.Argument(..., help="sweep YAML (experiments/sweeps/*.yaml)"),
    set_: list[str] = typer.Option(
        [], "--set", help="override a sweep key, e.g. --set num_samples=2 --set overrides.rl.iterations=4"
    ),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start a local one)"),
    fresh: bool = typer.Option(False, help="delete this sweep's earlier trials instead of resuming them"),
    check: bool = typer.Option(False, help="validate the sweep and print its space; run nothing"),
):
    """Ray Tune sweep over an experiment (RL trials on Ray Train) or CEM settings; re-running resumes."""
    from t2ray.tune import load_sweep, run_sweep

    the_sweep = load_sweep(sweep, set_)
    if check:
        c = the_sweep.config
        emit(
            {
                "name": c.name,
                "kind": c.kind,
                "base": c.base,
                "sweep_dir": str(the_sweep.dir),
                "space": {k: {d.kind: d.args} for k, d in c.space.items()},
                "metric": c.metric,
                "mode": c.mode,
                "search": c.search.alg,
                "scheduler": c.scheduler.type,
                "num_samples": c.num_samples,
                "per_trial": the_sweep.need_per_trial(),
            }
        )
        return
    outcome = run_sweep(the_sweep, address=address, fresh=fresh)
    emit(outcome.summary())
    if outcome.interrupted:
        raise interrupted(f"{outcome.finished} of {outcome.expected} trials finished, the running ones stopped")
    if not outcome.complete:
        typer.secho(
            f"sweep incomplete: {outcome.finished} of {outcome.expected} trials finished (interrupted or "
            "time budget); run the same command again to resume",
            err=True,
            fg="yellow",
        )


@app.command()
@user_errors
def submit(
    config: Path = typer.Argument(..., help="experiment YAML (`t2ray train`) or sweep YAML (`t2ray tune`)"),
    address: str | None = typer.Option(
        None, help="Ray dashboard address [default: $T2RAY_JOBS_ADDRESS or http://127.0.0.1:8265]"
    ),
    working_dir: Path | None = typer.Option(None, help="uploaded to the cluster [default: current dir]"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set rl.lr=1e-3"),
    requirements: Path | None = typer.Option(None, help="requirements.txt installed for the job"),
    uv: bool = typer.Option(False, help="install the requirements with uv instead of pip"),
    env: list[str] = typer.Option(
        [],
        help="KEY=VALUE or KEY (taken from your environment); repeat. WANDB_API_KEY, HF_TOKEN... are passed when set",
    ),
    submission_id: str | None = typer.Option(None, help="job id to use (default: Ray picks one)"),
    entrypoint_num_cpus: float | None = typer.Option(None, help="CPUs reserved for the job's driver"),
    entrypoint_num_gpus: float | None = typer.Option(None, help="GPUs reserved for the job's driver"),
    wait: bool = typer.Option(False, help="stream the job's logs until it ends; exit 1 if it fails"),
):
    """Submit a training run or a sweep to a Ray cluster as a job (prints the equivalent `ray job submit`)."""
    from t2ray import jobs

    done = jobs.submit(
        config,
        address=address,
        working_dir=working_dir,
        overrides=set_,
        requirements=requirements,
        installer="uv" if uv else "pip",
        env=jobs.parse_env(env),
        submission_id=submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
    )
    typer.echo(f"# same with the Ray CLI:\n{done.ray_command}", err=True)
    emit(done.summary())
    if wait:
        state = jobs.follow(done.job_id, address=done.address, out=lambda s: typer.echo(s, nl=False, err=True))
        _job_outcome(done.job_id, state, done.address)


def _job_outcome(job_id: str, state: str, address: str | None) -> None:
    from t2ray import jobs

    try:
        jobs.check_finished(job_id, state, address=address)
    except jobs.JobError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(1) from None
    emit({"job_id": job_id, "status": state})


@jobs_app.command("status")
@user_errors
def jobs_status(
    job_id: str,
    address: str | None = typer.Option(None, help="Ray dashboard address"),
    lines: int = typer.Option(40, help="log lines shown for a failed job"),
):
    """A job's status (a failed job: its message and the tail of its logs, exit 1)."""
    from t2ray import jobs

    info = jobs.status(job_id, address=address, log_lines=lines)
    emit({k: v for k, v in info.items() if k != "logs_tail"})
    if info["status"] == "FAILED":
        typer.secho(f"--- last {lines} log lines ---\n{info.get('logs_tail', '')}", err=True, fg="red")
        raise typer.Exit(1)


@jobs_app.command("logs")
@user_errors
def jobs_logs(
    job_id: str,
    address: str | None = typer.Option(None, help="Ray dashboard address"),
    tail: int | None = typer.Option(None, min=1, help="only the last N lines"),
    follow: bool = typer.Option(False, help="stream until the job ends"),
):
    """A job's logs (driver output: the training progress, metrics, errors)."""
    from t2ray import jobs

    if follow:
        state = jobs.follow(job_id, address=address, out=lambda s: typer.echo(s, nl=False))
        _job_outcome(job_id, state, address)
        return
    typer.echo(jobs.logs(job_id, address=address, lines=tail))


@jobs_app.command("stop")
@user_errors
def jobs_stop(
    job_id: str,
    address: str | None = typer.Option(None, help="Ray dashboard address"),
    wait_s: float = typer.Option(60, "--wait", help="seconds to wait for STOPPED (0: don't wait)"),
):
    """Stop a running job."""
    from t2ray import jobs

    emit({"job_id": job_id, "status": jobs.stop(job_id, address=address, wait_s=wait_s)})


@jobs_app.command("list")
@user_errors
def jobs_list(address: str | None = typer.Option(None, help="Ray dashboard address")):
    """Jobs on the cluster."""
    from t2ray import jobs

    emit(jobs.list_jobs(address=address))


@app.command("serve")
@user_errors
def serve_(
    config: Path = typer.Argument(..., help="Serve config YAML, e.g. experiments/serve-smollm2.yaml"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start a local one)"),
    num_cpus: int | None = typer.Option(None, min=1, help="CPUs of a local Ray cluster (default: all)"),
    host: str | None = typer.Option(
        None, help="bind here instead of the config's http_options.host (beyond loopback it needs T2RAY_API_KEY)"
    ),
):
    """Serve the base model and its SVF experts behind an OpenAI-compatible endpoint (Ray Serve); Ctrl-C stops."""
    from t2ray.serve.app import run_config

    run_config(config, address=address, num_cpus=num_cpus, host=host, on_ready=emit)


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])
