"""Tensor-parallel z sync: each rank's shards of W', built from only its part of W, assemble the whole W'.

The layout is vLLM's (column-parallel qkv_proj / gate_up_proj with HF's projections fused in order, row-parallel
o_proj / down_proj, grouped KV heads replicated when there are fewer than ranks); tests/rl/test_vllm_engine.py
checks it against vLLM itself at tensor parallel 3."""

from __future__ import annotations

import pytest
import torch

from t2ray.rl.vllm_engine import cpu_thread_binding, plan_shard
from t2ray.svf.decompose import svd_factors
from t2ray.svf.layer import adapted_block, adapted_weight

HEAD_DIM = 4
# A Llama layer's matrices: 8 query heads, 2 KV heads, hidden 32, MLP 48 (tall gate/up, wide down and k/v).
SHAPES = {
    "l.self_attn.q_proj": (32, 32),
    "l.self_attn.k_proj": (8, 32),
    "l.self_attn.v_proj": (8, 32),
    "l.self_attn.o_proj": (32, 32),
    "l.mlp.gate_proj": (48, 32),
    "l.mlp.up_proj": (48, 32),
    "l.mlp.down_proj": (32, 48),
}
ROW_PARALLEL = ("o_proj", "down_proj")


def full_adapted(name: str, generator) -> tuple[torch.Tensor, dict]:
    w = torch.randn(SHAPES[name], generator=generator, dtype=torch.float64)
    f = svd_factors(w, torch.float64)
    q, s = f.q.double(), f.s.double()
    z = 0.3 + 0.7 * torch.rand(s.numel(), generator=generator, dtype=torch.float64)
    return adapted_weight(w, q, s, z), {"w": w, "q": q, "s": s, "z": z}


@pytest.mark.parametrize("world", [1, 2, 4])  # 4 ranks > 2 KV heads: each KV head on two ranks
def test_rank_shards_assemble_the_whole_adapted_weight(world):
    generator = torch.Generator().manual_seed(world)
    for name in SHAPES:
        whole, parts = full_adapted(name, generator)
        row_parallel = name.endswith(ROW_PARALLEL)
        blocks = []
        for rank in range(world):
            shard = plan_shard(name, SHAPES.__getitem__, HEAD_DIM, rank, world, row_parallel)
            source = parts["w"][shard.source]  # all a rank reads of W
            block = adapted_block(
                source, parts["q"], parts["s"], parts["z"], tall=shard.tall, rows=shard.rows, cols=shard.cols
            )
            torch.testing.assert_close(block, whole[shard.rows, shard.cols], rtol=0, atol=1e-10)
            blocks.append((shard.rows, shard.cols))
        covered = torch.zeros(SHAPES[name], dtype=torch.int64)
        for rows, cols in blocks:
            covered[rows, cols] += 1
        replicas = max(1, world // (SHAPES[name][0] // HEAD_DIM)) if name.endswith(("k_proj", "v_proj")) else 1
        assert (covered == replicas).all(), name  # every entry once (KV heads: once per replica)


def test_fused_owner_layout_follows_vllm():
    """qkv_proj on rank 1 of 2: [its 4 query heads; its KV head of k; of v], one after another."""
    q, k, v = (plan_shard(f"l.self_attn.{p}_proj", SHAPES.__getitem__, HEAD_DIM, 1, 2, False) for p in "qkv")
    assert {q.owner, k.owner, v.owner} == {"l.self_attn.qkv_proj"}
    assert (q.dst[0], k.dst[0], v.dst[0]) == (slice(0, 16), slice(16, 20), slice(20, 24))
    assert (q.rows, k.rows, v.rows) == (slice(16, 32), slice(4, 8), slice(4, 8))
    up = plan_shard("l.mlp.up_proj", SHAPES.__getitem__, HEAD_DIM, 1, 2, False)
    assert (up.owner, up.dst[0], up.rows) == ("l.mlp.gate_up_proj", slice(24, 48), slice(24, 48))
    down = plan_shard("l.mlp.down_proj", SHAPES.__getitem__, HEAD_DIM, 1, 2, True)
    assert (down.owner, down.cols, down.source) == ("l.mlp.down_proj", slice(24, 48), (slice(None), slice(24, 48)))


def test_a_shape_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="do not split over 3"):
        plan_shard(
            "l.mlp.gate_proj", {"l.mlp.gate_proj": (50, 32), "l.mlp.up_proj": (50, 32)}.__getitem__, 4, 0, 3, False
        )


def test_cpu_thread_binding_gives_every_rank_cores():
    binding = cpu_thread_binding(3).split("|")
    assert len(binding) == 3 and all(binding)
