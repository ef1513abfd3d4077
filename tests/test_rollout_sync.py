"""z-only sync to rollout engines (the CPU twin of the vLLM path; vLLM itself: tests/rl/test_vllm_engine.py)."""

from __future__ import annotations

import pytest
import torch

from t2ray.generation import rollout
from t2ray.rl.rollout import (
    InProcessEngine,
    ReplicaEngine,
    ZSyncError,
    current_z,
    decode_z,
    encode_z,
)
from t2ray.svf import SVFConfig, patch_model, use_trainable
from t2ray.train.engines import LocalReplica


@pytest.fixture
def trained(tiny, tokenizer):
    patch_model(tiny, SVFConfig(), progress=False)
    params = use_trainable(tiny)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))  # as if several optimizer steps had moved z
    return tiny, tokenizer


def test_message_round_trip_is_exact(trained):
    z = current_z(trained[0])
    version, decoded, base = decode_z(encode_z(z, 7, "abc"))
    assert version == 7 and base == "abc" and decoded.keys() == z.keys()
    assert all(torch.equal(decoded[k], z[k]) for k in z)


def test_replica_generates_what_the_trainer_would(trained):
    """Through LocalReplica, as a GPU worker runs it (on its own device, in its own process): the z message only."""
    model, tokenizer = trained
    replica = ReplicaEngine("tiny-llama", SVFConfig(), dtype="float32", device="cpu")
    sent = LocalReplica(replica).sync(model, 3)
    assert replica.version == 3
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sent < weight_bytes / 100  # only z travels
    prompts = ["hello", "a longer prompt to pad"]
    ours = InProcessEngine(model, tokenizer).generate(prompts, max_new_tokens=8, temperature=0, top_p=1, seed=0)
    theirs = replica.generate(prompts, max_new_tokens=8, temperature=0, top_p=1, seed=0)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        torch.testing.assert_close(model(ids).logits, replica.model(ids).logits, atol=1e-4, rtol=1e-4)


def test_replica_refuses_bad_messages(trained):
    replica = ReplicaEngine("tiny-llama", SVFConfig(), dtype="float32")
    with pytest.raises(ZSyncError, match="malformed"):
        replica.receive(b"not a safetensors payload")
    z, base = current_z(trained[0]), trained[0].t2ray_fingerprint
    name = next(iter(z))
    with pytest.raises(ZSyncError, match="expected"):
        replica.receive(encode_z({name: torch.ones(3)}, 1, base))
    with pytest.raises(ZSyncError, match="finite"):
        replica.receive(encode_z({name: torch.full_like(z[name], float("nan"))}, 1, base))
    with pytest.raises(ZSyncError, match="does not adapt"):
        replica.receive(encode_z({"model.layers.0.self_attn.q_proj": z[name]}, 1, base))
    with pytest.raises(ZSyncError, match="base model"):
        replica.receive(encode_z(z, 1, "another-model"))
    assert replica.version == -1  # nothing was applied


def test_in_process_engine_needs_no_sync(trained):
    model, tokenizer = trained
    engine = InProcessEngine(model, tokenizer)
    assert engine.sync(model, 0) == 0
    ours = engine.generate(["x"], max_new_tokens=4, temperature=0, top_p=1, seed=0)
    assert torch.equal(ours.completion_ids, rollout(model, tokenizer, ["x"], max_new_tokens=4).completion_ids)
