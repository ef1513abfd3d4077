"""The SVF linear layer: W' = c · U diag(s ⊙ z) Vᵀ with c = Σs / Σ(s ⊙ z), z = sigmoid(p) · max_mult.

Only W and the square orthogonal factor Q are kept (SPEC §3). Since Q Qᵀ = I, W' = W + W V diag(c·z − 1) Vᵀ:
computing the *change* from W (d = c·z − 1) makes z = 1 reproduce W bit for bit and keeps rounding error
proportional to how far z moved:
  tall (m ≥ n, Q = V):  y = (x + ((x V) ⊙ d) Vᵀ) Wᵀ          wide (m < n, Q = U):  y = h + ((h U) ⊙ d) Uᵀ, h = x Wᵀ
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from t2ray.svf.decompose import Factors


def adapted_weight(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """W' = W + W V diag(c·z − 1) Vᵀ (tall, q = V) or W + U diag(c·z − 1) Uᵀ W (wide, q = U): O(m·n·r)."""
    return adapted_block(w, q, s, z, tall=w.shape[0] >= w.shape[1])


def adapted_block(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    *,
    tall: bool,
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> torch.Tensor:
    """W'[rows, cols] from the part of W the identity reads: W[rows, :] when tall, W[:, cols] when wide. A
    tensor-parallel shard (a block of rows or of columns of W') needs no other rank's weights when its slice runs
    along the side the factor does not contract."""
    # In the weights' dtype: in bf16 the change (≈ 1 % of W) is rounded to bf16 too, far below W's own rounding,
    # and the build (O(m·n·r), the cost of ~max(m, n) tokens) runs at bf16 speed.
    d = (z.float() * s.sum() / (z.float() * s).sum() - 1).to(w.dtype)  # c·z − 1: exactly 0 for z = 1
    q = q.to(w.dtype)
    if tall:  # w = W[rows, :]
        return w[:, cols] + ((w @ q) * d) @ q[cols].T
    return w[rows] + (q[rows] * d) @ (q.T @ w)  # w = W[:, cols]


Gemm = Callable[..., torch.Tensor]  # (role, h, weight, bias=None, transposed=False) -> h @ weight.T + bias


def plain_gemm(role: str, h: torch.Tensor, weight, bias=None, transposed: bool = False) -> torch.Tensor:
    """h @ weight (transposed) or h @ weightᵀ + bias; `role` ("w", "q", "qT", "wq") names the product for a gemm that
    keeps per-weight state (t2ray.kv_decode's packed copies). `weight` may be a function that builds it (W in Q's
    basis: a gemm that keeps a copy builds it once)."""
    weight = weight() if callable(weight) else weight
    return h @ weight if transposed else F.linear(h, weight, bias)


def per_row(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d or c·z in x's dtype, one row per batch row broadcast over a sequence's tokens."""
    v = v.to(x.dtype)
    return v.unsqueeze(1) if v.dim() == 2 and x.dim() == 3 else v


class SVFLinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        factors: Factors,
        *,
        max_mult: float = 1.0,
        init_mean: float = 0.1,
        init_std: float = 0.01,
        mode: str = "materialized",
    ):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)  # only z trains
        self.tall = base_layer.out_features >= base_layer.in_features
        device = base_layer.weight.device
        # A frozen parameter (not a buffer) in the weight's dtype, so ZeRO-3 partitions it like the weights.
        self.svf_q = nn.Parameter(factors.q.to(device, base_layer.weight.dtype), requires_grad=False)
        self.register_buffer("s", factors.s.to(device), persistent=False)
        self.svf_p = nn.Parameter(init_mean + init_std * torch.randn(factors.rank, device=device))
        self.max_mult = max_mult
        self.mode = mode
        self.enabled = True
        self.z_override: torch.Tensor | None = None  # (r,), (B, r) or (B, T, r): mixtures, per-row, per-token
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self._delta_cache: dict[bool, tuple[tuple, torch.Tensor]] = {}  # d and c·z (plus_one), each kept
        self.expected_tokens: int | None = None  # how many tokens the current call runs (generation.announce_tokens)

    @property
    def q(self) -> torch.Tensor:
        return self.svf_q

    @property
    def rank(self) -> int:
        return self.s.numel()

    def z(self) -> torch.Tensor:
        return self.z_override if self.z_override is not None else torch.sigmoid(self.svf_p) * self.max_mult

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return self.s.sum() / (z * self.s).sum(-1, keepdim=True)  # c = Σs / Σ(s ⊙ z), per row of z

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale(z) - 1  # d = c·z − 1, per row of z

    def adapted_weight(self, z: torch.Tensor) -> torch.Tensor:
        """W' for one z vector: built once, then every token costs what the base layer costs."""
        return adapted_weight(self.base_layer.weight, self.svf_q, self.s, z)

    def set_z(self, z: torch.Tensor | None) -> None:
        """Override z (a mixture, one z per row or per token); None returns to sigmoid(p) · max_mult."""
        if z is not None and z.shape[-1] != self.rank:
            raise ValueError(f"z has {z.shape[-1]} values, this layer needs {self.rank}")
        self.z_override = z
        self._weight_cache, self._delta_cache = None, {}

    @property
    def _cacheable(self) -> bool:
        return not hasattr(self.base_layer.weight, "ds_id")  # ZeRO-3 partitions it: never keep a whole copy

    def _z_source(self) -> torch.Tensor:
        return self.z_override if self.z_override is not None else self.svf_p

    def _cache_key(self) -> tuple | None:
        """What a kept W' or d was built from; None for a z made in inference mode (it has no version to check)."""
        source, weight = self._z_source(), self.base_layer.weight
        if source.is_inference():
            return None
        # an optimizer step, an in-place edit or a .to() invalidates the cache
        return source is self.svf_p, source._version, weight._version, weight.dtype, weight.device

    def _too_short_to_rebuild(self) -> bool:
        """Building W' costs what about max(m, n) tokens cost on the factored path (SPEC §3): a shorter call (an RL
        rollout right after a step, a small batch) runs factored instead of rebuilding a stale W'."""
        return self.expected_tokens is not None and self.expected_tokens < max(self.base_layer.weight.shape)

    def _kept_weight(self) -> torch.Tensor | None:
        """The kept W' while the z and W it was built from stay; None otherwise."""
        kept = self._weight_cache
        return kept[1] if kept is not None and kept[0] == self._cache_key() else None

    def _cached_weight(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """The kept W' while z and W stay, else W' built from `z` (None: the current z)."""
        kept = self._kept_weight()
        if kept is not None:
            return kept
        key = self._cache_key()
        # the cache outlives the call: an ordinary tensor even when the KV step (in inference mode) builds it, so
        # that a later forward's autograd may save it
        with torch.inference_mode(False):
            weight = self.adapted_weight((self.z() if z is None else z).detach())
        if self._cacheable and key is not None:
            self._weight_cache = (key, weight)
        return weight

    def current_delta(
        self, dtype: torch.dtype, z: torch.Tensor | None = None, *, plus_one: bool = False
    ) -> torch.Tensor:
        """d = c·z − 1 (c·z, `rescaled`'s, with `plus_one`) of the current z (`z`: it, when the caller has it) in
        `dtype`, kept while z stays: ~8 small ops that a decode step would otherwise repeat for every layer (RESULTS
        generation_step_ops). Training recomputes it: d carries z's grad."""
        if torch.is_grad_enabled() and self._z_source().requires_grad:
            return self.delta(self.z() if z is None else z).to(dtype)
        key = self._cache_key()
        kept = self._delta_cache.get(plus_one)
        if key is not None and kept is not None and kept[0] == (key, dtype):
            return kept[1]
        with torch.inference_mode(False):  # an ordinary tensor, as the kept W' (_cached_weight)
            d = self.delta((self.z() if z is None else z).detach())
            d = (d + 1 if plus_one else d).to(dtype)
        if key is not None:
            self._delta_cache[plus_one] = ((key, dtype), d)
        return d

    def decode_state(self) -> tuple:
        """What a forward reads that can change between decode steps (t2ray.cuda_graphs keeps a captured step while
        it stays): the switches, z's source and the kept W' and d."""
        kept = tuple(cache[1] for cache in (self._weight_cache, *self._delta_cache.values()) if cache is not None)
        return (self.enabled, self.mode, self.expected_tokens, self._z_source(), self.base_layer.weight, *kept)

    def materialized_state(self) -> tuple:
        """The current z with its W' (built now if needed), for `restore_materialized`: a server keeps one per
        mixture and switches between them without rebuilding."""
        with torch.no_grad():
            self._cached_weight()
        return self.z_override, self._weight_cache

    def restore_materialized(self, state: tuple) -> None:
        self.z_override, self._weight_cache = state
        self._delta_cache = {}  # keyed by z's version, not by which tensor z is

    def factored(
        self, x: torch.Tensor, d: torch.Tensor, gemm: Gemm = plain_gemm, xq: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The forward without W' (module docstring), given d = `delta(z)`; `gemm` runs its three products (a decoder
        passes packed ones, keeps d while z stays and, for tall layers reading the same x, gives x Q as `xq`)."""
        d = per_row(d, x)
        q, base = self.svf_q.to(x.dtype), self.base_layer

        def change(h, hq=None):  # ((h Q) ⊙ d) Qᵀ
            return gemm("q", (gemm("qT", h, q, transposed=True) if hq is None else hq) * d, q)

        if self.tall:
            return gemm("w", x + change(x, xq), base.weight, base.bias)
        h = gemm("w", x, base.weight)
        y = h + change(h)
        return y if base.bias is None else y + base.bias

    def basis_weight(self) -> torch.Tensor:
        """W Q (tall) or Qᵀ W (wide): W in Q's basis, for `rescaled`; O(m·n·r), built by whoever keeps it."""
        weight, q = self.base_layer.weight, self.svf_q.to(self.base_layer.weight.dtype)
        return weight @ q if self.tall else q.T @ weight

    def rescaled(self, x: torch.Tensor, cz: torch.Tensor, gemm: Gemm, xq: torch.Tensor | None = None) -> torch.Tensor:
        """The forward as W' = (W Q) diag(c·z) Qᵀ (tall) or Q diag(c·z) (Qᵀ W) (wide), given cz = c·z: two products
        where `factored` takes three (SmolLM2's 1536 × 576 MLP matrices: 1.38 instead of 1.75 times the base layer's
        multiply-adds):  tall y = ((x Q) ⊙ c·z) (W Q)ᵀ,  wide y = ((x (Qᵀ W)ᵀ) ⊙ c·z) Qᵀ.
        Inference only, and not bit for bit W at z = 1 (x Q is rounded on the way): a decoder's z per row. `gemm` gets
        W in Q's basis as a function that builds it (O(m·n·r)): a gemm that keeps a copy (the decoder's packed one)
        builds it once, `plain_gemm` at every call."""
        cz, q, base = per_row(cz, x), self.svf_q.to(x.dtype), self.base_layer
        if self.tall:
            hq = gemm("qT", x, q, transposed=True) if xq is None else xq
            return gemm("wq", hq * cz, self.basis_weight, base.bias)
        y = gemm("q", gemm("wq", x, self.basis_weight) * cz, q)
        return y if base.bias is None else y + base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        z = self.z()
        weight = self.materialised_weight(z)
        if weight is None:
            return self.factored(x, self.current_delta(x.dtype, z))
        return F.linear(x, weight, self.base_layer.bias)

    def materialised_weight(self, z: torch.Tensor | None = None) -> torch.Tensor | None:
        """W' (cached) when a forward now multiplies by it; None when it takes the factored path. A decoder that
        packs weights for its GEMMs (t2ray.kv_decode) asks this."""
        if self.mode == "factored":
            return None
        # z's source has z's shape and wants its grad: z itself is computed only to build W' (a decode step asks
        # every layer at every step: RESULTS generation_materialised_lookup)
        like_z = self._z_source() if z is None else z
        # Training always takes the factored path: z's gradient costs ~4·T·min(m,n)² per matrix there, while
        # rebuilding W' under autograd costs 3·m·n·r + T·m·n (about twice as much for T ≈ 1000 tokens).
        training = torch.is_grad_enabled() and like_z.requires_grad
        if like_z.dim() > 1 or training:
            return None
        kept = self._kept_weight()  # what a decode step finds, asking every layer at every step
        if kept is not None:
            return kept
        # ZeRO-3 (not cacheable): W' would be rebuilt on every forward, the factored path costs less.
        if not self._cacheable or self._too_short_to_rebuild():  # no kept W' (above): this call would build one
            return None
        return self._cached_weight(z)

    def __getstate__(self):
        state = dict(self.__dict__)
        # a copy's version counters restart: never carry a cached W' or d over
        state["_weight_cache"], state["_delta_cache"] = None, {}
        return state

    def extra_repr(self) -> str:
        return f"rank={self.rank}, tall={self.tall}, mode={self.mode}"
