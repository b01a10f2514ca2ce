"""The routing cache: every computed token's routing, kept beside its KV in vLLM's cache.

With prefix caching on, vLLM serves a request's leading blocks from KV that an
earlier request computed: those tokens are not computed again, so their routing
is not computed again either. The recorder keeps the routing of every token the
engine computes in a :class:`RoutingCache` addressed like the KV cache: the row
of a token is its KV slot, ``block_id * block_size + offset`` (vLLM's own slot
mapping, full-attention group), so a block's routing lives exactly as long as
its KV. It is written when the block's tokens are computed and overwritten when
vLLM reuses the block for other tokens; a prefix-cache hit on blocks ``[0, h)``
of a request reads back the rows that produced the KV the request reuses. The
cache holds one packed row per KV slot (ids, gate weights, position, token id:
``recorder.step_layout``) and, per block, the sum of its tokens' router
distributions (what the tokens add to a sample's router mean): for OLMoE
(L=16, k=8, E=64) 392 bytes a token plus 4 KiB a block, against 128 KiB of
bf16 KV a token.

Why keyed by block id, not by content hash as vLLM's own routed-experts capture
(R3) is: workers see a request's block table but not the scheduler's block
hashes, which depend on LoRA, multimodal inputs and cache salts; and R3's LRU
store lives apart from the KV cache, so it can lose a block whose KV is still
served (its lookup then fails). Here there is nothing to evict or look up: the
KV cache's own allocator decides every row's lifetime, and the memory is
bounded by its size.

Every block computed while the capture is installed is recorded, whoever
computed it (traced requests, untraced ones): a traced request that reuses an
untraced request's prefix gets its routing, and no request is recomputed.
:attr:`RoutingCache.filled` tells which rows were recorded, so a hit on a block
whose routing the cache does not hold (capture installed after the block was
computed, a block filled by a KV connector) is an error that names the request,
never a partial record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .packed_rows import RowLayout

CACHED_COLUMNS = ("positions", "token_ids", "expert_ids", "gate_weights")


class RoutingCacheMiss(RuntimeError):
    """A prefix-cache hit served tokens whose routing the cache does not hold."""


def full_attention_group(kv_cache_config) -> tuple[int, int]:
    """(group index, block size) of the first KV cache group of full attention: its block
    table holds a block for every position of a request, which sliding-window,
    chunked-local and Mamba groups do not. RuntimeError when there is none."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, RSWASpec

    def full(spec) -> bool:
        inner = getattr(spec, "kv_cache_specs", None)
        if inner is not None:  # UniformTypeKVCacheSpecs: one spec per layer
            return bool(inner) and all(full(s) for s in inner.values())
        return (isinstance(spec, FullAttentionSpec) and not isinstance(spec, RSWASpec)
                and spec.sliding_window is None and spec.attention_chunk_size is None)

    for index, group in enumerate(kv_cache_config.kv_cache_groups):
        if full(group.kv_cache_spec):
            return index, group.kv_cache_spec.block_size
    raise RuntimeError("moepath: this model's KV cache has no full-attention group, by whose "
                       "blocks routing would be kept for prefix-cache hits; start the engine "
                       "with --no-enable-prefix-caching to trace it")


@dataclass
class RoutingCache:
    """Routing rows of every KV slot of one KV cache group (see the module).

    Attributes:
        group: the KV cache group whose block table and slot mapping address the rows.
        block_size: tokens per KV block of that group.
        layout: the packed row layout (``recorder.step_layout`` without ``probs``).
        rows: uint8 [num_blocks * block_size, width]: row ``slot`` is the token whose KV
            is at ``slot``.
        sums: float32 [num_blocks, L, E]: sum over the block's recorded rows of the
            router distribution (scored as the hook scores it).
        filled: int64 [num_blocks]: rows ``[0, filled)`` of the block were recorded, in
            order, since its offset-0 row was last written; -1 when a row was written
            out of order (never read then). 0 for a block never recorded.
    """

    group: int
    block_size: int
    layout: RowLayout
    rows: np.ndarray
    sums: torch.Tensor
    filled: np.ndarray
    _columns: dict[str, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        # writable torch views of the rows' columns, made once: [num_slots, *shape]
        self._columns = {name: torch.from_numpy(self.layout.view(self.rows, name))
                         for name in CACHED_COLUMNS}

    @classmethod
    def allocate(cls, group: int, block_size: int, num_blocks: int, layout: RowLayout,
                 num_layers: int, num_experts: int) -> RoutingCache:
        if "probs" in layout.columns:
            raise ValueError("the routing cache keeps no per-token distributions")
        return cls(group, block_size, layout, layout.empty(num_blocks * block_size),
                   torch.zeros(num_blocks, num_layers, num_experts),
                   np.zeros(num_blocks, dtype=np.int64))

    def write(self, slots: torch.Tensor, sources: dict[str, torch.Tensor],
              scores: torch.Tensor) -> None:
        """Record one step's computed tokens: ``slots`` int64 [T] their KV slots (negative:
        a padding row, skipped), ``sources`` {column: [T, ...]} their values (any device,
        dtype converted), ``scores`` [L, T, E] their router distributions.

        A token at offset 0 starts its block afresh (vLLM fills a block from offset 0
        when it allocates it); one at any other offset must continue the block's
        recorded rows. A step's rows of one block are consecutive offsets (one
        request's consecutive positions)."""
        slots = slots.to("cpu", torch.int64)
        keep = torch.nonzero(slots >= 0).squeeze(1) if bool((slots < 0).any()) else None
        if keep is not None:
            slots, sources = slots[keep], {n: s[keep.to(s.device)] for n, s in sources.items()}
            scores = scores[:, keep.to(scores.device)]
        for name, column in self._columns.items():
            column.index_put_((slots,), sources[name].to("cpu", column.dtype))
        # a block's rows are consecutive in a step (one request's consecutive positions):
        # one segment of rows per touched block
        blocks, offsets = np.divmod(slots.numpy(), self.block_size)
        starts_segment = np.empty(len(blocks), dtype=bool)
        starts_segment[:1] = True
        np.not_equal(blocks[1:], blocks[:-1], out=starts_segment[1:])
        first = np.flatnonzero(starts_segment)
        touched, first_offsets = blocks[first], offsets[first]
        counts = np.diff(first, append=len(blocks))
        restarted = touched[first_offsets == 0]
        self.filled[restarted] = 0
        in_order = first_offsets == self.filled[touched]
        self.filled[touched] = np.where(in_order, first_offsets + counts, -1)
        # per-block sums on the scores' device, then one small host copy: [blocks, L, E]
        segment = torch.from_numpy(np.cumsum(starts_segment) - 1).to(scores.device)
        step_sums = torch.zeros(len(touched), *scores.shape[::2], device=scores.device)
        step_sums.index_add_(0, segment, scores.transpose(0, 1).contiguous())
        self.sums[torch.from_numpy(restarted)] = 0.0
        self.sums.index_add_(0, torch.from_numpy(touched), step_sums.cpu())

    def read(self, request: str, block_ids: list[int], start: int, stop: int,
             token_ids: list[int] | None) -> np.ndarray:
        """Packed rows [stop - start, width] of positions ``[start, stop)`` of a request
        whose KV blocks are ``block_ids`` (this group's); ``token_ids``: its tokens at
        those positions (None: not known, e.g. prompt embeddings), checked against the
        rows. :class:`RoutingCacheMiss` names ``request`` when a row was not recorded."""
        positions = np.arange(start, stop)
        index = positions // self.block_size
        if stop > start and index[-1] >= len(block_ids):
            raise RoutingCacheMiss(f"request {request}: positions up to {stop} were served "
                                   f"from the prefix cache but it holds {len(block_ids)} "
                                   f"blocks of {self.block_size}")
        blocks = np.asarray(block_ids, dtype=np.int64)[index]
        offsets = positions % self.block_size
        unrecorded = self.filled[blocks] <= offsets
        if unrecorded.any():
            first = int(np.argmax(unrecorded))
            raise RoutingCacheMiss(
                f"request {request}: the prefix cache served position {positions[first]} "
                f"from KV block {blocks[first]}, whose routing moepath did not record (was "
                f"it computed before the capture was installed, or loaded by a KV "
                f"connector?); trace with --no-enable-prefix-caching")
        rows = self.rows[blocks * self.block_size + offsets]
        stored = self.layout.view(rows, "positions")
        stored_tokens = self.layout.view(rows, "token_ids")
        if not np.array_equal(stored, positions) or (
                token_ids is not None and not np.array_equal(stored_tokens, token_ids)):
            raise RoutingCacheMiss(f"request {request}: the routing kept for its cached "
                                   f"positions [{start}, {stop}) belongs to other tokens")
        return rows

    def prompt_sum(self, block_ids: list[int], stop: int) -> np.ndarray:
        """float64 [L, E]: router distributions summed over positions ``[0, stop)`` of a
        request whose blocks are ``block_ids``; ``stop`` a multiple of the block size
        (a prefix-cache hit), rows already checked by :meth:`read`."""
        if stop % self.block_size:
            raise RoutingCacheMiss(f"a prefix-cache hit of {stop} tokens ends inside a KV "
                                   f"block of {self.block_size}")
        blocks = torch.as_tensor(block_ids[:stop // self.block_size], dtype=torch.int64)
        return self.sums[blocks].double().sum(0).numpy()

    def invalidate(self) -> None:
        """Forget every block's routing (the weights changed: no KV computed before may be
        served, and none of its routing either)."""
        self.filled[:] = 0
