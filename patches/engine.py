"""Offline tracing: a traced vLLM engine, and the driver behind ``moepath trace``.

The driver writes the trace through a :class:`~..tracer.writer.TraceWriter`. It
feeds samples in batches; after each batch it asks the workers to flush
(``collective_rpc``), checks that every sample of the batch was recorded, and
commits the batch's routing shards and samples rows together. A run killed at
any point resumes from the last commit with ``resume=True``: committed samples
are skipped, uncommitted shards removed, so every sample ends up in the trace
exactly once.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..tracer import checkpoints, provenance, store
from ..tracer.errors import CaptureError, InputError, ModelError
from ..tracer.manifest import Manifest, ModelInfo
from ..tracer.provenance import input_section
from ..tracer.samples import SampleSet, sample_table
from ..tracer.writer import TraceWriter
from . import compat
from .options import EngineOptions, TraceOptions
from .settings import REQUEST_ID_KEY, REQUEST_META_KEY, CaptureSettings, read_refusal

if TYPE_CHECKING:
    from .cluster import Cluster


def tag(params, sample_id: str, meta: dict | None = None):
    """Mark vLLM ``SamplingParams`` so the request is traced as ``sample_id`` (returns them).

    ``meta`` (JSON-serialisable dict) lands in the trace's samples table. With
    ``n > 1`` every completion is recorded under its own completion index. The
    request reads vLLM's prefix cache as an untraced one would (vLLM skips it for
    requests with prompt log-probs): the routing of cached tokens is replayed from
    the routing kept beside their KV blocks (``routing_cache.py``).
    """
    params.extra_args = {**(params.extra_args or {}), REQUEST_ID_KEY: str(sample_id),
                         "moepath_n": params.n, REQUEST_META_KEY: json.dumps(meta or {})}
    return params


class TracedEngine:
    """A vLLM ``LLM`` with moepath capture on; the Python API. Use as a context manager.

    With ``commit=True`` (the default) the engine's worker owns the trace
    directory: finished requests are committed every second and the trace is
    complete when the engine closes (also on exceptions)::

        with TracedEngine("toy", "out/trace") as engine:
            params = tag(SamplingParams(max_tokens=16), "a17", {"task": "qa"})
            engine.llm.generate(["The cat"], params)
        Trace.open("out/trace")  # complete, samples table with sample_id, task

    ``commit=False`` leaves committing to the caller: after each ``generate``,
    ``flush()`` returns the new shards to commit; ``moepath trace`` and ``compare``
    drive it that way.
    """

    def __init__(self, model: str | Path, trace_dir: str | Path,
                 options: EngineOptions | None = None, trace_all: bool = False,
                 commit: bool = True):
        from vllm import LLM

        options = options or EngineOptions()
        if why := compat.check_loadable(checkpoints.moe_shape(model).architecture):
            raise ModelError(why)
        options.prepare_environment()
        refusal = Path(tempfile.mkdtemp(prefix="moepath-")) / "refusal.txt"
        self.settings = CaptureSettings(dir=str(trace_dir), trace_all=trace_all,
                                        store_probs=options.store_probs, store=options.store,
                                        commit=commit, flush_interval_s=1.0,
                                        refusal_file=str(refusal)).with_run()
        self.model = Path(model)
        kwargs = options.llm_kwargs(str(model), self.settings)
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:  # vLLM reports a worker's failure at load without its reason
            if (why := read_refusal(self.settings)) is not None:
                raise ModelError(why) from exc
            raise
        finally:
            shutil.rmtree(refusal.parent, ignore_errors=True)
        self.routing = ModelInfo.from_dict(self.llm.collective_rpc("moepath_describe")[0])

    @property
    def reload_blocker(self) -> str | None:
        """Why checkpoints cannot be switched in place (None: they can)."""
        return self.routing.reload_blocker

    def switch_checkpoint(self, model: str | Path, trace_dir: str | Path) -> list[store.ShardInfo]:
        """Load ``model``'s weights in place and trace into ``trace_dir`` from now on.

        Exact on CPU thanks to the re-prepack in ``reload.py`` (proven by
        tests/test_compare_engine.py); resets the prefix cache so no KV computed
        with the old weights is reused. Same architecture and config only.
        Returns what :meth:`retarget` returns.
        """
        if self.reload_blocker:
            raise CaptureError(f"this engine cannot reload checkpoints: {self.reload_blocker}")
        shards = self._switch(trace_dir, model)
        self.llm.reset_prefix_cache()
        self.model = Path(model)
        return shards

    def retarget(self, trace_dir: str | Path) -> list[store.ShardInfo]:
        """Write the routing of further requests into ``trace_dir`` (same weights).

        Pending routing is flushed into the current directory first: the returned
        shards belong there, for the caller to commit (none when it flushed after
        its last ``generate``). ``commit=False`` engines only.
        """
        return self._switch(trace_dir, None)

    def _switch(self, trace_dir: str | Path, model: str | Path | None) -> list[store.ShardInfo]:
        self._refuse_if_worker_commits("switch directories")
        shards = self.flush()
        run = CaptureSettings(dir=str(trace_dir)).with_run().run
        self.llm.collective_rpc("moepath_switch", kwargs={
            "trace_dir": str(trace_dir), "run": run,
            "weights_path": str(model) if model else None})
        self.settings = CaptureSettings(
            **{**self.settings.as_dict(), "dir": str(trace_dir), "run": run})
        return shards

    def router_weights(self) -> store.RouterWeights:
        """The router matrix (and bias) of every traced MoE layer as the loaded model
        computes its router logits, read back by the writing worker (``router_linear.py``),
        or why it has none. One RPC per layer keeps each reply to one matrix."""
        from .router_linear import from_replies

        replies = []
        for slot in range(self.routing.num_layers):
            answers = self.llm.collective_rpc("moepath_router_weights", kwargs={"slot": slot})
            answers = [answer for answer in answers if answer is not None]
            if not answers:
                raise CaptureError("no worker of the engine answered for the router weights "
                                   "(no writing rank?); the trace cannot be started")
            replies.append(answers[0])
        return from_replies(replies)

    @property
    def max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    def sampling_params(self, sample_id: str, max_tokens: int = 0, nll: bool = False, **extra):
        """SamplingParams that trace this request under ``sample_id``.

        ``max_tokens=0`` is prefill only (vLLM samples one token that is never
        fed back, so only prompt tokens are recorded). ``nll`` asks for prompt
        log-probs, for which vLLM computes every prompt token (no prefix-cache reads).
        """
        from vllm import SamplingParams

        return tag(SamplingParams(
            max_tokens=max(1, max_tokens), temperature=0.0, detokenize=False,
            prompt_logprobs=0 if nll else None, flat_logprobs=True, **extra), sample_id)

    def flush(self) -> list[store.ShardInfo]:
        """Write all finished requests' routing and return the new shards, for the caller
        to commit; raise CaptureError if capture failed or a request's routing was not
        finite (``recorder.nonfinite_routing``: that request is not recorded).

        ``commit=False`` engines only: with ``commit=True`` the worker's committer
        thread owns the shards, and shards taken from it would never be committed
        (a later run on the directory deletes them). Call it between ``generate``
        calls: every traced request recorded so far is then taken as finished (vLLM
        would tell the worker only with a later step). ``self.requests_recomputed``
        then counts traced requests that vLLM preempted and recomputed (their
        recomputed rows replaced the first ones), and ``self.tokens_replayed`` traced
        tokens served from the prefix cache, whose routing was replayed (both since
        the engine started).
        """
        self._refuse_if_worker_commits("flush and commit routing yourself")
        replies = self.llm.collective_rpc("moepath_flush")
        self.requests_recomputed = sum(reply["requests_recomputed"] for reply in replies)
        self.tokens_replayed = sum(reply["tokens_replayed"] for reply in replies)
        errors = [reply["error"] for reply in replies if reply["error"]]
        if errors:
            raise CaptureError(f"routing capture failed in the engine: {errors[0]}")
        rejected = [why for reply in replies for why in reply["rejected"]]
        if rejected:
            more = f" ({len(rejected) - 1} more sample(s) alike)" if len(rejected) > 1 else ""
            raise CaptureError(rejected[0] + more)
        return [store.ShardInfo(**shard) for reply in replies for shard in reply["shards"]]

    def _refuse_if_worker_commits(self, action: str) -> None:
        if self.settings.commit:
            raise CaptureError(f"this engine's worker commits its own trace directory "
                               f"(commit=True); start it with commit=False to {action}")

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    def __enter__(self) -> TracedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Tokenized:
    sample_id: str
    token_ids: list[int]
    truncated: bool


def tokenize_samples(model: str | Path, sample_set: SampleSet, max_len: int, truncate: bool,
                     trust_remote_code: bool = False) -> list[Tokenized]:
    """Token ids of every sample, at most ``max_len`` tokens each.

    A longer sample is cut to ``max_len`` when ``truncate``, else InputError names
    it and its file. Writes nothing: callers tokenise before touching a trace directory.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    source = f" of '{sample_set.path}'" if sample_set.path else ""
    result = []
    for sample in sample_set.samples:
        ids = list(sample.input_ids) if sample.input_ids is not None else tokenizer(
            sample.text).input_ids
        if not ids:
            raise InputError(f"sample '{sample.sample_id}'{source} has no tokens; remove it")
        too_long = len(ids) > max_len
        if too_long and not truncate:
            raise InputError(
                f"sample '{sample.sample_id}'{source} is {len(ids)} tokens, longer than the "
                f"limit {max_len} (max_model_len minus generated tokens); pass --truncate or "
                f"raise --max-model-len")
        result.append(Tokenized(sample.sample_id, ids[:max_len], too_long))
    return result


def mean_nll(output) -> float | None:
    """Mean next-token negative log-likelihood of a prompt, in nats, from vLLM's prompt
    log-probs: over prompt tokens 1..P-1 (the first has none). None without prompt
    log-probs; NaN for a one-token prompt."""
    logprobs = output.prompt_logprobs
    if logprobs is None:
        return None
    values = logprobs.logprobs if hasattr(logprobs, "logprobs") else [
        next(iter(lp.values())).logprob for lp in logprobs[1:]]
    return float(-np.mean(values)) if len(values) else float("nan")


@dataclass
class TraceSummary:
    """What one tracing run did.

    ``samples``: samples traced by this run; ``tokens``: their prompt tokens (after
    truncation; generated tokens are not counted); ``truncated``, ``skipped_lines``,
    ``resumed_samples`` (already in the trace before this run): counts over the
    whole samples set; ``seconds``: wall time of this run's batches (engine start
    excluded; on a cluster, of its tracing until this trace was merged); ``bytes``: size
    of the trace directory on disk; ``lost_engines``: engine actors of a cluster lost
    while tracing it (their parts were resumed on others).
    """

    trace_dir: Path
    samples: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped_lines: int = 0
    resumed_samples: int = 0
    seconds: float = 0.0
    bytes: int = 0
    lost_engines: int = 0


ProgressFn = Callable[[int, int], None]  # (samples done in this run, their prompt tokens)


def trace_samples(model: str | Path, sample_set: SampleSet, out: str | Path,
                  engine_options: EngineOptions = EngineOptions(),  # noqa: B008 (frozen)
                  options: TraceOptions = TraceOptions(), resume: bool = False,  # noqa: B008
                  force: bool = False, on_start: Callable[[int, int], None] | None = None,
                  on_progress: ProgressFn | None = None,
                  cluster: Cluster | None = None) -> TraceSummary:
    """Trace every sample of ``sample_set`` through ``model`` into the trace directory ``out``.

    ``on_start(total_samples, already_done)`` is called once the engine is up;
    ``on_progress(samples, tokens)`` after each committed batch. With ``cluster``
    (:class:`~.cluster.Cluster`), the samples are split over its engine actors and
    their parts merged into ``out`` (``on_progress`` then counts the whole cluster).
    """
    checkpoints.moe_shape(model)  # fails fast for dense models / bad paths
    job, started = prepare_job(model, sample_set, engine_options, options)
    if cluster is not None:
        return cluster.trace(model, job, started, out, resume=resume, force=force,
                             on_start=on_start, on_progress=on_progress)
    writer = TraceWriter.open(out, resume=resume, force=force)
    if writer.resumed is not None:
        provenance.check_resumable(
            writer.trace_dir, writer.resumed, model, sample_set,
            recorded_options(engine_options, options, started.max_model_len))
    if writer.resumed is not None and not job.todo(writer):  # nothing left: no engine needed
        if on_start:
            on_start(len(job.tokenized), len(job.tokenized))
        return job.finish(writer, TraceSummary(writer.trace_dir))
    with TracedEngine(model, writer.trace_dir, started, commit=False) as engine:
        return job.run(engine, writer, on_start, on_progress)


@dataclass
class TraceJob:
    """The samples (tokenised once) and options of a trace; runs on a started engine.

    ``moepath compare`` runs one job per checkpoint on the same tokenisation.
    """

    sample_set: SampleSet
    tokenized: list[Tokenized]
    engine_options: EngineOptions
    options: TraceOptions

    def part(self, index: int, count: int) -> TraceJob:
        """Part ``index`` of ``count`` of the samples (:meth:`SampleSet.take_part`: samples
        index, index + count, ...) with their token ids: one data-parallel engine's job."""
        return replace(self, sample_set=self.sample_set.take_part(index, count),
                       tokenized=self.tokenized[index::count])

    def todo(self, writer: TraceWriter) -> list[Tokenized]:
        done = writer.committed_sample_ids()
        return [t for t in self.tokenized if t.sample_id not in done]

    def run(self, engine: TracedEngine, writer: TraceWriter,
            on_start: Callable[[int, int], None] | None = None,
            on_progress: ProgressFn | None = None) -> TraceSummary:
        """Trace the samples not yet committed by ``writer`` (the engine writes into its
        directory) and finish the trace."""
        batches = self.traced_batches(engine, writer)
        summary = next(batches)
        if on_start:
            on_start(len(self.tokenized), summary.resumed_samples)
        for summary in batches:
            if on_progress:
                on_progress(summary.samples, summary.tokens)
        return self.finish(writer, summary)

    def traced_batches(self, engine: TracedEngine, writer: TraceWriter) -> Iterator[TraceSummary]:
        """Trace the samples not yet committed by ``writer``, one committed batch at a time:
        yields this run's summary once the trace is begun (``resumed_samples`` set, nothing
        traced yet) and again after each batch. Leaves the trace running (:meth:`finish`)."""
        todo = self.todo(writer)
        summary = TraceSummary(writer.trace_dir, resumed_samples=len(self.tokenized) - len(todo))
        writer.begin(lambda: _new_manifest(engine, self.sample_set, self.engine_options,
                                           self.options),
                     router_weights=engine.router_weights())
        yield summary
        meta = {s.sample_id: s for s in self.sample_set.samples}
        started = time.perf_counter()
        for batch in _batches(todo, self.options.batch_size):
            _trace_batch(engine, batch, meta, self.options, writer)
            summary.samples += len(batch)
            summary.tokens += sum(len(t.token_ids) for t in batch)
            summary.seconds = time.perf_counter() - started
            yield summary

    def finish(self, writer: TraceWriter, summary: TraceSummary) -> TraceSummary:
        """Mark the trace complete with its counts; fill in ``summary``'s totals."""
        summary.resumed_samples = len(self.tokenized) - summary.samples
        summary.truncated = sum(t.truncated for t in self.tokenized)
        summary.skipped_lines = len(self.sample_set.skipped_lines)
        writer.finish(truncated=summary.truncated, skipped_lines=summary.skipped_lines)
        summary.bytes = sum(p.stat().st_size for p in writer.trace_dir.rglob("*") if p.is_file())
        return summary


def prepare_job(model: str | Path, sample_set: SampleSet, engine_options: EngineOptions,
                options: TraceOptions) -> tuple[TraceJob, EngineOptions]:
    """Tokenise ``sample_set`` with ``model``'s tokenizer within its context (InputError for
    a sample too long without ``truncate``); return the job and the options its engines
    start with (``max_model_len``: the prompt limit plus the generated tokens). Writes
    nothing, starts no engine."""
    max_len = max_prompt_len(model, engine_options, options)
    tokenized = tokenize_samples(model, sample_set, max_len, options.truncate,
                                 engine_options.trust_remote_code)
    return (TraceJob(sample_set, tokenized, engine_options, options),
            with_max_len(engine_options, max_len, options))


def max_prompt_len(model, engine_options: EngineOptions, options: TraceOptions) -> int:
    """Prompt tokens a sample may have: the context (--max-model-len, else the model's)
    minus the generated tokens (at least 1: vLLM samples one even for prefill only).

    InputError when that leaves no room for a prompt.
    """
    config = checkpoints.read_config(model)
    context = int(engine_options.max_model_len or config.get("max_position_embeddings") or 2048)
    if context <= max(1, options.max_tokens):
        raise InputError(
            f"--max-model-len must exceed --max-tokens (at least 1 generated token), got "
            f"{context} and {options.max_tokens}; raise --max-model-len or lower --max-tokens")
    return context - max(1, options.max_tokens)


def with_max_len(engine_options: EngineOptions, max_len: int, options: TraceOptions):
    return replace(engine_options, max_model_len=max_len + max(1, options.max_tokens))


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _trace_batch(engine: TracedEngine, batch: list[Tokenized], meta: dict,
                 options: TraceOptions, writer: TraceWriter) -> None:
    """Trace one batch and commit its routing shards and samples rows together."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=t.token_ids) for t in batch]
    params = [engine.sampling_params(t.sample_id, options.max_tokens, options.nll)
              for t in batch]
    try:
        outputs = engine.llm.generate(prompts, params, use_tqdm=False)
        shards = engine.flush()
        _check_recorded(writer, shards, batch)
    except CaptureError as exc:
        writer.fail(str(exc))
        raise
    frame = sample_table([meta[t.sample_id] for t in batch])
    frame["num_tokens"] = [len(t.token_ids) for t in batch]
    frame["truncated"] = [t.truncated for t in batch]
    frame["nll"] = [mean_nll(o) for o in outputs] if options.nll else np.nan
    writer.commit(routing=shards, samples=pa.Table.from_pandas(frame, preserve_index=False))


def _check_recorded(writer: TraceWriter, shards: list[store.ShardInfo],
                    batch: list[Tokenized]) -> None:
    """Every sample of the batch must be in the new shards: a silent gap is an error."""
    recorded = writer.recorded_sample_ids(shards)
    missing = [t.sample_id for t in batch if t.sample_id not in recorded]
    if missing:
        raise CaptureError(
            f"{len(missing)} traced sample(s) recorded no routing (first: '{missing[0]}'); "
            f"the trace is marked failed")


def _new_manifest(engine: TracedEngine, sample_set: SampleSet, engine_options: EngineOptions,
                  options: TraceOptions) -> Manifest:
    from .committer import engine_manifest

    return engine_manifest(
        engine.model, engine_options.dtype, engine.routing, input_section(sample_set),
        recorded_options(engine_options, options, engine.max_model_len), engine_options.store)


def recorded_options(engine_options: EngineOptions, options: TraceOptions,
                     max_model_len: int) -> dict:
    """The manifest's ``options``: what the run was asked to do, with the engine's context."""
    return {**asdict(engine_options), **asdict(options), "max_model_len": max_model_len}
