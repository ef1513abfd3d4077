"""Prefix caching for the KV decoder: the keys and values of prompts' leading 16-token blocks, kept per adapter state,
so that prompts sharing a start (a chat template's system prompt, a few-shot preamble) prefill only the rest.

A block is known by a digest of the adapter state and every token up to its end (a chain, as in vLLM), so a hit
means the same tokens at the same positions under the same weights. The last prompt token is always prefilled: its
logits pick the first new token. Blocks are kept least recently used first out, within a byte budget.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

from t2ray.kv_decode import KVDecoder, left_padded

BLOCK = 16  # tokens per cached block


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def _digests(state: Hashable, ids: Sequence[int], blocks: int) -> list[bytes]:
        chain = hashlib.blake2b(repr(state).encode(), digest_size=16)
        digests = []
        for k in range(blocks):
            chain.update(array("q", ids[k * BLOCK : (k + 1) * BLOCK]).tobytes())
            digests.append(chain.digest())  # digest() leaves the chain running
        return digests

    def cached_blocks(self, state: Hashable, ids: Sequence[int]) -> int:
        """How many of the prompt's leading blocks are cached (at most those before its last token)."""
        count = 0
        for digest in self._digests(state, ids, (len(ids) - 1) // BLOCK):
            if digest not in self._blocks:
                break
            count += 1
        return count

    def gather(
        self, states: Sequence[Hashable], prompts: Sequence[Sequence[int]], blocks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of each row's first `blocks` blocks, (layers, rows, kv_heads, blocks · BLOCK, head_dim);
        every row must have them cached (`cached_blocks`)."""
        rows = []
        for state, ids in zip(states, prompts, strict=True):
            digests = self._digests(state, ids, blocks)
            rows.append([self._blocks[d] for d in digests])
            self._touch(digests)
        keys = torch.stack([torch.cat([k for k, _ in row], 2) for row in rows], 1)
        values = torch.stack([torch.cat([v for _, v in row], 2) for row in rows], 1)
        return keys, values

    def store(self, state: Hashable, ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the full blocks of a prompt's keys and values, (layers, kv_heads, len(ids), head_dim) each."""
        digests = self._digests(state, ids, len(ids) // BLOCK)
        for k, digest in enumerate(digests):
            if digest not in self._blocks:
                block = slice(k * BLOCK, (k + 1) * BLOCK)
                pair = keys[:, :, block].clone(), values[:, :, block].clone()
                self._blocks[digest] = pair
                self.nbytes += 2 * pair[0].nbytes
        self._touch(digests)
        while self.nbytes > self.max_bytes and self._blocks:
            evicted, _ = self._blocks.popitem(last=False)[1]
            self.nbytes -= 2 * evicted.nbytes

    def _touch(self, digests: list[bytes]) -> None:
        """Used now: the last to be evicted, a prompt's first block last of all (a block is reachable only through
        the blocks before it, so the ends of chains go first)."""
        for digest in reversed(digests):
            self._blocks.move_to_end(digest)

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0


def prefill_prompts(
    decoder, prompts: list[list[int]], pad: int, device, cache: PrefixCache | None = None, states: list | None = None
) -> tuple[torch.Tensor, int]:
    """`decoder.prefill` of left-padded `prompts`: with a `cache` (KV decoder only), from its blocks where every row
    has them (`states`: each row's adapter state), then keeping each prompt's new full blocks. The logits after
    each prompt, and how many of each prompt's tokens came from the cache."""
    cache = cache if isinstance(decoder, KVDecoder) else None
    blocks = min(cache.cached_blocks(s, p) for s, p in zip(states, prompts, strict=True)) if cache else 0
    skip = blocks * BLOCK
    ids, mask = left_padded([p[skip:] for p in prompts], pad, device)
    logits = decoder.prefill(ids, mask, **({"prefix": cache.gather(states, prompts, blocks)} if skip else {}))
    if cache is not None:
        for row, (state, prompt) in enumerate(zip(states, prompts, strict=True)):
            if len(prompt) // BLOCK > blocks:  # full blocks not cached yet
                cache.store(state, prompt, *decoder.row_cache(row))
    return logits, skip
