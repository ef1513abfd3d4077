"""The plain-PyTorch RL loop (t2ray.rl.loop): rewards, batches, the optimizer state, and learning on tiny-llama."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from t2ray.config import ExperimentConfig
from t2ray.rl.loop import LoopState, Stepper, iteration_batch, safe_rewards, train_loop
from t2ray.tasks.base import Example, Task

from .learnable import LEARNABLE_RL, mean, rewards, write_learnable_task


def examples(n: int) -> list[Example]:
    return [Example(id=f"ex{i}", prompt=f"prompt {i}", answer=str(i)) for i in range(n)]


# ---------------------------------------------------------------- safe_rewards


class FlakyTask(Task):
    """Grades "yes" as right; its grader raises on some completions (a buggy user grader)."""

    name = "flaky"

    def examples(self, split):
        return examples(4)

    def grade(self, ex, completion):
        if "boom" in completion:
            raise RuntimeError("grader bug")
        if completion == "type":
            raise TypeError("another bug")
        return completion == "yes"

    def reference_completion(self, ex):
        return "yes"


def test_safe_rewards_counts_grader_errors_as_wrong():
    exs = examples(5)
    r, errors = safe_rewards(FlakyTask(), exs, ["yes", "boom", "no", "type", "yes"])
    assert r.tolist() == [1.0, -1.0, -1.0, -1.0, 1.0]
    assert errors == 2
    r, errors = safe_rewards(FlakyTask(), exs[:2], ["yes", "no"])
    assert r.tolist() == [1.0, -1.0] and errors == 0


def test_safe_rewards_keeps_task_defined_rewards():
    class Graded(FlakyTask):
        def reward(self, ex, completion):
            return 0.25 if completion == "half" else super().reward(ex, completion)

    r, errors = safe_rewards(Graded(), examples(3), ["half", "yes", "boom"])
    assert r.tolist() == [0.25, 1.0, -1.0] and errors == 1


# ---------------------------------------------------------------- iteration_batch


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_iteration_batch_shards_one_global_sample(world):
    train = examples(50)
    batch = 12
    for it in range(3):
        global_sample = iteration_batch(train, batch, seed=7, iteration=it, rank=0, world_size=1)
        assert len(global_sample) == batch and len({e.id for e in global_sample}) == batch
        shards = [iteration_batch(train, batch, seed=7, iteration=it, rank=r, world_size=world) for r in range(world)]
        ids = [{e.id for e in s} for s in shards]
        for a in range(world):
            for b in range(a + 1, world):
                assert not ids[a] & ids[b], "shards overlap"
        assert set().union(*ids) == {e.id for e in global_sample}, "shards do not cover the global sample"
        assert sum(map(len, shards)) == batch
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
        # every rank computes the same global sample: a rank's shard does not depend on the others running
        assert iteration_batch(train, batch, seed=7, iteration=it, rank=world - 1, world_size=world) == shards[-1]


def test_iteration_batch_varies_with_iteration_and_seed_and_caps_at_split_size():
    train = examples(50)
    first = [e.id for e in iteration_batch(train, 10, seed=0, iteration=0, rank=0, world_size=1)]
    assert first == [e.id for e in iteration_batch(train, 10, seed=0, iteration=0, rank=0, world_size=1)]
    assert first != [e.id for e in iteration_batch(train, 10, seed=0, iteration=1, rank=0, world_size=1)]
    assert first != [e.id for e in iteration_batch(train, 10, seed=1, iteration=0, rank=0, world_size=1)]
    small = examples(5)
    everything = iteration_batch(small, 16, seed=0, iteration=0, rank=0, world_size=1)
    assert sorted(e.id for e in everything) == sorted(e.id for e in small)


# ---------------------------------------------------------------- Stepper


def _quadratic_loss(params):
    return sum(((p - torch.arange(p.numel(), dtype=p.dtype)) ** 2).sum() for p in params)


def take_step(stepper, loss):
    stepper.backward(loss)
    return stepper.step()


def test_stepper_optimizer_state_round_trip():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    first = Stepper(a, lr=0.05, grad_clip=10.0)
    assert first.optimizer_state() == {}  # nothing before the first step
    for _ in range(3):
        norm = take_step(first, _quadratic_loss(a))
        assert norm > 0
    state = first.optimizer_state()
    assert set(state) == {f"{k}.{i}" for k in ("step", "exp_avg", "exp_avg_sq") for i in (0, 1)}
    assert all(t.dim() == 1 for t in state.values())  # flat, as checkpoints store them

    # a fresh stepper on copies of the parameters, given the state, takes exactly the same next step
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    second = Stepper(b, lr=0.05, grad_clip=10.0)
    second.load_optimizer_state(state)
    for key, value in second.optimizer_state().items():
        assert torch.equal(value, state[key]), key
    # the moments land where the parameters live (on a GPU run they used to stay on the CPU: a device mismatch)
    assert all(st["exp_avg"].device == p.device for p, st in second.optimizer.state.items())
    take_step(first, _quadratic_loss(a))
    take_step(second, _quadratic_loss(b))
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)

    # without the state the next step differs (Adam's first step is lr·sign(g))
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    third = Stepper(c, lr=0.05, grad_clip=10.0)
    take_step(first, _quadratic_loss(a))
    take_step(third, _quadratic_loss(c))
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a, c, strict=True))


def test_saved_optimizer_state_is_a_snapshot():
    """The step count used to be saved as a view of Adam's live tensor: a later step rewrote the saved value."""
    p = torch.nn.Parameter(torch.randn(4))
    stepper = Stepper([p], lr=0.05, grad_clip=10.0)
    take_step(stepper, _quadratic_loss([p]))
    saved = stepper.optimizer_state()
    before = {k: v.clone() for k, v in saved.items()}
    take_step(stepper, _quadratic_loss([p]))
    assert all(torch.equal(saved[k], before[k]) for k in saved) and float(saved["step.0"][0]) == 1.0


def test_deepspeed_adam_takes_the_steppers_steps(tmp_path):
    """DeepSpeed built from DeepSpeedConfig.to_dict runs the same Adam (no AdamW weight decay) as the one-process
    Stepper: identical parameters after three steps. A subprocess: DeepSpeed initialises torch.distributed."""
    script = tmp_path / "ds_vs_stepper.py"
    script.write_text("""
import os, torch, deepspeed
from t2ray.config import DeepSpeedConfig
from t2ray.rl.loop import Stepper
from t2ray.train.worker import skip_shm_all_reduce_build
skip_shm_all_reduce_build()  # as t2ray's workers do (a 30 s compile otherwise)
torch.manual_seed(0)
start = torch.randn(6) * 3
a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
model = torch.nn.Module()
model.z = b
config = DeepSpeedConfig(zero_stage=2).to_dict(train_batch=1, world_size=1, grad_clip=10.0, lr=0.1)
engine, *_ = deepspeed.initialize(model=model, model_parameters=[b], config=config)
inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
assert type(inner) is torch.optim.Adam, type(inner)
assert all(group["weight_decay"] == 0.0 for group in inner.param_groups)
stepper = Stepper([a], lr=0.1, grad_clip=10.0)
for _ in range(3):
    stepper.backward(((a - 1.0) ** 2).sum()); stepper.step()
    engine.backward(((b - 1.0) ** 2).sum()); engine.step()
print("max diff", float((a - b).abs().max()))
assert torch.allclose(a, b, atol=1e-6)
""")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "max diff" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_stepper_clips_the_gradient_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    stepper = Stepper([p], lr=1.0, grad_clip=1e-3)
    norm = take_step(stepper, (p * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum())
    assert norm == pytest.approx(5.0)  # the pre-clip norm is reported
    assert torch.allclose(p.grad.norm(), torch.tensor(1e-3), rtol=1e-3)


# ---------------------------------------------------------------- train_loop on tiny-llama


def learnable_config(task_path, **rl) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": "rl-loop",
            "task": str(task_path),
            "seed": 0,
            "model": {"spec": "tiny-llama"},
            "svf": {"target_modules": "mlp"},
            "scaling": {"num_workers": 1},
            "tracking": {"wandb": False},
            "rl": {
                **LEARNABLE_RL,
                "iterations": 20,
                "batch_size": 8,
                "eval_interval": 10,
                "eval_limit": 4,
                "eval_batch_size": 4,
                **rl,
            },
        }
    )


def test_train_loop_reward_goes_up_on_a_learnable_task(tmp_path, tokenizer):
    from t2ray.models import load_model
    from t2ray.rl.trainable import SVFAdapter
    from t2ray.tasks import get_task

    cfg = learnable_config(write_learnable_task(tmp_path))
    task = get_task(cfg.task, seed=cfg.seed)
    model, _ = load_model("tiny-llama", seed=cfg.seed)
    adapter = SVFAdapter(model, cfg.svf, seed=cfg.seed, progress=False)
    stepper = Stepper(adapter.parameters(), cfg.rl.lr, cfg.rl.grad_clip)
    start_state = adapter.state()
    seen = []
    start = time.perf_counter()
    state = train_loop(
        cfg, adapter.model, tokenizer, task, adapter, stepper, on_iteration=lambda st, m: seen.append(m["iteration"])
    )
    elapsed = time.perf_counter() - start

    assert state.iteration == 20 and seen == list(range(1, 21))
    r = rewards(state.history)
    first, last = mean(r[:5]), mean(r[-5:])
    assert last - first >= 0.5, f"reward did not go up: first 5 {first:+.2f}, last 5 {last:+.2f}: {r}"
    assert mean(m["accuracy"] for m in state.history[-5:]) > mean(m["accuracy"] for m in state.history[:5])
    # evaluations at 10 and 20 only; the best-on-valid state is kept
    evals = [m["iteration"] for m in state.history if "valid_accuracy" in m]
    assert evals == [10, 20]
    assert state.best_iteration in (10, 20) and state.best_state is not None
    assert set(state.best_state) == set(start_state)
    moved = max(float((adapter.state()[k] - start_state[k]).abs().max()) for k in start_state)
    assert moved > 1.0  # z really trained (lr 0.3 × 20 Adam steps)
    for m in state.history:
        assert m["reward_errors"] == 0 and m["samples"] == 8 and m["kl"] == 0.0
    assert elapsed < 60


def test_train_loop_resumes_from_a_state_and_reports_kl(tmp_path, tokenizer):
    """Starting from a LoopState runs only the remaining iterations; kl_coef > 0 adds the KL term."""
    from t2ray.models import load_model
    from t2ray.rl.trainable import SVFAdapter
    from t2ray.tasks import get_task

    cfg = learnable_config(write_learnable_task(tmp_path), iterations=4, eval_interval=2, kl_coef=0.1)
    task = get_task(cfg.task, seed=cfg.seed)
    model, _ = load_model("tiny-llama", seed=cfg.seed)
    adapter = SVFAdapter(model, cfg.svf, seed=cfg.seed, progress=False)
    stepper = Stepper(adapter.parameters(), cfg.rl.lr, cfg.rl.grad_clip)
    state = LoopState(iteration=2, best_valid=0.5, best_iteration=2, history=[{"iteration": 1}, {"iteration": 2}])
    state = train_loop(cfg, adapter.model, tokenizer, task, adapter, stepper, state=state)
    assert [m["iteration"] for m in state.history] == [1, 2, 3, 4]
    assert "valid_accuracy" in state.history[-1] and "valid_accuracy" not in state.history[2]
    # z starts near-uniform (p = 0.1 + 0.01·N): almost the base model; one lr-0.3 Adam step moves it away
    assert abs(state.history[2]["kl"]) < 1e-5 < state.history[3]["kl"]  # (float rounding may give −1e-8)


# ---------------------------------------------------------------- rl_step: samples per prompt, micro-batches


def one_rl_step(task_path, tokenizer, on_model=None, lora_dropout=None, **rl):
    """One rl_step on a fresh fp32 tiny-llama (SVF, or LoRA with `lora_dropout`); returns (metrics, the adapter's
    gradient per parameter, rollout texts). `on_model(model)` runs before the step (to attach hooks)."""
    from t2ray.config import LoRAConfig
    from t2ray.lora import LoRAAdapter
    from t2ray.models import load_model
    from t2ray.rl.loop import rl_step
    from t2ray.rl.rollout import InProcessEngine
    from t2ray.rl.trainable import SVFAdapter
    from t2ray.tasks import get_task

    cfg = learnable_config(task_path, **rl)
    task = get_task(cfg.task, seed=cfg.seed)
    model, _ = load_model("tiny-llama", seed=cfg.seed, dtype="float32")
    adapter = (
        SVFAdapter(model, cfg.svf, seed=cfg.seed, progress=False)
        if lora_dropout is None
        else LoRAAdapter(model, LoRAConfig(dropout=lora_dropout), cfg.svf, seed=cfg.seed)
    )
    if on_model is not None:
        on_model(adapter.model)
    stepper = Stepper(adapter.parameters(), lr=1e-12, grad_clip=1e9)  # keep the gradients, barely move z

    class Recording(InProcessEngine):  # the real engine, keeping what it generated
        def generate(self, *args, **kwargs):
            self.last = super().generate(*args, **kwargs)
            return self.last

    engine = Recording(adapter.model, tokenizer)
    shard = iteration_batch(task.examples("train"), cfg.rl.batch_size, cfg.seed, 0, 0, 1)
    metrics = rl_step(
        adapter.model,
        tokenizer,
        task,
        adapter,
        stepper,
        shard,
        cfg,
        seed=0,
        engine=engine,
        version=0,
    )
    grads = {i: p.grad.clone() for i, p in enumerate(adapter.parameters())}
    return metrics, grads, engine.last.texts


def test_micro_batches_accumulate_the_whole_batch_gradient(tmp_path, tokenizer):
    task = write_learnable_task(tmp_path)
    # temperature 1 on the near-uniform tiny model: varied completion lengths, so micro-batches trim padding
    common = dict(batch_size=4, samples_per_prompt=2, temperature=1.0, baseline="rloo", kl_coef=0.1)
    whole, whole_grads, whole_texts = one_rl_step(task, tokenizer, micro_batch_size=8, **common)
    split, split_grads, split_texts = one_rl_step(task, tokenizer, micro_batch_size=3, **common)
    assert whole_texts == split_texts and whole["samples"] == split["samples"] == 8
    assert whole["loss"] == pytest.approx(split["loss"], rel=1e-4, abs=1e-6)
    # the policy is the reference at the first step: KL is 0 up to rounding, which GEMMs of other row counts change
    # (MKL on an Intel Xeon: -1.4e-7 whole vs -0.9e-7 split), as for the loss
    assert whole["kl"] == pytest.approx(split["kl"], rel=1e-4, abs=1e-6)
    for i in whole_grads:
        assert torch.allclose(whole_grads[i], split_grads[i], rtol=1e-4, atol=1e-7), i
    assert any(float(g.abs().max()) > 0 for g in whole_grads.values())


def test_in_lockstep_every_micro_batch_runs_two_forwards_even_one_token_wide(tmp_path, tokenizer):
    """ZeRO-3: every forward is a collective. A shared-prompt micro-batch runs the prompt, then the completion unless
    its completions are one token wide after trimming — which one rank's micro-batch can be while another's is not:
    in lockstep each runs both forwards."""
    from t2ray.models import load_model
    from t2ray.rl.loop import _update
    from t2ray.rl.trainable import SVFAdapter

    cfg = learnable_config(write_learnable_task(tmp_path), batch_size=2, samples_per_prompt=2, micro_batch_size=2)
    model, _ = load_model("tiny-llama", dtype="float32")
    adapter = SVFAdapter(model, cfg.svf, progress=False)
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(1))
    model.train()  # as rl_step runs the update
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]]).repeat_interleave(2, 0)  # 2 prompts × 2 samples
    completions = torch.tensor([[11, 2, 2]] * 4)  # every completion one token, then padding (the rollout ran 3 steps)
    mask = torch.tensor([[1, 0, 0]] * 4)
    counts = {}
    for lockstep in (False, True):
        forwards.clear()
        stepper = Stepper(adapter.parameters(), lr=1e-3, grad_clip=1.0)
        args = (model, adapter, stepper, [None] * 4, cfg, prompts, torch.ones_like(prompts), completions, mask)
        _update(*args, torch.tensor([1.0, -1.0, 1.0, -1.0]), lockstep)
        counts[lockstep] = len(forwards)
    assert counts == {False: 2, True: 4}, counts  # 2 micro-batches of one prompt's 2 samples


def test_samples_per_prompt_widen_the_rollout_with_different_samples(tmp_path, tokenizer):
    metrics, _, texts = one_rl_step(
        write_learnable_task(tmp_path), tokenizer, batch_size=3, samples_per_prompt=4, temperature=1.0, baseline="group"
    )
    assert metrics["samples"] == 12 and len(texts) == 12
    copies = [texts[i : i + 4] for i in range(0, 12, 4)]  # a prompt's samples are adjacent
    assert all(len(set(group)) > 1 for group in copies), copies  # sampled copies of one prompt differ


def test_lora_dropout_applies_to_the_update_only(tmp_path, tokenizer):
    """rl_step used to leave the model in eval mode for the update: LoRA's dropout never applied."""
    modes = []

    def record(model):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout) and "lora_dropout" in name:
                module.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
        record.model = model

    one_rl_step(
        write_learnable_task(tmp_path), tokenizer, on_model=record, lora_dropout=0.5, batch_size=2, temperature=1.0
    )
    assert False in modes and True in modes  # rollouts in eval mode, the loss's forward in train mode
    assert modes.index(True) > modes.index(False)  # in that order
    assert not record.model.training  # and back to eval for whatever comes next


def test_logprobs_at_the_sampling_temperature_are_a_choice(tmp_path, tokenizer):
    task = write_learnable_task(tmp_path)
    common = dict(batch_size=4, temperature=2.0, baseline="none")  # raw ±1: a loss even when all fail
    plain, plain_grads, plain_texts = one_rl_step(task, tokenizer, **common)
    scaled, scaled_grads, scaled_texts = one_rl_step(task, tokenizer, logprobs_at_temperature=True, **common)
    assert plain_texts == scaled_texts  # the same rollouts…
    # …scored under π_T instead of π (close on the near-uniform tiny model, but not equal)
    assert abs(plain["loss"] - scaled["loss"]) > 1e-3
    assert any(not torch.allclose(plain_grads[i], scaled_grads[i]) for i in plain_grads)
    at_one = dict(common, temperature=1.0)
    assert one_rl_step(task, tokenizer, **at_one)[0]["loss"] == pytest.approx(
        one_rl_step(task, tokenizer, logprobs_at_temperature=True, **at_one)[0]["loss"], rel=1e-6
    )


def test_named_option_reward_credits_the_right_text_under_a_wrong_letter():
    from t2ray.tasks import get_task
    from t2ray.tasks.graders import resolve_choice_answer

    task = get_task("reasoning")
    ex = next(e for e in task.examples("train") if len(e.choices) == 4)
    right = "ABCD".index(resolve_choice_answer(ex.answer, ex.choices))
    wrong = (right + 1) % 4
    texts = [
        f"{'ABCD'[right]}. {ex.choices[right]}",  # graded right: +1
        f"{'ABCD'[wrong]}. {ex.choices[right]}",  # right text, wrong letter: 0
        f"{'ABCD'[wrong]}. {ex.choices[wrong]}",  # wrong: −1
        f"{ex.choices[wrong]} or {ex.choices[right]}",
    ]  # names two options: −1
    r, errors = safe_rewards(task, [ex] * 4, texts, "named-option")
    assert r.tolist() == [1.0, 0.0, -1.0, -1.0] and errors == 0
    assert safe_rewards(task, [ex] * 4, texts)[0].tolist() == [1.0, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="multiple-choice"):
        safe_rewards(get_task("math"), [], [], "named-option")
