"""What one ExpertModel replica does, in plain PyTorch (no Ray; unit-testable in one process).

The replica loads the base model and every expert once, patches the union of the experts' modules, and then
applies any mixture per request without touching the weights. SVF experts:

- a batch whose rows use *different* mixtures runs in the factored mode with one z per row, ``(B, r)``
  per module (SPEC §3: no weight copies), rows of the base model get z = 1 (exactly W);
- a batch where every row uses the *same* hot mixture runs in the materialised mode: W' is built once and
  kept in a small LRU (one copy of the adapted weights per entry), so later batches cost what the base costs;
- a batch of base-model rows runs with the SVF layers disabled (the untouched weights).

LoRA experts (adapter folders) are all held by one LoRA mixture layer per module: a mixture is a weight per
adapter, (K,) for the batch or (B, K) per row — Σ_k w_k ΔW_k exactly, at the cost of two rank-space matmuls
whatever the mix, so nothing is ever materialised.

Generation is a step-wise decode loop with a KV cache, so a replica can stream text per step, drop rows as they
finish and admit new ones at any step (continuous batching: `DecodeBatch.merge` left-pads the caches to one length);
the adapter mode is chosen again whenever the rows change. Greedy decoding gives the tokens `generation.rollout`
gives, alone or joined to a running batch (tested).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from t2ray.adapt.dispatch import PrefixScorer, classification_ids, classify
from t2ray.experts import ExpertError, alpha_matrix, check_expert, mix_z
from t2ray.generation import (
    GREEDY_BELOW,
    PromptTooLongError,
    context_length,
    eos_token_ids,
    greedy,
    render,
    sample,
)
from t2ray.kv_decode import input_device, new_decoder
from t2ray.library import library_kind, read_library
from t2ray.models import compute_dtype, load_model
from t2ray.models.placement import gpu_device_map
from t2ray.prefix_cache import PrefixCache, prefill_prompts
from t2ray.serve.errors import RequestError, bad_request, not_found
from t2ray.svf import SVFConfig, base_model_info, patch_model, set_mode, set_z, svf_layers

CLASSIFIER = "__classifier__"


@dataclass(frozen=True)
class MixtureRef:
    """A mixture as pass 1 decided it: expert names and α (per expert, or per expert per module)."""

    label: str = "base"
    experts: tuple[str, ...] = ()
    alpha: tuple = ()

    @property
    def is_base(self) -> bool:
        return not self.experts

    @property
    def key(self) -> tuple:
        return (self.experts, self.alpha)

    def report(self) -> dict[str, Any]:
        weights = {n: (list(a) if isinstance(a, tuple) else a) for n, a in zip(self.experts, self.alpha, strict=True)}
        return {"label": self.label, "weights": weights}


@dataclass
class GenRequest:
    """One generation request as the dispatcher sends it to a replica."""

    mixture: MixtureRef
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | None = None  # completion (raw text, no chat template)
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class GenItem:
    """A prepared request inside a batch (token ids, its z, its decoding state)."""

    request: GenRequest
    prompt_ids: list[int]
    z: Any  # its adapter state (ExpertLibrary.z_of); None: base model
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its prefill began (queue time = started - enqueued)
    rows_decoding: int = 0  # Σ over its steps of the rows decoding with it (÷ its tokens: its mean batch size)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False  # set when the caller left: the row stops at the next decode step
    text: str = ""  # decoded so far, incrementally (the two offsets below)
    prefix_offset: int = 0  # tokens [prefix_offset, read_offset) are decoded again as context for the next ones
    read_offset: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values the prefix cache gave


def replica_engine(engine: dict[str, Any], gpu_ids: list) -> dict[str, Any]:
    """The ExpertLibrary kwargs of a replica that Ray gave `gpu_ids` (ray.get_gpu_ids()): over several GPUs the model
    is split across them with a device map instead of loaded whole onto `cuda`. GPUs that torch cannot see (Ray's
    GPU count is bookkeeping: a node may declare GPUs it lacks) are named here, not at the first .to()."""
    if not str(engine.get("device", "cpu")).startswith("cuda"):
        return engine
    visible = torch.cuda.device_count()
    if visible < max(1, len(gpu_ids)):
        why = "" if torch.backends.cuda.is_built() else " (this torch is built without CUDA)"
        raise RuntimeError(
            f"model.device is {engine['device']} and Ray gave this replica GPU ids {list(gpu_ids)} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but torch sees {visible} CUDA "
            f"device(s){why}: run the replicas on nodes with real GPUs, or serve with model.device: cpu"
        )
    if len(gpu_ids) < 2:
        return engine
    dtype = compute_dtype(engine.get("dtype", "auto"), "cuda")
    split = gpu_device_map(engine["model_spec"], len(gpu_ids), dtype=dtype, seed=engine.get("seed", 0))
    return {**engine, "device_map": split}


class ExpertLibrary:
    """Base model + experts + the z-state of the model. Not thread-safe: call from one thread."""

    def __init__(
        self,
        model_spec: str,
        experts: dict[str, str],
        *,
        classifier: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        device_map: dict[str, int | str] | None = None,
        seed: int = 0,
        allow_transfer: bool = False,
        mode: str = "auto",
        materialize_after: int = 4,
        lru_size: int = 2,
        lru_bytes: int | None = None,
        z_cache_size: int = 256,
        prefix_cache_bytes: int = 256 << 20,
    ):
        self.model, self.tokenizer = load_model(
            model_spec, dtype=dtype, device=device, seed=seed, device_map=device_map
        )
        self.device = input_device(self.model)  # where ids go and logits come back (the embedding's GPU when split)
        self.model_spec = model_spec
        paths = {**experts, **({CLASSIFIER: classifier} if classifier else {})}
        self.lora = bool(paths) and library_kind(list(paths.values())) == "lora"
        self.experts = dict(
            zip(paths, read_library(list(paths.values())), strict=True)
        )  # SVF Experts or LoRAExpertFiles
        if self.lora:
            from t2ray.lora.layer import lora_mixture_layers, patch_lora_mixture

            patch_lora_mixture(self.model, list(self.experts.values()), allow_transfer=allow_transfer)
            self.column = {name: k for k, name in enumerate(self.experts)}  # adapter -> its weight's index
            self.layers = lora_mixture_layers(self.model)
        else:
            if self.experts:
                modules = list(dict.fromkeys(m for e in self.experts.values() for m in e.modules))
                patch_model(self.model, SVFConfig(target_modules=modules), progress=False)
                info = base_model_info(self.model)
                for name, expert in self.experts.items():
                    check_expert(expert, info, allow_transfer=allow_transfer, source=paths[name])
            self.layers = svf_layers(self.model)
            self.ones = {m: torch.ones(layer.rank, device=layer.s.device) for m, layer in self.layers.items()}
        # what building a W' costs, in tokens of the factored path (LoRA never builds one)
        shapes = [] if self.lora else [layer.base_layer.weight.shape for layer in self.layers.values()]
        self.build_tokens = max((max(shape) for shape in shapes), default=0)
        self._set(None)
        self.context = context_length(self.model)
        self.eos = eos_token_ids(self.model, self.tokenizer)
        self.mode, self.materialize_after, self.lru_size, self.lru_bytes = mode, materialize_after, lru_size, lru_bytes
        self._z_cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._z_cache_size = z_cache_size
        self._weights: OrderedDict[tuple, dict[str, tuple]] = OrderedDict()  # key -> layer -> (z, W' cache)
        self._hits: dict[tuple, int] = {}
        self._lock = threading.RLock()  # requests are prepared on the event loop, the model runs on a worker thread
        self._active: tuple | None = None
        self._scorer: PrefixScorer | None = None
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.stats = {
            "prompt_tokens": 0,
            "prefix_cached_tokens": 0,  # prompt tokens whose keys and values came from the prefix cache
            "materialized_builds": 0,
            "batches": {"base": 0, "factored": 0, "materialized": 0},
            "decoding_rows": 0,
            "cancelled_rows": 0,
            "materialize_failures": 0,
        }

    # ------------------------------------------------------------------ mixtures -> z

    def z_of(self, ref: MixtureRef, *, internal: bool = False) -> dict[str, torch.Tensor] | torch.Tensor | None:
        """The adapter state of a mixture (cached): SVF z' = Σ α_k z_k per module, LoRA one weight per adapter (K,);
        None for the base model. Requests cannot name the classifier expert (`internal` is for pass 1)."""
        if ref.is_base:
            return None
        with self._lock:
            return self._z_of(ref, internal)

    def _z_of(self, ref: MixtureRef, internal: bool) -> dict[str, torch.Tensor]:
        unknown = [n for n in ref.experts if n not in self.experts or (n == CLASSIFIER and not internal)]
        if unknown:
            valid = sorted(n for n in self.experts if n != CLASSIFIER)
            raise not_found(f"unknown expert {unknown[0]!r}; valid experts: {', '.join(valid)}")
        if ref.key in self._z_cache:
            self._z_cache.move_to_end(ref.key)
            return self._z_cache[ref.key]
        alpha = [list(a) if isinstance(a, tuple) else a for a in ref.alpha]
        if self.lora:
            if any(isinstance(a, list) for a in alpha):
                raise bad_request(
                    "LoRA experts are mixed with one weight per adapter, not per module", param="t2ray.weights"
                )
            try:
                weights = alpha_matrix(alpha, len(alpha))  # finite, >= 0, not all zero
            except ExpertError as err:
                raise bad_request(str(err), param="t2ray.weights") from None
            z = torch.zeros(len(self.column), device=self.device)
            z[[self.column[n] for n in ref.experts]] = weights.to(z.device)
        else:
            experts = [self.experts[n] for n in ref.experts]
            try:
                z = experts[0].z() if len(experts) == 1 and alpha == [1.0] else mix_z(experts, alpha)
            except ExpertError as err:
                raise bad_request(str(err), param="t2ray.weights") from None
            z = {m: v.detach().to(self.ones[m].device) for m, v in z.items()}
        self._z_cache[ref.key] = z
        if len(self._z_cache) > self._z_cache_size:
            self._z_cache.popitem(last=False)
        return z

    def note_request(self, ref: MixtureRef) -> None:
        if not ref.is_base:
            with self._lock:
                self._hits[ref.key] = self._hits.pop(ref.key, 0) + 1
                if len(self._hits) > 4 * self._z_cache_size:  # forget mixtures not seen for a long while
                    self._hits.pop(next(iter(self._hits)))

    def should_materialize(self, key: tuple, tokens: int | None = None) -> bool:
        """Mode auto: a kept W', or a mixture requested `materialize_after` times. Building one into a full LRU
        evicts another hot mixture (several hot experts and rows of each joining: W' after W' built for a few steps
        each), so then only for a batch with `tokens` left to run that pay for the build: about max(m, n) tokens of
        the factored path (SPEC §3)."""
        if self.mode == "factored" or self.lora:
            return False
        if self.mode == "materialized":
            return True
        if self.lru_size == 0:
            return False
        if key in self._weights:
            return True
        if self._hits.get(key, 0) < self.materialize_after:
            return False
        full = len(self._weights) >= self.lru_size
        return not full or tokens is None or tokens >= self.build_tokens

    # ------------------------------------------------------------------ model states

    def _set(self, z) -> None:
        """The model's adapter state: None = the base model; SVF z per module, or LoRA weights (K,) / (B, K)."""
        if self.lora:
            from t2ray.lora.layer import set_lora_weights

            set_lora_weights(self.model, z)
        else:
            set_z(self.model, z)

    def use_base(self) -> None:
        if self._active != ("base",):
            self._set(None)
            self._active = ("base",)

    def use_factored(self, z, token: Any) -> None:
        """SVF: z per module, (r,) for every row alike or (B, r) for one z per row; LoRA: weights (K,) or (B, K)."""
        if self._active != ("factored", token):
            if not self.lora:
                set_mode(self.model, "factored")
            self._set(z)
            self._active = ("factored", token)

    def stack_rows(self, zs: list) -> Any:
        """One adapter state per row (None: the base model) as a batch state."""
        if self.lora:
            return torch.stack([z if z is not None else torch.zeros(len(self.column), device=self.device) for z in zs])
        modules = [m for m in self.layers if any(z is not None and m in z for z in zs)]
        return {m: torch.stack([z[m] if z is not None and m in z else self.ones[m] for z in zs]) for m in modules}

    def entry_bytes(self, z: dict[str, torch.Tensor]) -> int:
        """What one materialised mixture holds: a copy of every adapted matrix."""
        return sum(
            layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
            for name, layer in self.layers.items()
            if name in z
        )

    def _make_room(self, nbytes: int) -> bool:
        """Evict (least recently used first) BEFORE a build, so a new W' never sits beside a full LRU; False when
        the entry cannot be kept at all (no LRU, or larger than the byte budget)."""
        if self.lru_size == 0 or (self.lru_bytes is not None and nbytes > self.lru_bytes):
            self._weights.clear()
            return False
        held = nbytes * len(self._weights)  # entries of one library are the same size (the experts' modules)
        while self._weights and (
            len(self._weights) >= self.lru_size or (self.lru_bytes is not None and held + nbytes > self.lru_bytes)
        ):
            self._weights.popitem(last=False)
            held -= nbytes
        return True

    def use_materialized(self, key: tuple, z: dict[str, torch.Tensor]) -> bool:
        """W' for this mixture, from the LRU or built now (and kept when the budget allows). False when building
        ran out of memory: the LRU is emptied and the model left in factored mode for this mixture."""
        if self._active == ("materialized", key):
            return True
        entry = self._weights.get(key)
        if entry is None:
            keep = self._make_room(self.entry_bytes(z))
            set_mode(self.model, "materialized")
            try:
                set_z(self.model, z)
                entry = {name: layer.materialized_state() for name, layer in self.layers.items() if name in z}
            except (MemoryError, torch.OutOfMemoryError):
                self._weights.clear()
                set_z(self.model, None)  # drop the half-built W'
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.stats["materialize_failures"] += 1
                self._active = None
                self.use_factored(z, key)
                return False
            self.stats["materialized_builds"] += 1
            if keep:
                self._weights[key] = entry
        else:
            set_mode(self.model, "materialized")
            self._weights.move_to_end(key)
            for name, layer in self.layers.items():
                if name in entry:
                    layer.enabled = True
                    layer.restore_materialized(entry[name])  # z and its W', no rebuild
                else:
                    layer.enabled = False
                    layer.set_z(None)
        self._active = ("materialized", key)
        return True

    def invalidate(self) -> None:
        self._active = None

    # ------------------------------------------------------------------ requests

    def encode(self, request: GenRequest) -> list[int]:
        tok = self.tokenizer
        if request.messages is not None:
            try:
                text = render(tok, request.messages)
            except Exception as err:  # the chat template refuses some role sequences
                raise bad_request(
                    f"messages cannot be rendered with the model's chat template: {err}", param="messages"
                ) from None
            ids = tok(text, add_special_tokens=False).input_ids
        else:
            ids = tok(request.prompt).input_ids
            if not ids:
                ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        if len(ids) + request.max_tokens > self.context:
            err = PromptTooLongError(
                f"the prompt has {len(ids)} tokens; with max_tokens={request.max_tokens} it "
                f"exceeds the model's context of {self.context} tokens"
            )
            raise bad_request(
                str(err), param="messages" if request.messages is not None else "prompt", code="context_length_exceeded"
            )
        return ids

    def prepare(self, request: GenRequest) -> GenItem:
        ids = self.encode(request)
        z = self.z_of(request.mixture)
        self.note_request(request.mixture)
        item = GenItem(request, ids, z)
        if request.temperature >= GREEDY_BELOW:
            item.generator = torch.Generator(device=self.device)  # where the logits it samples live
            item.generator.manual_seed(
                request.seed if request.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            )
        return item

    def check_classifiable(self, question: str) -> None:
        n = len(classification_ids(self.tokenizer, question))
        if n + 1 > self.context:
            raise bad_request(
                f"the query is too long to classify: {n} tokens with the classification prompt, the "
                f"model's context is {self.context}",
                param="messages",
                code="context_length_exceeded",
            )

    @torch.no_grad()
    def classify(
        self, questions: list[str], *, use_classifier: bool, mode: str = "score", batch_size: int = 32
    ) -> list[str]:
        """Pass 1: code | math | reasoning | other per question, by the base model or the classifier expert.
        Score mode reuses the KV cache of the classification prompt's shared prefix (see PrefixScorer)."""
        if use_classifier:
            if CLASSIFIER not in self.experts:
                raise bad_request("the classifier strategy needs classifier_expert in the serve config")
            ref = MixtureRef("classifier", (CLASSIFIER,), (1.0,))
            z = self.z_of(ref, internal=True)
            self.note_request(ref)
            if self.should_materialize(ref.key):
                self.use_materialized(ref.key, z)
            else:
                self.use_factored(z, ref.key)
        else:
            self.use_base()
        if mode != "score":
            return classify(self.model, self.tokenizer, questions, mode=mode, batch_size=batch_size)
        if self._scorer is None:
            self._scorer = PrefixScorer(self.model, self.tokenizer)
        return self._scorer.classify(questions, state=CLASSIFIER if use_classifier else "base")


class DecodeBatch:
    """Step-wise generation for a batch of prepared items (left padding, KV cache, rows dropped as they end, rows of
    another batch merged in)."""

    def __init__(self, lib: ExpertLibrary, items: list[GenItem]):
        self.lib, self.items = lib, list(items)
        self.active = list(range(len(items)))
        now = time.perf_counter()
        for it in items:
            it.started = now
        self.mode: str | None = None
        self._choose_mode()
        lib.stats["decoding_rows"] += len(items)

    def _choose_mode(self) -> None:
        """For the rows decoding now: one mixture -> the base model, its materialised W' (hot) or its z; several ->
        one adapter state per row (factored)."""
        items = [self.items[row] for row in self.active]
        single = items[0].request.mixture if len({it.request.mixture.key for it in items}) == 1 else None
        if single is not None and single.is_base:
            mode = "base"
        elif single is not None and self.lib.should_materialize(single.key, self._tokens_left(items)):
            mode = "materialized"
        else:
            mode = "factored"
        self.key = single.key if single is not None else None
        self._rows_z = None if single is not None else self.lib.stack_rows([it.z for it in items])
        # what the library knows these rows' z by: an object of its own (an id() of a freed batch's dict is handed
        # to the next one, and would leave the model on the old rows' z)
        self._rows_token = object()
        if mode != self.mode:
            self.lib.stats["batches"][mode] += 1  # a stretch of steps in one mode
            self.mode = mode

    @staticmethod
    def _tokens_left(items: list[GenItem]) -> int:
        """Tokens the rows may still run: prompts not yet prefilled, answers up to max_tokens."""
        return sum(
            it.request.max_tokens - len(it.generated) + (0 if it.generated else len(it.prompt_ids)) for it in items
        )

    def _activate(self) -> None:
        z = self.items[self.active[0]].z
        if self.mode == "base":
            self.lib.use_base()
        elif self.mode == "materialized":
            if not self.lib.use_materialized(self.key, z):
                self.mode = "factored"  # out of memory for its W': this batch decodes factored
        elif self._rows_z is None:
            self.lib.use_factored(z, self.key)
        else:
            self.lib.use_factored(self._rows_z, self._rows_token)

    def _state(self, item: GenItem) -> tuple:
        """What a row's keys and values depend on besides its tokens: the weights it decodes with."""
        return ("base",) if self.mode == "base" else (self.mode, item.request.mixture.key)

    @torch.no_grad()
    def prefill(self) -> None:
        prompts = [it.prompt_ids for it in self.items]
        budget = max(len(ids) for ids in prompts) + max(it.request.max_tokens for it in self.items)
        self.decoder = new_decoder(self.lib.model, len(self.items), budget)
        self._activate()
        states = [self._state(it) for it in self.items]
        logits, skip = prefill_prompts(
            self.decoder, prompts, self.lib.tokenizer.pad_token_id, self.lib.device, self.lib.prefix_cache, states
        )
        self.logits = logits.float()
        self.decoder.require_plain_cache()  # refused at the first request, not when its first row retires
        self.next_pos = torch.tensor([len(p) for p in prompts], device=self.lib.device)
        self.lib.stats["prompt_tokens"] += sum(map(len, prompts))
        self.lib.stats["prefix_cached_tokens"] += skip * len(prompts)
        for it in self.items:
            it.cached_tokens = skip

    def _pick(self) -> torch.Tensor:
        drawn = [j for j, row in enumerate(self.active) if self.items[row].request.temperature >= GREEDY_BELOW]
        if len(drawn) < len(self.active):
            tokens = greedy(self.logits)  # the greedy rows' (the drawn ones are overwritten below)
        else:  # every row samples: no greedy pick to make
            tokens = torch.empty(len(drawn), dtype=torch.long, device=self.logits.device)
        if drawn:
            items = [self.items[self.active[j]] for j in drawn]
            tokens[drawn] = sample(
                self.logits[drawn],
                torch.tensor([it.request.temperature for it in items]),
                torch.tensor([it.request.top_p for it in items]),
                torch.cat([torch.rand(1, generator=it.generator, device=self.logits.device) for it in items]),
            )
        return tokens

    def _new_text(self, it: GenItem) -> str:
        """The text the latest token adds, decoding only the last few tokens (re-decoding everything each step was
        O(n²) in the answer's length). A token that ends inside a UTF-8 character waits for the rest of it."""
        tok = self.lib.tokenizer
        ids = it.generated if it.generated[-1] not in self.lib.eos else it.generated[:-1]
        before = tok.decode(ids[it.prefix_offset : it.read_offset], skip_special_tokens=True)
        after = tok.decode(ids[it.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and (not after.endswith("\ufffd") or it.finish_reason is not None):
            it.prefix_offset, it.read_offset = it.read_offset, len(ids)
            return after[len(before) :]
        return ""

    def _event(self, row: int) -> dict[str, Any]:
        it = self.items[row]
        it.text += self._new_text(it)
        text = it.text
        stops = it.request.stop
        if stops:
            hits = [i for i in (text.find(s, max(0, it.emitted - len(s))) for s in stops) if i >= 0]
            if hits:
                text, it.finish_reason = text[: min(hits)], "stop"
        end = len(text)
        if it.finish_reason is None and stops:
            end -= max(len(s) for s in stops) - 1  # a stop string may be starting
        delta = text[it.emitted : max(end, it.emitted)]
        it.emitted = max(end, it.emitted)
        event = {"text": delta, "finish_reason": it.finish_reason}
        if it.finish_reason is not None:
            now = time.perf_counter()
            event.update(
                prompt_tokens=len(it.prompt_ids),
                cached_tokens=it.cached_tokens,
                completion_tokens=len(it.generated),
                queue_ms=1000 * (it.started - it.enqueued),
                generate_ms=1000 * (now - it.started),
                batch_size=round(it.rows_decoding / len(it.generated), 1),
                mode=self.mode,
            )
        return event

    @torch.no_grad()
    def step(self) -> list[dict[str, Any] | None]:
        """One token for every active row; an event per row (None for rows that had finished before)."""
        events: list[dict[str, Any] | None] = [None] * len(self.items)
        tokens = self._pick()
        keep = []
        for j, row in enumerate(self.active):
            it = self.items[row]
            if it.cancelled:  # nobody reads this row any more: it leaves the batch (and its KV cache) now
                it.finish_reason = "cancelled"
                self.lib.stats["cancelled_rows"] += 1
                continue
            token = int(tokens[j])
            it.generated.append(token)
            it.rows_decoding += len(self.active)
            if token in self.lib.eos and not it.request.ignore_eos:
                it.finish_reason = "stop"
            elif len(it.generated) >= it.request.max_tokens:
                it.finish_reason = "length"
            events[row] = self._event(row)
            if it.finish_reason is None:
                keep.append(j)
        self.lib.stats["decoding_rows"] -= len(self.active) - len(keep)
        if keep:
            self._advance(tokens, keep)
        else:
            self.active = []
        return events

    def merge(self, other: DecodeBatch) -> None:
        """The rows of `other` (prefilled, not stepped) join this batch at its next step: KV caches and masks
        left-padded to one length (positions are explicit, so padding changes nothing), their first logits kept for
        the next pick, the mode chosen again for the union."""
        if self.done:
            raise ValueError("merge into a finished batch: start from the joining batch instead")
        self.decoder.merge(other.decoder)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits])
        offset = len(self.items)
        self.items += other.items
        self.active += [offset + row for row in other.active]
        other.active = []  # its rows (and their decoding count) now belong to this batch
        self._choose_mode()

    def _advance(self, tokens: torch.Tensor, keep: list[int]) -> None:
        device = self.lib.device
        if len(keep) < len(self.active):  # rows finished: shrink the batch (cache, mask, positions), re-choose the mode
            index = torch.tensor(keep, device=device)
            self.decoder.select(index)
            self.decoder.trim()  # the leading columns that were only a finished row's
            self.next_pos, tokens = self.next_pos[index], tokens[index]
            self.active = [self.active[j] for j in keep]
            self._choose_mode()
        self._activate()
        self.logits = self.decoder.step(tokens.to(device), self.next_pos[:, None]).float()
        self.next_pos = self.next_pos + 1

    @property
    def done(self) -> bool:
        return not self.active

    def close(self) -> None:
        """Stop decoding: rows still active (every reader gone) leave; the library's counts stay true."""
        self.lib.stats["decoding_rows"] -= len(self.active)
        self.lib.stats["cancelled_rows"] += len(self.active)
        for row in self.active:
            self.items[row].finish_reason = self.items[row].finish_reason or "cancelled"
        self.active = []


def run_to_completion(lib: ExpertLibrary, requests: list[GenRequest]) -> list[dict[str, Any]]:
    """Generate for `requests` as one batch in this thread (tests, benchmarks): text + the final event."""
    items = [lib.prepare(r) for r in requests]
    batch = DecodeBatch(lib, items)
    batch.prefill()
    texts, finals = [""] * len(items), [None] * len(items)
    while not batch.done:
        for i, ev in enumerate(batch.step()):
            if ev is not None:
                texts[i] += ev["text"]
                if ev["finish_reason"] is not None:
                    finals[i] = ev
    return [{**f, "text": t} for f, t in zip(finals, texts, strict=True)]


__all__ = [
    "CLASSIFIER",
    "DecodeBatch",
    "ExpertLibrary",
    "GenItem",
    "GenRequest",
    "MixtureRef",
    "RequestError",
    "run_to_completion",
]
