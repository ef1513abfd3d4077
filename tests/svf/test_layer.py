"""SVFLinear on its own: the W' formula against a fresh full SVD, the two execution modes, z shapes, caching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from t2ray.svf import SVFLinear
from t2ray.svf.decompose import svd_factors
from t2ray.svf.layer import plain_gemm

SHAPES = {"tall": (48, 20), "wide": (20, 48), "square": (24, 24)}


def make_layer(shape, *, bias=True, mode="materialized", seed=0, max_mult=1.0) -> SVFLinear:
    torch.manual_seed(seed)
    out_features, in_features = shape
    base = nn.Linear(in_features, out_features, bias=bias)
    return SVFLinear(base, svd_factors(base.weight), mode=mode, max_mult=max_mult)


def reference_weight(weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """c · U diag(s ⊙ z) Vᵀ from a fresh full SVD in float64 (the paper's formula, SPEC §1)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    z = z.double()
    c = s.sum() / (s * z).sum()
    return c * (u * (s * z)) @ vh


def random_z(r: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 1.6 * torch.rand(*batch, r, generator=g)


@pytest.mark.parametrize("kind", SHAPES)
def test_adapted_weight_matches_full_svd_formula(kind):
    layer = make_layer(SHAPES[kind])
    z = random_z(layer.rank, seed=1)
    expected = reference_weight(layer.base_layer.weight, z)
    got = layer.adapted_weight(z).double()
    assert got.shape == layer.base_layer.weight.shape
    assert layer.tall == (SHAPES[kind][0] >= SHAPES[kind][1])
    assert layer.q.shape == (layer.rank, layer.rank)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("mode", ["materialized", "factored"])
def test_forward_matches_formula_with_bias(kind, mode):
    layer = make_layer(SHAPES[kind], mode=mode)
    z = random_z(layer.rank, seed=2)
    layer.set_z(z)
    x = torch.randn(3, 5, layer.base_layer.in_features)
    expected = x.double() @ reference_weight(layer.base_layer.weight, z).T + layer.base_layer.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("mode", ["materialized", "factored"])
def test_z_one_gives_base_layer(kind, mode):
    layer = make_layer(SHAPES[kind], mode=mode)
    layer.set_z(torch.ones(layer.rank))
    x = torch.randn(4, layer.base_layer.in_features)
    with torch.no_grad():  # the change from W is computed, and c·z − 1 is exactly 0: bit for bit
        assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.equal(layer.adapted_weight(torch.ones(layer.rank)), layer.base_layer.weight)


@pytest.mark.parametrize("kind", SHAPES)
def test_disabled_layer_is_bit_identical_to_base(kind):
    layer = make_layer(SHAPES[kind])
    layer.set_z(random_z(layer.rank, seed=3))
    layer.enabled = False
    x = torch.randn(2, 7, layer.base_layer.in_features)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", SHAPES)
def test_materialized_and_factored_agree(kind):
    mat = make_layer(SHAPES[kind], mode="materialized")
    fac = make_layer(SHAPES[kind], mode="factored")
    assert torch.equal(mat.svf_p, fac.svf_p)  # same seed, same init
    x = torch.randn(2, 6, mat.base_layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(mat(x), fac(x), atol=1e-5, rtol=1e-5)  # driven by p
        z = random_z(mat.rank, seed=4)
        mat.set_z(z)
        fac.set_z(z)
        torch.testing.assert_close(mat(x), fac(x), atol=1e-5, rtol=1e-5)  # driven by an override


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("mode", ["materialized", "factored"])
def test_renormalisation_makes_scale_of_z_irrelevant(kind, mode):
    layer = make_layer(SHAPES[kind], mode=mode)
    x = torch.randn(3, layer.base_layer.in_features)
    z = random_z(layer.rank, seed=5)
    with torch.no_grad():
        layer.set_z(z)
        y1 = layer(x)
        layer.set_z(3.7 * z)
        y2 = layer(x)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SHAPES)
def test_per_row_z_equals_separate_runs(kind):
    layer = make_layer(SHAPES[kind], mode="materialized")
    zs = random_z(layer.rank, seed=6, batch=(3,))
    x = torch.randn(3, 5, layer.base_layer.in_features)
    with torch.no_grad():
        layer.set_z(zs)  # (B, r) runs factored whatever the mode
        batched = layer(x)
        for i in range(3):
            layer.set_z(zs[i])
            torch.testing.assert_close(batched[i], layer(x[i : i + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SHAPES)
def test_the_rescaled_form_is_the_formula_per_row_with_bias(kind):
    """A decoder's z per row in two products (W in Q's basis, then c·z): the paper's W' for each row, bias included."""
    layer = make_layer(SHAPES[kind])
    zs = random_z(layer.rank, seed=7, batch=(3,))
    layer.set_z(zs)
    x = torch.randn(3, 5, layer.base_layer.in_features)
    with torch.no_grad():
        got = layer.rescaled(x, layer.current_delta(x.dtype, plus_one=True), plain_gemm).double()
    for i in range(3):
        expected = x[i].double() @ reference_weight(layer.base_layer.weight, zs[i]).T + layer.base_layer.bias.double()
        torch.testing.assert_close(got[i], expected, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SHAPES)
def test_per_token_z_with_equal_rows_equals_per_row(kind):
    layer = make_layer(SHAPES[kind], mode="factored")
    zs = random_z(layer.rank, seed=7, batch=(2,))
    x = torch.randn(2, 6, layer.base_layer.in_features)
    with torch.no_grad():
        layer.set_z(zs)
        per_row = layer(x)
        layer.set_z(zs[:, None, :].expand(2, 6, layer.rank).clone())
        per_token = layer(x)
    torch.testing.assert_close(per_token, per_row, atol=1e-6, rtol=1e-6)


def test_per_token_z_applies_token_by_token():
    layer = make_layer(SHAPES["tall"], mode="factored")
    za, zb = random_z(layer.rank, seed=8), random_z(layer.rank, seed=9)
    x = torch.randn(1, 4, layer.base_layer.in_features)
    with torch.no_grad():
        layer.set_z(torch.stack([za, za, zb, zb])[None])
        mixed = layer(x)
        layer.set_z(za)
        ya = layer(x)
        layer.set_z(zb)
        yb = layer(x)
    torch.testing.assert_close(mixed[:, :2], ya[:, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[:, 2:], yb[:, 2:], atol=1e-5, rtol=1e-5)


def test_set_z_rejects_wrong_length():
    layer = make_layer(SHAPES["tall"])
    with pytest.raises(ValueError, match="needs 20"):
        layer.set_z(torch.ones(layer.rank + 1))


def test_default_z_is_sigmoid_of_p_times_max_mult():
    layer = make_layer(SHAPES["wide"], max_mult=2.0)
    torch.testing.assert_close(layer.z(), torch.sigmoid(layer.svf_p) * 2.0)
    p = layer.svf_p.detach()
    assert abs(float(p.mean()) - 0.1) < 0.02  # paper init 0.1 + 0.01·N(0,1)
    assert float(p.std()) < 0.03


@pytest.mark.parametrize("kind", ["tall", "wide"])
def test_gradients_of_the_two_modes_agree_and_only_p_trains(kind):
    grads = []
    x = torch.randn(3, 4, SHAPES[kind][1])
    for mode in ("materialized", "factored"):
        layer = make_layer(SHAPES[kind], mode=mode)
        layer(x).pow(2).sum().backward()
        assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
        assert layer.svf_p.grad is not None and layer.svf_p.grad.abs().sum() > 0
        grads.append(layer.svf_p.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["tall", "wide"])
def test_training_forward_matches_autograd_through_the_weight_formula(kind):
    layer = make_layer(SHAPES[kind])
    x = torch.randn(3, 5, SHAPES[kind][1], requires_grad=True)
    layer(x).pow(2).sum().backward()
    got_p, got_x = layer.svf_p.grad.clone(), x.grad.clone()
    layer.svf_p.grad, x.grad = None, None
    nn.functional.linear(x, layer.adapted_weight(layer.z()), layer.base_layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(got_p, layer.svf_p.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_x, x.grad, atol=1e-5, rtol=1e-4)


def test_gradient_of_p_matches_finite_differences():
    layer = make_layer(SHAPES["wide"], mode="factored")
    x = torch.randn(2, 3, SHAPES["wide"][1])
    target = torch.randn(2, 3, SHAPES["wide"][0])
    loss_fn = lambda: (layer(x) - target).pow(2).mean()  # noqa: E731
    loss_fn().backward()
    eps = 1e-2
    for i in (0, 5, layer.rank - 1):
        with torch.no_grad():
            layer.svf_p[i] += eps
            up = loss_fn()
            layer.svf_p[i] -= 2 * eps
            down = loss_fn()
            layer.svf_p[i] += eps
        assert float(layer.svf_p.grad[i]) == pytest.approx(float(up - down) / (2 * eps), rel=2e-2, abs=1e-5)


def test_materialized_weight_is_cached_until_z_or_p_changes():
    layer = make_layer(SHAPES["tall"], mode="materialized")
    fac = make_layer(SHAPES["tall"], mode="factored")
    x = torch.randn(2, SHAPES["tall"][1])
    opt = torch.optim.Adam([layer.svf_p], lr=0.5)
    with torch.no_grad():
        y0 = layer(x)
        cached = layer._weight_cache[1]
        layer(x)
        assert layer._weight_cache[1] is cached  # no rebuild while nothing changed
    # an optimizer step on p (in place) must invalidate the cached W'
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        fac.svf_p.copy_(layer.svf_p)
        y1 = layer(x)
        assert not torch.allclose(y0, y1)
        torch.testing.assert_close(y1, fac(x), atol=1e-5, rtol=1e-5)
        # set_z with a new z, then an in-place edit of that z, each rebuild W'
        z = random_z(layer.rank, seed=10)
        layer.set_z(z)
        fac.set_z(z.clone())
        torch.testing.assert_close(layer(x), fac(x), atol=1e-5, rtol=1e-5)
        z.mul_(torch.linspace(0.5, 1.5, layer.rank))
        fac.set_z(z.clone())
        torch.testing.assert_close(layer(x), fac(x), atol=1e-5, rtol=1e-5)
        # back to p
        layer.set_z(None)
        fac.set_z(None)
        torch.testing.assert_close(layer(x), fac(x), atol=1e-5, rtol=1e-5)


def test_materialized_training_forward_is_not_served_from_cache():
    layer = make_layer(SHAPES["wide"], mode="materialized")
    x = torch.randn(2, SHAPES["wide"][1])
    with torch.no_grad():
        layer(x)  # fills the cache
    y = layer(x)
    assert y.requires_grad  # rebuilt under autograd, so p gets a gradient
    y.sum().backward()
    assert layer.svf_p.grad is not None


def test_cached_weight_follows_dtype_conversion():
    layer = make_layer(SHAPES["tall"], mode="materialized")
    x = torch.randn(2, SHAPES["tall"][1])
    with torch.no_grad():
        layer(x)  # fills the float32 cache
        layer.to(torch.float64)
        y = layer(x.double())
    assert y.dtype == torch.float64


def _train_steps(layer, x, n):
    opt = torch.optim.SGD([layer.svf_p], lr=1.0)
    for _ in range(n):
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_layer_never_serves_a_stale_cached_weight(how):
    import copy
    import pickle

    layer = make_layer(SHAPES["tall"], mode="materialized")
    x = torch.randn(4, SHAPES["tall"][1])
    _train_steps(layer, x, 3)
    with torch.no_grad():
        layer(x)  # cache built at svf_p._version == 3
    clone = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    _train_steps(clone, x, 3 - clone.svf_p._version)  # the clone's counter restarts: step it back to 3
    with torch.no_grad():
        expected = nn.functional.linear(x, clone.adapted_weight(clone.z()), clone.base_layer.bias)
        torch.testing.assert_close(clone(x), expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_layer_runs_in_both_modes():
    torch.manual_seed(0)
    base = nn.Linear(32, 64, bias=False).to(torch.bfloat16)
    layer = SVFLinear(base, svd_factors(base.weight))
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.set_z(torch.ones(layer.rank))
        for mode in ("materialized", "factored"):
            layer.mode = mode
            y = layer(x)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), base(x).float(), atol=5e-2, rtol=5e-2)


def test_factored_d_is_kept_while_z_stays_and_rebuilt_when_it_moves():
    """d = c·z − 1 is kept between factored calls (a decode step runs each layer once per token); a new z, an
    in-place edit of z, a step on p or a restored state each rebuild it; training recomputes it so z gets its grad."""
    layer, fresh = make_layer(SHAPES["wide"], mode="factored"), make_layer(SHAPES["wide"], mode="factored")
    x = torch.randn(3, SHAPES["wide"][1])
    with torch.no_grad():
        kept = layer.current_delta(x.dtype)
        assert layer.current_delta(x.dtype) is kept and layer.current_delta(torch.bfloat16) is not kept
        layer.svf_p.add_(0.3)  # as an optimizer step would
        fresh.svf_p.copy_(layer.svf_p)
        assert torch.equal(layer(x), fresh(x))
        z = random_z(layer.rank, seed=3)
        layer.set_z(z)
        fresh.set_z(z.clone())
        assert torch.equal(layer(x), fresh(x))
        z.mul_(torch.linspace(0.5, 1.5, layer.rank))
        fresh.set_z(z.clone())
        assert torch.equal(layer(x), fresh(x))
        layer.set_z(random_z(layer.rank, seed=5))
        fresh.set_z(random_z(layer.rank, seed=5))
        state = layer.materialized_state()
        layer.set_z(random_z(layer.rank, seed=6))
        layer(x)
        layer.restore_materialized(state)  # another z tensor at the same version: d must not be the kept one
        assert torch.equal(layer(x), fresh(x))
    layer.set_z(None)
    layer(x).sum().backward()
    assert layer.svf_p.grad is not None and layer.svf_p.grad.abs().sum() > 0


def test_a_z_made_in_inference_mode_is_used_not_kept():
    """A z an inference-mode caller made has no version to check: used for the call, never kept (a W' or d kept
    from it could not tell when it went stale)."""
    layer, fresh = make_layer(SHAPES["tall"]), make_layer(SHAPES["tall"])
    x = torch.randn(3, SHAPES["tall"][1])
    for mode in ("materialized", "factored"):
        layer.mode = fresh.mode = mode
        with torch.inference_mode():
            z = random_z(layer.rank, seed=4)
            layer.set_z(z)
            fresh.set_z(z.clone())
            assert torch.equal(layer(x), fresh(x))
        assert layer._weight_cache is None and layer._delta_cache == {}
        fresh.set_z(None)
        layer.set_z(None)


def test_materialized_state_switches_back_without_a_rebuild():
    layer = make_layer(SHAPES["tall"])
    x = torch.randn(2, SHAPES["tall"][1])
    layer.set_z(random_z(layer.rank, seed=1))
    first = layer.materialized_state()
    with torch.no_grad():
        y_first = layer(x)
    layer.set_z(random_z(layer.rank, seed=2))
    with torch.no_grad():
        assert not torch.allclose(layer(x), y_first)
    layer.restore_materialized(first)
    with torch.no_grad():
        assert torch.equal(layer(x), y_first)
    assert layer._weight_cache[1] is first[1][1]  # served from the kept W'


def test_a_short_call_runs_factored_instead_of_rebuilding_a_stale_w_prime():
    """Building W' costs about max(m, n) tokens of the factored path: fewer announced tokens run factored (no
    rebuild), more rebuild it, and a fresh W' is always used. Outputs agree either way."""
    from t2ray.generation import announce_tokens

    layer = make_layer((48, 32), mode="materialized")
    layer.set_z(random_z(layer.rank, seed=1))
    x = torch.randn(2, 3, 32)
    with torch.no_grad(), announce_tokens(layer, 47):
        short = layer(x)
    assert layer._weight_cache is None  # not built for 47 tokens (< max(m, n) = 48)
    with torch.no_grad(), announce_tokens(layer, 48):
        long = layer(x)
    assert layer._weight_cache is not None
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)
    built = layer._weight_cache[1]
    with torch.no_grad(), announce_tokens(layer, 1):
        layer(x)
    assert layer._weight_cache[1] is built and layer.expected_tokens is None  # a fresh W' is reused; reset after


def test_a_weight_zero3_partitions_runs_factored_instead_of_rebuilding_w_prime_every_call(monkeypatch):
    """ZeRO-3 marks the weights it partitions (ds_id); W' of such a weight cannot be kept, so materialized mode
    used to rebuild it on every forward. It runs the factored path, with the same result."""
    layer, reference = make_layer(SHAPES["tall"]), make_layer(SHAPES["tall"], mode="factored")
    layer.base_layer.weight.ds_id = 7
    builds = []
    build = layer.adapted_weight
    monkeypatch.setattr(layer, "adapted_weight", lambda z: builds.append(1) or build(z))
    x = torch.randn(3, SHAPES["tall"][1])
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    assert builds == [] and layer._weight_cache is None
