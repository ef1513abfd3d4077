"""What one Tune trial runs.

RL trial (the Ray 2.5x+ way to nest Train in Tune): the trial function builds the trial's ExperimentConfig and
fits a `TorchTrainer` (Ray Train workers + DeepSpeed, the same worker loop as `t2ray train`), with a
deterministic run name from the trial id and its run folder under the sweep. A Train V2 `UserCallback`
(`ForwardToTune`, on the Train controller) puts every `ray.train.report` of rank 0 on a queue; the trial
function reads it and calls `ray.tune.report` — every iteration, so ASHA/PBT decide on live metrics — with the
z checkpoint attached when the worker saved one (PBT exploits it; a restarted trial resumes from it).

CEM trial: the trial function itself loads the model and experts and runs `cem_search`, reporting the best
candidate of every generation, then the found α's accuracy on the task's valid split.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

from t2ray.train.progress import UserCallback
from t2ray.tune.config import Sweep

TRIAL_META = "t2ray_trial.json"
RUN_KEY = "t2ray_run"  # reported with every RL result: the Train run the trial is in now (PBT moves it)


def run_name(sweep_name: str, trial_id: str) -> str:
    """The Train run of a trial: same name on every restart of that trial (Train resumes it)."""
    return f"{sweep_name}-{trial_id}"


def trial_experiment(sweep: Sweep, values: dict, name: str):
    """The ExperimentConfig a trial trains: base + fixed overrides + the trial's values; its run folder lives
    under the sweep; per-run wandb is off (Tune's callback logs every trial once)."""
    from t2ray.config import ExperimentConfig, deep_merge

    data = deep_merge(
        sweep.trial_data(values),
        {"name": name, "storage_path": str(sweep.dir / "trials"), "tracking": {"wandb": False}},
    )
    return ExperimentConfig.model_validate(data)


class ForwardToTune(UserCallback):
    """Runs on the Train controller: forwards rank 0's metrics (and a copy of the checkpoint, if any, in a new
    folder under `staging`) to the trial; the first item also carries the controller's handle, so a trial that Tune
    stops can abort its Train run.

    The copy is made here, while Train still keeps the checkpoint: Train deletes all but the newest
    `checkpoint_keep` as new ones come, and the trial thread, which waits for Tune to take each report, may be
    more than that many reports behind."""

    def __init__(self, queue, staging: str):
        self.queue, self.staging = queue, staging
        self.sent_handle = False

    def after_report(self, run_context, metrics, checkpoint):
        import ray

        handle = None
        if not self.sent_handle:
            handle, self.sent_handle = ray.get_runtime_context().current_actor, True
        staged = None
        if checkpoint is not None:  # z, Adam moments, loop state: small
            Path(self.staging).mkdir(parents=True, exist_ok=True)
            staged = checkpoint.to_directory(tempfile.mkdtemp(prefix="checkpoint-", dir=self.staging))
        self.queue.put((dict(metrics[0]), staged, handle))


# Train controllers of the RL trials running in this process (trial id -> handle), and the trials being stopped.
_CONTROLLERS: dict = {}
_STOPPING: set = set()


def abort_train_runs(timeout: float = 60) -> None:
    """Abort the Train runs of this process's trials: their workers and placement group go away now.

    Tune stops a trial (ASHA/PBT decision, time budget) by ending its actor; the Train controller it started
    dies with it, and its placement group is left to Train's PlacementGroupCleaner, which cannot find the
    cluster when several Ray clusters share a machine (its state-API lookup refuses to pick one) — the
    leaked CPUs then starve every later trial. An explicit abort frees them whatever the machine."""
    import ray

    for trial_id, controller in list(_CONTROLLERS.items()):
        _STOPPING.add(trial_id)
        try:
            ray.get(controller.abort.remote(), timeout=timeout)
        except Exception:  # noqa: BLE001 — already finished or dead: nothing left to free
            pass
        _CONTROLLERS.pop(trial_id, None)


def rl_trainable(function):
    """The RL trial as a Tune trainable class: the function trainable, plus an abort of its Train run when
    Tune stops the trial (Trainable.cleanup runs inside the trial actor before the actor goes)."""
    from ray.tune.trainable import wrap_function

    base = wrap_function(function)

    class RLTrial(base):
        def cleanup(self):
            abort_train_runs()
            super().cleanup()

        def reset_config(self, new_config):  # reuse_actors: the actor takes the next trial
            abort_train_runs()
            return super().reset_config(new_config)

    RLTrial.__name__ = RLTrial.__qualname__ = "rl_trial"
    return RLTrial


def tune_worker(loop_config: dict) -> None:
    """The Train worker of an RL trial: `t2ray.train.worker.train_worker`, started from `init_checkpoint`
    (another trial's z + Adam state, handed over by PBT) when this run has no checkpoint of its own."""
    import ray.train

    from t2ray.train.worker import train_worker

    init = loop_config.get("init_checkpoint")
    if not init or ray.train.get_checkpoint() is not None:
        return train_worker(loop_config)
    seeded = ray.train.Checkpoint.from_directory(init)
    original = ray.train.get_checkpoint
    ray.train.get_checkpoint = lambda: seeded  # the worker restores through get_checkpoint(): hand it this one
    try:
        return train_worker(loop_config)
    finally:
        ray.train.get_checkpoint = original


def _starting_point(sweep: Sweep, trial_id: str) -> tuple[str, str | None]:
    """(Train run name, initial checkpoint folder or None). A trial restarted from its own Tune checkpoint
    resumes its own Train run; one restarted from another trial's (PBT exploit) starts a new, deterministically
    named run seeded with that checkpoint."""
    import ray.tune

    name = run_name(sweep.config.name, trial_id)
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return name, None
    with checkpoint.as_directory() as folder:
        meta_path = Path(folder, TRIAL_META)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("trial_id") == trial_id:
            return meta.get("run_name", name), None
        new_name = f"{name}-from-{meta.get('trial_id', 'unknown')}-it{meta.get('iteration', 0)}"
        init = sweep.dir / "trials" / new_name / "init_checkpoint"
        if init.exists():
            shutil.rmtree(init)
        shutil.copytree(folder, init)
        return new_name, str(init)


def rl_trial(config: dict, spec: dict) -> None:
    """Tune function trainable: fit one Ray Train run for this trial's config, reporting every iteration."""
    import ray.tune
    from ray.util.queue import Queue

    from t2ray.train.launcher import make_trainer, rollout_engines

    sweep = Sweep.from_spec(spec)
    trial_id = ray.tune.get_context().get_trial_id()
    name, init = _starting_point(sweep, trial_id)
    cfg = trial_experiment(sweep, config, name)
    with rollout_engines(cfg) as engines:
        queue = Queue(actor_options={"num_cpus": 0})
        loop_config = {"experiment": cfg.model_dump(mode="json"), "init_checkpoint": init, "engines": engines}
        # in the run's folder on the storage path, which a multi-node run shares: the controller may run on
        # another node than this trial
        staging = cfg.run_dir / "tune_staging"
        trainer = make_trainer(cfg, tune_worker, loop_config, callbacks=[ForwardToTune(queue, str(staging))])
        try:
            _fit_and_forward(trainer, queue, trial_id, name)
        finally:  # copies of reports never taken (an aborted run)
            shutil.rmtree(staging, ignore_errors=True)


def _fit_and_forward(trainer, queue, trial_id: str, name: str) -> None:
    """Fit the trial's Train run in a thread, forwarding its reports (and checkpoints) to Tune."""
    import ray.tune
    from ray.util.queue import Empty

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 — handed to the trial thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name=f"train-{name}", daemon=True)
    thread.start()
    meta = {"trial_id": trial_id, "run_name": name}
    while True:
        try:
            metrics, staged, controller = queue.get(block=True, timeout=0.5)
        except Empty:
            if thread.is_alive():
                continue
            if queue.empty():
                break
            continue
        if controller is not None:
            _CONTROLLERS[trial_id] = controller
        metrics = {**{k: v for k, v in metrics.items() if not k.startswith("_")}, RUN_KEY: name}
        if staged is not None:  # the controller's copy: Tune persists it with the trial's meta
            Path(staged, TRIAL_META).write_text(json.dumps({**meta, "iteration": metrics.get("iteration", 0)}))
            try:
                ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(staged))
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        else:
            ray.tune.report(metrics)
    thread.join()
    _CONTROLLERS.pop(trial_id, None)
    if trial_id in _STOPPING:  # Tune stopped this trial and its Train run was aborted on purpose
        return
    if "error" in outcome:
        raise RuntimeError(f"trial {trial_id} ({name}): training failed: {outcome['error']}")
    result = outcome.get("result")
    if result is not None and result.error:
        raise RuntimeError(f"trial {trial_id} ({name}): training failed: {result.error}")


def cem_trial(config: dict, spec: dict) -> None:
    """Tune function trainable: CEM over mixing weights with this trial's settings; one report per generation,
    then valid_accuracy of the found α."""
    import numpy as np
    import ray.tune
    import torch

    from t2ray.adapt.two_pass import search_alpha
    from t2ray.config import AdaptConfig
    from t2ray.evaluate import evaluate
    from t2ray.experts import load_expert, mix_z
    from t2ray.models import load_model
    from t2ray.svf import apply_experts, set_mode, set_z
    from t2ray.tasks import get_task

    sweep = Sweep.from_spec(spec)
    cfg = AdaptConfig.model_validate(sweep.trial_data(config))
    torch.set_num_threads(max(1, int(sweep.trial_resources()["CPU"])))
    task = get_task(cfg.task)
    experts = [load_expert(p) for p in cfg.experts]
    model, tokenizer = load_model(cfg.model.spec, dtype=cfg.model.dtype)
    for expert in experts:  # patch + check that every expert fits this base model
        apply_experts(model, [expert], allow_transfer=cfg.allow_transfer)
    generation = 0

    def report(alphas: np.ndarray, scores) -> None:
        nonlocal generation
        generation += 1
        best = max(scores)
        ray.tune.report(
            {
                "generation": generation,
                "shots_accuracy": best[0],
                "shots_loglik": best[1],
                "mean_shots_accuracy": float(np.mean([s[0] for s in scores])),
            }
        )

    found = search_alpha(cfg, model, tokenizer, experts, task, progress=False, observe=report)
    alpha = found.alpha.tolist()
    set_mode(model, "materialized")
    set_z(model, mix_z(experts, alpha))
    result = evaluate(
        model, tokenizer, task, split="valid", limit=cfg.limit, batch_size=cfg.batch_size, adapter="cem", progress=False
    )
    ray.tune.report(
        {
            "generation": generation,
            "valid_accuracy": result.accuracy,
            "valid_n": result.n,
            "shots_accuracy": found.fitness[0],
            "shots_loglik": found.fitness[1],
            "alpha": json.dumps(alpha),
        }
    )
