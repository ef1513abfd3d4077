"""The Ray Serve application: a ``Dispatcher`` ingress (OpenAI-compatible HTTP, pass 1) in front of
``ExpertModel`` replicas (pass 2), and ``build_app(args)``, the builder named by the Serve config's
``import_path: t2ray.serve.app:build_app``.

    client ──HTTP──▶ Dispatcher ──handle──▶ ExpertModel replica × N
                     auth, schema,          base model + every expert loaded once;
                     model → mixture        one decode loop: requests join the running
                     (pass 1: fixed,        batch at the next step; rows with different
                     prompt, classifier,    mixtures in one forward (z per row), a hot
                     token)                 single mixture from an LRU of materialised
                                            W'; classify (pass 1 forward), check_health
"""

import asyncio
import hmac
import importlib
import logging
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2ray.console import ray_log_options
from t2ray.ray_auth import enable_token_auth
from t2ray.serve.config import IMPORT_PATH, ReplicaSection, ServeArgs, read_serve_config
from t2ray.serve.engine import DecodeBatch, ExpertLibrary, GenItem, GenRequest, MixtureRef, replica_engine
from t2ray.serve.errors import RequestError, bad_request, not_found
from t2ray.serve.schema import (
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    parse_body,
    sse,
    usage,
)

logger = logging.getLogger("ray.serve")


def _replica_gone_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError

    errors: list[type[BaseException]] = [RayActorError]
    try:
        from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

        errors += [DeploymentUnavailableError, ReplicaUnavailableError]
    except ImportError:  # older Ray
        pass
    return tuple(errors)


REPLICA_GONE = _replica_gone_errors()
try:
    from ray.serve.exceptions import BackPressureError

    BACKPRESSURE: tuple[type[BaseException], ...] = (BackPressureError,)
except ImportError:  # older Ray
    BACKPRESSURE = ()
INTERNAL_ERROR = RequestError(500, "internal error; the server log has the details", type="server_error")


def token_routing_available() -> str | None:
    """None when token-level routing can be served, else why not."""
    try:
        module = importlib.import_module("t2ray.adapt.token_routing")
    except Exception as err:  # not written yet, or broken
        return f"t2ray.adapt.token_routing cannot be imported ({type(err).__name__}: {err})"
    missing = [n for n in ("generate_routed", "Router", "SVFMixer") if not hasattr(module, n)]
    return f"t2ray.adapt.token_routing lacks {', '.join(missing)}" if missing else None


# ============================================================================ pass 2: the model replicas


@serve.deployment(name="ExpertModel")
class ExpertModel:
    """Base model + SVF factors + every expert, loaded once; any mixture per request, batched."""

    def __init__(
        self, engine: dict[str, Any], batching: dict[str, Any], routing: dict[str, Any], public_experts: list[str]
    ):
        import ray
        import torch

        threads = batching.get("torch_threads") or max(
            1, int(round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        )
        torch.set_num_threads(threads)
        self.lib = ExpertLibrary(**replica_engine(engine, ray.get_gpu_ids()))  # split over its GPUs when several
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="t2ray-model")  # the model is used by one thread
        self.classify_mode = routing.pop("classify_mode", "score")
        self.routing = routing
        self.public_experts = public_experts
        self._router = None
        self._query_router = None
        self._fatal: str | None = None
        self.max_batch_size, self.prefill_tokens = batching["max_batch_size"], batching["prefill_tokens_per_step"]
        self._waiting: deque[tuple[GenItem, asyncio.Queue]] = deque()  # admitted first come, first served
        self._readers: dict[int, asyncio.Queue] = {}  # id(item) -> where its events go
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._classify_batch.set_max_batch_size(batching["classify_batch_size"])
        self._routed_batch.set_max_batch_size(batching["max_batch_size"])
        self._routed_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])

    async def _run(self, fn, *args, **kwargs):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args, **kwargs))
        except (MemoryError, RuntimeError) as err:
            if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
                self._fatal = f"{type(err).__name__}: {err}"  # let Serve replace this replica
            raise

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self._fatal:
            raise RuntimeError(f"replica unusable after {self._fatal}")
        if not self.lib.layers and self.lib.experts:
            raise RuntimeError("experts loaded but the model is not patched")

    async def ping(self) -> dict[str, Any]:
        return {
            "ok": True,
            "context": self.lib.context,
            "model": self.lib.model_spec,
            "stats": self.lib.stats,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": ray.get_gpu_ids(),
            "devices": sorted({str(p.device) for p in self.lib.model.parameters()}),
        }

    # ---------------------------------------------------------------- generation (pass 2)

    # Continuous batching: one decode loop per replica. A request waits only for the next step: the loop prefills
    # the waiting requests (first come, first served, within max_batch_size rows and prefill_tokens_per_step prompt
    # tokens), merges them into the running batch, and steps every row once; rows leave as they finish.
    def _admit(self, running: int) -> list[tuple[GenItem, asyncio.Queue]]:
        """The waiting requests that join at this step; their readers are registered."""
        joining, tokens = [], 0
        while self._waiting and running + len(joining) < self.max_batch_size:
            item, queue = self._waiting[0]
            if item.cancelled:  # its caller left while it waited
                self._waiting.popleft()
                continue
            if joining and tokens + len(item.prompt_ids) > self.prefill_tokens:
                break  # the rest join at a later step: a long prefill would stall every running row
            tokens += len(item.prompt_ids)
            joining.append(self._waiting.popleft())
            self._readers[id(item)] = queue
        return joining

    def _fail(self, items: list[GenItem], err: BaseException) -> None:
        """Their readers get the error (raised in `stream`, so the Dispatcher sees the replica fail)."""
        for item in items:
            queue = self._readers.pop(id(item), None)
            if queue is not None:
                queue.put_nowait(err)

    async def _prefill(self, joining: list[GenItem]) -> DecodeBatch | None:
        """The joining rows' prompts in one forward; if that fails, they fail and the running rows go on."""
        new = None
        try:
            new = await self._run(DecodeBatch, self.lib, joining)
            await self._run(new.prefill)
            return new
        except Exception as err:
            if new is not None:
                new.close()
            self._fail(joining, err)
            return None

    def _deliver(self, items: list[GenItem], events: list[dict | None]) -> None:
        """Each row's event of this step to its reader; a row that ended is unregistered (a cancelled row's reader
        has left: it gets nothing). `None`: the row had finished before this step."""
        for item, event in zip(items, events, strict=True):
            if event is None and item.finish_reason != "cancelled":
                continue
            queue = self._readers.get(id(item))
            if event is None or event["finish_reason"] is not None:
                self._readers.pop(id(item), None)
            if event is not None and queue is not None:
                queue.put_nowait(event)

    async def _decode_loop(self) -> None:
        batch: DecodeBatch | None = None
        while True:
            if batch is None and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            joining = [item for item, _ in self._admit(len(batch.active) if batch is not None else 0)]
            new = await self._prefill(joining) if joining else None
            if batch is None and new is None:
                continue
            try:
                if batch is None:
                    batch = new
                elif new is not None:
                    await self._run(batch.merge, new)
                events = await self._run(batch.step)
            except Exception as err:
                self._fail([batch.items[row] for row in batch.active] + joining, err)
                batch.close()
                batch = None
                continue
            self._deliver(batch.items, events)
            if batch.done:
                batch = None

    async def stream(self, request: GenRequest):
        """Events {text, finish_reason, ...} as tokens are generated; the first is {"error": ...} on a bad request."""
        try:
            item = self.lib.prepare(request)
        except RequestError as err:
            yield {"error": err.to_dict()}
            return
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())
        queue: asyncio.Queue = asyncio.Queue()
        self._waiting.append((item, queue))
        self._wake.set()
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event["finish_reason"] is not None:
                    return
        finally:  # ended, or the caller left (cancelled or closed): a row still decoding stops at the next step
            item.cancelled = True

    async def complete(self, request: GenRequest) -> dict[str, Any]:
        text, final = "", None
        async for event in self.stream(request):
            if "error" in event:
                return event
            text += event["text"]
            if event["finish_reason"] is not None:
                final = event
        return {**final, "text": text}

    # ---------------------------------------------------------------- pass 1: classification

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, items: list[tuple[str, bool]]) -> list[str]:
        labels: list[str | None] = [None] * len(items)
        for use_classifier in (False, True):
            rows = [i for i, (_, flag) in enumerate(items) if flag == use_classifier]
            if rows:
                got = await self._run(
                    self.lib.classify,
                    [items[i][0] for i in rows],
                    use_classifier=use_classifier,
                    mode=self.classify_mode,
                    batch_size=len(rows),
                )
                for i, label in zip(rows, got, strict=True):
                    labels[i] = label
        return labels

    async def classify(self, question: str, use_classifier: bool) -> dict[str, Any]:
        try:
            self.lib.check_classifiable(question)
            if use_classifier and "__classifier__" not in self.lib.experts:
                raise bad_request(
                    "strategy classifier needs classifier_expert in the serve config", param="t2ray.strategy"
                )
        except RequestError as err:
            return {"error": err.to_dict()}
        return {"label": await self._classify_batch((question, use_classifier))}

    # ---------------------------------------------------------------- token-level routing

    def _tasked_experts(self, what: str) -> list:
        """The public experts, each with the task its centroid comes from."""
        experts = [self.lib.experts[n] for n in self.public_experts]
        untasked = [e.name for e in experts if not e.task]
        if untasked:
            raise bad_request(
                f"{what} needs a task on every expert (for its centroid); {untasked[0]} has none",
                param="t2ray.strategy",
            )
        return experts

    def _nearest_expert(self, question: str) -> str:
        from t2ray.adapt.two_pass import query_router

        if self._query_router is None:
            experts = self._tasked_experts("nearest-centroid dispatch")
            router = query_router([e.task for e in experts], self.routing["examples_per_task"])
            self._query_router = (router, {e.task: name for e, name in zip(experts, self.public_experts, strict=True)})
        router, expert_of = self._query_router
        return expert_of[router.nearest([question])[0]]

    async def nearest(self, question: str) -> dict[str, Any]:
        """Pass 1 by nearest centroid: the expert whose training questions' mean embedding is closest."""
        try:
            self.lib.check_classifiable(question)
            return {"expert": await self._run(self._nearest_expert, question)}
        except RequestError as err:
            return {"error": err.to_dict()}

    def _routing_parts(self):
        from t2ray.adapt.token_routing import LoRAMixer, Router, SVFMixer
        from t2ray.tasks import get_task

        if self._router is None:
            experts = self._tasked_experts("token-level routing")
            router = Router.from_tasks(
                [get_task(e.task) for e in experts],
                temperature=self.routing["temperature"],
                examples_per_task=self.routing["examples_per_task"],
            )
            # the replica's library lists the public experts first (then mixture-only ones and the classifier)
            mixer = (
                LoRAMixer(self.lib.model, mixed=len(experts)) if self.lib.lora else SVFMixer(self.lib.model, experts)
            )
            self._router = (router, mixer)
        return self._router

    def _route(self, requests: list[GenRequest]) -> list[dict[str, Any]]:
        from t2ray.adapt.token_routing import generate_routed

        started = time.perf_counter()
        router, mixer = self._routing_parts()
        self.lib.invalidate()
        prompts = [r.messages if r.messages is not None else r.prompt for r in requests]
        try:
            result = generate_routed(
                self.lib.model,
                self.lib.tokenizer,
                prompts,
                mixer,
                router,
                every=self.routing["every"],
                max_new_tokens=max(r.max_tokens for r in requests),
            )
        finally:
            self.lib.invalidate()
        out = []
        for i, r in enumerate(requests):
            mask = result.completion_mask[i, : r.max_tokens]
            ids = result.completion_ids[i, : r.max_tokens][mask.bool()].tolist()
            ended = any(t in self.lib.eos for t in ids)
            text = self.lib.tokenizer.decode([t for t in ids if t not in self.lib.eos], skip_special_tokens=True)
            mean = result.weights_trace[:, i].mean(0).tolist()
            out.append(
                {
                    "text": text,
                    "finish_reason": "stop" if ended else "length",
                    "prompt_tokens": len(self.lib.encode(r)),
                    "cached_tokens": 0,  # routed generation prefills whole
                    "completion_tokens": len(ids),
                    "generate_ms": 1000 * (time.perf_counter() - started),
                    "batch_size": len(requests),
                    "mode": "token-routed",
                    "routing_steps": len(result.route_steps),
                    "weights": dict(zip(self.public_experts, mean, strict=True)),
                }
            )
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _routed_batch(self, requests: list[GenRequest]) -> list[dict[str, Any]]:
        try:
            return await self._run(self._route, requests)
        except RequestError as err:
            return [{"error": err.to_dict()}] * len(requests)

    async def routed(self, request: GenRequest) -> dict[str, Any]:
        try:
            reason = token_routing_available()
            if reason:
                raise bad_request(f"token-level routing is not available: {reason}", param="t2ray.strategy")
            self.lib.encode(request)  # context check (routed generation is greedy and ignores stop strings)
        except RequestError as err:
            return {"error": err.to_dict()}
        return await self._routed_batch(request)


# ============================================================================ pass 1 + HTTP: the dispatcher

api = FastAPI(title="t2ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(
        RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind).body(),
        status_code=exc.status_code,
    )


async def closing_stream(events, replica_stream):
    """`events`, and the replica's stream cancelled when they stop being read (the client disconnected)."""
    try:
        async for event in events:
            yield event
    finally:
        if replica_stream is not None:
            replica_stream.cancel()


def api_key(settings: dict[str, Any]) -> str:
    """The bearer token requests need ("" = none), from this node's environment, without surrounding whitespace.
    A required key that is unset or blank here is an error: never serve open because one node lacks the secret."""
    env = settings.get("api_key_env")
    key = (os.environ.get(env) or "").strip() if env else ""
    if settings["require_api_key"] and not key:
        raise RuntimeError(
            f"api key required but ${env} is unset or blank where the Dispatcher runs: set it on "
            "every node (or require_api_key: false)"
        )
    return key


@serve.deployment(name="Dispatcher")
@serve.ingress(api)
class Dispatcher:
    """OpenAI-compatible endpoint; decides each request's mixture (pass 1) and calls an ExpertModel (pass 2)."""

    def __init__(self, expert_model, settings: dict[str, Any]):
        self.replicas = expert_model
        self.s = settings
        self.api_key = api_key(settings)
        self.created = int(time.time())
        self.experts: dict[str, dict] = settings["experts"]
        self.mixtures: dict[str, dict] = settings["mixtures"]
        self.gen = settings["generation"]
        self.auto = settings["auto"]

    # ---------------------------------------------------------------- helpers

    def _check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(
                401,
                "Incorrect API key provided" if header else "Missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @staticmethod
    def _error(err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def model_ids(self) -> list[str]:
        return ["auto", "base", *self.experts, *self.mixtures]

    async def _resent(self, send, died: str):
        """`await send()`, sent again when the replica died under it (Serve starts a replacement); once the retries
        are spent, a 503 that says `died`."""
        for attempt in range(self.s["retries"] + 1):
            try:
                return await send()
            except REPLICA_GONE:
                if attempt == self.s["retries"]:
                    raise RequestError(503, died, type="server_error", code="replica_unavailable") from None
                await asyncio.sleep(0.5 * (attempt + 1))

    async def _call(self, method: str, *args):
        """A replica call, re-sent when the replica died under it."""

        async def send():
            try:
                return await getattr(self.replicas, method).remote(*args)
            except BACKPRESSURE:
                raise RequestError(
                    503,
                    "the server is overloaded (its request queue is full); retry shortly",
                    type="server_error",
                    code="server_overloaded",
                ) from None

        return await self._resent(
            send, "the model replica died and its replacement did not answer in time; retry the request"
        )

    @staticmethod
    def _raise_if_error(result: dict) -> dict:
        if "error" in result:
            raise RequestError.from_dict(result["error"])
        return result

    # ---------------------------------------------------------------- pass 1

    def _weights_ref(self, weights) -> MixtureRef:
        names = list(self.experts)
        if isinstance(weights, list):
            if len(weights) != len(names):
                raise bad_request(
                    f"t2ray.weights has {len(weights)} values; there are {len(names)} experts "
                    f"({', '.join(names)}): give one weight per expert or a name -> weight object",
                    param="t2ray.weights",
                )
            pairs = list(zip(names, weights, strict=True))
        else:
            unknown = [n for n in weights if n not in self.experts]
            if unknown:
                raise not_found(
                    f"t2ray.weights: unknown expert {unknown[0]!r}; valid experts: {', '.join(names)}",
                    param="t2ray.weights",
                    code="expert_not_found",
                )
            pairs = list(weights.items())
        pairs = [(n, float(w)) for n, w in pairs if w > 0]
        label = "mix:" + ",".join(f"{n}={w:g}" for n, w in pairs)
        return MixtureRef(label, tuple(n for n, _ in pairs), tuple(w for _, w in pairs))

    @staticmethod
    def _require(kind: str, name: str | None, known: dict, param: str) -> None:
        """A 404 that lists the valid ones unless `name` is a known `kind` (expert, mixture)."""
        if name not in known:
            raise not_found(
                f"unknown {kind} {name!r}; valid {kind}s: {', '.join(known) or '(none)'}",
                param=param,
                code=f"{kind}_not_found",
            )

    def _expert_ref(self, name: str | None, param: str) -> MixtureRef:
        self._require("expert", name, self.experts, param)
        return MixtureRef(f"expert:{name}", (name,), (1.0,))

    def _mixture_ref(self, name: str | None, param: str) -> MixtureRef:
        self._require("mixture", name, self.mixtures, param)
        m = self.mixtures[name]
        alpha = tuple(tuple(a) if isinstance(a, list) else a for a in m["alpha"])
        return MixtureRef(f"mixture:{name}", tuple(m["experts"]), alpha)

    async def _decide(self, body, question: str) -> tuple[MixtureRef | None, dict[str, Any]]:
        """The mixture for one request (None = token-level routing) and what pass 1 did."""
        if body.model not in self.model_ids() and body.model != self.s["base_id"]:
            raise not_found(f"The model {body.model!r} does not exist; valid models: {', '.join(self.model_ids())}")
        opts = body.t2ray
        info: dict[str, Any] = {}
        if opts is not None and opts.weights is not None:
            info["strategy"] = "weights"
            return self._weights_ref(opts.weights), info
        strategy = opts.strategy if opts is not None else None
        if strategy is None and opts is not None:
            strategy = "expert" if opts.expert else "mixture" if opts.mixture else None
        expert = opts.expert if opts is not None else None
        mixture = opts.mixture if opts is not None else None
        if strategy is None:
            if body.model == "auto":
                strategy, expert, mixture = self.auto["strategy"], self.auto["expert"], self.auto["mixture"]
            elif body.model in self.experts:
                strategy, expert = "expert", body.model
            elif body.model in self.mixtures:
                strategy, mixture = "mixture", body.model
            else:
                strategy = "base"
        else:  # a strategy from the body may lean on the model id for its target
            expert = expert or (body.model if body.model in self.experts else self.auto["expert"])
            mixture = mixture or (body.model if body.model in self.mixtures else self.auto["mixture"])
        info["strategy"] = strategy
        if strategy == "base":
            return MixtureRef(), info
        if strategy == "expert":
            return self._expert_ref(expert, "t2ray.expert" if opts is not None and opts.expert else "model"), info
        if strategy == "mixture":
            return self._mixture_ref(mixture, "t2ray.mixture" if opts is not None and opts.mixture else "model"), info
        if not self.experts:
            raise bad_request(f"strategy {strategy} needs experts; this server has none", param="t2ray.strategy")
        if strategy == "token":
            reason = token_routing_available()
            if reason:
                raise bad_request(f"token-level routing is not available: {reason}", param="t2ray.strategy")
            return None, info
        if strategy == "nearest":
            chosen = self._raise_if_error(await self._call("nearest", question))["expert"]
            return self._expert_ref(chosen, "model"), {**info, "expert": chosen}
        if strategy == "classifier" and not self.s["has_classifier"]:
            raise bad_request("strategy classifier needs classifier_expert in the serve config", param="t2ray.strategy")
        result = self._raise_if_error(await self._call("classify", question, strategy == "classifier"))
        category = result["label"]
        info["category"] = category
        chosen = self.s["categories"].get(category)
        return (self._expert_ref(chosen, "model") if chosen else MixtureRef()), info

    # ---------------------------------------------------------------- pass 2

    def _request_for(self, body, ref: MixtureRef | None, *, messages=None, prompt=None) -> GenRequest:
        budget = body.token_budget()
        max_tokens = self.gen["max_tokens_default"] if budget is None else budget
        if max_tokens > self.gen["max_tokens_limit"]:
            raise bad_request(
                f"max_tokens is {max_tokens}; this server allows at most {self.gen['max_tokens_limit']}",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        return GenRequest(
            mixture=ref or MixtureRef("token-routed"),
            messages=messages,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=self.gen["temperature"] if body.temperature is None else body.temperature,
            top_p=self.gen["top_p"] if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stops(),
            ignore_eos=body.ignore_eos,
        )

    def _report(self, ref: MixtureRef | None, info: dict, final: dict, pass1_ms: float, pass2_ms: float) -> dict:
        mixture = ref.report() if ref is not None else {"label": "token-routed", "weights": final.get("weights", {})}
        return {
            **info,
            "mixture": mixture,
            "timings": {
                "pass1_ms": round(pass1_ms, 2),
                "pass2_ms": round(pass2_ms, 2),
                "queue_ms": round(final.get("queue_ms", 0.0), 2),
                "generate_ms": round(final.get("generate_ms", 0.0), 2),
            },
            "batch_size": final.get("batch_size"),
            "weights_mode": final.get("mode"),
        }

    async def _one(self, body, question: str, **prompt) -> tuple[str, dict, dict]:
        """Pass 1 + pass 2 for one prompt, non-streaming: (text, final event, t2ray report)."""
        t0 = time.perf_counter()
        ref, info = await self._decide(body, question)
        request = self._request_for(body, ref, **prompt)
        t1 = time.perf_counter()
        final = self._raise_if_error(await self._call("routed" if ref is None else "complete", request))
        t2 = time.perf_counter()
        return final["text"], final, self._report(ref, info, final, 1000 * (t1 - t0), 1000 * (t2 - t1))

    async def _open_stream(self, request: GenRequest):
        """A replica stream and its first event (a request that dies before its first event is re-sent)."""

        async def send():
            stream = self.replicas.options(stream=True).stream.remote(request)
            first = await stream.__anext__()
            return stream, self._raise_if_error(first)

        return await self._resent(send, "the model replica died; retry the request")

    async def _stream(self, body, question: str, chat: bool, **prompt):
        t0 = time.perf_counter()
        ref, info = await self._decide(body, question)
        request = self._request_for(body, ref, **prompt)
        t1 = time.perf_counter()
        rid, model = new_id("chatcmpl" if chat else "cmpl"), body.model
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if ref is None:  # token-level routing answers in one piece
            final = self._raise_if_error(await self._call("routed", request))
            events, stream = [final], None
        else:
            stream, first = await self._open_stream(request)
            events = [first]

        async def sse_events():
            if chat:
                yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            final = None
            try:

                async def all_events():
                    for e in events:
                        yield e
                    if stream is not None and events[-1]["finish_reason"] is None:
                        async for e in stream:
                            yield e

                async for event in closing_stream(all_events(), stream):
                    if event["text"]:
                        yield sse(
                            chat_chunk(rid, model, {"content": event["text"]})
                            if chat
                            else completion_chunk(rid, model, event["text"])
                        )
                    if event["finish_reason"] is not None:
                        final = event
                report = self._report(ref, info, final, 1000 * (t1 - t0), 1000 * (time.perf_counter() - t1))
                yield sse(
                    chat_chunk(rid, model, {}, final["finish_reason"], t2ray=report)
                    if chat
                    else completion_chunk(rid, model, "", final["finish_reason"], t2ray=report)
                )
                if include_usage:
                    chunk = chat_chunk(rid, model, {}) if chat else completion_chunk(rid, model, "")
                    yield sse({**chunk, "choices": [], "usage": usage([final])})
            except RequestError as err:
                yield sse(err.body())
            except Exception:  # the client already has a 200: report the failure in the stream, details in the log
                logger.exception("stream failed")
                yield sse(INTERNAL_ERROR.body())
            yield sse("[DONE]")

        return StreamingResponse(sse_events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _handle(self, request: Request, kind: type, chat: bool):
        try:
            self._check_auth(request)
            limit = self.gen["max_body_bytes"]
            if int(request.headers.get("content-length") or 0) > limit:
                raise RequestError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
            raw = await request.body()
            if len(raw) > limit:
                raise RequestError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
            body = parse_body(raw, kind)
            if chat:
                messages = body.plain_messages()
                if body.stream:
                    return await self._stream(body, body.question(), True, messages=messages)
                text, final, report = await self._in_time(self._one(body, body.question(), messages=messages))
                return JSONResponse(chat_response(new_id("chatcmpl"), body.model, text, final, report))
            prompts = body.prompts()
            if len(prompts) > self.gen["max_prompts"]:
                raise bad_request(
                    f"prompt has {len(prompts)} entries; at most {self.gen['max_prompts']}", param="prompt"
                )
            if body.stream:
                if len(prompts) > 1:
                    raise bad_request("stream: true takes a single prompt", param="prompt")
                return await self._stream(body, prompts[0], False, prompt=prompts[0])
            results = await self._in_time(asyncio.gather(*(self._one(body, p, prompt=p) for p in prompts)))
            return JSONResponse(completion_response(new_id("cmpl"), body.model, list(results)))
        except RequestError as err:
            return self._error(err)
        except Exception:  # keep serving: a 500 in OpenAI's shape; the details (remote tracebacks) go to the log
            logger.exception("request failed")
            return self._error(INTERNAL_ERROR)

    async def _in_time(self, work):
        try:
            return await asyncio.wait_for(work, timeout=self.gen["request_timeout_s"])
        except asyncio.TimeoutError:
            raise RequestError(
                504,
                f"no answer within {self.gen['request_timeout_s']:g} s; retry, or ask for fewer tokens",
                type="server_error",
                code="timeout",
            ) from None

    # ---------------------------------------------------------------- routes

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, ChatRequest, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, CompletionRequest, chat=False)

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._check_auth(request)
        except RequestError as err:
            return self._error(err)

        def entry(model_id: str, **meta) -> dict:
            return {"id": model_id, "object": "model", "created": self.created, "owned_by": "t2ray", "t2ray": meta}

        data = [
            entry("auto", kind="auto", strategy=self.auto["strategy"]),
            entry("base", kind="base", model=self.s["base_id"]),
        ]
        data += [entry(n, kind="expert", task=e["task"], category=e["category"]) for n, e in self.experts.items()]
        data += [entry(n, kind="mixture", weights=m["report"]) for n, m in self.mixtures.items()]
        return {"object": "list", "data": data}

    @api.get("/healthz")
    async def healthz(self):
        """Healthy or not, nothing more: it needs no key, so it names no model, path or error."""
        try:
            await asyncio.wait_for(self._call("ping"), timeout=30)
            return {"status": "ok"}
        except Exception:
            logger.exception("health check: no model replica answered")
            return JSONResponse({"status": "unhealthy"}, status_code=503)


# ============================================================================ building the application


def plan(cfg: ServeArgs) -> tuple[dict, dict]:
    """(engine kwargs for the replicas, settings for the dispatcher) from validated, resolved args."""
    from t2ray.adapt.two_pass import expert_category
    from t2ray.library import library_kind, load_mixture, read_library

    engine_experts = dict(cfg.experts)
    meta = {}
    for name, expert in zip(
        cfg.experts, read_library(list(cfg.experts.values())), strict=True
    ):  # validated (clear errors)
        meta[name] = {"task": expert.task, "category": expert_category(expert)}
    mixtures = {}
    by_path = {str(Path(p).resolve()): n for n, p in cfg.experts.items()}
    for name, mix in cfg.mixtures.items():
        if mix.weights is not None:
            pairs = [(n, w) for n, w in mix.weights.items() if w > 0]
            names, alpha = [n for n, _ in pairs], [w for _, w in pairs]
            report = dict(pairs)
        else:
            spec, _ = load_mixture(mix.file)
            names = []
            for k, path in enumerate(spec.experts):
                known = by_path.get(str(Path(path).resolve()))
                if known is None:
                    known = f"{name}#{k}"  # an expert only this mixture uses: loaded, not listed
                    engine_experts[known] = str(Path(path).resolve())
                names.append(known)
            alpha = spec.alpha
            report = {n: a for n, a in zip(names, alpha, strict=True)}
        mixtures[name] = {"experts": names, "alpha": alpha, "report": report}
    library_kind([*engine_experts.values(), *([cfg.classifier_expert] if cfg.classifier_expert else [])])
    categories = {}
    for name, m in meta.items():
        if m["category"] != "other":  # SPEC §1: `other` goes to the base model unless the config says otherwise
            categories.setdefault(m["category"], name)
    categories.update(cfg.auto.categories)
    engine = {
        "model_spec": cfg.model.spec,
        "experts": engine_experts,
        "classifier": cfg.classifier_expert,
        "dtype": cfg.model.dtype,
        "device": cfg.model.device,
        "seed": cfg.model.seed,
        "allow_transfer": cfg.model.allow_transfer,
        "mode": cfg.batching.mode,
        "materialize_after": cfg.batching.materialize_after,
        "lru_size": cfg.batching.lru_size,
        "lru_bytes": cfg.batching.lru_bytes,
        "prefix_cache_bytes": cfg.batching.prefix_cache_bytes,
    }
    settings = {
        "base_id": cfg.model.spec,
        "experts": meta,
        "mixtures": mixtures,
        "categories": categories,
        "auto": cfg.auto.model_dump(),
        "generation": cfg.generation.model_dump(),
        "api_key_env": cfg.api_key_env,
        "retries": cfg.retries,
        "require_api_key": cfg.require_api_key
        if cfg.require_api_key is not None
        else bool(cfg.api_key_env and os.environ.get(cfg.api_key_env)),
        "has_classifier": cfg.classifier_expert is not None,
    }
    return engine, settings


def build_app(args: dict | ServeArgs | None = None):
    """The Serve application for `args` (the `args:` of a Serve config; see experiments/serve-smollm2.yaml)."""
    cfg = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    cfg = cfg.resolved()
    engine, settings = plan(cfg)
    routing = {**cfg.auto.routing.model_dump(), "classify_mode": cfg.auto.classify_mode}
    replica_options = cfg.expert_model.options()
    # Serve's default (5 in flight per replica) would cap every batch at 5 rows
    replica_options.setdefault("max_ongoing_requests", 4 * cfg.batching.max_batch_size)
    dispatcher_options = cfg.dispatcher.options()
    dispatcher_options.setdefault("max_ongoing_requests", 512)  # it only awaits replicas
    replicas = ExpertModel.options(**replica_options).bind(
        engine, cfg.batching.model_dump(), routing, list(cfg.experts)
    )
    return Dispatcher.options(**dispatcher_options).bind(replicas, settings)


# ============================================================================ `t2ray serve CONFIG`

DEPLOYMENT_SECTIONS = {"ExpertModel": "expert_model", "Dispatcher": "dispatcher"}


def app_args(app: dict) -> dict:
    """A t2ray application's args with the config's `deployments:` overrides folded in (what `serve run`
    would apply to those deployments)."""
    args = dict(app.get("args") or {})
    for override in app.get("deployments") or []:
        section = DEPLOYMENT_SECTIONS.get(override.get("name"))
        if section is None:
            raise ValueError(
                f"deployments: unknown deployment {override.get('name')!r}; "
                f"t2ray's are {', '.join(DEPLOYMENT_SECTIONS)}"
            )
        merged = dict(args.get(section) or {})
        merged.update({k: v for k, v in override.items() if k != "name"})
        args[section] = merged
    return args


RESOURCE_OPTIONS = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}  # Ray resource -> its actor option


def replica_needs(section: ReplicaSection) -> dict[str, float]:
    """The Ray resources one replica of a deployment asks for (those its ray_actor_options name)."""
    options = section.ray_actor_options
    needs = {resource: options.get(option) for resource, option in RESOURCE_OPTIONS.items()}
    needs.update(options.get("resources") or {})
    return {resource: float(amount) for resource, amount in needs.items() if amount}


def unplaceable(section: str, needs: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why no node (`nodes`: each one's total resources) can ever hold one replica; None when one can. Serve itself
    would only wait, forever, for a node that has it."""
    if any(all(node.get(r, 0) >= amount for r, amount in needs.items()) for node in nodes):
        return None
    for resource, amount in needs.items():
        most = max((node.get(resource, 0) for node in nodes), default=0)
        if most < amount:
            key = RESOURCE_OPTIONS.get(resource, f"resources.{resource}")
            return (
                f"{section}: a replica asks ray_actor_options.{key} = {amount:g}, but no node of this Ray cluster "
                f"has {amount:g} {resource} (the most on one node: {most:g}); Serve would wait forever: lower it or "
                "add a node that has it"
            )
    asks = ", ".join(f"{RESOURCE_OPTIONS.get(r, r)} = {a:g}" for r, a in needs.items())
    return f"{section}: a replica asks {asks}, but no node of this Ray cluster has all of these at once"


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each live node, and of each node type the cluster's autoscaler may still start."""
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    from ray._private.state import state  # the autoscaler's node types (KubeRay, `ray up`); None on a local cluster

    config = state.get_cluster_config()
    nodes += [dict(group.resources) for group in (config.node_group_configs if config else ()) if group.max_count]
    return nodes


def check_placement(apps: list[tuple[dict, ServeArgs]]) -> None:
    """Every t2ray deployment's replica fits on some node of the connected cluster, or a clear error naming what is
    missing (before anything is deployed)."""
    nodes = cluster_nodes()
    for app, args in apps:
        for section in ("expert_model", "dispatcher"):
            why = unplaceable(f"{app.get('name', 'default')}: {section}", replica_needs(getattr(args, section)), nodes)
            if why:
                raise ValueError(why)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_key_off_loopback(args: ServeArgs, host: str, name: str) -> ServeArgs:
    """An app served beyond this machine needs an API key: Ray Serve's HTTP proxy checks none itself. Refuses to
    start without one unless the config says `require_api_key: false`; with one, every Dispatcher requires it."""
    if host in LOOPBACK or host.startswith("127.") or args.require_api_key is False:
        return args
    env = args.api_key_env
    if not env or not (os.environ.get(env) or "").strip():
        raise ValueError(
            f"application {name!r} would serve on {host} (reachable from the network) without an API key: "
            f"set {env or 'T2RAY_API_KEY'} (e.g. `export {env or 'T2RAY_API_KEY'}=$(openssl rand -hex 32)`"
            f"{'' if env else ' and api_key_env: T2RAY_API_KEY'}), bind http_options.host 127.0.0.1, or say "
            "`require_api_key: false` in its args to serve it open on purpose"
        )
    return args.model_copy(update={"require_api_key": True})


def run_config(
    path: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    host: str | None = None,
    blocking: bool = True,
    on_ready=None,
) -> dict:
    """Validate a Serve config, start (or join) Ray and Serve, deploy its applications; with `blocking`, serve
    until Ctrl-C / SIGTERM, then shut Serve (and a Ray started here) down. Returns where it serves."""
    import ray

    config = read_serve_config(path)
    http = {"host": "127.0.0.1", "port": 8000, **(config.get("http_options") or {}), **({"host": host} if host else {})}
    apps = []
    for app in config["applications"]:
        if app["import_path"] != IMPORT_PATH:
            raise ValueError(
                f"application {app.get('name')!r}: t2ray serve runs {IMPORT_PATH} applications only; "
                "use Ray's `serve run` for others"
            )
        args = ServeArgs.model_validate(app_args(app))
        args = require_key_off_loopback(args, http["host"], app.get("name", "default"))  # before any file is read
        apps.append((app, args.resolved()))  # a missing expert fails here, early
    started_ray = not ray.is_initialized()
    if started_ray:
        enable_token_auth(create=address is None)
        ray.init(address=address, num_cpus=num_cpus if address is None else None, **ray_log_options())
    check_placement(apps)
    serve.start(http_options=http)
    routes = {}
    for app, args in apps:
        name, prefix = app.get("name", "default"), app.get("route_prefix", "/")
        serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
        routes[name] = f"http://{http['host']}:{http['port']}{'' if prefix == '/' else prefix}/v1"
    keys = sorted({a.api_key_env for _, a in apps if a.api_key_env and os.environ.get(a.api_key_env)})
    info = {
        "openai_base_url": routes,
        "auth": f"Bearer ${keys[0]}" if keys else "none (set T2RAY_API_KEY to require a token)",
    }
    if on_ready is not None:
        on_ready(info)
    if not blocking:
        return info
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return info
