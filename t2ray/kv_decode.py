"""The decode step: a batch's KV cache and one forward per new token, two ways behind one interface.

`KVDecoder` (Llama-family models): the cache is one tensor per batch written in place, the mask one boolean row per
batch row, and the attention of a new token runs over the filled length only. The step writes Llama's layer out with
as few eager ops as it can, in inference mode (at decode sizes each op's fixed cost outweighs its arithmetic), the
same formulas op for op; every projection runs through its module (or that module's packed weight), so SVF layers
(materialised W' or a z per row) and LoRA layers run inside the step exactly as in any forward.

On a CUDA device the step runs at fixed shapes (the new token's slot a tensor, attention over a power-of-two window
of the cache) and is replayed as a CUDA graph (t2ray.cuda_graphs): an eager step at small B is kernel launches, not
arithmetic. `T2RAY_CUDA_GRAPHS=0` turns that off.

`HFDecoder`: Hugging Face's forward and its cache, which grows by concatenation at every step; it runs every other
model, ZeRO-3 (its hooks gather weights in the order that forward calls them), a model split over several GPUs
(accelerate's hooks move the activations from layer to layer, and each layer's cache stays on its GPU) and
`T2RAY_DECODE=hf`.

Both: `prefill` a left-padded batch, `step` one token per row, `select` rows (retiring the rest), `merge` another
batch's rows (continuous batching), `trim` columns that are padding on every row.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import os
import sys
import time
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from t2ray.cuda_graphs import StepGraphs

SUPPORTED = ("llama",)  # attention = q/k/v/o projections + rotary, nothing else (no qk-norm, sliding window, bias)


def unsupported_reason(model) -> str | None:
    """None when `KVDecoder` can run this model; else why `HFDecoder` runs instead."""
    if os.environ.get("T2RAY_DECODE", "kv") == "hf":
        return "T2RAY_DECODE=hf"
    kind = getattr(unwrapped(model).config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} is not one of {SUPPORTED}"
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # even on one rank: its weights live in the hooks
        return "DeepSpeed ZeRO-3 partitions the weights"
    devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) > 1:  # the one-tensor cache lives on one device
        return f"the model is split over {len(devices)} devices ({', '.join(devices)})"
    return None


_SAID: set[str] = set()  # fallback reasons already printed (one line per reason and process)


def new_decoder(model, rows: int, capacity: int, *, lockstep: bool = False) -> KVDecoder | HFDecoder:
    """The decoder for `rows` rows of up to `capacity` tokens (prompt + new); `lockstep`: ZeRO-3."""
    retain_heap()
    if lockstep:
        return HFDecoder(model)
    reason = unsupported_reason(model)
    if reason is None:
        return KVDecoder(model, rows, capacity)
    if reason not in _SAID:
        _SAID.add(reason)
        logging.getLogger("t2ray").warning("decoding with Hugging Face's forward step: %s", reason)
    return HFDecoder(model)


@functools.cache
def retain_heap() -> bool:
    """Keep freed blocks in the process heap (glibc malloc), once per process. By default glibc maps blocks over
    128 KiB fresh from the OS and returns the heap's top at every free, so a decode step's logits and activations
    fault in freshly zeroed pages at every step (~1,200 page faults a step at B = 8; without them the step is ~6 %
    faster: RESULTS generation_step_ops). True where applied; `T2RAY_MALLOPT=0` leaves malloc as it is."""
    if not sys.platform.startswith("linux") or os.environ.get("T2RAY_MALLOPT", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: its own policy
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # blocks up to 32 MiB (a B = 32 prefill's largest activation is 12 MiB) from the heap; up to 512 MiB kept free
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 512 << 20))


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of token lists padded on the left to the longest, on `device`."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


def unwrapped(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel


def input_device(model) -> torch.device:
    """Where a model's input ids go: its embedding's device (a model split over GPUs has no one device)."""
    return unwrapped(model).get_input_embeddings().weight.device


def cache_kwarg(model) -> str:
    """transformers 5.x calls the KV cache argument ``cache`` (``past_key_values`` is deprecated); 4.x: the latter."""
    return "cache" if "cache" in inspect.signature(unwrapped(model).forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward pass returned, whichever name this transformers version gives it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# oneDNN-packed copies of bf16 and fp32 weights (CPU): torch.mm re-lays the weight out on every call, a packed weight
# is laid out once (RESULTS decode_step: SmolLM2's bf16 GEMMs at B = 8 in 16 ms instead of 26-29; fp32 ones 2-4x
# faster, on AVX2 kernels too: RESULTS generation_fp32_packed). Plain nn.Linear weights and an
# SVF layer's materialised W'. The copy costs the weight's bytes again; it is rebuilt when the module's weight is
# another tensor (a new W') or changed in place (its version moves).
class Packed(NamedTuple):
    sources: list[tuple[weakref.ref, int]]  # each stacked weight and its version when packed
    weight: torch.Tensor


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PACK = torch.backends.mkldnn.is_available() and os.environ.get("T2RAY_PACK_WEIGHTS", "1") != "0"
# oneDNN packs bf16 only where the CPU has bf16 instructions (AVX512-BW/VL/DQ or AVX-NE-CONVERT); an AVX2-only CPU
# running a bf16 model explicitly asked for keeps torch.mm for it
PACKED_DTYPES = (
    (torch.float32, torch.bfloat16) if PACK and torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
)


@functools.cache
def packs_one_row(dtype: torch.dtype) -> bool:
    """Whether a packed GEMM beats torch.mm for one row (a GEMV, a decode step at B = 1) of `dtype` weights, measured
    once per process for fp32 (~0.1 s), where the machine decides: on an Intel Xeon MKL's own GEMV runs 1.4-1.6x
    oneDNN's packed one (AVX2 kernels too), on an AMD EPYC the packed one runs 2.3x MKL's (RESULTS generation_amx).
    bf16 packs wherever it can (1.1-1.5x torch.mm at one row on both), as do more rows. `T2RAY_PACK_WEIGHTS=1` packs
    without measuring."""
    if dtype != torch.float32 or os.environ.get("T2RAY_PACK_WEIGHTS") == "1":
        return dtype in PACKED_DTYPES
    seconds = {}
    for shape in ((1536, 576), (576, 1536)):  # a small model's MLP, 32 M values of each: far more than L2 holds
        weights = [torch.full(shape, 0.5, dtype=dtype) for _ in range((32 << 20) // (shape[0] * shape[1]))]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
        x = torch.randn(1, shape[1], dtype=dtype)
        runs = {"torch.mm": lambda: [F.linear(x, w) for w in weights]}  # noqa: B023 (run inside this iteration)
        runs["packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]  # noqa: B023
        for name, run in runs.items():
            seconds[name] = seconds.get(name, 0.0) + min(_timed(run) for _ in range(3))
    pays = seconds["packed"] < seconds["torch.mm"]
    logging.getLogger("t2ray").info(
        "one-row %s GEMMs: packed %.2fx torch.mm's speed here, %s",
        str(dtype).removeprefix("torch."),
        seconds["torch.mm"] / seconds["packed"],
        "packed" if pays else "torch.mm",
    )
    return pays


def _timed(run) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def packable_weight(module, x: torch.Tensor) -> torch.Tensor | None:
    """The weight `module(x)` multiplies by, where a packed copy can stand in for it (a served base model's SVF layers
    are off: their W); None where it cannot (no packing, another dtype or device, a factored SVF layer, LoRA, a
    weight being trained)."""
    plain = type(module) is torch.nn.Linear
    base = module if plain else getattr(module, "base_layer", None)
    weight = getattr(base, "weight", None)
    # cheap checks first: this runs for every projection of every step
    if not PACK or weight is None or weight.dtype not in PACKED_DTYPES or weight.device.type != "cpu":
        return None
    if not _packs_rows(x):  # before an SVF layer's W' is looked up for nothing
        return None
    if not plain:  # an SVF layer: W when it is off, its W' when its forward would multiply by one (else factored)
        materialised = getattr(module, "materialised_weight", None)
        if materialised is None:
            return None
        if module.enabled:
            weight = materialised()
    if weight is None or weight.requires_grad or x.dtype != weight.dtype:
        return None
    return weight


def _packs_rows(x: torch.Tensor) -> bool:
    return x.numel() != x.shape[-1] or packs_one_row(x.dtype)


def packed_gemm(
    key,
    weights: list[torch.Tensor],
    x: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    cache=_PACKED,
    transposed=False,
    make: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """x @ cat(weights).T + bias (x @ cat(weights, 1) when `transposed`; x @ make().T when `make` builds the matrix
    from `weights`) through a packed copy of it, kept in `cache` under `key` and rebuilt when any weight is another
    tensor or was changed in place."""
    cached = cache.get(key)
    stale = (
        cached is None
        or len(cached.sources) != len(weights)
        or any(ref() is not w or seen != w._version for (ref, seen), w in zip(cached.sources, weights, strict=True))
    )
    if stale:
        if make is not None:
            stacked = make()
        else:
            parts = [w.T for w in weights] if transposed else weights
            stacked = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(stacked, x.shape[0])
        cached = cache[key] = Packed([(weakref.ref(w), w._version) for w in weights], packed)
    return torch.ops.mkldnn._linear_pointwise(x, cached.weight, bias, "none", [], "")


# SVF layer -> {"wq" (W in Q's basis) | "q" | "qT" | "xq" (gate's and up's Q stacked): Packed}
_FACTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _factored_ready(module, x: torch.Tensor) -> bool:
    """Whether `module` is an SVF layer whose forward here takes the factored path on packed weights (a z per row or
    per token: mixed batches, CEM fitness, routing); not where it would not run here (off, training, another dtype
    or device). Only asked where `packable_weight` found no W'."""
    if getattr(module, "svf_q", None) is None or not PACK or not module.enabled or torch.is_grad_enabled():
        return False
    weight = module.base_layer.weight
    return weight.dtype in PACKED_DTYPES and weight.device.type == "cpu" and x.dtype == weight.dtype and _packs_rows(x)


def _factored_svf(module, x: torch.Tensor, xq: torch.Tensor | None = None) -> torch.Tensor:
    """A `_factored_ready` layer's forward with its products on packed weights (`xq`: x·Q, computed already): the
    rescaled form (two products, not three: RESULTS generation_z_per_row)."""
    factors = _FACTORS.setdefault(module, {})

    def gemm(role, h, w, bias=None, transposed=False):
        if callable(w):  # W in Q's basis: built (O(m·n·r)) when W or Q changes, kept only packed
            return packed_gemm(role, [module.base_layer.weight, module.svf_q], h, bias, cache=factors, make=w)
        return packed_gemm(role, [w], h, bias, cache=factors, transposed=transposed)

    return module.rescaled(x, module.current_delta(x.dtype, plus_one=True), gemm, xq)


def _bias(module) -> torch.Tensor | None:
    return module.bias if type(module) is torch.nn.Linear else getattr(module, "base_layer", module).bias


def _pack_key(module, weight: torch.Tensor):
    """An SVF layer's W' is packed under the layer, its W (the layer off) under the nn.Linear that owns W: a server
    switching between base-model batches and an expert's keeps both packed instead of re-packing at each switch."""
    base = getattr(module, "base_layer", module)
    return base if weight is base.weight else module


def _forward(module, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """module(x) given `packable_weight(module, x)`."""
    if weight is not None:
        return packed_gemm(_pack_key(module, weight), [weight], x, _bias(module))
    return _factored_svf(module, x) if _factored_ready(module, x) else module(x)


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """module(x), through packed weights where that is faster (bf16 and fp32 on the CPU)."""
    return _forward(module, x, packable_weight(module, x))


def stacked(modules: tuple, x: torch.Tensor) -> torch.Tensor:
    """cat([m(x) for m in modules], -1) (q/k/v, gate/up): one GEMM of their stacked packed weights where each would
    pack alone (fewer, wider GEMMs: RESULTS generation_fused_projections), else each module on its own."""
    weights = [packable_weight(m, x) for m in modules]
    if all(w is None and _factored_ready(m, x) and m.tall for m, w in zip(modules, weights, strict=True)):
        # SVF layers with a z per row, all tall (gate/up): the x·Q products they share x for as one GEMM
        qs = [m.svf_q for m in modules]
        xq = packed_gemm("xq", qs, x, None, cache=_FACTORS.setdefault(modules[0], {}), transposed=True)
        parts = xq.split([q.shape[1] for q in qs], -1)
        return torch.cat([_factored_svf(m, x, part) for m, part in zip(modules, parts, strict=True)], -1)
    if any(w is None for w in weights) or any(_bias(m) is not None for m in modules):
        return torch.cat([_forward(m, x, w) for m, w in zip(modules, weights, strict=True)], -1)
    return packed_gemm(_pack_key(modules[0], weights[0]), weights, x, None)


def wants_static_step(device: torch.device) -> bool:
    """Whether a decoder on `device` steps at fixed shapes and replays CUDA graphs."""
    return device.type == "cuda" and os.environ.get("T2RAY_CUDA_GRAPHS", "1") != "0"


MIN_WINDOW = 64  # the smallest attention window of a fixed-shape step; windows double from there


class KVDecoder:
    def __init__(self, model, rows: int, capacity: int, *, static: bool | None = None):
        """`static`: step at fixed shapes (CUDA graphs on a CUDA device); None: where `wants_static_step`."""
        self.model = unwrapped(model)
        config = self.model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = [Layer.of(layer) for layer in self.model.model.layers]  # looked up once, not at every step
        weight = self.model.get_input_embeddings().weight
        shape = (config.num_hidden_layers, rows, self.kv_heads, capacity, self.head_dim)
        self.static = wants_static_step(weight.device) if static is None else static
        # a fixed-shape step attends over slots not yet written, masked: they must hold finite numbers (0 · NaN = NaN)
        empty = torch.zeros if self.static else torch.empty
        self.keys = empty(shape, dtype=weight.dtype, device=weight.device)
        self.values = empty(shape, dtype=weight.dtype, device=weight.device)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=weight.device)
        self.length = 0  # slots filled (every row fills the same slots; left padding marks some invalid)
        self.graphs = StepGraphs(self.model) if self.static and weight.device.type == "cuda" else None

    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        share: int = 1,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits of the last position of each prompt; each of the rows[::share] is prefilled once and its cache
        copied to its `share` rows. `prefix`: the keys and values of each row's first P prompt tokens
        (t2ray.prefix_cache), (layers, rows, kv_heads, P, head_dim); `ids` and `mask` are then the rest."""
        start = 0
        if prefix is not None:
            if share > 1:
                raise ValueError("a cached prefix is given per row: prefill shared prompts without one")
            start = prefix[0].shape[3]
            self.keys[:, :, :, :start], self.values[:, :, :, :start] = prefix
            self.valid[:, :start] = True
            self.length = start
        width = ids.shape[1]
        positions = start + (mask.cumsum(1) - 1).clamp(min=0)
        slots = torch.arange(width, device=ids.device)
        self.valid[:, start : start + width] = mask.bool()
        # a padded slot sees itself (a row with nothing to attend to would be NaN, and NaN keys poison later steps)
        causal = (slots[None, :] <= slots[:, None]) & self.valid[::share, None, None, start : start + width]
        attend = causal | torch.eye(width, dtype=torch.bool, device=ids.device)
        if start:  # every query sees the whole prefix
            attend = torch.cat([attend.new_ones(*attend.shape[:3], start), attend], -1)
        logits = self._forward(ids[::share], positions[::share], attend, rows=slice(None, None, share))
        self.length = start + width
        if share > 1:
            for cache in (self.keys, self.values):
                cache[:, :, :, :width] = cache[:, ::share, :, :width].repeat_interleave(share, 1)
        return logits.repeat_interleave(share, 0)

    def row_cache(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of a row's filled positions in order, (layers, kv_heads, n, head_dim) each."""
        filled = self.valid[row, : self.length].nonzero().squeeze(1)
        return self.keys[:, row].index_select(2, filled), self.values[:, row].index_select(2, filled)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of one new token per row (tokens (B,), positions (B, 1))."""
        if self.length == self.valid.shape[1]:
            self._grow(max(16, self.length))  # a caller that under-counted: amortised, never wrong
        self.valid[:, self.length] = True
        if self.static:
            window = min(self.valid.shape[1], max(MIN_WINDOW, 1 << self.length.bit_length()))  # > length
            if self.graphs is not None:
                logits = self.graphs.step(window, self._fixed_step(window), tokens, positions, self.length)
            else:  # the fixed-shape step run eagerly: what a graph replays (the CPU's tests check it)
                logits = self._fixed_step(window)(tokens, positions, torch.tensor([self.length], device=tokens.device))
        else:
            attend = self.valid[:, None, None, : self.length + 1]
            logits = self._forward(tokens[:, None], positions, attend, rows=slice(None))
        self.length += 1
        return logits

    def _fixed_step(self, window: int):
        """The step as a function of (tokens (B,), positions (B, 1), slot (1,)) tensors only, every shape fixed by
        the batch and `window`: what a CUDA graph captures (it replays on the same tensors, refilled)."""
        attend = self.valid[:, None, None, :window]
        return lambda tokens, positions, slot: self._forward(
            tokens[:, None], positions, attend, rows=slice(None), slot=slot, window=window
        )

    def _moved(self) -> None:
        """The cache is other tensors now: a captured step would read the old ones."""
        if self.graphs is not None:
            self.graphs.clear()

    def select(self, keep: torch.Tensor) -> None:
        self.keys, self.values, self.valid = self.keys[:, keep], self.values[:, keep], self.valid[keep]
        self._moved()

    def merge(self, other: KVDecoder) -> None:
        """`other`'s rows join after these, both right-aligned on the last filled slot (positions are explicit, so
        the left padding this adds changes nothing); room for the longer of the two budgets left."""
        length = max(self.length, other.length)
        room = max(self.valid.shape[1] - self.length, other.valid.shape[1] - other.length)
        rows = self.valid.shape[0] + other.valid.shape[0]
        layers, _, kv_heads, _, head_dim = self.keys.shape
        keys = self.keys.new_zeros(layers, rows, kv_heads, length + room, head_dim)
        values, valid = torch.zeros_like(keys), self.valid.new_zeros(rows, length + room)
        first = 0
        for part in (self, other):
            end, offset = first + part.valid.shape[0], length - part.length
            keys[:, first:end, :, offset:length] = part.keys[:, :, :, : part.length]
            values[:, first:end, :, offset:length] = part.values[:, :, :, : part.length]
            valid[first:end, offset:length] = part.valid[:, : part.length]
            first = end
        self.keys, self.values, self.valid, self.length = keys, values, valid, length
        self._moved()

    def trim(self) -> None:
        first = int(self.valid[:, : self.length].any(0).int().argmax())
        if first > 0:  # views: the slots beyond `length` keep their room
            self.keys, self.values, self.valid = (
                self.keys[..., first:, :],
                self.values[..., first:, :],
                self.valid[:, first:],
            )
            self.length -= first
            self._moved()

    def require_plain_cache(self) -> None:
        """Rows can always be merged and trimmed here (HFDecoder's check; nothing to check)."""

    def _grow(self, extra: int) -> None:
        pad = (0, 0, 0, extra)
        self.keys, self.values = F.pad(self.keys, pad), F.pad(self.values, pad)
        self.valid = F.pad(self.valid, (0, extra))
        self._moved()

    def _forward(self, ids, positions, attend, rows: slice, slot=None, window: int = 0) -> torch.Tensor:
        """Logits of the last of `ids`' positions, their keys and values written at slots length.. (or at the
        tensor `slot`, attending over the first `window` slots: the fixed-shape step)."""
        inner = self.model.model
        batch, width = ids.shape
        start, end = self.length, self.length + width
        hidden = inner.embed_tokens(ids)
        rotary = Rotary(*inner.rotary_emb(hidden, positions))
        mask = hidden.new_zeros(attend.shape).masked_fill_(~attend, float("-inf"))  # once, not per layer
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads
        # every layer's cache slots as views, made in one op each
        if slot is None:
            new_keys, new_values = (c[:, rows, :, start:end].unbind(0) for c in (self.keys, self.values))
            keys, values = (c[:, rows, :, :end].unbind(0) for c in (self.keys, self.values))
        else:
            layer_keys, layer_values = self.keys.unbind(0), self.values.unbind(0)
            keys, values = (c[:, :, :, :window].unbind(0) for c in (self.keys, self.values))
        # inference mode: no autograd bookkeeping on the layers' ~1,500 ops (RESULTS generation_step_ops); the last
        # norm and the LM head run outside it, so the logits are ordinary tensors for every caller
        with torch.inference_mode():
            for i, layer in enumerate(self.layers):
                x = rms_norm(layer.input_norm, hidden)
                qkv = stacked(layer.qkv, x).view(batch, width, heads + 2 * kv_heads, head_dim)
                qk = rotary(qkv[:, :, : heads + kv_heads])  # q's and k's heads in one pass
                key, value = qk[:, :, heads:].transpose(1, 2), qkv[:, :, heads + kv_heads :].transpose(1, 2)
                if slot is None:
                    new_keys[i].copy_(key)
                    new_values[i].copy_(value)
                else:
                    layer_keys[i].index_copy_(2, slot, key)
                    layer_values[i].index_copy_(2, slot, value)
                # one query per head: a group of heads sharing a KV head reads it as G queries, no copy
                if width == 1:
                    q = qk[:, :, :heads].view(batch, kv_heads, groups, head_dim)
                    out = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=mask, scale=layer.scaling)
                    out = out.view(batch, 1, heads * head_dim)
                else:
                    q = qk[:, :, :heads].transpose(1, 2)
                    k, v = keys[i].repeat_interleave(groups, 1), values[i].repeat_interleave(groups, 1)
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling)
                    out = out.transpose(1, 2).reshape(batch, width, heads * head_dim)
                hidden = hidden + linear(layer.o_proj, out)
                x = rms_norm(layer.post_norm, hidden)
                gate, up = stacked(layer.gate_up, x).chunk(2, -1)  # the same size in Llama
                hidden = hidden + linear(layer.down_proj, layer.act(gate).mul_(up))  # down(act(gate(x)) · up(x))
        return linear(self.model.lm_head, rms_norm(inner.norm, hidden[:, -1:]))[:, -1]


class Layer(NamedTuple):
    """One Llama decoder layer's modules."""

    input_norm: torch.nn.Module
    qkv: tuple[torch.nn.Module, ...]
    o_proj: torch.nn.Module
    scaling: float
    post_norm: torch.nn.Module
    gate_up: tuple[torch.nn.Module, ...]
    act: torch.nn.Module
    down_proj: torch.nn.Module

    @classmethod
    def of(cls, layer) -> Layer:
        attention, mlp = layer.self_attn, layer.mlp
        return cls(
            layer.input_layernorm,
            (attention.q_proj, attention.k_proj, attention.v_proj),
            attention.o_proj,
            attention.scaling,
            layer.post_attention_layernorm,
            (mlp.gate_proj, mlp.up_proj),
            mlp.act_fn,
            mlp.down_proj,
        )


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward (statistics in fp32, the weight applied in x's dtype) with its temporaries updated in
    place; any other norm module runs its own forward."""
    if type(norm).__name__ != "LlamaRMSNorm":
        return norm(x)
    h = x.to(torch.float32, copy=True)
    h.mul_(h.pow(2).mean(-1, keepdim=True).add_(norm.variance_epsilon).rsqrt_())
    return norm.weight * h.to(x.dtype)


class Rotary:
    """Rotary embedding x·cos + rotate_half(x)·sin of x (B, T, heads, D) for one call's positions: rotate_half(x)·sin
    is roll(x)·sin with the sign folded into sin once (the same products, so the same bits as HF's formula)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):  # (B, T, D) each
        half = cos.shape[-1] // 2
        self.cos = cos[:, :, None]  # broadcast over heads
        self.sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, :, None]
        self.half = half

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.cos).add_(x.roll(self.half, -1).mul_(self.sin))


class HFDecoder:
    def __init__(self, model):
        self.model, self.cache, self.mask, self.cache_arg = model, None, None, cache_kwarg(model)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, share: int = 1) -> torch.Tensor:
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids[::share],
            attention_mask=mask[::share],
            position_ids=positions[::share],
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache, self.mask = output_cache(out), mask
        if share > 1:
            self.cache.batch_repeat_interleave(share)
        return out.logits[:, -1].repeat_interleave(share, 0)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: self.cache},
        )
        self.cache = output_cache(out)
        return out.logits[:, -1]

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep.cpu())  # a CPU index works on every layer's device (a split model)
        self.mask = self.mask[keep]

    def merge(self, other: HFDecoder) -> None:
        self.require_plain_cache()
        pad_mine, pad_theirs = (max(0, b.mask.shape[1] - a.mask.shape[1]) for a, b in ((self, other), (other, self)))
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, pad_mine, 0)), F.pad(theirs.keys, (0, 0, pad_theirs, 0))])
            mine.values = torch.cat(
                [F.pad(mine.values, (0, 0, pad_mine, 0)), F.pad(theirs.values, (0, 0, pad_theirs, 0))]
            )
        self.mask = torch.cat([F.pad(self.mask, (pad_mine, 0)), F.pad(other.mask, (pad_theirs, 0))])

    def trim(self) -> None:
        self.require_plain_cache()
        first = int(self.mask.any(0).int().argmax())
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def require_plain_cache(self) -> None:
        """Continuous batching merges and trims caches layer by layer: a model with sliding-window layers cannot."""
        from transformers.cache_utils import DynamicLayer

        if any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            raise RuntimeError("continuous batching needs a plain dynamic KV cache (no sliding-window layers)")
