"""CUDA graphs of the KV decoder's step: one eager step at small batch sizes is ~1,000 kernel launches and the
Python between them (16 tokens/s at B = 1 on an H200: RESULTS gpu_check), a replayed graph is one launch.

A graph replays the kernels it captured on the very tensors it captured: the step's inputs are copied into buffers
it owns, and it reads the cache and the adapters' tensors where they were. So a graph is kept for one batch's cache
(the decoder clears them when its cache becomes other tensors: rows retired or merged, the cache grown) and one
*adapter state*: every module that can change between steps (an SVF layer's z, its kept W' or d; a LoRA mixture's
weights) says which tensors it reads through `decode_state()`; when any of them is another tensor, or was edited in
place, the graphs are dropped and captured again. A state is captured only once it has held for two steps, so
token-level routing that changes z at every step runs eagerly instead of capturing at every step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens, positions, slot) -> logits


@dataclass
class GraphStats:
    """This process's captures and replays (bench/gpu_check.py prints them)."""

    captures: int = 0
    capture_seconds: float = 0.0
    replays: int = 0
    eager_steps: int = 0
    failures: list[str] = field(default_factory=list)


STATS = GraphStats()


def stateful_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose state a step reads and that can change between steps (they have `decode_state`)."""
    return [m for m in model.modules() if hasattr(m, "decode_state")]


def adapter_state(modules: list[torch.nn.Module]) -> tuple[tuple, list[torch.Tensor]]:
    """(signature, tensors) of what the step reads that can change between steps. The signature names each tensor by
    identity and version; the caller keeps `tensors` alive, so that no new tensor can take a kept one's identity."""
    signature, held = [], []
    for module in modules:
        for item in module.decode_state():
            if isinstance(item, torch.Tensor):
                held.append(item)
                signature.append((id(item), None if item.is_inference() else item._version))
            else:
                signature.append(item)
    return tuple(signature), held


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    positions: torch.Tensor
    slot: torch.Tensor
    logits: torch.Tensor


class StepGraphs:
    """One decoder's captured steps, one per attention window, for the current adapter state."""

    def __init__(self, model: torch.nn.Module):
        self.modules = stateful_modules(model)  # looked up once: a decoder lives for one batch
        self.graphs: dict[int, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time
        self.stream = torch.cuda.Stream()  # warm-ups and captures (a shared pool wants one capture stream)
        self.signature: tuple | None = None
        self.held: list[torch.Tensor] = []
        self.off = False  # a capture failed: eager from then on

    def clear(self) -> None:
        self.graphs.clear()

    def step(self, window: int, run: Step, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """The step's logits: a replay of the graph for (window, adapter state), else `run` eagerly (capturing it
        for the next steps once the state is steady)."""
        signature, held = adapter_state(self.modules)
        steady = signature == self.signature  # the adapter state held since the previous step
        if not steady:
            self.graphs.clear()
            self.signature, self.held = signature, held
        graph = self.graphs.get(window)
        if graph is not None:
            graph.tokens.copy_(tokens)
            graph.positions.copy_(positions)
            graph.slot.fill_(slot)
            graph.graph.replay()
            STATS.replays += 1
            return graph.logits.clone()  # the next replay overwrites its output
        inputs = (tokens.clone(), positions.clone(), torch.tensor([slot], device=tokens.device))
        logits = self._warm_up(run, inputs)
        # captured only when the state the step ran on held since the step before and the step itself left it
        # (a W' or d built inside it would be captured half-built)
        if steady and not self.off and adapter_state(self.modules)[0] == signature:
            self._capture(window, run, inputs)
        STATS.eager_steps += 1
        return logits

    def _warm_up(self, run: Step, inputs) -> torch.Tensor:
        """The eager step on a side stream, as CUDA's capture rules ask (lazy kernel and library set-up happens
        outside the capture); it writes the same keys and values the graph will, and its logits are this step's."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            logits = run(*inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        logits.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
        return logits

    @contextmanager
    def _capturing(self, graph: torch.cuda.CUDAGraph):
        """torch.cuda.graph's capture without its synchronize and empty_cache, which hand the allocator's cached
        blocks back to the driver at every capture (a server captures again whenever its batch changes).
        thread_local: a server's other threads may use CUDA meanwhile (the default errors on any thread's call)."""
        self.stream.synchronize()  # the warm-up done: the capture starts on an idle stream
        with torch.cuda.stream(self.stream):
            graph.capture_begin(self.pool, capture_error_mode="thread_local")
            try:
                yield
            finally:
                graph.capture_end()

    def _capture(self, window: int, run: Step, inputs) -> None:
        began = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with self._capturing(graph):
                logits = run(*inputs)
        except Exception as err:  # an op the graph cannot hold: the step runs eagerly, as before
            self.off = True
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            STATS.failures.append(reason)
            logging.getLogger("t2ray").warning("CUDA graphs off for this batch (the step runs eagerly): %s", reason)
            return
        self.graphs[window] = _Graph(graph, *inputs, logits)
        STATS.captures += 1
        STATS.capture_seconds += time.perf_counter() - began
