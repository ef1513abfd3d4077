"""The prefix cache (t2ray/prefix_cache.py) and the KV decoder's prefill from a cached prefix: the same logits and
tokens as a whole prefill; blocks known by adapter state and every token before them; a byte budget, LRU."""

from __future__ import annotations

import torch

from t2ray.kv_decode import KVDecoder
from t2ray.prefix_cache import BLOCK, PrefixCache, prefill_prompts

SHARED = list(range(100, 100 + 2 * BLOCK + 5))  # a system prompt of 2 full blocks and a bit


def prefill(model, prompts, cache=None, state="base", new_tokens=6):
    """Greedy tokens and first logits of `prompts` prefilled as a replica does (from `cache`'s blocks where every row
    has them, then keeping theirs), and how many prompt tokens each row skipped."""
    decoder = KVDecoder(model, len(prompts), max(map(len, prompts)) + new_tokens)
    with torch.no_grad():
        logits, skip = prefill_prompts(decoder, prompts, 0, "cpu", cache, [state] * len(prompts))
        first, positions, tokens = logits, torch.tensor([len(p) for p in prompts]), []
        for _ in range(new_tokens):
            tokens.append(logits.argmax(-1))
            logits = decoder.step(tokens[-1], positions[:, None])
            positions = positions + 1
    return torch.stack(tokens, 1), first, skip


def test_prompts_sharing_a_start_decode_as_if_prefilled_whole(varied):
    model = varied.eval()
    first = [SHARED + [7, 8, 9], SHARED + [5] * 20]
    later = [SHARED + [11, 12], SHARED + list(range(300, 340)), SHARED[: 2 * BLOCK] + [3]]
    cache = PrefixCache(1 << 30)
    prefill(model, first, cache)
    assert len(cache) == 2 + 1  # the shared 2 blocks once, the second prompt's third block
    tokens, logits, skip = prefill(model, later, cache)
    assert skip == 2 * BLOCK  # the shared blocks; the third prompt's last token is prefilled, not cached
    whole_tokens, whole_logits, _ = prefill(model, later)
    torch.testing.assert_close(logits, whole_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, whole_tokens)


def test_a_block_is_known_by_its_state_and_every_token_before_it(varied):
    model = varied.eval()
    cache = PrefixCache(1 << 30)
    prefill(model, [SHARED + [1]], cache, state=("materialized", ("math",)))
    assert cache.cached_blocks(("materialized", ("math",)), SHARED + [2]) == 2
    assert cache.cached_blocks("base", SHARED + [2]) == 0  # other weights: other keys and values
    assert cache.cached_blocks(("materialized", ("math",)), [0] + SHARED) == 0  # shifted: other positions
    changed = SHARED[:BLOCK] + [1] + SHARED[BLOCK + 1 :]
    assert cache.cached_blocks(("materialized", ("math",)), changed) == 1  # the first block only


def test_blocks_are_kept_within_the_byte_budget_least_recently_used_out(varied):
    model = varied.eval()
    one = PrefixCache(1 << 30)
    prefill(model, [SHARED], one)
    block_bytes = one.nbytes // len(one)
    cache = PrefixCache(2 * block_bytes)
    prefill(model, [SHARED], cache)
    prefill(model, [list(range(500, 500 + BLOCK + 1))], cache)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.cached_blocks("base", SHARED) == 1  # its second block went first: the end of a chain, least recent
    assert cache.cached_blocks("base", list(range(500, 500 + BLOCK + 1))) == 1
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
