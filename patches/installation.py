"""Capture installation in a vLLM worker: the routing hook and the step recorder wired in.

``install(worker, settings)`` runs after the worker loaded the model and before
vLLM compiles it. It inspects the model (``inspection.py``), allocates
:class:`hook.CaptureBuffers`, tags each layer's router with its MoE-layer ordinal
and wraps the model runner's ``execute_model`` so that a
:class:`recorder.StepRecorder` sees every step (and, with vLLM's prefix caching
on, keeps every computed token's routing in a ``routing_cache.RoutingCache``).
With pipeline parallelism each stage records its own layers and the last stage
writes the joined records (``stages.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from . import compat, hook
from .inspection import ModelRouting, UnsupportedModelError, inspect_model
from .recorder import StepRecorder
from .settings import CaptureSettings
from .sink import RoutingSink
from .stages import PipelineStages


def wrap_execute_model(runner, recorder: StepRecorder):
    """Instance-level wrapper of ``runner.execute_model`` (V1 model runner, CPU and CUDA)."""
    original = runner.execute_model

    @functools.wraps(original)
    def execute_model(scheduler_output, *args, **kwargs):
        with recorder.lock:
            try:  # also after a failure: pipeline stages exchange finished records in lockstep
                recorder.on_finished(scheduler_output.finished_req_ids)
                if recorder.error is None:
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


def records_routing() -> bool:
    """Only tensor-parallel rank 0 (of each pipeline stage and data-parallel rank) records."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank() == 0


def uses_prefix_caching(vllm_config, settings: CaptureSettings) -> bool:
    """Whether the engine reads vLLM's prefix cache, so that the recorder keeps a routing
    cache; refuses what that cache cannot serve (UnsupportedModelError)."""
    if not vllm_config.cache_config.enable_prefix_caching:
        return False
    if vllm_config.parallel_config.decode_context_parallel_size > 1:
        raise UnsupportedModelError(
            "moepath: decode context parallelism spreads each KV block over ranks, and the "
            "routing of prefix-cache hits is kept by whole blocks; start the engine with "
            "--no-enable-prefix-caching or without --decode-context-parallel-size")
    if settings.store_probs:
        raise UnsupportedModelError(
            "moepath: store_probs keeps every token's router distribution, which the routing "
            "cache does not keep for prefix-cache hits; start the engine with "
            "--no-enable-prefix-caching to store them (moepath's own engines do)")
    return True


@dataclass
class Capture:
    """What :func:`install` set up in a worker.

    ``routing``: this worker's MoE layers; ``recorder``: None on ranks that do not
    record; ``stages``: the pipeline's recording workers (None: one stage), whose
    last stage alone writes (``recorder.sink``).
    """

    routing: ModelRouting
    recorder: StepRecorder | None
    stages: PipelineStages | None = None

    def describe(self) -> dict:
        """The manifest's routing fields for the whole model (every pipeline stage's layers)."""
        section = self.routing.describe()
        if self.stages is not None:
            layer_ids = self.stages.layer_ids
            section |= {"num_layers": len(layer_ids), "layer_ids": layer_ids}
        return section

    def local_slot(self, slot: int) -> int | None:
        """This worker's index of the model's MoE layer ``slot`` (None: another stage's)."""
        local = slot - (self.stages.first_slot() if self.stages is not None else 0)
        return local if 0 <= local < len(self.routing.layers) else None


def install(worker, settings: CaptureSettings) -> Capture:
    """Set up capture in a worker whose model is loaded; no recorder on non-recording ranks.

    Other tensor-parallel ranks still run the hook (every TP rank computes identical
    routing from the replicated gate) but never map or write rows.
    """
    prefix_caching = uses_prefix_caching(worker.vllm_config, settings)
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
    if not records_routing():
        return Capture(routing, None)
    config = worker.vllm_config
    stages = PipelineStages.of(config, [layer.layer_id for layer in layers])
    sink = None
    if stages is None or stages.collects:
        num_layers = len(stages.layer_ids) if stages is not None else len(layers)
        sink = RoutingSink(settings.dir, settings.run, config.parallel_config.data_parallel_rank,
                           (num_layers, routing.top_k, routing.num_experts),
                           settings.shard_tokens, settings.store)
    recorder = StepRecorder(settings, routing, sink, stages, prefix_caching)
    wrap_execute_model(runner, recorder)
    return Capture(routing, recorder, stages)
