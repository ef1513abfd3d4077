"""A decode step for Llama-family models over a KV cache allocated once per batch.

Hugging Face's cache concatenates every layer's keys and values at every step and its modelling code builds a 4-D
mask per call; here the cache is one tensor per batch written in place, the mask one boolean row per batch row, and
the attention of one new token runs over the filled length only. The model's own modules do everything else
(embeddings, norms, rotary, projections, MLP, LM head), so SVF layers (materialised W' or a z per row) and LoRA
layers run inside the step exactly as in any forward.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

SUPPORTED = ("llama",)  # attention = q/k/v/o projections + rotary, nothing else (no qk-norm, sliding window, bias)


def unsupported_reason(model) -> str | None:
    """None when `KVDecoder` can run this model; else why the Hugging Face loop runs instead."""
    if os.environ.get("T2RAY_DECODE", "kv") == "hf":
        return "T2RAY_DECODE=hf"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(inner.config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} is not one of {SUPPORTED}"
    return None


class KVDecoder:
    """`prefill` a left-padded batch, then `step` one token per row; `select` keeps some rows (retiring the rest)."""

    def __init__(self, model, rows: int, capacity: int):
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = self.model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        weight = self.model.get_input_embeddings().weight
        shape = (config.num_hidden_layers, rows, self.kv_heads, capacity, self.head_dim)
        self.keys = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=weight.device)
        self.length = 0  # slots filled (every row fills the same slots; left padding marks some invalid)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, share: int = 1) -> torch.Tensor:
        """Logits of the last position of each prompt; each of the rows[::share] is prefilled once and its cache
        copied to its `share` rows."""
        width = ids.shape[1]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        slots = torch.arange(width, device=ids.device)
        causal = slots[None, :] <= slots[:, None]
        self.valid[:, :width] = mask.bool()
        # a padded slot sees itself (a row with nothing to attend to would be NaN, and NaN keys poison later steps)
        attend = (self.valid[::share, None, None, :width] & causal) | torch.eye(
            width, dtype=torch.bool, device=ids.device
        )
        logits = self._forward(ids[::share], positions[::share], attend, rows=slice(None, None, share))
        if share > 1:
            for cache in (self.keys, self.values):
                cache[:, :, :, :width] = cache[:, ::share, :, :width].repeat_interleave(share, 1)
        return logits.repeat_interleave(share, 0)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of one new token per row (tokens (B,), positions (B, 1))."""
        self.valid[:, self.length] = True
        attend = self.valid[:, None, None, : self.length + 1]
        return self._forward(tokens[:, None], positions, attend, rows=slice(None))

    def select(self, keep: torch.Tensor) -> None:
        self.keys, self.values, self.valid = self.keys[:, keep], self.values[:, keep], self.valid[keep]

    def _forward(self, ids, positions, attend, rows: slice) -> torch.Tensor:
        inner = self.model.model
        batch, width = ids.shape
        start, end = self.length, self.length + width
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        groups = self.heads // self.kv_heads
        for i, layer in enumerate(inner.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(batch, width, self.heads, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(batch, width, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(batch, width, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            self.keys[i, rows, :, start:end], self.values[i, rows, :, start:end] = k, v
            keys, values = self.keys[i, rows, :, :end], self.values[i, rows, :, :end]
            if width == 1:  # one query per head: a group of heads sharing a KV head reads it as G queries, no copy
                q = q.reshape(batch, self.kv_heads, groups, self.head_dim)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=attention.scaling)
                out = out.reshape(batch, 1, self.heads * self.head_dim)
            else:
                keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=attention.scaling)
                out = out.transpose(1, 2).reshape(batch, width, self.heads * self.head_dim)
            hidden = hidden + attention.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.length = end
        return self.model.lm_head(inner.norm(hidden[:, -1:]))[:, -1]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (x·cos + rotate_half(x)·sin), cos/sin (B, T, D) broadcast over heads."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin
