"""moepath's vLLM plugin (entry point ``vllm.general_plugins`` -> ``register``).

vLLM calls :func:`register` in every process it starts (user process,
EngineCore, each worker). It is idempotent and imports nothing heavy. It only
wraps ``Worker.load_model``; that wrapper reads the engine's capture settings
once (``additional_config["moepath"]``, see ``settings.py``) and, only when
tracing is on for that engine, installs the capture. An untraced engine runs
vLLM's own code paths: no routing hook, no per-step work (on an AMX CPU the
wrapper requests AMX tile permission first, for every engine: a vLLM crash fix).

Patch register (vLLM 0.32.0; versions checked in ``compat.py``):

| symbol | file | why | how | removal |
|---|---|---|---|---|
| ``Worker.load_model`` | v1/worker/gpu_worker.py (CPUWorker inherits) | the only per-engine point after the model is built and before it is compiled; also the first point in every CPU worker to request AMX tile permission, which vLLM 0.32's bf16 AMX attention needs and never requests (SIGILL otherwise), and to track models under zentorch, whose process-wide weight cache must not meet a freed model's addresses (``zentorch_cache.py``) | wrapper: requests AMX permission (CPU), calls the original, tracks the model under zentorch, then ``installation.install`` if traced | post-load hook: when vLLM offers one; AMX: when vLLM requests the permission itself; zentorch: when its cache no longer outlives the buffers it names |
| ``FusedMoERouter.select_experts`` | model_executor/layers/fused_moe/router/fused_moe_router.py | sole caller site of routing on every modular MoE path; sees logits, weights, logical ids (vLLM's ``set_capture_fn`` gives ids only) | class-level wrapper, installed only in traced workers: calls the original, then writes ids, weights and the scored logits into preallocated buffers (``hook.py``) | when a router capture callback passes logits and weights |
| ``GPUModelRunner.execute_model`` (instance) | v1/worker/gpu_model_runner.py (CPUModelRunner inherits) | batch layout (req_ids, query_start_loc, positions, the device copy of input_ids, and with prefix caching each request's block table and the KV slot mapping) is final after the forward | instance-level wrapper on traced workers: finished ids on entry, row mapping after the forward (with prefix caching: every token's routing kept at its KV slot, ``routing_cache.py``, and replayed for traced requests' cached tokens) | with the above |
| ``Worker.shutdown`` (instance, server mode only) | v1/worker/gpu_worker.py | commit the last shards and mark the trace complete when the server stops (earlier pipeline stages: send their last records to the last stage, which commits) | instance-level wrapper | — |
| ``Worker.moepath_flush`` / ``moepath_describe`` / ``moepath_switch`` / ``moepath_router_weights`` (added) | — | ``collective_rpc`` control: flush shards, report routing config, switch checkpoint and trace directory, read one layer's router matrix back from the loaded model (``router_linear.py``: the router linear applied to the identity, between steps) | instance attributes on traced workers | — |
| ``Worker.reload_weights`` (called, then CPU experts re-prepacked) | v1/worker/gpu_worker.py, fused_moe/experts/cpu_moe.py | vLLM 0.32 skips the AMX/VNNI prepack on reload (silently wrong routing); zentorch's experts would take the new weights as already reordered | ``reload.py`` copies ``cpu_prepack_moe_weight`` output into the same storage, or forgets zentorch's weight cache | when vLLM re-prepacks on reload |

CUDA: vLLM 0.32 defaults to the V2 model runner there, which this capture does
not wrap; traced engines are started with ``VLLM_USE_V2_MODEL_RUNNER=0`` (see
``EngineOptions.prepare_environment`` in ``options.py``), and a runner without V1
batch state is refused at load.
"""

from __future__ import annotations

import functools

_REGISTERED = False


def register() -> None:
    """vLLM plugin entry point: wrap ``Worker.load_model`` once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    from . import compat

    worker_cls = compat.worker_class()
    if not getattr(worker_cls.load_model, "__moepath_wrapped__", False):
        worker_cls.load_model = _wrap_load_model(worker_cls.load_model)
    _REGISTERED = True


def _wrap_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        from . import zentorch_cache

        _request_amx_permission()
        original(self, *args, **kwargs)
        if zentorch_cache.loaded():
            zentorch_cache.track(self.model_runner.get_model())
        from .settings import from_vllm_config

        settings = from_vllm_config(self.vllm_config)
        if settings is not None:
            from .inspection import UnsupportedModelError
            from .settings import write_refusal

            try:
                _enable_capture(self, settings)
            except UnsupportedModelError as exc:
                write_refusal(settings, str(exc))
                raise

    load_model.__moepath_wrapped__ = True
    return load_model


def _request_amx_permission() -> None:
    """Ask Linux for AMX tile state in this worker before vLLM's kernels use it.

    vLLM 0.32's CPU attention picks its AMX kernel for bf16 on AMX CPUs but
    never requests the tile-data permission (``arch_prctl(ARCH_REQ_XCOMP_PERM)``);
    unless oneDNN happened to request it first, the worker dies with SIGILL
    (exit code -4) on its first forward. Applies to untraced engines too.
    """
    import torch

    if not torch.cuda.is_available() and torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


def _enable_capture(worker, settings) -> None:
    from . import compat, inspection, installation

    compat.check_version()
    if not hasattr(worker.model_runner, "input_batch"):
        raise inspection.UnsupportedModelError(
            "moepath: this model runner has no V1 batch state (V2 runner?); start the engine "
            "with VLLM_USE_V2_MODEL_RUNNER=0 to trace")
    from . import reload, router_linear

    capture = installation.install(worker, settings)
    recorder = capture.recorder

    def describe() -> dict:
        """The manifest's model fields this worker knows (routing, whether it writes, why
        checkpoints cannot be reloaded in place), alike for a driver and the committer."""
        return capture.describe() | {"writer": recorder is not None,
                                     "reload_blocker": _reload_blocker(worker)}

    worker.moepath_describe = describe
    # the driver flushes between generate calls: its requests are done
    worker.moepath_flush = (functools.partial(recorder.flush, requests_done=True)
                            if recorder is not None
                            else lambda: {"shards": [], "error": None, "rejected": [],
                                         "requests_recorded": 0, "requests_recomputed": 0,
                                         "requests_incomplete": 0, "tokens_replayed": 0})

    def switch(trace_dir: str, run: str, weights_path: str | None = None) -> None:
        if weights_path:
            reload.reload_checkpoint(worker, weights_path)
        if recorder is not None:
            recorder.retarget(trace_dir, run, weights_changed=bool(weights_path))

    worker.moepath_switch = switch

    def router_weights(slot: int) -> dict | None:
        """The model's MoE layer ``slot``'s router matrix read back from the loaded model
        (see ``router_linear.py``); None on ranks that do not record it (tensor-parallel
        ranks other than 0 hold it too; other pipeline stages hold other layers)."""
        local = capture.local_slot(slot)
        if recorder is None or local is None:
            return None
        return router_linear.layer_reply(worker.model_runner.get_model(),
                                         capture.routing.layers[local],
                                         capture.routing.num_experts, worker.model_runner.device)

    worker.moepath_router_weights = router_weights
    if settings.commit and recorder is not None:
        _commit_from_worker(worker, settings, capture, describe, router_weights)


def _commit_from_worker(worker, settings, capture, describe, router_weights) -> None:
    """Server mode: the writing worker commits the manifest periodically and at shutdown.

    ``describe()`` gives the manifest's routing fields, as ``moepath_describe`` gives
    them to a driver; ``router_weights(slot)`` a layer's router matrix, as
    ``moepath_router_weights`` does. With pipeline parallelism the last stage
    commits, with every stage's router matrices gathered at load; the other stages
    send it their last records when they shut down.
    """
    from ..tracer.manifest import ModelInfo
    from . import inspection, router_linear
    from .committer import ManifestCommitter

    config = worker.vllm_config
    parallel = config.parallel_config
    if parallel.data_parallel_size > 1:
        raise inspection.UnsupportedModelError(
            "moepath: a data-parallel server is not traced: each rank's engine has its own "
            "writing worker and no commit joins their shards into one trace (untested, as "
            "vLLM 0.32's CPU backend cannot serve a MoE model data parallel at all: its CPU "
            "communicator lacks the all_gatherv the MoE dispatch calls); serve traced with "
            "--data-parallel-size 1, one server per trace directory, or trace offline in "
            "parts (moepath trace --part I/N, then moepath merge)")
    if parallel.distributed_executor_backend == "ray":
        raise inspection.UnsupportedModelError(
            "moepath: vLLM's Ray executor ends its workers with ray.kill, never calling their "
            "shutdown, so a served trace would never get its last commit nor be marked "
            "complete; serve traced with --distributed-executor-backend mp (one node), or "
            "trace offline (moepath trace; its driver commits)")
    info = ModelInfo.from_dict(describe())
    replies = [router_weights(slot) for slot in range(info.num_layers)]
    recorder, stages = capture.recorder, capture.stages
    if stages is not None:
        gathered = stages.gather([reply for reply in replies if reply is not None])
        if not stages.collects:
            _flush_at_shutdown(worker, recorder)
            return
        replies = [reply for stage in gathered for reply in stage]
    committer = ManifestCommitter(settings, recorder, info, router_linear.from_replies(replies),
                                  config.model_config.model,
                                  str(config.model_config.dtype).removeprefix("torch."))
    original_shutdown = worker.shutdown

    def shutdown(*args, **kwargs):
        committer.close()
        return original_shutdown(*args, **kwargs)

    worker.shutdown = shutdown


def _flush_at_shutdown(worker, recorder) -> None:
    """A pipeline stage that does not commit sends its last records to the committing
    stage when the server stops (that stage's committer takes them in at its close)."""
    original_shutdown = worker.shutdown

    def shutdown(*args, **kwargs):
        recorder.flush(requests_done=True)
        return original_shutdown(*args, **kwargs)

    worker.shutdown = shutdown


def _reload_blocker(worker) -> str | None:
    """Why this engine cannot reload checkpoints in place (None: it can)."""
    from .reload import ReloadUnsupported, check_reloadable

    try:
        check_reloadable(worker.model_runner.get_model(), worker.model_runner.device)
    except ReloadUnsupported as exc:
        return str(exc)
    return None
