"""Capture installation in a vLLM worker: the routing hook and the step recorder wired in.

``install(worker, settings)`` runs after the worker loaded the model and before
vLLM compiles it. It inspects the model (``inspection.py``), allocates
:class:`hook.CaptureBuffers`, tags each layer's router with its MoE-layer ordinal
and wraps the model runner's ``execute_model`` so that a
:class:`recorder.StepRecorder` sees every step.
"""

from __future__ import annotations

import functools

from . import compat, hook
from .inspection import ModelRouting, inspect_model
from .recorder import StepRecorder
from .settings import CaptureSettings
from .sink import RoutingSink


def wrap_execute_model(runner, recorder: StepRecorder):
    """Instance-level wrapper of ``runner.execute_model`` (V1 model runner, CPU and CUDA)."""
    original = runner.execute_model

    @functools.wraps(original)
    def execute_model(scheduler_output, *args, **kwargs):
        if recorder.error is None:
            with recorder.lock:
                try:
                    recorder.on_finished(scheduler_output.finished_req_ids)
                    hook.SCORES_WANTED = recorder.wants_scores(scheduler_output)
                except Exception as exc:
                    recorder.fail(exc)
        scores_written = hook.SCORES_WANTED
        try:
            result = original(scheduler_output, *args, **kwargs)
        finally:
            hook.SCORES_WANTED = True
        if recorder.error is None and scheduler_output.total_num_scheduled_tokens > 0:
            with recorder.lock:
                try:
                    recorder.after_forward(
                        runner, scheduler_output.total_num_scheduled_tokens, scores_written)
                except Exception as exc:
                    recorder.fail(exc)
        return result

    runner.execute_model = execute_model


def is_writer(vllm_config) -> bool:
    """Only tensor-parallel rank 0 (of each data-parallel rank) writes routing."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank() == 0


def install(worker, settings: CaptureSettings) -> tuple[ModelRouting, StepRecorder | None]:
    """Set up capture in a worker whose model is loaded; no recorder on non-writer ranks.

    Non-writer ranks still run the hook (every TP rank computes identical routing
    from the replicated gate) but never map or write rows.
    """
    runner = worker.model_runner
    routing = inspect_model(runner.get_model(), worker.vllm_config)
    layers = routing.layers
    hook.BUFFERS = hook.CaptureBuffers.allocate(
        runner.max_num_tokens, len(layers), routing.top_k, routing.num_experts, runner.device,
        sigmoid=routing.config["scoring_func"] == "sigmoid")
    for slot, layer in enumerate(layers):
        layer.router._moepath_slot = slot
        layer.router._moepath_weight_scale = layer.output_scale
        layer.router._moepath_bias = layer.selection_bias
    router_cls = compat.router_base_class()
    if not getattr(router_cls.select_experts, "__moepath_wrapped__", False):
        router_cls.select_experts = hook.wrap_select_experts(router_cls.select_experts)
    if not is_writer(worker.vllm_config):
        return routing, None
    dp_rank = worker.vllm_config.parallel_config.data_parallel_rank
    sink = RoutingSink(settings.dir, settings.run, dp_rank,
                       (len(layers), routing.top_k, routing.num_experts), settings.shard_tokens,
                       settings.store)
    recorder = StepRecorder(settings, routing, sink)
    wrap_execute_model(runner, recorder)
    return routing, recorder
