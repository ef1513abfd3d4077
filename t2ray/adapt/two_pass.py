"""Two-pass inference over a task split: pass 1 decides a mixture per query (or per task, or per token),
pass 2 answers with it. One entry point for the CLI, the report and the serving layer."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from t2ray.adapt.dispatch import classify, confusion
from t2ray.config import AdaptConfig
from t2ray.evaluate import EvalResult, grade_all
from t2ray.experts import Expert, ExpertError, Mixture, load_expert, mix_z, save_mixture
from t2ray.generation import generate
from t2ray.library import library_kind
from t2ray.models import load_model
from t2ray.svf import apply_experts, disabled, set_mode, set_z
from t2ray.tasks import get_task
from t2ray.tasks.base import Task


@dataclass
class AdaptResult:
    strategy: str
    eval: EvalResult
    pass1_s: float
    pass2_s: float
    choices: list[str] = field(default_factory=list)  # per query: expert name, "base" or "mixture"
    alpha: list | None = None  # fewshot: the α found
    history: list[dict] = field(default_factory=list)  # fewshot: CEM generations
    expert_names: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        counts = {c: self.choices.count(c) for c in sorted(set(self.choices))}
        return {
            **self.eval.summary(),
            "strategy": self.strategy,
            "pass1_s": self.pass1_s,
            "pass2_s": self.pass2_s,
            "pass1_over_pass2": self.pass1_s / max(self.pass2_s, 1e-9),
            "choices": counts,
            "alpha": self.alpha,
            "expert_names": self.expert_names,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.summary(), "history": self.history, "records": self.eval.records}, indent=2))
        return path


def category_of(task: str | None) -> str | None:
    """The category of the task an expert was trained on (its name when the task is not known here)."""
    try:
        return get_task(task).category if task else None
    except ValueError:
        return task


def expert_category(expert: Expert) -> str:
    """The category an expert serves, from the task it was trained on."""
    return category_of(expert.task) or expert.name


def pass2_bar(task: Task, total: int, progress: bool):
    return tqdm(total=total, desc=f"pass 2 {task.name}", unit="prompt", disable=not progress)


def grouped_generate(
    model, tokenizer, task: Task, messages, groups: list[dict | None], batch_size: int, progress: bool = False
):
    """Pass 2 where queries use a few distinct mixtures: one materialised W' per mixture, not per query."""
    texts: list[str | None] = [None] * len(messages)
    keys = {}
    for i, z in enumerate(groups):
        keys.setdefault(id(z), (z, []))[1].append(i)
    with pass2_bar(task, len(messages), progress) as bar:
        for z, rows in keys.values():
            set_z(model, z)
            out = generate(
                model, tokenizer, [messages[i] for i in rows], max_new_tokens=task.max_new_tokens, batch_size=batch_size
            )
            for i, text in zip(rows, out, strict=True):
                texts[i] = text
            bar.update(len(rows))
    return texts


def lora_library(cfg: AdaptConfig) -> bool:
    """True when the experts are LoRA adapter folders, False for SVF files; a mix is refused in one line."""
    return library_kind([*cfg.experts, *([cfg.classifier_expert] if cfg.strategy == "classifier" else [])]) == "lora"


def run_adapt(cfg: AdaptConfig, *, progress: bool = True) -> AdaptResult:
    task = get_task(cfg.task)
    examples = task.examples(cfg.split)[: cfg.limit]
    messages = [task.messages(ex) for ex in examples]
    if lora_library(cfg):
        return run_adapt_lora(cfg, task, examples, messages, progress=progress)
    experts = [load_expert(p) for p in cfg.experts]
    model, tokenizer = load_model(cfg.model.spec, dtype=cfg.model.dtype)
    apply_experts(model, experts[:1], allow_transfer=cfg.allow_transfer)  # patch + check the library fits
    for expert in experts[1:]:
        apply_experts(model, [expert], allow_transfer=cfg.allow_transfer)
    set_mode(model, "materialized")
    alpha, history = None, []

    t0 = time.perf_counter()
    if cfg.strategy in ("prompt", "classifier"):
        by_category = {expert_category(e): e for e in experts}
        if cfg.strategy == "classifier":
            cls_expert = load_expert(cfg.classifier_expert)
            apply_experts(model, [cls_expert], allow_transfer=cfg.allow_transfer)
            labels = classify(model, tokenizer, [ex.prompt for ex in examples], mode=cfg.classify_mode)
        else:
            with disabled(model):
                labels = classify(model, tokenizer, [ex.prompt for ex in examples], mode=cfg.classify_mode)
        zs = {c: e.z() for c, e in by_category.items()}
        groups = [zs.get(label) for label in labels]  # "other" or a category without an expert -> base model
        choices = [by_category[label].name if label in by_category else "base" for label in labels]
    elif cfg.strategy == "nearest":
        tasks = [e.task for e in experts]
        router = query_router(tasks, cfg.routing.examples_per_task, what=cfg.experts)
        zs = {e.task: e.z() for e in experts}
        nearest = router.nearest([ex.prompt for ex in examples])
        groups = [zs[t] for t in nearest]
        choices = [experts[tasks.index(t)].name for t in nearest]
    elif cfg.strategy == "fewshot":
        result = search_alpha(cfg, model, tokenizer, experts, task, progress=progress)
        alpha, history = result.alpha.tolist(), result.history
        mixed = mix_z(experts, alpha)
        groups, choices = [mixed] * len(examples), ["mixture"] * len(examples)
    else:
        groups, choices = None, ["token-routed"] * len(examples)
    pass1 = time.perf_counter() - t0

    t1 = time.perf_counter()
    if groups is None:
        from t2ray.adapt.token_routing import SVFMixer

        texts = route_tokens(
            model,
            tokenizer,
            SVFMixer(model, experts, allow_transfer=cfg.allow_transfer),
            [e.task for e in experts],
            task,
            messages,
            cfg,
            progress=progress,
        )
    else:
        set_mode(model, "materialized")
        texts = grouped_generate(model, tokenizer, task, messages, groups, cfg.batch_size, progress=progress)
    pass2 = time.perf_counter() - t1
    return graded(cfg, task, examples, texts, choices, pass1, pass2, [e.name for e in experts], alpha, history)


def graded(
    cfg: AdaptConfig,
    task: Task,
    examples,
    texts: list[str],
    choices: list[str],
    pass1: float,
    pass2: float,
    names: list[str],
    alpha: list | None = None,
    history: list[dict] | None = None,
) -> AdaptResult:
    grades = grade_all(task, examples, texts)
    correct = sum(ok for ok, _ in grades)
    records = [
        {"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "completion": t, "correct": ok, "choice": c}
        for ex, t, (ok, _), c in zip(examples, texts, grades, choices, strict=True)
    ]
    evaluation = EvalResult(
        task=task.name,
        split=cfg.split,
        accuracy=correct / max(1, len(examples)),
        n=len(examples),
        correct=correct,
        seconds=pass1 + pass2,
        adapter=cfg.strategy,
        records=records,
    )
    return AdaptResult(cfg.strategy, evaluation, pass1, pass2, choices, alpha, history or [], names)


def run_adapt_lora(cfg: AdaptConfig, task: Task, examples, messages, *, progress: bool) -> AdaptResult:
    """Two-pass adaptation over LoRA adapters (Belofsky's setting). Every strategy is per-row adapter weights through
    LoRAMixer, the exact Σ_k w_k ΔW_k: prompt / classifier put one adapter on each row (none: the base model),
    token re-routes every k tokens, fewshot searches one α per adapter with CEM (LoraHub's setting). The classifier
    is a LoRA adapter trained on the cls task, mixed in as adapter K."""
    import torch

    from t2ray.adapt.token_routing import LoRAMixer, generate_weighted
    from t2ray.lora.layer import read_lora_expert, set_lora_weights

    if cfg.strategy == "fewshot" and (cfg.cem.per_module or cfg.cem.actors > 1):
        raise ExpertError(
            "few-shot CEM over LoRA adapters takes one α per adapter in this process (LoraHub's "
            "setting): set cem.per_module false and cem.actors 1"
        )
    adapters = [read_lora_expert(p) for p in cfg.experts]
    tasks = [a.task for a in adapters]
    classifier = [read_lora_expert(cfg.classifier_expert)] if cfg.strategy == "classifier" else []
    model, tokenizer = load_model(cfg.model.spec, dtype=cfg.model.dtype)
    mixer = LoRAMixer(model, adapters + classifier, allow_transfer=cfg.allow_transfer)
    k = len(adapters)

    t0 = time.perf_counter()
    weights, choices, alpha, history = None, ["token-routed"] * len(examples), None, []
    if cfg.strategy == "fewshot":
        from t2ray.adapt.fewshot import LoRAShotFitness, pick_shots

        fitness = LoRAShotFitness(
            model, tokenizer, mixer, task, pick_shots(task, cfg.cem.shots, cfg.cem.seed), batch_size=cfg.batch_size
        )
        found = run_cem(cfg, fitness, (k,), progress=progress)
        alpha, history = found.alpha.tolist(), found.history
        weights = torch.tensor(alpha, dtype=torch.float32).expand(len(examples), k)
        choices = ["mixture"] * len(examples)
    elif cfg.strategy != "token":
        questions = [ex.prompt for ex in examples]
        if cfg.strategy == "nearest":
            router = query_router(tasks, cfg.routing.examples_per_task, what=cfg.experts)
            labels = [category_of(t) for t in router.nearest(questions)]
        else:
            set_lora_weights(model, [0.0] * k + [1.0] * len(classifier))  # the classifier adapter alone, or the base
            try:
                labels = classify(model, tokenizer, questions, mode=cfg.classify_mode)
            finally:
                mixer.reset()
        index = {category_of(t): i for i, t in enumerate(tasks)}
        weights = torch.zeros(len(examples), k + len(classifier))
        for row, label in enumerate(labels):
            if label in index:
                weights[row, index[label]] = 1.0
        choices = [adapters[index[label]].name if label in index else "base" for label in labels]
    pass1 = time.perf_counter() - t0

    t1 = time.perf_counter()
    if weights is None:
        texts = route_tokens(model, tokenizer, mixer, tasks, task, messages, cfg, progress=progress)
    else:
        texts = []
        with pass2_bar(task, len(messages), progress) as bar:
            for start in range(0, len(messages), cfg.batch_size):
                rows = slice(start, start + cfg.batch_size)
                texts += generate_weighted(
                    model, tokenizer, messages[rows], mixer, weights[rows], max_new_tokens=task.max_new_tokens
                )
                bar.update(len(messages[rows]))
    pass2 = time.perf_counter() - t1
    return graded(cfg, task, examples, texts, choices, pass1, pass2, [a.name for a in adapters], alpha, history)


def query_router(tasks: list[str | None], examples_per_task: int = 64, *, what: list[str] | None = None):
    """The nearest-centroid dispatcher: one centroid per expert's training task, from its TRAIN questions alone."""
    from t2ray.adapt.token_routing import Router

    missing = [(what or tasks)[i] for i, t in enumerate(tasks) if not t]
    if missing:
        raise ValueError(f"nearest-centroid routing needs each expert's training task; {missing} have none")
    return Router.from_tasks([get_task(t) for t in tasks], examples_per_task=examples_per_task, questions_only=True)


def dispatch_quality(
    model_spec: str,
    limits: dict[str, int],
    *,
    classifier_expert: str | Path | None = None,
    expert_tasks: list[str] = (),
    dtype: str = "auto",
    mode: str = "score",
    allow_transfer: bool = False,
) -> dict:
    """Pass 1 alone, scored against each query's true category over the first `limits[task]` test queries of each
    task: the prompt strategy (the base model classifies), the classifier expert (when given) and the nearest
    centroid of the experts' training tasks (when given)."""
    model, tokenizer = load_model(model_spec, dtype=dtype)
    questions, true = [], []
    for name, limit in limits.items():
        task = get_task(name)
        examples = task.examples("test")[:limit]
        questions += [ex.prompt for ex in examples]
        true += [task.category] * len(examples)
    predicted = {"prompt": classify(model, tokenizer, questions, mode=mode)}
    if classifier_expert is not None:
        apply_experts(model, [load_expert(classifier_expert)], allow_transfer=allow_transfer)
        set_mode(model, "materialized")
        predicted["classifier"] = classify(model, tokenizer, questions, mode=mode)
    if expert_tasks:
        predicted["nearest"] = [get_task(t).category for t in query_router(list(expert_tasks)).nearest(questions)]
    return {
        **{strategy: confusion(true, labels) for strategy, labels in predicted.items()},
        "categories": {name: get_task(name).category for name in limits},
    }


def route_tokens(
    model, tokenizer, mixer, tasks: list[str | None], task: Task, messages, cfg: AdaptConfig, progress: bool = False
) -> list[str]:
    """Pass 2 with token-level routing: centroids of each expert's training task (`tasks`, in the mixer's order),
    re-routed every k tokens."""
    from t2ray.adapt.token_routing import Router, generate_routed

    missing = [cfg.experts[i] for i, t in enumerate(tasks) if not t]
    if missing:
        raise ValueError(f"token routing needs each expert's training task for its centroid; {missing} have none")
    router = Router.from_tasks(
        [get_task(t) for t in tasks],
        examples_per_task=cfg.routing.examples_per_task,
        temperature=cfg.routing.temperature,
    )
    texts: list[str] = []
    with pass2_bar(task, len(messages), progress) as bar:
        for start in range(0, len(messages), cfg.batch_size):
            chunk = messages[start : start + cfg.batch_size]
            texts += generate_routed(
                model,
                tokenizer,
                chunk,
                mixer,
                router,
                every=cfg.routing.every,
                max_new_tokens=task.max_new_tokens,
                recompute_prefix=cfg.routing.recompute_prefix,
            ).texts
            bar.update(len(chunk))
    return texts


def search_alpha(
    cfg: AdaptConfig, model, tokenizer, experts: list[Expert], task: Task, *, progress: bool = True, observe=None
):
    """CEM over α on k shots: in this process, or on `cfg.cem.actors` Ray actors. `observe(alphas, scores)`, if
    given, sees every generation's population (e.g. to report it to Tune)."""
    from t2ray.adapt.fewshot import ShotFitness, pick_shots

    c = cfg.cem
    shape = (len(experts), len(experts[0].modules)) if c.per_module else (len(experts),)
    if c.actors > 1:
        from t2ray.adapt.cem_pool import ActorPoolFitness

        fitness = ActorPoolFitness(
            c.actors,
            model_spec=cfg.model.spec,
            expert_paths=cfg.experts,
            task_spec=cfg.task,
            shots=c.shots,
            seed=c.seed,
            dtype=cfg.model.dtype,
            allow_transfer=cfg.allow_transfer,
        )
    else:
        fitness = ShotFitness(
            model,
            tokenizer,
            experts,
            task,
            pick_shots(task, c.shots, c.seed),
            batch_size=cfg.batch_size,
            allow_transfer=cfg.allow_transfer,
        )
    return run_cem(cfg, fitness, shape, progress=progress, observe=observe)


def run_cem(cfg: AdaptConfig, fitness, shape: tuple[int, ...], *, progress: bool = True, observe=None):
    """CEM over α of `shape` with cfg.cem's settings; a fitness with shutdown() (Ray actors) is shut down after."""
    from t2ray.adapt.cem import cem_search

    def scored(alphas):
        scores = fitness(alphas)
        if observe is not None:
            observe(alphas, scores)
        return scores

    # every setting of cfg.cem is the search's but those of the fitness (shots, actors) and of α's shape (per_module)
    search = cfg.cem.model_dump(exclude={"shots", "actors", "per_module"})
    try:
        return cem_search(scored, shape, **search, progress=progress)
    finally:
        if hasattr(fitness, "shutdown"):
            fitness.shutdown()


def save_found_mixture(result: AdaptResult, cfg: AdaptConfig, path: str | Path) -> Path:
    """The α CEM found as a mixture file usable by `t2ray eval --mixture` and by serving."""
    return save_mixture(
        Mixture(
            experts=list(cfg.experts),
            alpha=result.alpha,
            name=f"fewshot-{cfg.task}",
            task=cfg.task,
            metadata={"cem": cfg.cem.model_dump(), "shots_accuracy": result.history[-1]["best_accuracy"]},
        ),
        path,
    )
