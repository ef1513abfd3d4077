"""The per-worker RL loop, plain PyTorch (no Ray): Ray Train only wraps it and adds checkpoints."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from t2ray.config import ExperimentConfig
from t2ray.evaluate import grade_all
from t2ray.generation import AllDone, completion_logits, encode_prompts, gather_logprobs, generate
from t2ray.rl.loss import advantages, kl_to_reference, reinforce_loss
from t2ray.rl.rollout import InProcessEngine, RolloutEngine
from t2ray.rl.trainable import TrainableAdapter
from t2ray.tasks.base import Example, Task
from t2ray.tasks.graders import named_option_reward
from t2ray.tasks.sandbox import SandboxUnavailable

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over workers (identity in one process)
# Every rank calls it after a stage that can fail on one rank alone (a too-long prompt, a grader): with that rank's
# error or None, and it raises on every rank if any failed, so that no rank waits for the others in a collective.
Agree = Callable[[BaseException | None], None]


def raise_own(error: BaseException | None) -> None:
    """Agree in one process."""
    if error is not None:
        raise error


def checked(stage: Callable[[], object], agree: Agree):
    """`stage()`'s result, after every rank has run its own and agreed that none failed."""
    error, result = None, None
    try:
        result = stage()
    except Exception as err:  # noqa: BLE001 — any failure must reach the other ranks before they block
        error = err
    agree(error)
    return result


class Stepper:
    """Accumulate gradients over micro-batches, then clip + Adam, in one process; t2ray.train wraps DeepSpeed's
    engine in the same interface (``backward`` per micro-batch, one ``step``)."""

    def __init__(self, params, lr: float, grad_clip: float):
        self.params = list(params)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.grad_clip = grad_clip
        self.accumulating = False

    def backward(self, loss: torch.Tensor) -> None:
        if not self.accumulating:  # the first micro-batch after a step starts from zero gradients
            self.optimizer.zero_grad(set_to_none=True)
            self.accumulating = True
        loss.backward()

    def step(self) -> float:
        self.accumulating = False
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return float(norm)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Adam moments per parameter index, full (unsharded): resumable at any worker count."""
        out = {}
        for i, p in enumerate(self.params):
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"{key}.{i}"] = value.detach().cpu().clone().reshape(-1)  # a copy: the step count too
        return out

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate(self.params):
            if f"exp_avg.{i}" in state:
                self.optimizer.state[p] = {  # the moments where the parameter lives (a GPU run resumes on GPU)
                    "step": state[f"step.{i}"].reshape(()).clone(),
                    "exp_avg": state[f"exp_avg.{i}"].view_as(p).to(p.device, p.dtype, copy=True),
                    "exp_avg_sq": state[f"exp_avg_sq.{i}"].view_as(p).to(p.device, p.dtype, copy=True),
                }


@dataclass
class LoopState:
    iteration: int = 0
    best_valid: float = float("-inf")
    best_iteration: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict] = field(default_factory=list)


def iteration_batch(
    examples: list[Example], batch_size: int, seed: int, iteration: int, rank: int, world_size: int
) -> list[Example]:
    """The same global sample on every worker (seeded by iteration), then this worker's shard."""
    picked = random.Random(seed * 1_000_003 + iteration).sample(examples, min(batch_size, len(examples)))
    return picked[rank::world_size]


def reward_function(task: Task, kind: str = "task"):
    """(example, completion) -> reward, as rl.reward names it."""
    if kind == "task":
        return task.reward
    if kind == "named-option":
        if getattr(task, "grader", None) != "choice":
            raise ValueError(
                f"rl.reward named-option is for multiple-choice tasks; {task.name!r} is graded by "
                f"{getattr(task, 'grader', 'its own code')!r}"
            )
        return lambda ex, text: named_option_reward(text, ex.answer, ex.choices)
    raise ValueError(f"unknown rl.reward {kind!r}: task | named-option")


def safe_rewards(
    task: Task, examples: list[Example], completions: list[str], kind: str = "task"
) -> tuple[torch.Tensor, int]:
    """±1 (or task-defined) rewards; a grader that raises scores the sample as wrong and is counted."""
    reward = reward_function(task, kind)
    rewards, errors = [], 0
    for ex, text in zip(examples, completions, strict=True):
        try:
            rewards.append(float(reward(ex, text)))
        except SandboxUnavailable:  # every code reward would be −1: stop, and say why
            raise
        except Exception:  # noqa: BLE001 — user graders may raise anything; training must go on
            rewards.append(-1.0)
            errors += 1
    return torch.tensor(rewards), errors


def trim_padding(ids, mask, cids, cmask, min_width: int = 1):
    """Drop the columns a micro-batch's rows all pad: left of the prompts, right of the completions (keeping at least
    `min_width` completion columns where there are as many)."""
    first = int(mask.any(0).float().argmax())
    last = int(cmask.any(0).nonzero().max()) + 1 if cmask.any() else 1
    last = max(last, min(min_width, cids.shape[1]))
    return ids[:, first:], mask[:, first:], cids[:, :last], cmask[:, :last]


def rl_step(
    model,
    tokenizer,
    task: Task,
    adapter: TrainableAdapter,
    stepper,
    shard: list[Example],
    cfg: ExperimentConfig,
    seed: int,
    engine: RolloutEngine,
    version: int,
    *,
    agree: Agree = raise_own,
    lockstep: bool = False,
) -> dict[str, float]:
    """One iteration on this rank's shard: rollouts, rewards, one optimizer step. `lockstep` (ZeRO-3 over several
    ranks): every forward is a collective, so every rank must run as many as the others."""
    rl = cfg.rl
    expanded = [ex for ex in shard for _ in range(rl.samples_per_prompt)]  # a prompt's samples are adjacent
    prompts = [task.messages(ex) for ex in expanded]
    max_new = rl.max_new_tokens or task.max_new_tokens
    t0 = time.perf_counter()
    sync_bytes = 0
    if rl.objective == "sft":
        batch = encode_prompts(tokenizer, prompts, model, 0)
        tokenizer.padding_side = "right"
        try:
            ref = tokenizer(
                [task.reference_completion(ex) + tokenizer.eos_token for ex in expanded],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
        finally:
            tokenizer.padding_side = "left"
        ids, mask, cids, cmask = batch["input_ids"], batch["attention_mask"], ref["input_ids"], ref["attention_mask"]
        rewards, errors = torch.zeros(len(expanded)), 0
    else:
        model.eval()
        checked(lambda: encode_prompts(tokenizer, prompts, model, max_new), agree)  # a too-long prompt, on any rank
        sync_bytes = engine.sync(model, version)  # z only, never weights
        roll = engine.generate(
            prompts,
            max_new_tokens=max_new,
            temperature=rl.temperature,
            top_p=rl.top_p,
            seed=seed,
            samples_per_prompt=rl.samples_per_prompt,
        )
        ids, mask, cids, cmask = roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask
        rewards, errors = checked(lambda: safe_rewards(task, expanded, roll.texts, rl.reward), agree)
    t1 = time.perf_counter()
    model.train()  # dropout (LoRA's lora_dropout) applies to the update, not to rollouts or evaluations
    try:
        metrics = _update(model, adapter, stepper, expanded, cfg, ids, mask, cids, cmask, rewards, lockstep)
    finally:
        model.eval()
    return {
        **metrics,
        "reward": float(rewards.mean()),
        "accuracy": float((rewards > 0).float().mean()),
        "reward_errors": errors,
        "completion_tokens": int(cmask.sum()),
        "sync_bytes": sync_bytes,
        "rollout_s": t1 - t0,
        "update_s": time.perf_counter() - t1,
        "samples": len(expanded),
    }


def _update(
    model,
    adapter: TrainableAdapter,
    stepper,
    expanded: list[Example],
    cfg: ExperimentConfig,
    ids,
    mask,
    cids,
    cmask,
    rewards,
    lockstep: bool = False,
) -> dict[str, float]:
    """The loss over micro-batches, one optimizer step: {loss, kl, grad_norm}."""
    rl = cfg.rl
    dev = next(model.parameters()).device
    ids, mask, cids, cmask = (t.to(dev) for t in (ids, mask, cids, cmask))
    adv = (
        None
        if rl.objective == "sft"
        else advantages(
            rewards, rl.samples_per_prompt, baseline=rl.baseline, normalize=rl.normalize_rewards, clip=rl.reward_clip
        ).to(dev)
    )
    tokens = cmask.sum().clamp(min=1)
    sampled_at_temperature = rl.logprobs_at_temperature and rl.objective == "reinforce" and rl.temperature > 0
    k = rl.samples_per_prompt
    micro = max(k, rl.micro_batch_size // k * k)  # whole prompts per micro-batch: their prompt forward is shared
    # The shared prompt needs its KV cache in the backward, which activation checkpointing drops: one forward per row.
    shared = 1 if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) else k
    # A shared prompt's forward is followed by a second one unless the completion is one token wide: in lockstep every
    # rank keeps two columns, so that no rank runs one forward fewer than the others (and waits in a collective).
    min_width = 2 if lockstep and shared > 1 else 1
    loss_sum, kl_sum = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for start in range(0, len(expanded), micro):
        # Each micro-batch's loss is its share of the whole batch's, so the accumulated gradient is the batch's.
        rows = slice(start, start + micro)
        m_ids, m_mask, m_cids, m_cmask = trim_padding(ids[rows], mask[rows], cids[rows], cmask[rows], min_width)
        logits = completion_logits(model, m_ids, m_mask, m_cids, m_cmask, samples_per_prompt=shared)
        # π_T, the distribution the rollouts were sampled from, when asked; the KL stays between the T = 1 policies
        logp = gather_logprobs(logits / rl.temperature if sampled_at_temperature else logits, m_cids, m_cmask)
        if adv is None:
            loss = -logp.sum() / tokens  # token-mean NLL of the reference replies
        else:
            loss = reinforce_loss(logp, adv[rows], len(expanded))  # DeepSpeed averages gradients over workers
        if rl.kl_coef > 0:
            with torch.no_grad(), adapter.reference():
                ref_logits = completion_logits(model, m_ids, m_mask, m_cids, m_cmask, samples_per_prompt=k)
            kl = kl_to_reference(logits, ref_logits, m_cmask) * m_cmask.sum() / tokens  # token-weighted share
            loss = loss + rl.kl_coef * kl
            kl_sum += kl.detach()
        stepper.backward(loss)
        loss_sum += loss.detach()
    grad_norm = stepper.step()
    return {"loss": float(loss_sum), "kl": float(kl_sum), "grad_norm": float(grad_norm or 0.0)}


def sharded_accuracy(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    rank: int,
    world_size: int,
    reduce: Reduce,
    batch_size: int,
    seed: int,
    all_done: AllDone | None = None,
    agree: Agree = raise_own,
) -> float:
    """Greedy accuracy over `examples`, each worker grading its shard; counts summed over workers. With `all_done`
    (ZeRO-3 lockstep) every shard is padded to the same length, so every rank runs as many generate batches."""
    shard = examples[rank::world_size]
    real = len(shard)
    if all_done is not None:
        shard += (shard[-1:] or examples[-1:]) * (-(-len(examples) // world_size) - real)  # repeats, not graded
    messages = [task.messages(ex) for ex in shard]
    checked(lambda: encode_prompts(tokenizer, messages, model, task.max_new_tokens), agree)
    texts = generate(
        model,
        tokenizer,
        messages,
        max_new_tokens=task.max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        all_done=all_done,
    )
    correct = checked(lambda: sum(ok for ok, _ in grade_all(task, shard[:real], texts[:real])), agree)
    counts = reduce(torch.tensor([float(correct), float(real)]))
    return float(counts[0] / counts[1].clamp(min=1))


def train_loop(
    cfg: ExperimentConfig,
    model,
    tokenizer,
    task: Task,
    adapter: TrainableAdapter,
    stepper,
    *,
    rank: int = 0,
    world_size: int = 1,
    reduce: Reduce = lambda t: t,
    state: LoopState | None = None,
    on_iteration: Callable[[LoopState, dict], None] | None = None,
    engine: RolloutEngine | None = None,
    all_done: AllDone | None = None,
    agree: Agree = raise_own,
) -> LoopState:
    """Run RL iterations from `state.iteration` to cfg.rl.iterations; evaluate on valid every eval_interval
    (and at the end); keep the best-on-valid adapter state. Over several ranks: `reduce` sums over them, `agree`
    stops all of them when one fails, `all_done` keeps ZeRO-3's generation in lockstep."""
    state = state or LoopState()
    engine = engine or InProcessEngine(model, tokenizer, all_done)
    train = task.examples("train")
    valid = task.examples("valid")[: cfg.rl.eval_limit]
    reduce_mean = lambda x: float(reduce(torch.tensor([x, 1.0]))[0] / world_size)  # noqa: E731
    while state.iteration < cfg.rl.iterations:
        it = state.iteration
        shard = iteration_batch(train, cfg.rl.batch_size, cfg.seed, it, rank, world_size)
        t0 = time.perf_counter()
        metrics = rl_step(
            model,
            tokenizer,
            task,
            adapter,
            stepper,
            shard,
            cfg,
            seed=cfg.seed * 7919 + it * world_size + rank,
            engine=engine,
            version=it,
            agree=agree,
            lockstep=all_done is not None,
        )
        metrics = {k: reduce_mean(v) if k in ("reward", "accuracy", "loss", "kl") else v for k, v in metrics.items()}
        metrics.update(iteration=it + 1, seconds=time.perf_counter() - t0)
        state.iteration = it + 1
        if state.iteration % cfg.rl.eval_interval == 0 or state.iteration == cfg.rl.iterations:
            metrics["valid_accuracy"] = sharded_accuracy(
                model,
                tokenizer,
                task,
                valid,
                rank,
                world_size,
                reduce,
                cfg.rl.eval_batch_size,
                cfg.seed,
                all_done,
                agree,
            )
            if metrics["valid_accuracy"] > state.best_valid:
                state.best_valid, state.best_iteration = metrics["valid_accuracy"], state.iteration
                state.best_state = adapter.state()
        state.history.append(metrics)
        if on_iteration:
            on_iteration(state, metrics)
    return state
