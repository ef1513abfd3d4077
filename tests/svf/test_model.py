"""patch_model & co. on whole models: identities at z = 1, per-row / per-token z, gradients, caching, unpatching."""

from __future__ import annotations

import copy

import pytest
import torch

from t2ray.svf import (
    SVFConfig,
    SVFLinear,
    base_model_info,
    disabled,
    load_params,
    model_fingerprint,
    patch_model,
    select_targets,
    set_mode,
    set_z,
    svf_layers,
    trainable_params,
    unpatch_model,
    use_trainable,
)

MODES = ["materialized", "factored"]
PROMPTS = ["What is 47 + 38?", "Write a haiku about the sea, please.", "Hi"]


def token_ids(n: int = 2, t: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 40000, (n, t), generator=g)


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def z_dict(model, seed: int, batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: 0.3 + 1.4 * torch.rand(*batch, layer.rank, generator=g) for name, layer in svf_layers(model).items()}


def ones(model) -> dict[str, torch.Tensor]:
    return {name: torch.ones(layer.rank) for name, layer in svf_layers(model).items()}


def left_padded(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return batch["input_ids"], mask, positions


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("targets", ["mlp", "all"])
def test_z_one_reproduces_base_logits(tiny, mode, targets):
    ids = token_ids()
    base = logits(tiny, ids)
    patch_model(tiny, SVFConfig(target_modules=targets, mode=mode), progress=False)
    set_z(tiny, ones(tiny))
    assert torch.equal(logits(tiny, ids), base)  # W' = W + (change), and the change is exactly 0 at z = 1
    # a per-row z of ones takes the factored path in either mode
    set_z(tiny, {k: v.expand(2, -1) for k, v in ones(tiny).items()})
    assert torch.equal(logits(tiny, ids), base)


@pytest.mark.parametrize("mode", MODES)
def test_disabled_and_no_z_are_bit_identical_to_base(tiny, mode):
    ids = token_ids()
    base = logits(tiny, ids)
    patch_model(tiny, SVFConfig(target_modules="all", mode=mode), progress=False)
    set_z(tiny, z_dict(tiny, seed=1))
    adapted = logits(tiny, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with disabled(tiny):
        assert torch.equal(logits(tiny, ids), base)
    assert torch.equal(logits(tiny, ids), adapted)  # the previous state comes back
    set_z(tiny, None)
    assert torch.equal(logits(tiny, ids), base)


def test_set_z_on_some_modules_leaves_the_others_at_base(tiny):
    ids = token_ids()
    patch_model(tiny, SVFConfig(), progress=False)
    zs = z_dict(tiny, seed=2)
    only = "model.layers.1.mlp.up_proj"
    set_z(tiny, {only: zs[only]})
    partial = logits(tiny, ids)
    assert [n for n, layer in svf_layers(tiny).items() if layer.enabled] == [only]
    ref = copy.deepcopy(tiny)
    set_z(ref, {n: (zs[only] if n == only else torch.ones(layer.rank)) for n, layer in svf_layers(ref).items()})
    torch.testing.assert_close(partial, logits(ref, ids), atol=2e-5, rtol=1e-5)


def test_set_z_errors(tiny):
    patch_model(tiny, SVFConfig(), progress=False)
    with pytest.raises(ValueError, match="not SVF-patched"):
        set_z(tiny, {"model.layers.0.self_attn.q_proj": torch.ones(64)})
    with pytest.raises(ValueError, match="needs 64"):
        set_z(tiny, {"model.layers.0.mlp.gate_proj": torch.ones(63)})
    with pytest.raises(ValueError, match="unknown SVF mode"):
        set_mode(tiny, "lazy")


@pytest.mark.parametrize("mode", MODES)
def test_renormalisation_invariance_through_the_model(tiny, mode):
    ids = token_ids()
    patch_model(tiny, SVFConfig(target_modules="all", mode=mode), progress=False)
    zs = z_dict(tiny, seed=3)
    set_z(tiny, zs)
    a = logits(tiny, ids)
    set_z(tiny, {k: 3.7 * v for k, v in zs.items()})
    torch.testing.assert_close(logits(tiny, ids), a, atol=2e-5, rtol=1e-5)


def test_modes_agree_through_the_model(tiny):
    ids = token_ids()
    patch_model(tiny, SVFConfig(target_modules="all"), progress=False)
    zs = z_dict(tiny, seed=4)
    set_z(tiny, zs)
    mat = logits(tiny, ids)
    set_mode(tiny, "factored")
    assert all(layer.mode == "factored" for layer in svf_layers(tiny).values())
    torch.testing.assert_close(logits(tiny, ids), mat, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- per-row and per-token z


@pytest.mark.parametrize("mode", MODES)
def test_per_row_z_with_left_padding_equals_separate_runs(tiny, tokenizer, mode):
    ids, mask, positions = left_padded(tokenizer, PROMPTS)
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # really left-padded
    patch_model(tiny, SVFConfig(target_modules="all", mode=mode), progress=False)
    zs = z_dict(tiny, seed=5, batch=(3,))
    set_z(tiny, zs)
    batched = logits(tiny, ids, attention_mask=mask, position_ids=positions)
    for i, text in enumerate(PROMPTS):
        set_z(tiny, {k: v[i] for k, v in zs.items()})  # one z: materialized mode builds W'
        alone_ids = tokenizer([text], return_tensors="pt")["input_ids"]
        alone = logits(tiny, alone_ids)[0]
        n = alone_ids.shape[1]
        torch.testing.assert_close(batched[i, -n:], alone, atol=5e-5, rtol=1e-5)


def test_per_row_z_in_bf16_equals_separate_runs(tiny, tokenizer):
    """The compute dtype `auto` picks on bf16 hardware: a batch of per-row z (factored) gives each row what a
    materialised W' of that row's z gives alone, up to bf16 rounding."""
    ids, mask, positions = left_padded(tokenizer, PROMPTS)
    model = tiny.to(torch.bfloat16)
    patch_model(model, SVFConfig(target_modules="all"), progress=False)
    assert all(layer.svf_q.dtype == torch.bfloat16 for layer in svf_layers(model).values())
    zs = z_dict(model, seed=5, batch=(3,))
    set_z(model, zs)
    batched = logits(model, ids, attention_mask=mask, position_ids=positions).float()
    for i, text in enumerate(PROMPTS):
        set_z(model, {k: v[i] for k, v in zs.items()})
        alone_ids = tokenizer([text], return_tensors="pt")["input_ids"]
        alone = logits(model, alone_ids)[0].float()
        n = alone_ids.shape[1]
        # logits here span about ±1.3 (see tests/rl/learnable.py); bf16 keeps 8 bits of mantissa
        torch.testing.assert_close(batched[i, -n:], alone, atol=3e-2, rtol=0)
        other = {k: v[(i + 1) % 3] for k, v in zs.items()}
        set_z(model, other)
        assert (logits(model, alone_ids)[0].float() - alone).abs().max() > 3e-2  # the rows' z really differ


def test_per_row_z_differs_between_rows(tiny):
    ids = token_ids(n=1).expand(2, -1)
    patch_model(tiny, SVFConfig(mode="factored"), progress=False)
    zs = z_dict(tiny, seed=6, batch=(2,))
    set_z(tiny, zs)
    out = logits(tiny, ids)
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # same tokens, different experts


def test_per_token_z_with_equal_rows_equals_per_row(tiny, tokenizer):
    ids, mask, positions = left_padded(tokenizer, PROMPTS)
    patch_model(tiny, SVFConfig(target_modules="all", mode="factored"), progress=False)
    zs = z_dict(tiny, seed=7, batch=(3,))
    set_z(tiny, zs)
    per_row = logits(tiny, ids, attention_mask=mask, position_ids=positions)
    t = ids.shape[1]
    set_z(tiny, {k: v[:, None, :].expand(3, t, -1).contiguous() for k, v in zs.items()})
    per_token = logits(tiny, ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    torch.testing.assert_close(per_token[real], per_row[real], atol=1e-5, rtol=1e-5)


def test_per_token_z_switch_only_affects_later_tokens(tiny):
    ids = token_ids(n=1, t=8)
    patch_model(tiny, SVFConfig(target_modules="all", mode="factored"), progress=False)
    za, zb = z_dict(tiny, seed=8), z_dict(tiny, seed=9)
    set_z(tiny, za)
    only_a = logits(tiny, ids)
    set_z(tiny, zb)
    only_b = logits(tiny, ids)
    switch = 5
    set_z(tiny, {k: torch.cat([za[k].expand(switch, -1), zb[k].expand(8 - switch, -1)])[None] for k in za})
    mixed = logits(tiny, ids)
    # causal: tokens before the switch never see expert b
    torch.testing.assert_close(mixed[:, :switch], only_a[:, :switch], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[:, switch:], only_a[:, switch:], atol=1e-4)
    assert not torch.allclose(mixed[:, switch:], only_b[:, switch:], atol=1e-4)  # earlier tokens used a


# ---------------------------------------------------------------- training: gradients and cache invalidation


@pytest.mark.parametrize("mode", MODES)
def test_gradient_flows_only_into_svf_p(tiny, mode):
    patch_model(tiny, SVFConfig(target_modules="all", mode=mode), progress=False)
    params = use_trainable(tiny)
    assert len(params) == 14 and all(p.requires_grad for p in params)
    tiny.train()
    ids = token_ids()
    out = tiny(input_ids=ids, labels=ids)
    out.loss.backward()
    for name, p in tiny.named_parameters():
        if name.endswith(".svf_p"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert {id(p) for p in params} == {id(p) for n, p in tiny.named_parameters() if n.endswith(".svf_p")}


def test_optimizer_step_invalidates_cached_weights(tiny):
    ids = token_ids()
    patch_model(tiny, SVFConfig(target_modules="all", mode="materialized"), progress=False)
    params = use_trainable(tiny)
    before = logits(tiny, ids)  # fills every layer's W' cache
    assert all(layer._weight_cache is not None for layer in svf_layers(tiny).values())
    opt = torch.optim.Adam(params, lr=0.05)
    tiny(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = logits(tiny, ids)
    assert not torch.allclose(after, before, atol=1e-4)
    set_mode(tiny, "factored")  # factored never caches: the reference
    torch.testing.assert_close(after, logits(tiny, ids), atol=2e-5, rtol=1e-5)


def test_set_z_and_load_params_invalidate_cached_weights(tiny):
    ids = token_ids()
    patch_model(tiny, SVFConfig(target_modules="all", mode="materialized"), progress=False)
    ref = copy.deepcopy(tiny)
    set_mode(ref, "factored")
    for seed in (10, 11):
        zs = z_dict(tiny, seed=seed)
        set_z(tiny, zs)
        set_z(ref, zs)
        torch.testing.assert_close(logits(tiny, ids), logits(ref, ids), atol=2e-5, rtol=1e-5)
    use_trainable(tiny)
    use_trainable(ref)
    logits(tiny, ids)  # cache built from p
    new_p = {n: p + 0.5 * torch.randn_like(p) for n, p in trainable_params(tiny).items()}
    load_params(tiny, new_p)
    load_params(ref, new_p)
    torch.testing.assert_close(logits(tiny, ids), logits(ref, ids), atol=2e-5, rtol=1e-5)


def test_trainable_params_round_trip(tiny):
    patch_model(tiny, SVFConfig(), progress=False, seed=3)
    params = trainable_params(tiny)
    assert list(params) == list(svf_layers(tiny)) and all(not p.requires_grad for p in params.values())
    other = copy.deepcopy(tiny)
    load_params(other, {n: torch.zeros_like(p) for n, p in params.items()})
    assert all(torch.equal(p, torch.zeros_like(p)) for p in trainable_params(other).values())
    load_params(other, params)
    assert all(torch.equal(trainable_params(other)[n], params[n]) for n in params)


def test_patch_init_is_seeded_and_keeps_global_rng(make_tiny):
    a, b, c = make_tiny(), make_tiny(), make_tiny()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    patch_model(a, SVFConfig(), seed=0, progress=False)
    assert torch.equal(torch.rand(3), expected_next)  # patching does not consume the caller's RNG
    patch_model(b, SVFConfig(), seed=0, progress=False)
    patch_model(c, SVFConfig(), seed=1, progress=False)
    pa, pb, pc = trainable_params(a), trainable_params(b), trainable_params(c)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not all(torch.equal(pa[n], pc[n]) for n in pa)


# ---------------------------------------------------------------- patch / unpatch


def test_patch_then_unpatch_restores_original_modules(tiny):
    ids = token_ids()
    base = logits(tiny, ids)
    targets = select_targets(tiny, "all")
    originals = {n: tiny.get_submodule(n) for n in targets}
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    layers = patch_model(tiny, SVFConfig(target_modules="all"), progress=False)
    assert list(layers) == targets
    assert all(isinstance(tiny.get_submodule(n), SVFLinear) for n in targets)
    assert all(layers[n].base_layer is originals[n] for n in targets)
    set_z(tiny, z_dict(tiny, seed=12))
    unpatch_model(tiny)
    assert svf_layers(tiny) == {}
    assert all(tiny.get_submodule(n) is originals[n] for n in targets)
    assert list(tiny.state_dict()) == list(state)
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(logits(tiny, ids), base)
    patch_model(tiny, SVFConfig(), progress=False)  # patchable again
    assert len(svf_layers(tiny)) == 6


def test_patching_twice_is_refused(tiny):
    patch_model(tiny, SVFConfig(), progress=False)
    with pytest.raises(ValueError, match="already SVF-patched"):
        patch_model(tiny, SVFConfig(target_modules="attn"), progress=False)
    assert len(svf_layers(tiny)) == 6


def test_patched_parameters(tiny):
    patch_model(tiny, SVFConfig(), progress=False)
    keys = list(tiny.state_dict())
    assert not any(k.endswith(".s") for k in keys)  # singular values: a non-persistent buffer
    assert sum(k.endswith(".svf_p") for k in keys) == 6
    for layer in svf_layers(tiny).values():
        assert layer.svf_p.requires_grad and not layer.svf_q.requires_grad  # q is frozen (a parameter for ZeRO-3)
        assert layer.q is layer.svf_q and layer.svf_q.dtype == layer.base_layer.weight.dtype


def test_base_model_info_matches_layers(tiny):
    fingerprint = model_fingerprint(tiny)
    patch_model(tiny, SVFConfig(layers="1"), progress=False)
    info = base_model_info(tiny)
    assert info.fingerprint == fingerprint
    assert info.module_ranks == {
        "model.layers.1.mlp.gate_proj": 64,
        "model.layers.1.mlp.up_proj": 64,
        "model.layers.1.mlp.down_proj": 64,
    }


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_identity_and_disabled(smollm2, tokenizer):
    model, tok = smollm2
    ids, mask, positions = left_padded(tok, PROMPTS)
    kw = dict(attention_mask=mask, position_ids=positions)
    base = logits(model, ids, **kw)
    real = mask.bool()
    try:
        layers = patch_model(model, SVFConfig(), progress=False)
        assert len(layers) == 90 and sum(layer.rank for layer in layers.values()) == 51_840  # SPEC §5
        set_z(model, ones(model))
        for mode in MODES:
            set_mode(model, mode)
            assert torch.equal(logits(model, ids, **kw), base)
        set_z(model, z_dict(model, seed=13))
        assert not torch.allclose(logits(model, ids, **kw)[real], base[real], atol=1e-2)
        with disabled(model):
            assert torch.equal(logits(model, ids, **kw), base)
    finally:
        unpatch_model(model)
    assert torch.equal(logits(model, ids, **kw), base)


def test_repatching_an_edited_model_uses_its_new_weights(tiny):
    patch_model(tiny, SVFConfig(), progress=False)
    unpatch_model(tiny)
    with torch.no_grad():
        tiny.model.layers[0].mlp.gate_proj.weight.mul_(2.0)  # e.g. another checkpoint loaded in place
    fresh = model_fingerprint(tiny)
    layers = patch_model(tiny, SVFConfig(), progress=False)
    assert base_model_info(tiny).fingerprint == fresh
    layer = layers["model.layers.0.mlp.gate_proj"]
    torch.testing.assert_close(layer.s, torch.linalg.svdvals(layer.base_layer.weight), atol=1e-4, rtol=1e-4)
