"""Pipeline parallelism: the stages' routing of one request joined into one record.

With ``--pipeline-parallel-size P`` each stage holds a contiguous range of the
decoder layers (vLLM's ``get_pp_indices``), so the tensor-parallel rank 0 of each
stage records its own MoE layers, keyed by their global layer ids. Every stage
receives the same scheduler output and builds the same batch layout, so each
records the same (request, position) rows; only the layers differ.

The last stage (vLLM's output rank) is the collector: whenever requests finish,
every other stage sends it their records over the pipeline group's CPU process
group, and the collector joins each request's parts into one record with all
layers, which alone goes to the trace. Every stage learns when requests finish
from the same scheduler output, so they exchange in lockstep; a stage that
failed still takes part and sends its error, which fails the collector's
capture. Earlier stages send without waiting (the collector receives after
its own forward of the step, which needs their activations first); messages
carry their own tag, apart from vLLM's activation traffic on the same group.
Nothing travels across nodes but through vLLM's own process group, so the
layout needs no shared file system.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import numpy as np
import torch

from ..tracer import store

# tag of moepath's messages on the pipeline group (vLLM's own use tag 0)
MESSAGE_TAG = 0x6D6F65
SEND_TIMEOUT = timedelta(minutes=5)  # a stage waits this long for the collector at a flush


class StageMismatch(RuntimeError):
    """The stages' records of one request do not describe the same tokens."""


def join_stage_records(parts: list[store.RoutingRecord]) -> store.RoutingRecord:
    """One request's record with every stage's layers, from its parts in stage order.

    Each part has the same positions and token ids (StageMismatch otherwise) and
    its stage's layers; expert ids, gate weights, per-token distributions
    ([T, L_s, ...]) and the prompt mean ([L_s, E]) are joined along the layer axis.
    """
    first = parts[0]
    for stage, part in enumerate(parts[1:], start=1):
        if not (np.array_equal(part.positions, first.positions)
                and np.array_equal(part.token_ids, first.token_ids)):
            raise StageMismatch(
                f"request '{first.request_id}': pipeline stage {stage} recorded other tokens "
                f"than stage 0 (positions {part.positions[:3]}... vs {first.positions[:3]}...)")

    def layers(name: str, axis: int) -> np.ndarray | None:
        arrays = [getattr(part, name) for part in parts]
        return None if arrays[0] is None else np.concatenate(arrays, axis=axis)

    return store.RoutingRecord(
        sample_id=first.sample_id, request_id=first.request_id, completion=first.completion,
        num_prompt_tokens=first.num_prompt_tokens, positions=first.positions,
        token_ids=first.token_ids, expert_ids=layers("expert_ids", 1),
        gate_weights=layers("gate_weights", 1), router_mean=layers("router_mean", 0),
        router_probs=layers("router_probs", 1), meta=first.meta)


class PipelineStages:
    """The recording workers (tensor-parallel rank 0) of an engine's pipeline stages, seen
    from one of them; see the module. Build it with :meth:`of` at load, in every stage
    at once: it exchanges the stages' MoE layer ids."""

    def __init__(self, group, layer_ids: list[list[int]]):
        self.group = group  # vLLM's pipeline GroupCoordinator
        self.stage = group.rank_in_group
        self.stage_layer_ids = layer_ids  # global MoE layer ids of each stage, stage order
        self._sends: list = []  # (work, tensor): sends in flight, their buffers kept alive

    @classmethod
    def of(cls, vllm_config, layer_ids: list[int]) -> PipelineStages | None:
        """The pipeline of this worker with its MoE layers ``layer_ids`` (None: one stage).
        Collective: every stage's recording worker calls it at load."""
        if vllm_config.parallel_config.pipeline_parallel_size == 1:
            return None
        from vllm.distributed import get_pp_group

        group = get_pp_group()
        gathered: list = [None] * group.world_size
        torch.distributed.all_gather_object(gathered, list(layer_ids), group=group.cpu_group)
        return cls(group, gathered)

    @property
    def collects(self) -> bool:
        """Whether this stage joins the records and writes them (the last stage)."""
        return self.stage == self.group.world_size - 1

    @property
    def layer_ids(self) -> list[int]:
        """Global ids of every stage's MoE layers, in layer order."""
        return [layer for ids in self.stage_layer_ids for layer in ids]

    def first_slot(self) -> int:
        """The pipeline-wide slot (index into :attr:`layer_ids`) of this stage's first layer."""
        return sum(len(ids) for ids in self.stage_layer_ids[:self.stage])

    def gather(self, value) -> list | None:
        """Every stage's ``value``, in stage order, on the collector (None elsewhere).
        Collective: every stage calls it."""
        values: list | None = [None] * self.group.world_size if self.collects else None
        torch.distributed.gather_object(value, values, dst=self.group.ranks[-1],
                                        group=self.group.cpu_group)
        return values

    def join(self, records: dict[str, store.RoutingRecord],
             error: str | None) -> dict[str, store.RoutingRecord]:
        """This stage's records of the requests that just finished (request id -> record),
        and its capture error: on the collector, the joined records (StageMismatch or
        RuntimeError when a stage failed or lacks a request the collector has); on the
        other stages, {} once sent."""
        if not self.collects:
            self._send({"records": records, "error": error})
            return {}
        messages = [self._receive(stage) for stage in range(self.group.world_size - 1)]
        for stage, message in enumerate(messages):
            if message["error"]:
                raise RuntimeError(f"pipeline stage {stage} failed: {message['error']}")
        joined = {}
        for req_id, record in records.items():
            parts = [message["records"].get(req_id) for message in messages]
            if any(part is None for part in parts):
                stage = next(s for s, part in enumerate(parts) if part is None)
                raise StageMismatch(f"request '{req_id}' finished on the last pipeline stage "
                                    f"but stage {stage} recorded no routing for it")
            joined[req_id] = join_stage_records([*parts, record])
        return joined

    def wait_sent(self) -> None:
        """Wait until the collector received everything this stage sent (at a flush)."""
        for work, _ in self._sends:
            work.wait(SEND_TIMEOUT)
        self._sends.clear()

    def _send(self, message: dict) -> None:
        """Send ``message`` to the collector without waiting for it to be received."""
        self._sends = [(work, buffer) for work, buffer in self._sends if not work.is_completed()]
        payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.long)
        collector = self.group.ranks[-1]
        for tensor in (size, payload):
            work = torch.distributed.isend(tensor, dst=collector, group=self.group.cpu_group,
                                           tag=MESSAGE_TAG)
            self._sends.append((work, tensor))

    def _receive(self, stage: int) -> dict:
        """The next message of ``stage`` (a message between this engine's own workers, as
        vLLM's own ``recv_object``; never data from a file)."""
        source = self.group.ranks[stage]
        size = torch.empty(1, dtype=torch.long)
        torch.distributed.recv(size, src=source, group=self.group.cpu_group, tag=MESSAGE_TAG)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        torch.distributed.recv(payload, src=source, group=self.group.cpu_group, tag=MESSAGE_TAG)
        return pickle.loads(payload.numpy().tobytes())  # noqa: S301 - see docstring
