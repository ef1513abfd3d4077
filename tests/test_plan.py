"""The planner counts on the real code: its meta-device model holds exactly the tensors a real patched model holds,
and what it counts for the backward matches what the loop's real forward keeps (2-D padding mask and all)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from t2ray.generation import completion_logits, gather_logprobs
from t2ray.models.loader import enable_activation_checkpointing, resolve
from t2ray.plan import GIB, Run, kept_for_backward, meta_model, model_config, plan, plan_run, saved_for_backward
from t2ray.svf import SVFConfig, patch_model


def real_kept(model, rows: int, prompt: int, width: int, vocab: int) -> dict[str, int]:
    """What the RL loop's own forward (t2ray.generation.completion_logits, left-padded rows) keeps for the backward."""
    ids = torch.randint(0, vocab, (rows, prompt))
    mask = torch.ones(rows, prompt, dtype=torch.long)
    mask[0, :3] = 0  # one left-padded row, as batches are
    cids = torch.randint(0, vocab, (rows, width))
    cmask = torch.ones(rows, width, dtype=torch.long)
    model.train()
    with kept_for_backward(vocab, model.parameters()) as kept:
        logits = completion_logits(model, ids, mask, cids, cmask)
        gather_logprobs(logits, cids, cmask).sum()
    return kept


@pytest.fixture(scope="module")
def tiny_config(t2ray_cache) -> tuple[str, dict]:
    folder = str(resolve("tiny-llama", 0))
    return folder, model_config(folder)


def test_the_meta_model_holds_the_real_models_tensors(tiny_config, make_tiny):
    folder, config = tiny_config
    real = make_tiny(dtype="bfloat16")
    patch_model(real, SVFConfig(target_modules="mlp"), progress=False)
    meta = meta_model(config, Run(gpus=1, zero=2, dtype="bfloat16"))
    for model in (real, meta):
        model.requires_grad_(False)
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in real.named_parameters()}
    assert {n: (tuple(p.shape), p.dtype) for n, p in meta.named_parameters()} == shapes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_what_the_backward_keeps_matches_the_real_forward(tiny_config, make_tiny, checkpointing, dtype):
    """bf16 without checkpointing is where the meta device's math-path attention (fp32 scores) read 27 % high."""
    folder, config = tiny_config
    real = make_tiny(dtype=dtype)
    patch_model(real, SVFConfig(target_modules="mlp"), progress=False)
    if checkpointing:
        enable_activation_checkpointing(real)
    measured = real_kept(real, rows=4, prompt=24, width=8, vocab=config["vocab_size"])
    run = Run(gpus=1, zero=2, dtype=dtype, micro_batch=4, prompt_len=24, completion_len=8, checkpointing=checkpointing)
    activations, logits = saved_for_backward(meta_model(config, run), run, config["vocab_size"])
    assert logits == pytest.approx(measured["logits"], rel=0.15)
    assert activations == pytest.approx(measured["activations"], rel=0.15)


def test_checkpointing_lowers_what_the_backward_keeps(tiny_config, make_tiny):
    folder, config = tiny_config
    kept = {}
    for checkpointing in (False, True):
        real = make_tiny(dtype="float32")
        patch_model(real, SVFConfig(target_modules="mlp"), progress=False)
        if checkpointing:
            enable_activation_checkpointing(real)
        kept[checkpointing] = real_kept(real, rows=4, prompt=48, width=16, vocab=config["vocab_size"])["activations"]
    assert kept[True] < 0.5 * kept[False], kept


def test_the_70b_plan_fits_only_with_what_the_shipped_file_sets():
    """16 × 80 GB with ZeRO-3 and activation checkpointing fits; without checkpointing, or on 2 GPUs with ZeRO-2,
    it does not (the review's case: the old planner said it fits while the code would not)."""
    fits = plan("llama3-70b", gpus=16, gpu_mem_gb=80, zero=3)
    assert fits.fits and fits.z_values == 80 * 3 * 8192
    assert fits.rows["frozen weights (bfloat16)"] == pytest.approx(70.55e9 * 2 / 16 / GIB, rel=0.01)
    assert not plan("llama3-70b", gpus=16, gpu_mem_gb=80, zero=3, checkpointing=False).fits
    assert not plan("llama3-70b", gpus=2, gpu_mem_gb=80, zero=2).fits


def test_70b_rollout_engines_on_gpus_of_their_own():
    """The shipped 70B file: 8 ZeRO-3 trainers and one vLLM engine over 8 GPUs of its own, its z applier in host
    memory. A rank's applier holds its block of each MLP matrix (gate/up: rows, down: columns; 1/8 of W) and every
    square factor whole (8192² each): 43 GiB, which on the GPU beside the weights would leave too little."""
    from t2ray.config import load_experiment
    from t2ray.plan import experiment_run

    cfg = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "llama3-70b-svf.yaml")
    assert (cfg.rl.rollout_engine, cfg.rollout.num_engines, cfg.rollout.gpus_per_engine) == ("vllm", 1, 8)
    run = experiment_run(cfg, 768)
    result = plan_run(cfg.model.spec, run, 80)
    assert result.fits and "rollout KV cache (in-process decode)" not in result.rows  # trainers hold no rollout
    applier = 80 * 3 * (8192 * 28672 // 8 + 8192**2) * 2 / GIB
    assert result.host_gib == pytest.approx(applier)
    on_device = plan_run(cfg.model.spec, dataclasses.replace(run, applier_on="device"), 80)
    assert on_device.engine_rows["z applier: its block of W + whole square factors"] == pytest.approx(applier)
    assert on_device.engine_total > result.engine_total + 40
    assert not plan_run(cfg.model.spec, dataclasses.replace(run, engine_gpus=4, applier_on="device"), 80).fits


def test_lora_is_planned_through_peft(tiny_config):
    folder, _ = tiny_config
    lora = plan_run(
        folder, Run(gpus=1, zero=2, method="lora", lora_r=4, micro_batch=2, prompt_len=16, completion_len=4), 8
    )
    svf = plan_run(folder, Run(gpus=1, zero=2, micro_batch=2, prompt_len=16, completion_len=4), 8)
    assert "SVF factors (square U or V)" in lora.rows and lora.rows["SVF factors (square U or V)"] == 0
    assert lora.z_values == 2 * 3 * 4 * (64 + 160)  # A and B of r=4 on 2 layers × 3 MLP matrices (hidden 64, MLP 160)
    assert svf.z_values == 2 * 3 * 64


# ---------------------------------------------------------------- serving: a replica split over GPUs


@pytest.fixture(scope="module")
def meta_70b():
    from transformers import AutoConfig

    from t2ray.models.placement import meta_model

    return meta_model(AutoConfig.for_model(**model_config("llama3-70b")), "bfloat16")


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_the_70b_split_puts_every_weight_on_one_gpu_in_balanced_contiguous_runs(meta_70b, gpus):
    from t2ray.models.placement import split_model

    split = split_model(meta_70b, gpus)
    assert [i for run in split.layers for i in run] == list(range(80))  # contiguous, in order, each layer once
    owners = [
        [key for key in split.device_map if name == key or name.startswith(key + ".")]
        for name, _ in meta_70b.named_parameters()
    ]
    assert all(len(o) == 1 for o in owners)  # every weight has exactly one place
    assert split.device_map["model.embed_tokens"] == 0 and split.device_map["lm_head"] == gpus - 1
    assert split.device_map["model.norm"] == gpus - 1 and split.device_map["model.rotary_emb"] == 0
    tensors = [*meta_70b.parameters(), *meta_70b.buffers()]  # the rotary embedding's buffers too
    assert sum(split.weight_bytes) == sum(t.numel() * t.element_size() for t in tensors)
    layer = sum(p.numel() * 2 for p in meta_70b.model.layers[0].parameters())
    assert max(split.weight_bytes) <= sum(split.weight_bytes) / gpus + layer  # within a layer of an even share
    if gpus == 4:
        assert [len(run) for run in split.layers] == [19, 21, 21, 19]  # the embedding and the head weigh a layer each


def test_a_tied_head_stays_with_the_embedding_and_too_many_gpus_are_refused():
    from transformers import AutoConfig

    from t2ray.models.placement import meta_model, split_model

    smol = meta_model(AutoConfig.for_model(**model_config("smollm2-135m")), "float32")
    split = split_model(smol, 3)
    assert split.device_map["lm_head"] == split.device_map["model.embed_tokens"] == 0  # one tensor, one GPU
    tensors = [*smol.parameters(), *smol.buffers()]
    assert sum(split.weight_bytes) == sum(t.numel() * t.element_size() for t in tensors)  # the tied tensor once
    with pytest.raises(ValueError, match="30 decoder layers cannot be split over 31 GPUs"):
        split_model(smol, 31)


SERVE_70B = Path(__file__).resolve().parents[1] / "experiments" / "serve-llama3-70b.yaml"
SERVE_SMOLLM2 = SERVE_70B.with_name("serve-smollm2.yaml")


def serve_plan(path: Path, gpu_mem_gb: float = 80):
    from t2ray.serve.capacity import plan_serve

    (one,) = plan_serve(path, gpu_mem_gb)
    return one


def test_the_shipped_smollm2_server_fits():
    p = serve_plan(SERVE_SMOLLM2)
    assert p.plan.fits and p.dtype == "float32" and p.layers == list(range(30))
    assert p.plan.rows["frozen weights (float32)"] == pytest.approx(134.5e6 * 4 / GIB, rel=0.01)
    w_prime = p.plan.rows["materialised W' (2 copies, mode auto)"]  # lru_size 2: a copy of the MLP matrices each
    assert w_prime == pytest.approx(2 * 30 * 3 * 576 * 1536 * 4 / GIB)
    kv = 16 * 8192 * 30 * 2 * 3 * 64 * 4  # rows × context × layers × (K, V) × KV heads × head dim × fp32
    assert p.plan.rows["KV cache (16 rows × the context)"] == pytest.approx(kv / GIB)
    assert p.plan.rows["KV copy while rows join"] == pytest.approx(kv / GIB)  # one device: the whole cache is copied


@pytest.mark.parametrize("gpus,fits", [(1, False), (2, False), (4, True), (8, True)])
def test_a_70b_replica_fits_80_gb_gpus_from_4_per_replica(tmp_path, gpus, fits):
    text = SERVE_70B.read_text()
    assert "num_gpus: 4}" in text  # the shipped file asks what the plan says
    path = tmp_path / "serve.yaml"
    path.write_text(text.replace("num_gpus: 4}", f"num_gpus: {gpus}}}"))
    p = serve_plan(path)
    assert p.plan.fits == fits, p.plan.table()
    weights = p.plan.rows["frozen weights (bfloat16)"]
    assert weights == pytest.approx(70.55e9 * 2 / gpus / GIB, rel=0.1)  # the fullest GPU: about an even share
    assert p.plan.rows["materialised W' (0 copies, mode factored)"] == 0
    assert p.gpu < gpus and len(p.layers) <= 80 // gpus + 1


def test_materialised_copies_follow_the_lru_settings(tmp_path):
    data = yaml.safe_load(SERVE_70B.read_text())
    data["applications"][0]["args"]["batching"] = {"mode": "auto", "lru_size": 2}
    path = tmp_path / "hot.yaml"
    path.write_text(yaml.safe_dump(data))
    hot = serve_plan(path)
    assert not hot.plan.fits  # two copies of the MLP matrices: 2 × 113 GB over 4 GPUs
    assert hot.plan.rows["materialised W' (2 copies, mode auto)"] > 50
