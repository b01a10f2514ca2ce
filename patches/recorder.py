"""The step recorder: per-step row mapping and per-request routing in a vLLM worker.

After each forward, :meth:`StepRecorder.after_forward` maps buffer rows to
(request, position) from the runner's batch state (``input_batch.req_ids``,
``query_start_loc``, ``positions``, ``input_ids.gpu``) and appends the rows of
traced requests to their accumulators; when vLLM reports a request finished,
its record goes to the :class:`sink.RoutingSink`. With vLLM's prefix caching on
it also keeps every computed token's routing in a
:class:`routing_cache.RoutingCache`, from which it gives a traced request the
routing of the tokens vLLM served it from the prefix cache.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..tracer import store
from . import compat, hook
from .inspection import ModelRouting
from .packed_rows import RowLayout
from .routing_cache import RoutingCache, full_attention_group
from .settings import REQUEST_ID_KEY, REQUEST_META_KEY, CaptureSettings
from .sink import RoutingSink
from .stages import PipelineStages

_CHILD_ID = re.compile(r"^(\d+)_(.+)$")  # vLLM's n>1 child ids: f"{index}_{parent_id}"
_INTERNAL_SUFFIX = re.compile(r"-[0-9A-Za-z]{8}$")  # vLLM appends "-<8 chars>" to request ids


PROBS_BLOCK_ROWS = 2048  # --store-probs: rows gathered at once ([2048, L, E] float32)
MAX_RUN_STEPS = 64  # decode steps per run: the run storage is [64, n, width] (reused)


def step_layout(num_layers: int, top_k: int, num_experts: int, store_probs: bool) -> RowLayout:
    """Host row of one traced token, in the store's dtypes: position and token id (int32),
    expert ids (uint8 when E <= 256, else uint16) and gate weights (float16) [L, k],
    and with ``store_probs`` the router distribution (float16) [L, E]."""
    ids_dtype = store.expert_id_type(num_experts).to_pandas_dtype()
    columns = [("positions", np.int32, ()), ("token_ids", np.int32, ()),
               ("expert_ids", ids_dtype, (num_layers, top_k)),
               ("gate_weights", np.float16, (num_layers, top_k))]
    if store_probs:
        columns.append(("probs", np.float16, (num_layers, num_experts)))
    return RowLayout(columns)


@dataclass(slots=True)
class _Chunk:
    """Consecutive positions of one request: rows [start, end) of ``rows``, packed host rows
    (:func:`step_layout`) of one step (a request's rows are contiguous in a step: the
    batch order restricted to traced requests) or of one request over a decode run."""

    rows: np.ndarray
    start: int
    end: int
    first_position: int  # position of row ``start``; rows are consecutive positions
    prompt_rows: int  # leading rows that are prompt tokens
    prompt_prob_sum: np.ndarray | None  # float64 [L, E] over those rows (None: no prompt rows)

    @property
    def next_position(self) -> int:
        return self.first_position + self.end - self.start


@dataclass(frozen=True)
class OutputLimit:
    """Where a request's routing ends, from the stops vLLM's engine core decides on tokens.

    The engine core ends a request at its first generated token that is its EOS
    (unless ``ignore_eos``) or one of its ``stop_token_ids``, or at its
    ``max_tokens``-th, and never feeds that final token back: the request's last
    recorded position is ``num_prompt_tokens + n_out - 2``. Under vLLM's async
    scheduling (its default on CUDA) the step after the one that sampled the
    final token is already scheduled when the core learns the request ended, and
    feeds that token at ``num_prompt_tokens + n_out - 1`` (``n_out`` is then
    known from the recorded tokens: the stop token is the one fed); :meth:`end`
    cuts such rows at commit, so the record equals a synchronous one. Without
    async scheduling no row is past it. Stop strings and repetition stops are
    decided elsewhere (the front end; the core, on token patterns): not covered.
    """

    stop_token_ids: frozenset[int]
    max_tokens: int | None

    @classmethod
    def of(cls, sampling_params) -> OutputLimit | None:
        """The limit of a request with these vLLM ``SamplingParams`` (None: none given)."""
        if sampling_params is None:
            return None
        eos = sampling_params.eos_token_id  # None under ignore_eos
        stops = set(sampling_params.stop_token_ids or ()) | ({eos} if eos is not None else set())
        return cls(frozenset(stops), sampling_params.max_tokens)

    def end(self, num_prompt_tokens: int, token_ids: np.ndarray) -> int:
        """The position after the last one a request with these stops computed, given the
        tokens fed at positions 0.. (``token_ids``, int [T]): the position where its final
        output token is fed, if it is, else T."""
        end = len(token_ids)
        if self.max_tokens is not None:
            end = min(end, num_prompt_tokens + self.max_tokens - 1)
        generated = token_ids[num_prompt_tokens:end]
        stopped = np.flatnonzero(np.isin(generated, list(self.stop_token_ids)))
        return num_prompt_tokens + int(stopped[0]) if len(stopped) else end


@dataclass
class RequestAccumulator:
    """Routing of one traced request, gathered chunk by chunk across steps."""

    sample_id: str
    request_id: str
    completion: int
    num_prompt_tokens: int
    meta: dict
    chunks: list[_Chunk] = field(default_factory=list)
    next_position: int = 0  # the position after the last recorded one
    recomputed: bool = False  # preempted and recomputed at least once
    output_limit: OutputLimit | None = None  # where its rows end (None: where they stop)

    def add(self, chunk: _Chunk) -> None:
        if chunk.first_position < self.next_position:
            self._rewind(chunk.first_position)
        self.chunks.append(chunk)
        self.next_position = chunk.next_position

    def restart(self, chunk: _Chunk) -> None:
        """The request starts over with ``chunk`` as its first rows (a prefix-cache hit
        replayed from position 0): every earlier record is dropped."""
        self.recomputed |= bool(self.chunks)
        self.chunks = [chunk]
        self.next_position = chunk.next_position

    def truncate(self, position: int) -> None:
        """Drop every row at or after ``position``; prompt rows may not be cut from a
        chunk (their router-distribution sum covers the whole chunk)."""
        while self.chunks and self.chunks[-1].first_position >= position:
            self.chunks.pop()
        if self.chunks and self.chunks[-1].next_position > position:
            last = self.chunks[-1]
            kept = position - last.first_position
            if last.prompt_rows > kept:
                raise RuntimeError(f"request {self.request_id}: cannot cut its prompt rows "
                                   f"at position {position}")
            self.chunks[-1] = _Chunk(last.rows, last.start, last.start + kept,
                                     last.first_position, last.prompt_rows,
                                     last.prompt_prob_sum)
        self.next_position = min(self.next_position, position)

    def _rewind(self, start: int) -> None:
        """Preemption recomputes from an earlier position: rows from ``start`` on replace
        every earlier record at or after that position (keep the last)."""
        while self.chunks and self.chunks[-1].first_position >= start:
            self.chunks.pop()
            self.recomputed = True
        if self.chunks and self.chunks[-1].next_position > start:
            raise RuntimeError(f"request {self.request_id}: overlapping partial chunk at {start}")

    def finish(self, layout: RowLayout) -> store.RoutingRecord:
        pieces = [c.rows[c.start:c.end] for c in self.chunks]
        rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)  # one: a view
        positions = layout.view(rows, "positions")
        expected = np.arange(positions[0], positions[0] + len(positions))
        if positions[0] != 0 or not np.array_equal(positions, expected):
            raise RuntimeError(
                f"request '{self.sample_id}' has gaps in its routing (positions from "
                f"{positions[0]}); was the prompt read from the prefix cache?")
        if self.output_limit is not None:  # rows past the final output (async scheduling)
            rows = rows[:self.output_limit.end(self.num_prompt_tokens,
                                               layout.view(rows, "token_ids"))]
            positions = layout.view(rows, "positions")
        prompt_chunks = [c for c in self.chunks if c.prompt_rows]
        mean = None
        if prompt_chunks:
            total = sum(c.prompt_prob_sum for c in prompt_chunks)
            mean = (total / sum(c.prompt_rows for c in prompt_chunks)).astype(np.float32)
        return store.RoutingRecord(
            sample_id=self.sample_id, request_id=self.request_id, completion=self.completion,
            num_prompt_tokens=self.num_prompt_tokens, positions=positions,
            token_ids=layout.view(rows, "token_ids"), expert_ids=layout.view(rows, "expert_ids"),
            gate_weights=layout.view(rows, "gate_weights"), router_mean=mean,
            router_probs=layout.view(rows, "probs") if "probs" in layout.columns else None,
            meta=self.meta,
        )


@dataclass
class _TracedBatch:
    """Which requests of a runner batch (``req_ids``, in batch order) are traced."""

    req_ids: tuple[str, ...]
    index: np.ndarray  # int64 [n]: batch index of each traced request
    accumulators: list[RequestAccumulator]
    num_prompt_tokens: np.ndarray  # int64 [n]

    @functools.cached_property
    def decode_rows(self) -> torch.Tensor | None:
        """Buffer rows of the traced requests in a step of one token per request (None:
        every request is traced, so all rows)."""
        return None if len(self.index) == len(self.req_ids) else torch.from_numpy(self.index)

    @functools.cached_property
    def req_id_set(self) -> frozenset[str]:
        return frozenset(self.req_ids)


@dataclass
class _DecodeRun:
    """Consecutive decode steps of one unchanged traced batch, written into one array as
    they come: ``rows[s, j]`` is traced request j's token at position ``first[j] + s``.

    Recording a decode step is then one host copy per column into ``rows[steps]``, no
    allocation and no chunk per request, and only torch calls: inside the engine the
    first numpy call after a forward costs ~80 us (its code is out of cache), 15x a
    warm one. When the run ends, each request gets its rows of every step as one
    chunk, and ``rows`` (the recorder's reused storage) is free again.
    """

    batch: _TracedBatch
    first: np.ndarray  # int64 [n]: each request's position in the run's first step
    rows: np.ndarray  # uint8 [MAX_RUN_STEPS, n, width]: packed rows (step_layout)
    columns: dict[str, torch.Tensor]  # views of ``rows``' copied columns [MAX_RUN_STEPS, n, ...]
    steps: int = 1  # a run starts with its first step
    next_positions: torch.Tensor = field(init=False)  # int32 [n]: positions in step ``steps``

    def __post_init__(self):
        self.next_positions = torch.from_numpy(self.first + 1).to(torch.int32)

    @property
    def full(self) -> bool:
        return self.steps == MAX_RUN_STEPS

    def step_columns(self) -> dict[str, torch.Tensor]:
        """Views of the copied columns of the run's next step, ``rows[steps]``."""
        return {name: column[self.steps] for name, column in self.columns.items()}

    def holds_next_step(self, written: dict[str, torch.Tensor]) -> bool:
        """Whether ``written`` (:meth:`step_columns`, just filled) is the run's next step."""
        return torch.equal(written["positions"], self.next_positions)

    def advance(self) -> None:
        self.steps += 1
        self.next_positions += 1

    def end(self) -> None:
        """Hand each request its rows of the run as one chunk (one copy of the run)."""
        rows = self.rows[:self.steps].swapaxes(0, 1).copy()  # [n, steps, width], off storage
        for acc, request_rows, position in zip(self.batch.accumulators, rows,
                                               self.first.tolist(), strict=True):
            acc.add(_Chunk(request_rows, 0, self.steps, position, 0, None))


def _ranges(starts: np.ndarray, ends: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """int64 concatenation of ``arange(starts[i], ends[i])``; ``offsets`` = exclusive cumsum
    of the lengths (``offsets[-1]`` = total)."""
    lengths = ends - starts
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])


def _extra_args(sampling_params) -> dict:
    """A request's ``SamplingParams.extra_args`` (where its moepath tags are), or {}."""
    return (sampling_params.extra_args or {}) if sampling_params else {}


def _parse_meta(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"{REQUEST_META_KEY} must be a dict or a JSON object string")
    return value


def nonfinite_routing(record: store.RoutingRecord, routing: ModelRouting) -> str | None:
    """Why ``record`` must not be stored, or None: a gate weight, router distribution or
    prompt mean that is not finite. NaN router logits make every router's weights NaN,
    an infinite logit a softmax router's; a trace keeps no such row. The reason names
    the sample, the first such token position and, at it, the first MoE layer."""
    bad = ~np.isfinite(record.gate_weights).all(-1)  # [T, L]
    if record.router_probs is not None:
        bad |= ~np.isfinite(record.router_probs).all(-1)
    where = ""
    if bad.any():
        token, slot = np.argwhere(bad)[0]
        where = f" at position {record.positions[token]}"
    elif record.router_mean is not None and not np.isfinite(record.router_mean).all():
        slot = np.flatnonzero(~np.isfinite(record.router_mean).all(-1))[0]
        where = " (its prompt mean)"
    else:
        return None
    return (f"sample '{record.sample_id}': MoE layer {slot} (model layer "
            f"{routing.layers[slot].layer_id}) routed with NaN or infinite gate weights or "
            f"router scores{where}, from router logits that are not finite; its routing is not "
            f"recorded. The model's activations overflowed or its weights hold NaN/inf: check "
            f"the checkpoint, or serve it in float32 or bfloat16 (--dtype)")


class StepRecorder:
    """Maps each step's buffer rows to traced requests; hands finished ones to the sink."""

    def __init__(self, settings: CaptureSettings, routing: ModelRouting,
                 sink: RoutingSink | None, stages: PipelineStages | None = None,
                 prefix_caching: bool = False):
        """``sink``: where finished records go (None on a pipeline stage that sends them
        to the collecting stage); ``stages``: the pipeline, when there are several;
        ``prefix_caching``: vLLM's prefix cache is read, so routing is kept per KV slot."""
        self.settings = settings
        # with vLLM's prefix caching on, every computed token's routing is kept in a
        # RoutingCache (made at the first step, once the KV cache exists), from which
        # traced requests' prefix-cache hits are replayed
        self.prefix_caching = prefix_caching
        self.cache: RoutingCache | None = None
        self.tokens_replayed = 0  # traced tokens read from the routing cache
        self.routing = routing
        self.sink = sink
        self.stages = stages
        self.active: dict[str, RequestAccumulator | None] = {}
        self.error: str | None = None
        self.lock = threading.Lock()
        self.requests_recorded = 0
        self.requests_recomputed = 0
        self.requests_incomplete = 0  # ended before their whole prompt was computed
        self.rejected: list[str] = []  # why requests were not recorded, since the last flush
        self.layout = step_layout(len(routing.layers), routing.top_k, routing.num_experts,
                                  settings.store_probs)
        self._batch: _TracedBatch | None = None
        self._run: _DecodeRun | None = None
        self._run_storage = self.layout.empty(0)  # reused by every run: uint8 [S * n, width]

    @property
    def stores_probs(self) -> bool:
        """``--store-probs``: every traced token's router distribution is stored."""
        return "probs" in self.layout.columns

    # -- which requests are traced -------------------------------------------

    def _accumulator(self, runner, req_id: str) -> RequestAccumulator | None:
        if req_id in self.active:
            return self.active[req_id]
        state = runner.requests[req_id]
        if not self._traces(state.sampling_params):
            self.active[req_id] = None
            return None
        extra = _extra_args(state.sampling_params)
        sample_id = extra.get(REQUEST_ID_KEY)
        completion, parent = 0, req_id
        match = _CHILD_ID.match(req_id)
        if match and self._may_be_child(extra):
            completion, parent = int(match.group(1)), match.group(2)
        if sample_id is None:
            sample_id = _INTERNAL_SUFFIX.sub("", parent)
        accumulator = RequestAccumulator(
            sample_id=str(sample_id), request_id=req_id, completion=completion,
            num_prompt_tokens=int(state.num_prompt_tokens),
            meta=_parse_meta(extra.get(REQUEST_META_KEY)),
            output_limit=OutputLimit.of(state.sampling_params))
        self.active[req_id] = accumulator
        return accumulator

    def _may_be_child(self, extra_args: dict) -> bool:
        """Whether a request id of the child form ``<index>_<parent id>`` names one of a
        parent's ``n > 1`` completions. ``tag`` records the parent's n (``moepath_n``),
        which vLLM sets to 1 in the children's params; requests tagged through
        ``vllm_xargs`` have no ``moepath_n``, so the id's form decides."""
        n = extra_args.get("moepath_n")
        return n is None or n > 1 or self.settings.trace_all

    def _traces(self, sampling_params) -> bool:
        """Whether a request with these sampling params is traced: tagged, or all are."""
        if self.settings.trace_all:
            return True
        return _extra_args(sampling_params).get(REQUEST_ID_KEY) is not None

    def _schedules_traced(self, scheduler_output) -> bool:
        """Whether the step about to run has a traced request. A request is judged by
        its sampling params when new, by the recorder's record of it otherwise; one
        the recorder has not seen counts as traced."""
        if self.settings.trace_all:
            return True
        new = {request.req_id: request.sampling_params
               for request in scheduler_output.scheduled_new_reqs}
        for req_id in scheduler_output.num_scheduled_tokens:
            if (self._traces(new[req_id]) if req_id in new
                    else self.active.get(req_id, True) is not None):
                return True
        return False

    # -- per step ------------------------------------------------------------

    def on_finished(self, finished_req_ids, all_stages: bool = False) -> None:
        """Record the traced requests among ``finished_req_ids``.

        With several pipeline stages, every stage calls this at the same step (the
        scheduler output tells each the same finished ids), also after a capture
        error, so that they exchange their records in lockstep; ``all_stages``: the
        stages exchange even when nothing finished (a flush, which every stage runs).
        """
        if finished_req_ids:
            self._end_run()
            self._batch = None  # its accumulators may be gone
        # in the order the requests were first scheduled, not the order of vLLM's set of
        # finished ids (its request ids end in random characters): a run traced twice
        # writes its records in one order, so order-seeded metrics (pair sampling, the
        # bootstrap) agree between the runs
        finished = set(finished_req_ids)
        records, recomputed = {}, set()
        for req_id in [req_id for req_id in self.active if req_id in finished]:
            accumulator = self.active.pop(req_id, None)
            if accumulator is None or not accumulator.chunks:
                continue
            if accumulator.next_position < accumulator.num_prompt_tokens:
                self._drop_incomplete(accumulator)
                continue
            record = accumulator.finish(self.layout)
            if (why := nonfinite_routing(record, self.routing)) is not None:
                self._reject(why)
                continue
            records[req_id] = record
            if accumulator.recomputed:
                recomputed.add(req_id)
        if self.stages is not None and (finished or all_stages):
            records = self.stages.join(records, self.error)
        for req_id, record in records.items():
            self.sink.add(self._kept(record))
            self.requests_recorded += 1
            self.requests_recomputed += req_id in recomputed

    def _kept(self, record: store.RoutingRecord) -> store.RoutingRecord | store.RoutingSummary:
        """What the trace keeps of a finished request: ``--store per-sample`` keeps its
        per-layer summaries, computed here from its per-token rows, which are dropped."""
        if self.settings.store == store.PER_SAMPLE:
            return store.RoutingSummary.of(record, self.routing.num_experts)
        return record

    def _drop_incomplete(self, accumulator: RequestAccumulator) -> None:
        """A request that ended before its prompt was computed (aborted: a client
        disconnected, a ``generate`` call interrupted) is not recorded: its prompt
        mean and pathway would describe part of the sample. Counted and logged where
        records are written (on the collecting stage of a pipeline)."""
        if self.sink is None:
            return
        self.requests_incomplete += 1
        compat.logger.warning(
            "%s request '%s' (sample '%s') ended after %d of its %d prompt tokens (aborted?); "
            "it is not recorded", compat.LOG_PREFIX, accumulator.request_id,
            accumulator.sample_id, accumulator.next_position, accumulator.num_prompt_tokens)

    def _reject(self, why: str) -> None:
        """A finished request whose routing is not finite is not recorded: the driver's
        next flush fails with ``why`` (``TracedEngine.flush``), a server logs it."""
        self.rejected.append(why)
        compat.logger.error("%s %s", compat.LOG_PREFIX, why)

    def _traced_batch(self, runner) -> _TracedBatch:
        """The traced requests of the runner's batch; recomputed only when the batch changes
        (a decode batch stays the same for many steps)."""
        batch = runner.input_batch
        req_ids = tuple(batch.req_ids[:batch.num_reqs])
        if self._batch is not None and self._batch.req_ids == req_ids:
            return self._batch
        traced = [(i, acc) for i, req_id in enumerate(req_ids)
                  if (acc := self._accumulator(runner, req_id)) is not None]
        self._batch = _TracedBatch(
            req_ids, np.array([i for i, _ in traced], dtype=np.int64),
            [acc for _, acc in traced],
            np.array([acc.num_prompt_tokens for _, acc in traced], dtype=np.int64))
        return self._batch

    def wants_scores(self, scheduler_output) -> bool:
        """Whether the step about to run needs the router distributions scored. False
        for a step that can do nothing but continue the current decode run (the
        run's requests, one token each, and no ``--store-probs``), and for a step
        without a traced request (an eager engine serving untraced requests pays
        no scoring; a compiled graph scores every step, see ``hook.record``).

        The run's traced requests were decoding when it began; one of them that is
        preempted leaves the batch for a step, which ends the run, so the same
        requests with one token each are each at their next generated position.
        :meth:`after_forward` checks that no such step has prompt rows.
        """
        if self.prefix_caching:
            return True  # every computed token's distribution goes to the routing cache
        run = self._run
        if run is not None and not run.full and not self.stores_probs:
            scheduled = scheduler_output.num_scheduled_tokens
            if (scheduler_output.total_num_scheduled_tokens == len(scheduled)
                    and scheduled.keys() == run.batch.req_id_set):
                return False
        return self._schedules_traced(scheduler_output)

    def after_forward(self, runner, total_tokens: int, scores_written: bool = True) -> None:
        """Append this step's rows of traced requests to their accumulators.

        A decode step of the same traced batch as the step before continues that
        step's :class:`_DecodeRun`: one host copy per column into the run's array.
        Any other step costs one gather and host copy per column (traced rows only),
        one sum of the distributions per request with prompt rows
        (:meth:`_prompt_sums`) and one chunk of row indices per traced request. No
        step does per-token work.

        ``total_tokens``: the step's scheduled tokens (buffer rows). ``scores_written``:
        False when :meth:`wants_scores` let the hook skip scoring this step; a step
        with prompt rows of traced requests, or with traced rows under
        ``--store-probs``, then raises.
        """
        num_reqs = runner.input_batch.num_reqs
        if self.prefix_caching:
            self._cache_step(runner, total_tokens)
        traced = self._traced_batch(runner)
        if not traced.accumulators:
            return
        if not scores_written and self.stores_probs:
            raise RuntimeError("a step predicted to have no traced request had traced "
                               "requests, and their router distributions were not scored")
        if total_tokens == num_reqs and self._continue_run(runner, traced):
            return
        self._end_run()
        bounds = runner.query_start_loc.np[: num_reqs + 1]
        index = traced.index
        starts, ends = bounds[index].astype(np.int64), bounds[index + 1].astype(np.int64)
        offsets = np.concatenate(([0], np.cumsum(ends - starts)))
        rows = None if len(index) == num_reqs else torch.from_numpy(
            _ranges(starts, ends, offsets))
        step = self.layout.empty(int(offsets[-1]))
        self._copy_rows(runner, total_tokens, rows, self._copied_columns(step))
        first = self.layout.view(step, "positions")[offsets[:-1]].astype(np.int64)
        prompt_rows = np.clip(traced.num_prompt_tokens - first, 0, ends - starts)
        if not scores_written and prompt_rows.any():
            raise RuntimeError("a step predicted to be decode-only had prompt tokens, and "
                               "their router distributions were not scored")
        self._replay_cached(runner, traced, first)
        sums = self._prompt_sums(starts, prompt_rows)
        if self.stores_probs:
            self._copy_probs(rows, step)
        if len(step) == len(index) and not prompt_rows.any():
            self._start_run(traced, first, step)  # one generated token per request
            return
        for j, (acc, start, end, position, prompt) in enumerate(zip(
                traced.accumulators, offsets[:-1].tolist(), offsets[1:].tolist(),
                first.tolist(), prompt_rows.tolist(), strict=True)):
            acc.add(_Chunk(step, start, end, position, prompt, sums.get(j)))

    # -- prefix caching --------------------------------------------------------

    def _cache_step(self, runner, total_tokens: int) -> None:
        """Keep the routing of every token of the step in the routing cache, at its KV slot."""
        if self.cache is None:
            group, block_size = full_attention_group(runner.kv_cache_config)
            self.cache = RoutingCache.allocate(
                group, block_size, runner.kv_cache_config.num_blocks, self.layout,
                len(self.routing.layers), self.routing.num_experts)
        buffers = hook.BUFFERS
        table = runner.input_batch.block_table[self.cache.group]
        self.cache.write(table.slot_mapping.gpu[:total_tokens], {
            "positions": runner.positions[:total_tokens],
            "token_ids": runner.input_ids.gpu[:total_tokens],
            "expert_ids": buffers.expert_ids[:total_tokens],
            "gate_weights": buffers.gate_weights[:total_tokens]},
            buffers.router_scores[:, :total_tokens])

    def _replay_cached(self, runner, traced: _TracedBatch, first: np.ndarray) -> None:
        """Give each traced request whose rows this step start past its recorded ones
        (vLLM served positions ``[0, first)`` from its prefix cache) the routing of those
        positions from the routing cache. Without prefix caching a gap stays a gap, which
        :meth:`RequestAccumulator.finish` refuses."""
        if self.cache is None:
            return
        for acc, position in zip(traced.accumulators, first.tolist(), strict=True):
            if position > 0 and position != acc.next_position:
                self._replay(runner.requests[acc.request_id], acc, position)

    def _replay(self, state, acc: RequestAccumulator, hit: int) -> None:
        """Rows ``[0, hit)`` of ``acc``'s request, whose KV vLLM read from its prefix cache
        (``state``: the runner's CachedRequestState; its block table starts with the hit
        blocks).

        A hit within the prompt (a new request, or one preempted and resumed) replaces
        every earlier row by the cached ones, whose sums give the prompt's share of the
        router mean. A hit past the prompt (a request preempted while decoding, resumed)
        keeps its own rows up to the hit, which include its whole prompt with its sums,
        and takes from the cache only generated positions it had not recorded.
        """
        cache, prompt = self.cache, acc.num_prompt_tokens
        block_ids = state.block_ids[cache.group]
        name = f"'{acc.sample_id}' ({acc.request_id})"
        keep = 0 if hit <= prompt else min(acc.next_position, hit)
        if hit > prompt and keep < prompt:
            raise RuntimeError(f"request {name} resumed past its prompt ({hit} cached "
                               f"tokens) without having recorded the prompt")
        tokens = (None if state.prompt_token_ids is None  # prompt embeddings: not known
                  else (state.prompt_token_ids + state.output_token_ids)[keep:hit])
        rows = cache.read(name, block_ids, keep, hit, tokens)
        self.tokens_replayed += hit - keep
        if keep == 0:
            acc.restart(_Chunk(rows, 0, hit, 0, hit, cache.prompt_sum(block_ids, hit)))
            return
        acc.recomputed = True  # preempted: only a resumed request has rows to keep
        acc.truncate(keep)
        if hit > keep:
            acc.add(_Chunk(rows, 0, hit - keep, keep, 0, None))

    def _continue_run(self, runner, traced: _TracedBatch) -> bool:
        """Record a step of one token per request into the current run if it is the run's
        next decode step; False (nothing recorded) otherwise."""
        run = self._run
        if run is None or run.batch is not traced or run.full:
            return False
        written = run.step_columns()
        self._copy_rows(runner, len(traced.req_ids), traced.decode_rows, written)
        if not run.holds_next_step(written):
            return False
        if self.stores_probs:
            self._copy_probs(traced.decode_rows, run.rows[run.steps])
        run.advance()
        return True

    def _start_run(self, traced: _TracedBatch, first: np.ndarray, step: np.ndarray) -> None:
        size = MAX_RUN_STEPS * len(first)
        if len(self._run_storage) < size:
            self._run_storage = self.layout.empty(size)
        rows = self._run_storage[:size].reshape(MAX_RUN_STEPS, len(first), -1)
        rows[0] = step
        self._run = _DecodeRun(traced, first, rows, self._copied_columns(rows))

    def _end_run(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.end()

    def _copied_columns(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Views of the columns :meth:`_copy_rows` fills (all but ``probs``) of packed
        host rows ``rows`` (uint8 [..., width]): {name: [..., *shape]}. A run makes
        them once, so a decode step costs one index and one copy per column."""
        return {name: torch.from_numpy(self.layout.view(rows, name))
                for name in self.layout.columns if name != "probs"}

    @staticmethod
    def _copy_rows(runner, total: int, rows: torch.Tensor | None,
                   out: dict[str, torch.Tensor]) -> None:
        """Copy buffer rows ``rows`` (None: all ``total``) into ``out``
        (:meth:`_copied_columns` of packed host rows [len(rows) or total, width])."""
        buffers = hook.BUFFERS
        # token ids from the device copy the model read: under async scheduling (vLLM's
        # default on CUDA) a decode step's fed-back token is written there only, and the
        # host copy holds a stale value; on CPU the two are one tensor
        sources = {"positions": runner.positions, "token_ids": runner.input_ids.gpu,
                   "expert_ids": buffers.expert_ids, "gate_weights": buffers.gate_weights}
        for name, source in sources.items():
            source = source[:total]
            out[name].copy_(source if rows is None else source[rows.to(source.device)])

    @staticmethod
    def _prompt_sums(buffer_starts: np.ndarray, prompt_rows: np.ndarray) -> dict:
        """{traced index j: float64 [L, E] sum of the router distribution over its
        prompt rows} for each j with ``prompt_rows[j]`` > 0, whose rows start at
        buffer row ``buffer_starts[j]`` (a request's rows are contiguous in a step).

        One reduction per such request, straight from the hook's layer-major
        scores: float32 within a step (pairwise summation, relative error ~1e-7,
        below the float32 the store keeps), float64 across steps.
        """
        chunks = np.flatnonzero(prompt_rows)
        if not len(chunks):
            return {}
        scores = hook.BUFFERS.router_scores
        sums = torch.stack([scores[:, start:start + count].sum(1) for start, count in zip(
            buffer_starts[chunks].tolist(), prompt_rows[chunks].tolist(), strict=True)])
        return dict(zip(chunks.tolist(), sums.double().cpu().numpy(), strict=True))

    def _copy_probs(self, rows: torch.Tensor | None, out: np.ndarray) -> None:
        """``--store-probs``: copy the distributions of buffer rows ``rows`` (None: rows
        [:len(out)]) into the probs column (float16 [n, L, E]) of packed rows ``out``,
        ``PROBS_BLOCK_ROWS`` rows at a time so that a gather's temporary stays small."""
        scores = hook.BUFFERS.router_scores  # [L, T, E]
        probs = torch.from_numpy(self.layout.view(out, "probs"))
        for block in range(0, len(out), PROBS_BLOCK_ROWS):
            stop = min(block + PROBS_BLOCK_ROWS, len(out))
            source = (scores[:, block:stop] if rows is None
                      else scores[:, rows[block:stop].to(scores.device)])
            probs[block:stop].copy_(source.transpose(0, 1))

    def retarget(self, trace_dir: str, run: str, weights_changed: bool = False) -> None:
        """Write further requests into another trace directory (next checkpoint);
        ``weights_changed``: the model's weights were reloaded, so the routing cache's
        rows are forgotten (vLLM's prefix cache is reset too, by the driver)."""
        with self.lock:
            if self.active and any(self.active.values()):
                raise RuntimeError("cannot switch trace directory while traced requests run")
            if self.sink is not None:
                self.sink.flush()
                self.sink.retarget(trace_dir, run)
            self.requests_recorded = 0
            if weights_changed and self.cache is not None:
                self.cache.invalidate()

    def fail(self, exc: BaseException) -> None:
        """Log once, switch capture off for this engine, remember the error for flush()."""
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
            compat.logger.error("%s capture failed and is now off for this engine: %s",
                                compat.LOG_PREFIX, self.error, exc_info=exc)
        self.active.clear()
        self._batch = None
        self._run = None

    def flush(self, requests_done: bool = False) -> dict:
        """Write pending routing; report new shards, requests recorded, and any error.

        ``requests_done``: the caller knows no traced request is still running (an
        offline engine after ``generate`` returned, or shutdown), so every request
        with recorded rows is finished now. vLLM tells workers which requests
        finished only with the next step, which an in-process engine
        (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) does not run after ``generate``
        returns, and which a multiprocess engine core runs concurrently with a flush.
        """
        with self.lock:
            shards = []
            try:
                if requests_done:
                    self.on_finished(list(self.active), all_stages=True)
                if self.sink is not None:
                    shards = self.sink.flush()
                else:
                    self.stages.wait_sent()
            except Exception as exc:  # a failed write must reach the driver, not vanish
                self.fail(exc)
            rejected, self.rejected = self.rejected, []
            return {"shards": shards, "error": self.error, "rejected": rejected,
                    "requests_recorded": self.requests_recorded,
                    "requests_recomputed": self.requests_recomputed,
                    "requests_incomplete": self.requests_incomplete,
                    "tokens_replayed": self.tokens_replayed}
