"""Gradient-free token-level routing of task experts (Belofsky 2023, arXiv 2311.10847; SPEC §1).

Each expert (task) has a centroid: the mean sentence embedding of prompts from its task's TRAIN split.
While generating, the current text of each row (prompt + generated so far) is re-embedded every
``every`` tokens; cosine similarity to every centroid is taken, the LARGEST score is multiplied by the
temperature (4), and a softmax gives that row's expert weights. The experts are then mixed with those
weights for the next token(s).

What differs from the public code (its known faults, SPEC §1):

* KV cache. Decoding keeps the cache: the forward pass for a token sees keys/values of earlier positions as
  they were computed under the weights in force back then (the prefill uses the first routing weights).
  ``recompute_prefix=True`` reproduces the original instead — the whole prefix re-run every token,
  under the current weights, without a cache — for comparison.
* Exact mixtures. :class:`SVFMixer` sets z' = Σ_k w_k z_k per batch row through the SVF layers' factored mode
  (no weight re-materialisation); :class:`LoRAMixer` computes Σ_k w_k ΔW_k exactly (concatenated adapters,
  ``t2ray.lora.layer``) instead of PEFT's ``linear`` merge with its cross terms B_i A_j.
* Long texts keep moving the router: the embedder reads each text's most recent 254 word pieces
  (``t2ray.adapt.embedder``) instead of freezing on the first 256.
* Centroids use train-split examples only.
* Batched: every row of a batch has its own weights; rows stop at EOS (and are no longer routed).

Routing text. A prompt given as chat messages is routed on its message contents joined by newlines (the chat
template's markup is the same for every task, so it only dilutes the similarity); centroids use the same
function on ``task.messages(example)``, so the two sides always match.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from t2ray.experts import Expert, ExpertError, mix_z
from t2ray.generation import Messages, StepHook, decode_encoded, encode_prompts, on_live_rows
from t2ray.kv_decode import input_device

__all__ = [
    "Router",
    "Mixer",
    "SVFMixer",
    "LoRAMixer",
    "RoutedGeneration",
    "generate_routed",
    "generate_weighted",
    "greedy_decode",
    "routing_text",
    "routing_weights",
]


def routing_text(prompt: Messages | str) -> str:
    """The text the router embeds for a prompt: a string as is, chat messages' contents joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


def routing_weights(similarities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Belofsky's rule: multiply each row's LARGEST cosine score by the temperature, then softmax over experts.

    (Taken literally, as in the original: a row whose best score is negative gets that score made *more*
    negative; with sentence embeddings of real texts the best score is positive.)
    """
    best = similarities.argmax(-1, keepdim=True)
    scaled = similarities.scatter(-1, best, similarities.gather(-1, best) * temperature)
    return torch.softmax(scaled, -1)


class Router:
    """Centroids (K, D) + temperature -> per-text expert weights (B, K) that sum to 1."""

    def __init__(
        self, centroids: torch.Tensor, temperature: float = 4.0, *, embedder=None, names: Sequence[str] | None = None
    ):
        centroids = torch.as_tensor(centroids, dtype=torch.float32)
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be a (K, D) tensor with K >= 1, got shape {tuple(centroids.shape)}")
        if not torch.isfinite(centroids).all() or (centroids.norm(dim=-1) == 0).any():
            raise ValueError("centroids must be finite and non-zero")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number, got {temperature!r}")
        if names is not None and len(names) != centroids.shape[0]:
            raise ValueError(f"{len(names)} names for {centroids.shape[0]} centroids")
        self.centroids = centroids
        self.temperature = float(temperature)
        self.names = list(names) if names is not None else [f"expert{k}" for k in range(centroids.shape[0])]
        self._embedder = embedder
        self.calls = 0  # routing steps served (one call embeds a whole batch of texts)
        self.seconds = 0.0  # wall time spent in weights() (embedding + scoring)
        self.sources: dict[str, list[str]] = {}  # example ids behind each centroid (from_tasks)

    @property
    def num_experts(self) -> int:
        return self.centroids.shape[0]

    @property
    def embedder(self):
        if self._embedder is None:
            from t2ray.adapt.embedder import get_embedder

            self._embedder = get_embedder()
        return self._embedder

    @classmethod
    def from_tasks(
        cls,
        tasks: Sequence,
        embedder=None,
        examples_per_task: int = 64,
        *,
        temperature: float = 4.0,
        seed: int = 0,
        questions_only: bool = False,
    ) -> Router:
        """One centroid per task: the mean embedding of up to ``examples_per_task`` of its TRAIN prompts.

        The examples are a seeded sample of the train split (the split's order may be meaningful); test and
        valid items are never read. ``router.sources[task.name]`` lists the example ids used. `questions_only`:
        embed the bare questions (pass-1 dispatch sees a user's query, never the task's system prompt).
        """
        if not tasks:
            raise ValueError("from_tasks needs at least one task")
        if examples_per_task < 1:
            raise ValueError(f"examples_per_task must be >= 1, got {examples_per_task}")
        if embedder is None:
            from t2ray.adapt.embedder import get_embedder

            embedder = get_embedder()
        centroids, sources, names = [], {}, []
        for task in tasks:
            train = list(task.examples("train"))
            if not train:
                raise ValueError(f"task {task.name!r} has no train examples to build a centroid from")
            picked = train if len(train) <= examples_per_task else random.Random(seed).sample(train, examples_per_task)
            texts = [ex.prompt if questions_only else routing_text(task.messages(ex)) for ex in picked]
            emb = embedder.embed(texts)
            centroids.append(emb.mean(0))
            sources[task.name] = [ex.id for ex in picked]
            names.append(task.name)
        router = cls(torch.stack(centroids), temperature, embedder=embedder, names=names)
        router.sources = sources
        return router

    def similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding (B, D) to each centroid: (B, K)."""
        return F.normalize(embeddings.float(), dim=-1) @ F.normalize(self.centroids, dim=-1).T

    def nearest(self, texts: Sequence[str]) -> list[str]:
        """Pass-1 dispatch by nearest centroid: the name of the most similar centroid for each text."""
        best = self.similarities(self.embedder.embed(list(texts))).argmax(-1)
        return [self.names[k] for k in best.tolist()]

    def weights_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return routing_weights(self.similarities(embeddings), self.temperature)

    def weights(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, K) expert weights for each text (rows sum to 1)."""
        start = time.perf_counter()
        self.calls += 1
        weights = self.weights_from_embeddings(self.embedder.embed(list(texts)))
        self.seconds += time.perf_counter() - start
        return weights


# ----------------------------------------------------------------------------- mixers


class Mixer(Protocol):
    """Applies per-row expert weights to a model before its next forward pass."""

    num_experts: int

    def set_weights(self, weights: torch.Tensor) -> None:
        """weights: (B, K) (one mixture per batch row) or (B, T, K) (per token)."""

    def reset(self) -> None:
        """Back to the state the model had before mixing (base model / no mixture)."""


class SVFMixer:
    """Per-row z' = Σ_k w_k z_k through ``set_z`` in factored mode: no W' is ever rebuilt.

    Patches the model for the experts' modules if it is not SVF-patched yet (as ``apply_experts`` does) and
    checks every expert against it. ``set_weights`` switches the layers to factored mode (until ``reset()``, which
    clears z and restores each layer's previous mode); one mixer can serve any number of generations.
    """

    def __init__(self, model: nn.Module, experts: Sequence[Expert], *, allow_transfer: bool = False):
        from t2ray.experts import check_expert
        from t2ray.svf import SVFConfig, base_model_info, patch_model, svf_layers

        experts = list(experts)
        if not experts:
            raise ExpertError("SVFMixer needs at least one expert")
        mix_z(experts, [1.0] * len(experts))  # validates identical module layouts (clear ExpertError otherwise)
        if not svf_layers(model):
            patch_model(model, SVFConfig(target_modules=experts[0].modules), progress=False)
        info = base_model_info(model)
        for expert in experts:
            check_expert(expert, info, allow_transfer=allow_transfer)
        self.model = model
        self.experts = experts
        self.num_experts = len(experts)
        layers = svf_layers(model)
        self._layers = layers
        zs = [e.z() for e in experts]
        self._z = {m: torch.stack([z[m] for z in zs]).to(layers[m].s.device) for m in experts[0].modules}  # (K, r)
        self._saved_modes: dict[str, str] | None = None

    def set_weights(self, weights: torch.Tensor) -> None:
        from t2ray.svf import set_z

        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.ndim not in (2, 3) or weights.shape[-1] != self.num_experts:
            raise ValueError(
                f"weights must be (B, {self.num_experts}) or (B, T, {self.num_experts}), got {tuple(weights.shape)}"
            )
        if self._saved_modes is None:
            self._saved_modes = {name: layer.mode for name, layer in self._layers.items()}
            for layer in self._layers.values():
                layer.mode = "factored"
        set_z(self.model, {m: weights.to(z.device) @ z for m, z in self._z.items()})

    def reset(self) -> None:
        from t2ray.svf import set_z

        set_z(self.model, None)
        for name, mode in (self._saved_modes or {}).items():
            self._layers[name].mode = mode
        self._saved_modes = None


class LoRAMixer:
    """Exact Σ_k w_k ΔW_k per row over saved LoRA experts (``t2ray.lora.layer``).

    Give adapter folders to patch the model here, or patch it beforehand with ``patch_lora_mixture``.
    ``reset()`` returns to the base model (the layers stay patched; ``unpatch_lora_mixture`` removes them).
    ``mixed``: the weights given cover the first `mixed` patched adapters; the rest (e.g. a serving replica's
    classifier adapter) stay at weight 0.
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Sequence | None = None,
        *,
        allow_transfer: bool = False,
        mixed: int | None = None,
    ):
        from t2ray.lora.layer import LoRAMixtureError, lora_mixture_layers, patch_lora_mixture

        if adapters is not None:
            patch_lora_mixture(model, adapters, allow_transfer=allow_transfer)
        layers = lora_mixture_layers(model)
        if not layers:
            raise LoRAMixtureError("LoRAMixer: the model has no LoRA mixture layers; pass adapter folders")
        self.model = model
        self.patched = next(iter(layers.values())).num_experts
        self.num_experts = self.patched if mixed is None else mixed
        if not 1 <= self.num_experts <= self.patched:
            raise LoRAMixtureError(f"LoRAMixer: mixed={mixed} but {self.patched} adapters are patched")

    def set_weights(self, weights: torch.Tensor) -> None:
        from t2ray.lora.layer import set_lora_weights

        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.ndim not in (2, 3) or weights.shape[-1] != self.num_experts:
            raise ValueError(
                f"weights must be (B, {self.num_experts}) or (B, T, {self.num_experts}), got {tuple(weights.shape)}"
            )
        set_lora_weights(self.model, F.pad(weights, (0, self.patched - self.num_experts)))

    def reset(self) -> None:
        from t2ray.lora.layer import set_lora_weights

        set_lora_weights(self.model, None)


# ----------------------------------------------------------------------------- decoding


@dataclass
class RoutedGeneration:
    texts: list[str]  # completions (up to, not including, the first EOS)
    weights_trace: torch.Tensor  # (S, B, K): the weights of every row at each of the S routing steps
    route_steps: list[int]  # S token indices: weights_trace[s] was computed before token route_steps[s]
    completion_ids: torch.Tensor  # (B, N)
    completion_mask: torch.Tensor  # (B, N): 1 up to and including the first EOS
    router_calls: int = 0
    forward_tokens: int = 0  # tokens run through the model (prefill + decode); shows the recompute cost


@torch.no_grad()
def greedy_decode(
    model,
    tokenizer,
    prompts: Sequence[Messages | str],
    *,
    max_new_tokens: int = 64,
    before_step: StepHook | None = None,
    recompute_prefix: bool = False,
    stop_at_eos: bool = True,
):
    """Greedy decoding of chat prompts through the shared decode loop (``t2ray.generation.decode``);
    ``before_step`` runs before the forward that picks each token; ``stop_at_eos=False`` always generates
    ``max_new_tokens`` (benchmarks: equal work for every variant).
    Returns (completion_ids (B, N), completion_mask (B, N), forward_tokens)."""
    batch = encode_prompts(tokenizer, prompts, model, max_new_tokens).to(input_device(model))
    return decode_encoded(
        model,
        tokenizer,
        batch,
        max_new_tokens=max_new_tokens,
        before_step=before_step,
        recompute_prefix=recompute_prefix,
        stop_at_eos=stop_at_eos,
        retire_rows=not recompute_prefix,
    )


def _decode(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    pad = tokenizer.pad_token_id
    return tokenizer.batch_decode(ids * mask + pad * (1 - mask), skip_special_tokens=True)


@torch.no_grad()
def generate_weighted(
    model,
    tokenizer,
    prompts: Sequence[Messages | str],
    mixer: Mixer,
    weights: torch.Tensor,
    *,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy generation with fixed expert weights per row (B, K) — all zero: the base model on that row."""
    try:
        ids, mask, _ = greedy_decode(
            model,
            tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            before_step=on_live_rows(lambda live: mixer.set_weights(weights[live])),
        )
    finally:
        mixer.reset()
    return _decode(tokenizer, ids, mask)


@torch.no_grad()
def generate_routed(
    model,
    tokenizer,
    prompts: Sequence[Messages | str],
    mixer: Mixer,
    router: Router,
    *,
    every: int = 2,
    max_new_tokens: int = 64,
    recompute_prefix: bool = False,
    stop_at_eos: bool = True,
) -> RoutedGeneration:
    """Greedy generation with token-level routing: every ``every`` tokens each unfinished row's text is
    re-embedded and its expert weights recomputed (``every=1``: before every token; Belofsky: 2 was best).

    The mixer holds the current (B, K) weights between routing steps. With the KV cache, earlier positions keep
    the keys/values computed under earlier weights; ``recompute_prefix=True`` re-runs the whole prefix every
    token (the original's behaviour, no cache). The mixer is reset when generation ends.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer (route every k tokens), got {every!r}")
    if router.num_experts != mixer.num_experts:
        raise ValueError(f"the router has {router.num_experts} centroids but the mixer {mixer.num_experts} experts")
    prompts = list(prompts)
    base_texts = [routing_text(p) for p in prompts]
    trace: list[torch.Tensor] = []
    steps: list[int] = []
    calls_before = router.calls
    state: dict = {"rows": -1}  # the last weights routed (B, K) and the batch rows the mixer holds

    def route(i: int, generated: torch.Tensor, done: torch.Tensor, live: torch.Tensor) -> None:
        if i % every == 0:
            active = (~done).nonzero().flatten().tolist()
            texts = [base_texts[b] + tokenizer.decode(generated[b].tolist(), skip_special_tokens=True) for b in active]
            fresh = router.weights(texts)
            weights = state.get("weights")
            weights = fresh.new_zeros(len(prompts), router.num_experts) if weights is None else weights.clone()
            weights[active] = fresh  # finished rows keep their last weights (they are no longer routed)
            state["weights"] = weights
            trace.append(weights)
            steps.append(i)
        elif len(live) == state["rows"]:
            return
        mixer.set_weights(state["weights"][live])  # the rows of this step's batch (done rows may have left it)
        state["rows"] = len(live)

    try:
        ids, mask, forward_tokens = greedy_decode(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            before_step=route,
            recompute_prefix=recompute_prefix,
            stop_at_eos=stop_at_eos,
        )
    finally:
        mixer.reset()
    return RoutedGeneration(
        texts=_decode(tokenizer, ids, mask),
        weights_trace=torch.stack(trace),
        route_steps=steps,
        completion_ids=ids,
        completion_mask=mask,
        router_calls=router.calls - calls_before,
        forward_tokens=forward_tokens,
    )
