"""Engine and trace options: how a traced vLLM engine is started, what a trace records.

Frozen dataclasses, validated when built (:class:`~moepath.tracer.errors.InputError`
names the flag). :meth:`EngineOptions.prepare_environment` sets the process
environment vLLM reads at engine start; :meth:`EngineOptions.llm_kwargs` gives the
``vllm.LLM`` arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..tracer import store as trace_store
from ..tracer.errors import InputError
from .settings import CONFIG_KEY, CaptureSettings

ENGINE_CORE_CHOICES = ("process", "inline", "auto")
EXECUTOR_CHOICES = (None, "mp", "ray")  # None: vLLM's choice (mp on one node)


@dataclass(frozen=True)
class EngineOptions:
    """How the traced vLLM engine is started.

    ``engine_core`` defaults to vLLM's own process layout; ``"auto"`` (what
    ``moepath trace``, ``compare`` and ``demo`` pass) runs the engine core inline
    on a CPU host, which traces 1.5-1.8x faster on 2 cores (:meth:`engine_core_inline`).
    """

    dtype: str = "bfloat16"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.3
    max_num_batched_tokens: int | None = None
    trust_remote_code: bool = False
    seed: int = 0
    store_probs: bool = False
    store: str = trace_store.PER_TOKEN  # --store: what the worker keeps (CaptureSettings.store)
    num_kv_blocks: int | None = None  # override the KV cache size (tests force preemption)
    block_size: int | None = None  # KV cache block (tokens; vLLM's default: 128 on CPU)
    prefix_caching: bool = True  # vLLM's default; False: every prompt token is computed
    engine_core: str = "process"  # "process" (vLLM's default), "inline" or "auto": see below
    distributed_executor_backend: str | None = None  # vLLM's choice unless "mp" or "ray"

    def __post_init__(self):
        if self.engine_core not in ENGINE_CORE_CHOICES:
            raise InputError(f"engine core (--engine-core) must be one of "
                             f"{', '.join(ENGINE_CORE_CHOICES)}, not {self.engine_core!r}")
        if self.store not in trace_store.STORES:
            raise InputError(f"--store must be one of {', '.join(trace_store.STORES)}, "
                             f"not {self.store!r}")
        if self.store == trace_store.PER_SAMPLE and self.store_probs:
            raise InputError("--store-probs keeps every token's router distribution, which "
                             "--store per-sample drops; pass --store per-token with it")
        if self.distributed_executor_backend not in EXECUTOR_CHOICES:
            raise InputError(f"--distributed-executor-backend must be one of "
                             f"{', '.join(map(str, EXECUTOR_CHOICES[1:]))}, "
                             f"not {self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "ray":
            _refuse_ray_without_gpu()

    @property
    def workers(self) -> int:
        """vLLM workers of the engine: one per tensor-parallel rank of each pipeline stage."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def engine_core_inline(self) -> bool:
        """Whether vLLM's engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

        ``"auto"`` chooses inline on a CPU host with one worker, unless the user set
        ``VLLM_ENABLE_V1_MULTIPROCESSING`` or ``VLLM_CPU_OMP_THREADS_BIND`` (vLLM's own
        process layout and thread binding then apply). Offline tracing drives the
        engine synchronously, so a separate engine-core process does no useful work
        in parallel, yet vLLM reserves a CPU core for it: on a 2-core host the model
        then runs on one core (bench/README.md: inline traces 1.5-1.8x faster there).
        """
        if self.engine_core != "auto":
            return self.engine_core == "inline"
        if self.workers > 1 or os.environ.keys() & {
                "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"}:
            return False
        import torch

        return not torch.cuda.is_available()

    def place_engine_core(self) -> None:
        """Put vLLM's engine core where :meth:`engine_core_inline` says, for every engine
        this process starts from now on (vLLM reads the variable once per process)."""
        if self.engine_core_inline():
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    def prepare_environment(self) -> None:
        """Set what vLLM reads from the environment when this process starts an engine:
        the V1 model runner (the capture wraps it), the engine core's place
        (:meth:`place_engine_core`) and CPU thread binding (:func:`bind_cpu_threads`)."""
        self.place_engine_core()
        prepare_capture_environment(self.workers)

    def llm_kwargs(self, model: str, settings: CaptureSettings | None) -> dict:
        """``vllm.LLM`` keyword arguments; ``settings=None`` gives the untraced twin.

        Prefix caching stays at vLLM's default (on) unless ``prefix_caching=False``,
        traced or not: hits replay the routing kept beside the KV blocks
        (``routing_cache.py``); ``store_probs`` turns it off, whose per-token
        distributions that cache does not keep.
        """
        kwargs = {
            "model": model,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "enforce_eager": self.enforce_eager,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "trust_remote_code": self.trust_remote_code,
            "seed": self.seed,
        }
        if settings is not None:
            kwargs["additional_config"] = {CONFIG_KEY: settings.as_dict()}
            # async scheduling (vLLM's default on CUDA) decodes a request once more after
            # it sampled its stop token; the capture refuses it (off on CPU anyway)
            kwargs["async_scheduling"] = False
        if not self.prefix_caching or (settings is not None and settings.store_probs):
            # store_probs: the routing cache keeps no per-token distributions
            kwargs["enable_prefix_caching"] = False
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        if self.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.num_kv_blocks:
            kwargs["num_gpu_blocks_override"] = self.num_kv_blocks
        if self.distributed_executor_backend:
            kwargs["distributed_executor_backend"] = self.distributed_executor_backend
        if self.block_size:
            kwargs["block_size"] = self.block_size
        return kwargs


@dataclass(frozen=True)
class TraceOptions:
    """What ``moepath trace`` records (engine options apart)."""

    truncate: bool = False
    nll: bool = True
    max_tokens: int = 0
    batch_size: int = 256  # samples per committed batch, >= 1

    def __post_init__(self):
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, not {self.batch_size}")


def _refuse_ray_without_gpu() -> None:
    """vLLM 0.32 runs its Ray executor on GPU platforms only: the CPU platform has no Ray
    device key (``platforms/interface.py:150``), so ``initialize_ray_cluster`` raises
    "current platform cpu does not support ray" (``v1/executor/ray_utils.py:572-576``)."""
    import torch

    if not torch.cuda.is_available():
        raise InputError(
            "--distributed-executor-backend ray: vLLM 0.32 runs its Ray executor only on "
            "GPUs (its CPU backend raises 'current platform cpu does not support ray'); "
            "on CPU hosts use the default (mp) executor")


@dataclass(frozen=True)
class ClusterOptions:
    """Where the traced engines run on a Ray cluster (``--ray``, ``--engines``,
    ``--cpus-per-engine``; ``patches/cluster.py``).

    ``address``: ``"local"`` starts a cluster of this machine alone, listening on
    127.0.0.1 only, for the run; ``"auto"`` joins the cluster ``ray start`` made this
    machine part of; ``"HOST:PORT"`` joins the cluster whose head listens there.
    ``engines``: engine actors (None: as many as the cluster's free GPUs, or CPUs, hold).
    ``cpus_per_engine``: on a cluster without GPUs, the cores of one engine, its vLLM
    threads bound to them (None: one per tensor-parallel rank); on GPUs an engine takes
    ``tensor_parallel_size`` GPUs of one node. ``max_attempts``: lost actors a part may
    see before the run stops. ``placement_timeout_s``: how long the actors may wait for
    room on the cluster.
    """

    address: str = "local"
    engines: int | None = None
    cpus_per_engine: int | None = None
    max_attempts: int = 3
    placement_timeout_s: float = 600.0

    def __post_init__(self):
        if not self.address:
            raise InputError("--ray takes local, auto or the HOST:PORT of a cluster's head")
        for flag, value in (("--engines", self.engines),
                            ("--cpus-per-engine", self.cpus_per_engine),
                            ("max_attempts", self.max_attempts)):
            if value is not None and value < 1:
                raise InputError(f"{flag} must be at least 1, not {value}")


def prepare_capture_environment(workers: int) -> None:
    """What every traced engine this process starts needs from the environment, wherever
    its engine core runs: the V1 model runner (the capture wraps it) and, on a CPU host
    with several ``workers`` (tensor-parallel ranks times pipeline stages), cores of its
    own for each (:func:`bind_cpu_threads`)."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    bind_cpu_threads(workers)


def bind_cpu_threads(workers: int) -> None:
    """CPU tensor or pipeline parallelism: give each of the engine's ``workers`` its own
    cores unless the user chose.

    vLLM's automatic binding asserts on a single-NUMA-node host ("Not enough
    allowed NUMA nodes to bind threads of 2 local CPUWorkers", vLLM 0.32's
    ``utils/ompmultiprocessing.py``); an explicit ``VLLM_CPU_OMP_THREADS_BIND`` such as
    ``0|1``, what this function sets, works (``tests/test_faults.py`` runs TP=2 with it,
    ``tests/test_pipeline.py`` two pipeline stages).
    """
    if workers <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores_binding(sorted(os.sched_getaffinity(0)),
                                                            workers)


def pin_to_cores(cores: list[int], ranks: int = 1) -> None:
    """Run this process, and the engines it starts, on ``cores`` (CPU ids) only: one of
    several engines sharing a CPU machine (the engine actors of ``patches/cluster.py``).

    The process's affinity (threads started later inherit it) and torch's thread count
    cover an engine whose model runs in this process; the ``ranks`` worker processes of
    a tensor-parallel engine each get a share (``VLLM_CPU_OMP_THREADS_BIND``, which vLLM
    applies to its worker processes only). Call before the first engine starts.
    """
    import torch

    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    if ranks > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores_binding(cores, ranks)


def cores_binding(cores: list[int], ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for an engine of ``ranks`` tensor-parallel ranks on
    ``cores`` (CPU ids): the cores split evenly, one group per rank (a rank gets the last
    core when there are fewer cores than ranks)::

        >>> cores_binding([4, 5, 6, 7], 2), cores_binding([3], 1), cores_binding([0], 2)
        ('4-5|6-7', '3', '0|0')
    """
    per_rank = max(1, len(cores) // ranks)
    groups = [cores[i * per_rank:(i + 1) * per_rank] or cores[-1:] for i in range(ranks)]
    return "|".join(",".join(map(str, g)) if g != list(range(g[0], g[-1] + 1))
                    else f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)
