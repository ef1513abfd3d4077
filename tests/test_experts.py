"""Tests for t2ray.experts: the expert / mixture file formats and mixing."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from t2ray.experts import (
    FORMAT_VERSION,
    BaseModelInfo,
    Expert,
    ExpertError,
    Mixture,
    expert_info,
    import_official,
    load_expert,
    mix_z,
    one_hot,
    parse_mix_spec,
    save_expert,
    save_mixture,
)
from t2ray.library import load_mixture

RANKS = {
    "model.layers.0.mlp.gate_proj": 8,
    "model.layers.0.mlp.up_proj": 8,
    "model.layers.0.mlp.down_proj": 6,
}
BASE = BaseModelInfo(model_id="tiny-llama", fingerprint="ab" * 32, module_ranks=RANKS)
OTHER = BaseModelInfo(model_id="other-llama", fingerprint="cd" * 32, module_ranks=RANKS)


def make_expert(name="math", seed=0, ranks=RANKS, base=BASE) -> Expert:
    g = torch.Generator().manual_seed(seed)
    params = {m: 0.1 + 0.5 * torch.randn(r, generator=g) for m, r in ranks.items()}
    return Expert(
        name=name,
        params=params,
        base_model=base.model_id,
        fingerprint=base.fingerprint,
        task="gsm8k",
        training={"lr": 2e-3, "iters": 30},
        metrics={"valid_acc": 0.9},
    )


@pytest.fixture
def expert_file(tmp_path):
    return save_expert(make_expert(), tmp_path / "math.safetensors")


def rewrite_header(src, dst, **changes):
    """Copy an expert file with some top-level header fields changed (None deletes)."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["t2ray"])
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file(tensors, str(dst), metadata={"t2ray": json.dumps(meta)})
    return dst


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_bitwise_and_keeps_metadata(expert_file):
    original = make_expert()
    loaded = load_expert(expert_file, BASE)
    assert loaded.modules == list(RANKS)
    for m in RANKS:
        assert loaded.params[m].dtype == torch.float32
        assert torch.equal(loaded.params[m].view(torch.int32), original.params[m].view(torch.int32))
    assert (loaded.name, loaded.task, loaded.base_model, loaded.fingerprint, loaded.max_mult) == (
        "math",
        "gsm8k",
        "tiny-llama",
        BASE.fingerprint,
        1.0,
    )
    assert loaded.training == original.training and loaded.metrics == original.metrics
    info = expert_info(expert_file)
    assert info["format_version"] == FORMAT_VERSION and info["kind"] == "t2ray-svf-expert"
    assert info["modules"] == [[m, r] for m, r in RANKS.items()]
    assert info["parametrisation"] == {"kind": "sigmoid", "max_mult": 1.0}
    assert info["created"] == loaded.created and info["t2ray_version"]
    assert loaded.metadata() == info


def test_z_is_sigmoid_times_max_mult():
    e = make_expert()
    e.max_mult = 2.0
    for m, z in e.z().items():
        assert torch.allclose(z, torch.sigmoid(e.params[m]) * 2.0)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "e.safetensors"
    save_expert(make_expert(seed=1), path)
    save_expert(make_expert(seed=2), path)  # overwrite
    assert torch.equal(
        load_expert(path).params["model.layers.0.mlp.up_proj"], make_expert(seed=2).params["model.layers.0.mlp.up_proj"]
    )
    assert [p.name for p in path.parent.iterdir()] == ["e.safetensors"]


def test_subset_expert_is_valid_on_its_own_base(tmp_path):
    subset = {m: r for m, r in RANKS.items() if "down" not in m}
    path = save_expert(make_expert(ranks=subset), tmp_path / "subset.safetensors")
    assert load_expert(path, BASE).modules == list(subset)


# ----------------------------------------------------------------------------- base model checks


def test_refuses_another_models_fingerprint(expert_file):
    with pytest.raises(
        ExpertError,
        match=r"expert 'math' \(math.safetensors\) was trained for base model tiny-llama "
        r"\(fingerprint abababababab…\), not other-llama.*--allow-transfer",
    ):
        load_expert(expert_file, OTHER)


def test_transfer_allowed_with_equal_shapes(expert_file):
    e = load_expert(expert_file, OTHER, allow_transfer=True)
    assert e.fingerprint == BASE.fingerprint  # provenance is kept


def test_transfer_refused_names_first_missing_module(tmp_path):
    ranks = {m: r for m, r in RANKS.items() if "up_proj" not in m}
    path = save_expert(make_expert(ranks=ranks), tmp_path / "e.safetensors")
    with pytest.raises(ExpertError, match=r"cannot transfer.*module model.layers.0.mlp.up_proj is missing"):
        load_expert(path, OTHER, allow_transfer=True)


def test_transfer_refused_names_first_length_mismatch(expert_file):
    other = BaseModelInfo(
        "wide", "ef" * 32, {**RANKS, "model.layers.0.mlp.gate_proj": 9, "model.layers.0.mlp.up_proj": 7}
    )
    with pytest.raises(
        ExpertError, match=r"module model.layers.0.mlp.gate_proj has length 8 in the expert, 9 in the model"
    ):
        load_expert(expert_file, other, allow_transfer=True)


def test_transfer_refused_for_extra_module(expert_file):
    other = BaseModelInfo("small", "ef" * 32, {m: r for m, r in RANKS.items() if "down" not in m})
    with pytest.raises(ExpertError, match=r"module model.layers.0.mlp.down_proj is not adapted in the model"):
        load_expert(expert_file, other, allow_transfer=True)


def test_same_fingerprint_but_module_not_adapted(expert_file):
    base = BaseModelInfo("tiny-llama", BASE.fingerprint, {"model.layers.0.mlp.gate_proj": 8})
    with pytest.raises(ExpertError, match=r"module model.layers.0.mlp.up_proj is not adapted in tiny-llama"):
        load_expert(expert_file, base)


# ----------------------------------------------------------------------------- damaged / foreign files


def test_missing_file(tmp_path):
    with pytest.raises(ExpertError, match=r"nope.safetensors: expert file not found"):
        load_expert(tmp_path / "nope.safetensors")


def test_random_bytes_are_corrupt(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ExpertError, match=r"junk.safetensors: .*corrupt or truncated"):
        load_expert(path)
    with pytest.raises(ExpertError, match="corrupt or truncated"):
        expert_info(path)


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.999])
def test_truncated_file(expert_file, tmp_path, keep):
    data = expert_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ExpertError, match=r"cut.safetensors: .*corrupt or truncated"):
        load_expert(cut)


def test_save_refuses_nan_and_inf(tmp_path):
    for bad in (float("nan"), float("inf")):
        e = make_expert()
        e.params["model.layers.0.mlp.up_proj"][3] = bad
        with pytest.raises(ExpertError, match=r"module model.layers.0.mlp.up_proj has NaN/inf"):
            save_expert(e, tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_load_refuses_edited_nan_inf(expert_file, tmp_path, bad):
    from safetensors import safe_open

    with safe_open(str(expert_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["model.layers.0.mlp.down_proj"][0] = bad
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ExpertError, match=r"edited.safetensors: module model.layers.0.mlp.down_proj contains NaN/inf"):
        load_expert(path)


def test_unknown_format_version(expert_file, tmp_path):
    path = rewrite_header(expert_file, tmp_path / "future.safetensors", format_version=FORMAT_VERSION + 1)
    with pytest.raises(ExpertError, match=r"format version 2 is newer than this t2ray supports \(1\); upgrade t2ray"):
        load_expert(path)


def test_unknown_parametrisation(expert_file, tmp_path):
    path = rewrite_header(expert_file, tmp_path / "p.safetensors", parametrisation={"kind": "softplus"})
    with pytest.raises(ExpertError, match="unknown parametrisation"):
        load_expert(path)


def test_module_list_must_match_tensors(expert_file, tmp_path):
    path = rewrite_header(expert_file, tmp_path / "m.safetensors", modules=[["model.layers.0.mlp.gate_proj", 8]])
    with pytest.raises(ExpertError, match=r"tensor model.layers.0.mlp.(up|down)_proj is not in the module list"):
        load_expert(path)
    path = rewrite_header(
        expert_file, tmp_path / "l.safetensors", modules=[[m, 5 if "gate" in m else r] for m, r in RANKS.items()]
    )
    with pytest.raises(ExpertError, match=r"tensor model.layers.0.mlp.gate_proj must be 1-D float of length 5"):
        expert_info(path)


def test_missing_header(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"model.layers.0.mlp.gate_proj": torch.zeros(8)}, str(path))
    with pytest.raises(ExpertError, match=r"plain.safetensors: safetensors file without a 't2ray' header"):
        load_expert(path)


# ----------------------------------------------------------------------------- mixing


def test_one_hot_alpha_gives_exactly_that_experts_z():
    experts = [make_expert(f"e{k}", seed=k) for k in range(3)]
    for k in range(3):
        mixed = mix_z(experts, one_hot(k, 3))
        for m, z in experts[k].z().items():
            assert torch.equal(mixed[m], z)


def test_mix_is_weighted_sum_and_accepts_numpy_and_tensors():
    a, b = make_expert("a", 1), make_expert("b", 2)
    for alpha in ([0.3, 0.9], np.array([0.3, 0.9]), torch.tensor([0.3, 0.9])):
        mixed = mix_z([a, b], alpha)
        for m in RANKS:
            assert torch.allclose(mixed[m], 0.3 * a.z()[m] + 0.9 * b.z()[m])


def test_per_module_alpha():
    a, b = make_expert("a", 1), make_expert("b", 2)
    alpha = [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]  # (K=2, M=3)
    mixed = mix_z([a, b], alpha)
    gate, up, down = RANKS
    assert torch.equal(mixed[gate], a.z()[gate]) and torch.equal(mixed[up], b.z()[up])
    assert torch.allclose(mixed[down], 0.5 * (a.z()[down] + b.z()[down]))


def test_alpha_tensor_stays_differentiable():
    alpha = torch.tensor([0.5, 0.5], requires_grad=True)
    mixed = mix_z([make_expert("a", 1), make_expert("b", 2)], alpha)
    sum(z.sum() for z in mixed.values()).backward()
    assert alpha.grad is not None and alpha.grad.shape == (2,)


@pytest.mark.parametrize(
    "alpha, message",
    [
        ([1.0], r"alpha has shape \(1,\); expected \(2,\) or \(2, 3\)"),
        ([[1.0, 1.0], [1.0, 1.0]], r"alpha has shape \(2, 2\); expected \(2,\) or \(2, 3\)"),
        ([[[1.0]]], r"alpha has shape \(1, 1, 1\)"),
        ([0.5, float("nan")], "NaN/inf"),
        ([1.0, -0.1], "negative"),
        ([0.0, 0.0], "all zero"),
        ([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]], r"all zero for module model.layers.0.mlp.up_proj"),
        ([[1.0, 2.0], [3.0]], "array of numbers"),
    ],
)
def test_bad_alpha_refused(alpha, message):
    with pytest.raises(ExpertError, match=message):
        mix_z([make_expert("a", 1), make_expert("b", 2)], alpha)


def test_mix_refuses_different_layouts_and_empty():
    small = {m: r for m, r in RANKS.items() if "up" not in m}
    with pytest.raises(ExpertError, match=r"module model.layers.0.mlp.up_proj has length 8 vs None"):
        mix_z([make_expert("a"), make_expert("b", ranks=small)], [1, 1])
    with pytest.raises(ExpertError, match="no experts"):
        mix_z([], [])


# ----------------------------------------------------------------------------- mixture files


def test_mixture_round_trip_with_relative_paths(tmp_path):
    experts_dir = tmp_path / "experts"
    files = [save_expert(make_expert(n, s), experts_dir / f"{n}.safetensors") for s, n in enumerate(["math", "code"])]
    path = save_mixture(
        Mixture(
            experts=[str(f) for f in files], alpha=[0.25, 0.75], name="mix", task="math", metadata={"found_by": "cem"}
        ),
        tmp_path / "mixtures" / "mix.json",
    )
    doc = json.loads(path.read_text())
    assert doc["experts"] == ["../experts/math.safetensors", "../experts/code.safetensors"]
    # Moving the whole tree keeps the mixture loadable.
    moved = tmp_path.rename(tmp_path.parent / (tmp_path.name + "_moved"))
    mixture, experts = load_mixture(moved / "mixtures" / "mix.json", BASE)
    assert [e.name for e in experts] == ["math", "code"]
    assert mixture.alpha == [0.25, 0.75] and mixture.name == "mix" and mixture.task == "math"
    assert mixture.metadata == {"found_by": "cem"}
    assert mixture.experts == [str(moved / "mixtures" / "../experts" / f"{n}.safetensors") for n in ("math", "code")]
    mixed = mix_z(experts, mixture.alpha)
    assert set(mixed) == set(RANKS)


def test_mixture_per_module_alpha_checked_against_experts(tmp_path):
    f = save_expert(make_expert(), tmp_path / "a.safetensors")
    path = save_mixture(Mixture(experts=[str(f)], alpha=[[1.0, 1.0]]), tmp_path / "m.json")
    with pytest.raises(ExpertError, match=r"m.json: alpha has shape \(1, 2\); expected \(1,\) or \(1, 3\)"):
        load_mixture(path)


def test_malformed_mixture_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "experts": ["a.safetensors"],\n  "alpha": [1.0,,]\n}\n')
    with pytest.raises(ExpertError, match=r"broken.json: malformed JSON at line 3, column 17: Expecting value"):
        load_mixture(path)


def test_mixture_with_missing_expert_file(tmp_path):
    f = save_expert(make_expert(), tmp_path / "a.safetensors")
    path = save_mixture(
        Mixture(experts=[str(f), str(tmp_path / "gone.safetensors")], alpha=[1, 1]), tmp_path / "m.json"
    )
    with pytest.raises(ExpertError, match=r"m.json: expert 'gone.safetensors' not found"):
        load_mixture(path)


def test_mixture_experts_validated_against_base(tmp_path):
    f = save_expert(make_expert(), tmp_path / "a.safetensors")
    path = save_mixture(Mixture(experts=[str(f)], alpha=[1]), tmp_path / "m.json")
    with pytest.raises(ExpertError, match="--allow-transfer"):
        load_mixture(path, OTHER)
    assert len(load_mixture(path, OTHER, allow_transfer=True)[1]) == 1


# ----------------------------------------------------------------------------- mix specs


def test_parse_mix_spec():
    assert parse_mix_spec("a.safetensors:0.5, dir/b.safetensors:1.5e-1") == (
        ["a.safetensors", "dir/b.safetensors"],
        [0.5, 0.15],
    )
    assert parse_mix_spec("C:/x/a.safetensors:1") == (["C:/x/a.safetensors"], [1.0])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty entry"),
        ("a.safetensors:0.5,", "empty entry"),
        ("a.safetensors", "is not path:weight"),
        (":0.5", "is not path:weight"),
        ("a.safetensors:half", "weight 'half' of a.safetensors is not a number"),
        ("a.safetensors:nan", "finite number >= 0"),
        ("a.safetensors:inf", "finite number >= 0"),
        ("a.safetensors:-1", "finite number >= 0"),
        ("a.safetensors:0,b.safetensors:0", "all weights are zero"),
    ],
)
def test_parse_mix_spec_refuses(spec, message):
    with pytest.raises(ExpertError, match=message):
        parse_mix_spec(spec)


# ----------------------------------------------------------------------------- official format


def official_params(dtype=torch.float32, ranks=RANKS):
    return {f"{m}.weight": torch.nn.Parameter((0.1 + 0.01 * torch.randn(r)).to(dtype)) for m, r in ranks.items()}


def test_import_official_float32(tmp_path):
    params = official_params()
    torch.save(params, tmp_path / "policy_params.pt")
    e = import_official(tmp_path / "policy_params.pt", BASE, name="gsm8k", task="math")
    assert e.modules == list(RANKS) and e.fingerprint == BASE.fingerprint and e.base_model == "tiny-llama"
    for m in RANKS:
        assert torch.equal(e.params[m], params[f"{m}.weight"].detach())
    assert e.training["imported_from"]["subset"] is False
    out = save_expert(e, tmp_path / "gsm8k.safetensors")
    assert load_expert(out, BASE).task == "math"


def test_import_official_bf16_nested_subset(tmp_path):
    ranks = {m: r for m, r in RANKS.items() if "up" not in m}
    params = official_params(torch.bfloat16, ranks)
    torch.save({"policy": params, "step": torch.tensor(3)}, tmp_path / "policy_params.pt")
    e = import_official(tmp_path / "policy_params.pt", BASE, name="code")
    assert e.modules == list(ranks)
    for m in ranks:
        assert e.params[m].dtype == torch.float32
        assert torch.equal(e.params[m], params[f"{m}.weight"].detach().float())
    assert e.training["imported_from"] == {
        "format": "sakana-self-adaptive-llms",
        "file": "policy_params.pt",
        "modules": 2,
        "base_modules": 3,
        "subset": True,
    }


class NotATensor:
    pass


def test_import_official_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model.layers.0.mlp.gate_proj.weight": NotATensor()}, path)
    with pytest.raises(ExpertError, match=r"evil.pt: cannot load as a plain tensor file with weights_only=True"):
        import_official(path, BASE, name="x")


def test_import_official_refuses_non_tensor_values(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"model.layers.0.mlp.gate_proj.weight": "hello"}, path)
    with pytest.raises(ExpertError, match="found no dict of tensors"):
        import_official(path, BASE, name="x")


def test_import_official_refuses_unknown_module_and_wrong_length(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8)}, path)
    with pytest.raises(
        ExpertError, match=r"'model.layers.0.self_attn.q_proj.weight' is not an adapted module of tiny-llama"
    ):
        import_official(path, BASE, name="x")
    torch.save({"model.layers.0.mlp.down_proj.weight": torch.zeros(7)}, path)
    with pytest.raises(ExpertError, match=r"model.layers.0.mlp.down_proj.weight has shape \(7,\).*length 6"):
        import_official(path, BASE, name="x")


def test_import_official_refuses_corrupt_file(tmp_path):
    path = tmp_path / "p.pt"
    path.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ExpertError, match="cannot load as a plain tensor file"):
        import_official(path, BASE, name="x")
