"""Target selection, the base-model fingerprint, and the per-matrix SVD cache."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from t2ray.svf import (
    DecomposeError,
    SVFConfig,
    base_model_info,
    decompose,
    model_fingerprint,
    patch_model,
    select_targets,
)
from t2ray.svf.decompose import svd_cache_dir

# `t2ray.svf.decompose` as an attribute is the function (the package re-exports it), so fetch the module itself.
decompose_mod = importlib.import_module("t2ray.svf.decompose")

MLP = ["gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def names(layers, kinds):
    group = {k: "mlp" if k in MLP else "self_attn" for k in MLP + ATTN}
    return [f"model.layers.{i}.{group[k]}.{k}" for i in layers for k in kinds]


# ---------------------------------------------------------------- select_targets


def test_select_groups(tiny):
    assert select_targets(tiny, "mlp") == names([0, 1], MLP)
    assert select_targets(tiny, "attn") == names([0, 1], ATTN)
    everything = select_targets(tiny, "all")
    assert sorted(everything) == sorted(names([0, 1], MLP + ATTN))
    assert not any("lm_head" in n or "embed" in n for n in everything)  # only decoder-layer linears


def test_select_explicit_names(tiny):
    assert select_targets(tiny, "gate_proj") == names([0, 1], ["gate_proj"])
    assert select_targets(tiny, ["q_proj", "down_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert select_targets(tiny, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert select_targets(tiny, "mlp.up_proj") == names([0, 1], ["up_proj"])


@pytest.mark.parametrize(
    "layers, expected",
    [
        ("0-1", [0, 1]),
        ("1", [1]),
        ("0,1", [0, 1]),
        (" 1 , 0 ", [0, 1]),
        ([1], [1]),
        ([0], [0]),
        (None, [0, 1]),
    ],
)
def test_select_layers(tiny, layers, expected):
    assert select_targets(tiny, "mlp", layers) == names(expected, MLP)


@pytest.mark.parametrize("target", ["nope_proj", ["gate_proj", "nope"], "mlp.q_proj", "layers.7.mlp.up_proj"])
def test_select_bad_names(tiny, target):
    with pytest.raises(DecomposeError, match="no linear layer matches"):
        select_targets(tiny, target)


@pytest.mark.parametrize("layers", [[2], [-1], "5", "0-2", [0, 9]])
def test_select_layers_out_of_range(tiny, layers):
    with pytest.raises(DecomposeError, match="out of range: the model has 2 layers"):
        select_targets(tiny, "mlp", layers)


@pytest.mark.parametrize("layers", ["a", "0-b", "-1", "1..2", "0-1-2", "x,1"])
def test_select_bad_range_strings(tiny, layers):
    with pytest.raises(DecomposeError, match="bad layer range"):
        select_targets(tiny, "mlp", layers)


@pytest.mark.parametrize("layers", [[], "", "1-0"])
def test_select_nothing_is_an_error(tiny, layers):
    with pytest.raises(DecomposeError, match="matches no module"):
        select_targets(tiny, "mlp", layers)


def test_svf_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError):
        SVFConfig(targets="mlp")
    with pytest.raises(ValueError):
        SVFConfig(max_mult=0)
    with pytest.raises(ValueError):
        SVFConfig(mode="lazy")
    assert SVFConfig().model_dump()["target_modules"] == "mlp"


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_across_loads_of_one_seed(make_tiny):
    a, b, other = make_tiny(seed=0), make_tiny(seed=0), make_tiny(seed=1)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(other)
    assert len(model_fingerprint(a)) == 24


def test_fingerprint_changes_when_one_weight_element_changes(tiny):
    before = model_fingerprint(tiny)
    with torch.no_grad():
        tiny.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    assert model_fingerprint(tiny) != before


def test_fingerprint_is_one_identity_across_compute_dtypes(make_tiny):
    # an expert trained on the fp32 load applies to the bf16 load of the same checkpoint, and back
    assert model_fingerprint(make_tiny(dtype="float32")) == model_fingerprint(make_tiny(dtype="bfloat16"))
    assert model_fingerprint(make_tiny(dtype="bfloat16")) != model_fingerprint(make_tiny(seed=1, dtype="bfloat16"))


def test_fingerprint_unchanged_by_patching(tiny):
    before = model_fingerprint(tiny)
    targets = select_targets(tiny, "all")
    patch_model(tiny, SVFConfig(target_modules="all"), progress=False)
    assert model_fingerprint(tiny) == before
    info = base_model_info(tiny)
    assert info.fingerprint == before
    assert info.model_id == "tiny-llama"
    assert list(info.module_ranks) == targets
    assert info.module_ranks["model.layers.0.mlp.gate_proj"] == 64  # 160×64 -> r = 64
    assert info.module_ranks["model.layers.0.self_attn.k_proj"] == 32  # 32×64 -> r = 32


# ---------------------------------------------------------------- decompose + cache


def test_decompose_factors_reconstruct_weights(tiny, tmp_path):
    targets = select_targets(tiny, "all")
    factors = decompose(tiny, targets, cache_dir=tmp_path, progress=False)
    modules = dict(tiny.named_modules())
    for name in targets:
        w = modules[name].weight
        f = factors[name]
        r = min(w.shape)
        assert f.q.shape == (r, r) and f.s.shape == (r,) and f.rank == r
        assert f.q.dtype == torch.float32 and f.s.dtype == torch.float32
        torch.testing.assert_close(f.q.T @ f.q, torch.eye(r), atol=1e-5, rtol=0)  # orthogonal
        torch.testing.assert_close(f.s, torch.linalg.svdvals(w), atol=1e-5, rtol=1e-5)
        # W Q Qᵀ = W (tall: Q = V) or Q Qᵀ W = W (wide: Q = U)
        back = w @ f.q @ f.q.T if w.shape[0] >= w.shape[1] else f.q @ f.q.T @ w
        torch.testing.assert_close(back, w, atol=1e-5, rtol=1e-5)


def test_decompose_writes_one_file_per_matrix_under_fingerprint(tiny, tmp_path):
    targets = select_targets(tiny, "mlp")
    decompose(tiny, targets, cache_dir=tmp_path, progress=False)
    folder = svd_cache_dir(model_fingerprint(tiny), torch.float32, tmp_path)
    assert folder == tmp_path / f"{model_fingerprint(tiny)}-float32"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.safetensors" for n in targets)


def test_decompose_second_call_is_a_cache_hit(tiny, tmp_path, monkeypatch):
    targets = select_targets(tiny, "mlp")
    first = decompose(tiny, targets, cache_dir=tmp_path, progress=False)

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD recomputed on a cache hit")

    monkeypatch.setattr(decompose_mod, "svd_factors", no_svd)
    second = decompose(tiny, targets, cache_dir=tmp_path, progress=False)
    assert list(second) == targets
    for name in targets:
        assert torch.equal(first[name].q, second[name].q) and torch.equal(first[name].s, second[name].s)


def test_wider_selection_only_computes_new_matrices(tiny, tmp_path, monkeypatch):
    decompose(tiny, select_targets(tiny, "mlp"), cache_dir=tmp_path, progress=False)
    computed = []
    real = decompose_mod.svd_factors

    def counting(weight, dtype=torch.float32):
        computed.append(tuple(weight.shape))
        return real(weight, dtype)

    monkeypatch.setattr(decompose_mod, "svd_factors", counting)
    decompose(tiny, select_targets(tiny, "all"), cache_dir=tmp_path, progress=False)
    assert len(computed) == len(select_targets(tiny, "attn"))


def test_patch_model_uses_the_session_cache(tiny, t2ray_cache):
    targets = select_targets(tiny, "mlp")
    patch_model(tiny, SVFConfig(), progress=False)
    folder = svd_cache_dir(tiny.t2ray_fingerprint, torch.float32)
    assert folder.parent == t2ray_cache / "svd"  # conftest isolates the SVD cache
    assert {f"{n}.safetensors" for n in targets} <= {p.name for p in folder.glob("*.safetensors")}


def _corrupt_and_reload(tiny, tmp_path, monkeypatch, caplog, write_bad, message):
    targets = select_targets(tiny, "mlp")
    good = decompose(tiny, targets, cache_dir=tmp_path, progress=False)
    victim = targets[2]  # a wide matrix (down_proj 64×160)
    path = svd_cache_dir(model_fingerprint(tiny), torch.float32, tmp_path) / f"{victim}.safetensors"
    write_bad(path)
    computed = []
    real = decompose_mod.svd_factors
    monkeypatch.setattr(decompose_mod, "svd_factors", lambda w, d=torch.float32: computed.append(1) or real(w, d))
    with caplog.at_level(logging.WARNING, logger="t2ray.svf.decompose"):
        again = decompose(tiny, targets, cache_dir=tmp_path, progress=False)
    assert len(computed) == 1  # only the bad file
    assert any(message in r.getMessage() and victim in r.getMessage() for r in caplog.records)
    for name in targets:
        torch.testing.assert_close(again[name].q, good[name].q, atol=0, rtol=0)
        torch.testing.assert_close(again[name].s, good[name].s, atol=0, rtol=0)
    rewritten = load_file(path)  # the bad file was replaced by a good one
    assert torch.equal(rewritten["q"], good[victim].q)


def test_corrupt_cache_file_is_recomputed(tiny, tmp_path, monkeypatch, caplog):
    g = torch.Generator().manual_seed(0)
    random_bytes = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    _corrupt_and_reload(tiny, tmp_path, monkeypatch, caplog, lambda p: p.write_bytes(random_bytes), "unreadable")


def test_truncated_cache_file_is_recomputed(tiny, tmp_path, monkeypatch, caplog):
    _corrupt_and_reload(
        tiny, tmp_path, monkeypatch, caplog, lambda p: p.write_bytes(p.read_bytes()[:200]), "unreadable"
    )


def test_cache_file_with_missing_key_is_recomputed(tiny, tmp_path, monkeypatch, caplog):
    _corrupt_and_reload(tiny, tmp_path, monkeypatch, caplog, lambda p: save_file({"q": torch.eye(64)}, p), "unreadable")


def test_cache_file_with_wrong_shape_is_recomputed(tiny, tmp_path, monkeypatch, caplog):
    _corrupt_and_reload(
        tiny,
        tmp_path,
        monkeypatch,
        caplog,
        lambda p: save_file({"q": torch.eye(32), "s": torch.ones(32)}, p),
        "does not match",
    )


def test_cache_file_with_nan_is_recomputed(tiny, tmp_path, monkeypatch, caplog):
    bad_q = torch.eye(64)
    bad_q[0, 0] = float("nan")
    _corrupt_and_reload(
        tiny, tmp_path, monkeypatch, caplog, lambda p: save_file({"q": bad_q, "s": torch.ones(64)}, p), "does not match"
    )


def test_float64_svd_is_cached_separately_and_tighter(tiny, tmp_path):
    targets = select_targets(tiny, "mlp")
    f32 = decompose(tiny, targets, cache_dir=tmp_path, progress=False)
    f64 = decompose(tiny, targets, dtype=torch.float64, cache_dir=tmp_path, progress=False)
    fp = model_fingerprint(tiny)
    assert (tmp_path / f"{fp}-float64").is_dir() and (tmp_path / f"{fp}-float32").is_dir()
    modules = dict(tiny.named_modules())
    for name in targets:
        assert f64[name].q.dtype == torch.float32  # stored in float32 either way
        w = modules[name].weight.double()
        r = min(w.shape)
        err = {}
        for key, f in (("32", f32[name]), ("64", f64[name])):
            q = f.q.double()
            err[key] = (q.T @ q - torch.eye(r, dtype=torch.float64)).abs().max()
        assert err["64"] <= err["32"] + 1e-7
        torch.testing.assert_close(f64[name].s.double(), torch.linalg.svdvals(w), atol=1e-6, rtol=1e-6)


def test_patch_model_with_float64_svd(tiny, t2ray_cache):
    patch_model(tiny, SVFConfig(svd_dtype="float64"), progress=False)
    assert svd_cache_dir(tiny.t2ray_fingerprint, torch.float64).is_dir()


def test_edited_model_gets_its_own_cache_entry(tiny, tmp_path):
    targets = select_targets(tiny, ["model.layers.0.mlp.gate_proj"])
    before = decompose(tiny, targets, cache_dir=tmp_path, progress=False)[targets[0]]
    with torch.no_grad():
        tiny.model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    after = decompose(tiny, targets, cache_dir=tmp_path, progress=False)[targets[0]]
    torch.testing.assert_close(after.s, 2 * before.s, atol=1e-5, rtol=1e-5)
    assert len(list(tmp_path.iterdir())) == 2
