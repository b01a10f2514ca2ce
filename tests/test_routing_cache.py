"""The routing cache without an engine: rows at KV slots, block lifetimes, misses named.

Engine tests (prefix-cache hits against the same requests computed in full) are in
tests/test_prefix_caching.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moepath.patches.recorder import step_layout
from moepath.patches.routing_cache import RoutingCache, RoutingCacheMiss, full_attention_group

L, K, E, BLOCK = 2, 2, 4, 4
LAYOUT = step_layout(L, K, E, store_probs=False)


def new_cache(num_blocks: int = 6) -> RoutingCache:
    return RoutingCache.allocate(0, BLOCK, num_blocks, LAYOUT, L, E)


def compute(cache: RoutingCache, blocks: list[int], positions: range, tokens: list[int],
            tag: int = 0) -> torch.Tensor:
    """Record one request's tokens at ``positions`` (its KV blocks ``blocks``), as a step
    of the engine would: expert ids ``position + tag``, token ids ``tokens[position]``;
    returns the distributions scored for them [L, n, E]."""
    positions = torch.tensor(list(positions))
    slots = torch.tensor(blocks)[positions // BLOCK] * BLOCK + positions % BLOCK
    n = len(positions)
    scores = torch.rand(L, n, E, generator=torch.Generator().manual_seed(tag + n)).softmax(-1)
    cache.write(slots, {
        "positions": positions, "token_ids": torch.tensor(tokens)[positions],
        "expert_ids": (positions + tag)[:, None, None].expand(n, L, K).to(torch.int32),
        "gate_weights": torch.full((n, L, K), 0.25)}, scores)
    return scores


def test_a_hit_reads_back_the_rows_and_sums_the_blocks_were_computed_with():
    cache = new_cache()
    tokens = list(range(100, 111))  # 11 tokens: blocks 3, 1 full, block 4 holds 3
    first = compute(cache, [3, 1, 4], range(0, 6), tokens)  # a chunk ending inside block 1
    second = compute(cache, [3, 1, 4], range(6, 11), tokens)
    rows = cache.read("r", [3, 1, 4], 0, 8, tokens[:8])
    np.testing.assert_array_equal(LAYOUT.view(rows, "positions"), np.arange(8))
    np.testing.assert_array_equal(LAYOUT.view(rows, "token_ids"), tokens[:8])
    np.testing.assert_array_equal(LAYOUT.view(rows, "expert_ids")[:, 0, 0], np.arange(8))
    expected = torch.cat([first, second], 1)[:, :8].double().sum(1).numpy()
    np.testing.assert_allclose(cache.prompt_sum([3, 1, 4], 8), expected, rtol=1e-6)
    assert cache.filled[[3, 1, 4]].tolist() == [4, 4, 3]


def test_a_block_reused_for_other_tokens_is_overwritten_from_its_first_row():
    cache = new_cache()
    compute(cache, [2, 5], range(0, 8), list(range(8)))
    compute(cache, [5], range(0, 2), [50, 51], tag=20)  # block 5 freed, reallocated
    assert cache.filled[5] == 2
    with pytest.raises(RoutingCacheMiss, match="served position 6 from KV block 5, whose "
                                               "routing moepath did not record"):
        cache.read("'a' (r-1)", [2, 5], 0, 8, list(range(8)))
    rows = cache.read("'b' (r-2)", [5], 0, 2, [50, 51])
    np.testing.assert_array_equal(LAYOUT.view(rows, "expert_ids")[:, 0, 0], [20, 21])


def test_rows_never_recorded_or_written_out_of_order_are_misses_naming_the_request():
    cache = new_cache()
    with pytest.raises(RoutingCacheMiss, match="request 'a' \\(r-1\\): the prefix cache "
                                               "served position 0 from KV block 0"):
        cache.read("'a' (r-1)", [0], 0, 4, None)
    compute(cache, [1], range(0, 2), [7, 8, 9, 10])
    compute(cache, [1], range(3, 4), [7, 8, 9, 10])  # offset 2 skipped
    assert cache.filled[1] == -1
    with pytest.raises(RoutingCacheMiss, match="block 1"):
        cache.read("'a' (r-1)", [1], 0, 2, [7, 8])


def test_rows_of_other_tokens_are_refused():
    cache = new_cache()
    compute(cache, [0], range(0, 4), [1, 2, 3, 4])
    with pytest.raises(RoutingCacheMiss, match="positions \\[0, 4\\) belongs to other tokens"):
        cache.read("'a' (r-1)", [0], 0, 4, [1, 2, 3, 5])
    with pytest.raises(RoutingCacheMiss, match="holds 1 blocks of 4"):
        cache.read("'a' (r-1)", [0], 0, 8, None)


def test_padding_rows_are_not_recorded_and_new_weights_forget_every_block():
    cache = new_cache()
    n = 3
    cache.write(torch.tensor([0, 1, -1]), {  # a padded step (CUDA graphs): slot -1
        "positions": torch.arange(n), "token_ids": torch.arange(n),
        "expert_ids": torch.zeros(n, L, K, dtype=torch.int32),
        "gate_weights": torch.zeros(n, L, K)},
        torch.ones(L, n, E))
    assert cache.filled[0] == 2
    np.testing.assert_array_equal(cache.sums[0].numpy(), np.full((L, E), 2.0))
    cache.invalidate()
    with pytest.raises(RoutingCacheMiss):
        cache.read("r", [0], 0, 1, None)


def test_a_hit_that_ends_inside_a_block_has_no_prompt_sum():
    cache = new_cache()
    compute(cache, [0, 1], range(0, 8), list(range(8)))
    with pytest.raises(RoutingCacheMiss, match="hit of 6 tokens ends inside a KV block of 4"):
        cache.prompt_sum([0, 1], 6)


def test_routing_is_kept_by_the_blocks_of_the_first_full_attention_group():
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        SlidingWindowSpec,
    )

    def spec(kind, block_size, **extra):
        return kind(block_size=block_size, num_kv_heads=1, head_size=64, dtype=torch.float32,
                    **extra)

    def config(*specs):
        return KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec([f"layer{i}"], s) for i, s in enumerate(specs)])

    hybrid = config(spec(SlidingWindowSpec, 16, sliding_window=64), spec(FullAttentionSpec, 32))
    assert full_attention_group(hybrid) == (1, 32)
    with pytest.raises(RuntimeError, match="no full-attention group.*--no-enable-prefix-caching"):
        full_attention_group(config(spec(SlidingWindowSpec, 16, sliding_window=64)))
