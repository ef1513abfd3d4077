"""REINFORCE pieces (t2ray.rl.loss): advantages, the loss value and gradient sign, the KL to the base model."""

from __future__ import annotations

import pytest
import torch

from t2ray.rl.loss import advantages, kl_to_reference, reinforce_loss

# ---------------------------------------------------------------- advantages


def test_advantages_none_is_the_reward():
    r = torch.tensor([1.0, -1.0, 1.0, 1.0])
    assert torch.equal(advantages(r), r)
    assert advantages(torch.tensor([1, -1])).dtype == torch.float32  # integer rewards become float


def test_advantages_mean_baseline():
    r = torch.tensor([1.0, -1.0, 1.0, 1.0])
    adv = advantages(r, baseline="mean")
    assert torch.allclose(adv, torch.tensor([0.5, -1.5, 0.5, 0.5]))
    assert abs(float(adv.sum())) < 1e-6
    assert torch.equal(advantages(torch.full((4,), -1.0), baseline="mean"), torch.zeros(4))  # no signal


def test_advantages_group_baseline_per_prompt():
    # 2 prompts × 3 samples, sample-major per prompt
    r = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    adv = advantages(r, 3, baseline="group")
    third = 1 / 3
    assert torch.allclose(adv, torch.tensor([4 * third, -2 * third, -2 * third, 0.0, 0.0, 0.0]))
    assert torch.allclose(adv.view(2, 3).sum(1), torch.zeros(2), atol=1e-6)  # each prompt is its own baseline
    assert not torch.allclose(adv, advantages(r, 3, baseline="mean"))


def test_advantages_normalize_is_a_z_score_after_the_baseline():
    r = torch.tensor([1.0, -1.0, 1.0, 1.0])
    adv = advantages(r, baseline="mean", normalize=True)
    assert abs(float(adv.std()) - 1.0) < 1e-4
    assert torch.allclose(adv, advantages(r, baseline="mean") / advantages(r, baseline="mean").std(), atol=1e-5)
    # baseline none: normalising centres too (it used to divide the raw ±1 by their std, keeping their sign)
    assert torch.allclose(advantages(r, normalize=True), adv) and abs(float(advantages(r, normalize=True).sum())) < 1e-5
    assert torch.equal(advantages(torch.tensor([3.0]), normalize=True), torch.tensor([3.0]))  # one sample: unchanged


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_equal_rewards_normalise_to_no_signal(baseline):
    for value in (1.0, -1.0, 0.0):  # it used to give ±1e6 with baseline none
        assert torch.equal(advantages(torch.full((4,), value), baseline=baseline, normalize=True), torch.zeros(4))


def test_advantages_clip_after_normalisation():
    r = torch.tensor([1.0, -1.0, -1.0, -1.0])  # one success among four: z-scores +1.5, −0.5 ×3
    adv = advantages(r, normalize=True, clip=1.0)
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5, -0.5]), atol=1e-5)  # clip ≥ 1 bites on ±1 rewards
    assert torch.allclose(advantages(torch.tensor([5.0, -3.0, 0.5]), clip=1.0), torch.tensor([1.0, -1.0, 0.5]))


def test_advantages_unknown_baseline():
    with pytest.raises(ValueError, match="unknown baseline 'median'"):
        advantages(torch.ones(2), baseline="median")


# ---------------------------------------------------------------- reinforce_loss


def test_reinforce_loss_hand_example():
    # L = −Σ_i (Σ_t log π(y_it)) · A_i / B ; masked tokens carry log π = 0
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    # −((−3)(+1) + (−0.5)(−1)) / 2 = −(−3 + 0.5) / 2 = 1.25
    assert float(reinforce_loss(logp, adv, 2)) == pytest.approx(1.25)
    # B is the global batch: the same shard over a batch twice as large weighs half
    assert float(reinforce_loss(logp, adv, 4)) == pytest.approx(0.625)
    assert float(reinforce_loss(logp, torch.zeros(2), 2)) == 0.0


def test_reinforce_gradient_sign():
    """A gradient step makes rewarded sequences likelier and penalised ones less likely."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)  # 2 sequences × 3 tokens × vocab 5
    tokens = torch.tensor([[1, 2, 3], [0, 4, 4]])

    def seq_logp():
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    adv = torch.tensor([1.0, -1.0])
    before = seq_logp().sum(1).detach()
    loss = reinforce_loss(seq_logp(), adv, 2)
    loss.backward()
    # dL/d log π(y_it) = −A_i / B: negative for the rewarded sequence, positive for the penalised one
    chosen = logits.grad.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert (chosen[0] < 0).all() and (chosen[1] > 0).all()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    after = seq_logp().sum(1).detach()
    assert after[0] > before[0] and after[1] < before[1]


# ---------------------------------------------------------------- KL to the base model (tiny-llama + SVF)


@pytest.fixture
def svf_tiny(tiny, tokenizer):
    from t2ray.generation import rollout
    from t2ray.rl.trainable import SVFAdapter
    from t2ray.svf import SVFConfig

    adapter = SVFAdapter(tiny, SVFConfig(target_modules="all"), seed=0, progress=False)
    prompts = ["Name a colour.", "Count to three, please.", "What is the capital of France?"]
    roll = rollout(adapter.model, tokenizer, prompts, max_new_tokens=5, temperature=1.0, seed=3)
    return adapter, roll


def _kl(adapter, roll, *, grad: bool = False):
    from t2ray.generation import completion_logits

    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    with torch.no_grad(), adapter.reference():
        ref = completion_logits(adapter.model, *args)
    with torch.set_grad_enabled(grad):
        logits = completion_logits(adapter.model, *args)
    return kl_to_reference(logits, ref, roll.completion_mask)


def _set_p(adapter, fill):
    adapter.load_state({name: fill(p) for name, p in adapter.state().items()})


def test_kl_is_zero_for_the_reference_itself():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert float(kl_to_reference(logits, logits, mask)) == 0.0
    shifted = logits.clone()
    shifted[0, 3] += 5 * torch.randn(11)  # a masked position does not count
    assert float(kl_to_reference(shifted, logits, mask)) == 0.0
    shifted[0, 0] += torch.randn(11)
    assert float(kl_to_reference(shifted, logits, mask)) > 0


def test_kl_zero_at_z_one_and_positive_after_z_moves(svf_tiny):
    adapter, roll = svf_tiny
    # z = sigmoid(30) = 1 exactly in float32: W' = W, the policy is the base model
    _set_p(adapter, lambda p: torch.full_like(p, 30.0))
    assert float(_kl(adapter, roll)) < 1e-9  # W' = W bit for bit: 0 exactly
    # any constant z is the base model too (c renormalises Σ s·z)
    _set_p(adapter, lambda p: torch.full_like(p, -1.0))
    assert float(_kl(adapter, roll)) < 1e-6  # only float rounding (≈ 2e-8)
    # a non-uniform z changes the policy: KL > 0, and it has a gradient w.r.t. p
    torch.manual_seed(1)
    _set_p(adapter, lambda p: 2.0 * torch.randn_like(p))
    kl = _kl(adapter, roll, grad=True)
    assert float(kl.detach()) > 1e-4  # ≈ 4e-3
    kl.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in adapter.parameters())


def test_reference_is_the_untouched_base_model(svf_tiny, tiny_base):
    from t2ray.generation import completion_logits
    from t2ray.svf import svf_layers

    adapter, roll = svf_tiny
    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    torch.manual_seed(2)
    _set_p(adapter, lambda p: 2.0 * torch.randn_like(p))
    with torch.no_grad():
        base = completion_logits(tiny_base[0], *args)  # the unpatched model
        with adapter.reference():
            ref = completion_logits(adapter.model, *args)
        adapted = completion_logits(adapter.model, *args)
    assert torch.equal(ref, base)
    assert not torch.allclose(adapted, base)
    assert all(layer.enabled for layer in svf_layers(adapter.model).values())  # reference() restored the adapter


def test_advantages_rloo_leaves_each_sample_out():
    r = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])  # 2 prompts × 3 samples
    adv = advantages(r, 3, baseline="rloo")
    # sample 0: 1 − mean(−1, −1) = 2; samples 1, 2: −1 − mean(1, −1) = −1; an all-right prompt teaches nothing
    assert adv.tolist() == [2.0, -1.0, -1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(adv, advantages(r, 3, baseline="group") * 3 / 2)  # RLOO = group baseline × k/(k−1)
    with pytest.raises(ValueError, match="rloo needs rl.samples_per_prompt ≥ 2"):
        advantages(r, 1, baseline="rloo")
