"""Options shared by several commands, defined once (Typer ``Annotated`` style)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

# the one import of the engine's options in cli/ (commands name them o.EngineOptions, ...)
from ..patches.options import ClusterOptions, EngineOptions

if TYPE_CHECKING:  # built by @analysis_flags and @read_flags, imported on use (pandas)
    from ..tracer.compare import CompareOptions  # noqa: F401
    from ..tracer.samples import SampleReadOptions  # noqa: F401

# --help panels besides Typer's "Options": on/off flags (their --no- forms would squeeze
# the help text of every option into a narrow column at 80 columns), and the engine's
SWITCHES_PANEL = "Switches"
ENGINE_PANEL = "vLLM engine"
CLUSTER_PANEL = "Ray cluster"

Model = Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder of an MoE model.")]
Samples = Annotated[Path, typer.Option("--samples", "-s",
                    help="Samples file: .jsonl (or .json: one JSON object per line), .parquet, "
                         ".csv or .txt (one sample per line).")]
IdField = Annotated[str, typer.Option(help="JSONL/CSV/Parquet field holding the sample id "
                    "(optional as 'id'; a field named otherwise must exist).")]
TextField = Annotated[str, typer.Option(help="Field holding the text (or use 'input_ids').")]
SkipBadLines = Annotated[bool, typer.Option(help="Skip malformed lines and report how many.",
                                            rich_help_panel=SWITCHES_PANEL)]
Limit = Annotated[int | None, typer.Option(help="Use only the first N samples.")]
Truncate = Annotated[bool, typer.Option(help="Cut samples longer than the context "
                     "(--max-model-len, else the model's) minus the generated tokens (counted).",
                     rich_help_panel=SWITCHES_PANEL)]
Nll = Annotated[bool, typer.Option(help="Record each sample's mean NLL (same prefill pass).",
                                   rich_help_panel=SWITCHES_PANEL)]
MaxTokens = Annotated[int, typer.Option(help="Generated tokens to trace too (0: prefill only).")]
BatchSize = Annotated[int, typer.Option(help="Samples per committed batch (the unit of "
                                           "resume after an interruption).")]
Part = Annotated[str | None, typer.Option(
    help="Trace only part I/N of the samples (0-based: samples I, I+N, ...), to run N engines "
         "in parallel; join the parts with `moepath merge`.")]
DataParallel = Annotated[int, typer.Option(
    "--data-parallel-size", "-dp", help="vLLM data-parallel ranks: refused above 1 (vLLM 0.32 "
    "runs no offline data parallelism in one process); use --part I/N.")]
Resume = Annotated[bool, typer.Option(help="Continue an interrupted trace in --out.",
                                      rich_help_panel=SWITCHES_PANEL)]
Force = Annotated[bool, typer.Option(help="Overwrite --out if it holds moepath output (a "
                  "trace, or an eval's); other directories are refused.",
                  rich_help_panel=SWITCHES_PANEL)]
Tau = Annotated[float, typer.Option(help="Cumulative router-weight threshold of a pathway.")]
Unit = Annotated[str, typer.Option(help="Edit-distance unit: char (paper) or expert.")]
Normalize = Annotated[str, typer.Option(help="Per-layer distances (--layers, and "
                      "per_layer_distance in --json): none (paper) or max (each pair divided by "
                      "the longer segment's length). Whole-pathway distances are always shown "
                      "both raw and divided by the longer pathway's length.")]
Source = Annotated[str, typer.Option(help="full: mean router distribution; topk: mean top-k "
                   "gate weights.")]
Pairs = Annotated[str, typer.Option(help="auto (exact up to 1,000 samples a group, else "
                  "200,000 sampled pairs), all (always exact), or a number of sampled pairs.")]
TraceDir = Annotated[Path, typer.Argument(help="Trace directory written by `moepath trace`.")]
GroupBy = Annotated[str | None, typer.Option(help="Samples-table column to group by.")]
Seed = Annotated[int, typer.Option(help="Seed of sampled pairs, bootstrap resamples and the "
                                        "random-routing baseline.")]

# The comparison's options, shared by compare and watch.
MemorisedOnly = Annotated[bool, typer.Option(help="Metrics on memorised samples only (the "
                          "paper's protocol).", rich_help_panel=SWITCHES_PANEL)]
Epsilon = Annotated[float | None, typer.Option(help="Memorisation loss threshold.")]
EpsilonQuantile = Annotated[float | None, typer.Option(
    help="Epsilon as this quantile of final losses (default 0.25).")]
EpsilonPerGroup = Annotated[bool, typer.Option(
    "--epsilon-per-group/--epsilon-global",
    help="With --group-by, take the epsilon quantile over each group's final losses "
         "(the paper: per domain) or over all samples.", rich_help_panel=SWITCHES_PANEL)]
Delta = Annotated[float, typer.Option(help="Allowed distance to the final loss.")]
FromStep = Annotated[int | None, typer.Option(help="Correlate from this step on.")]
FromTStar = Annotated[bool, typer.Option(
    "--from-t-star/--all-checkpoints",
    help="Correlate each t*=N group from step N on (after its samples are memorised), "
         "or over every checkpoint.", rich_help_panel=SWITCHES_PANEL)]
MinCheckpoints = Annotated[int, typer.Option(
    help="Flag correlations over fewer checkpoints as too small: listed, never headlined.")]
MinGroupSize = Annotated[int, typer.Option(
    help="Flag correlations of groups of fewer samples as too small.")]
Control = Annotated[str | None, typer.Option(
    help="Metric to partial out of each correlation (same group); 'none' for no partial "
         "correlation.")]
Level = Annotated[float, typer.Option(help="Confidence level of the bootstrap intervals over "
                                           "samples (the ci_low / ci_high values).")]
Resamples = Annotated[int, typer.Option(help="Bootstrap resamples per interval; 0 computes "
                                             "none.")]
ReuseEngine = Annotated[bool, typer.Option(help="Reload weights into the running engine "
                        "between checkpoints of one architecture.",
                        rich_help_panel=SWITCHES_PANEL)]
LogTo = Annotated[str | None, typer.Option(
    help="Also log each checkpoint's group metrics at its step to these trackers, "
         "comma-separated: tensorboard (OUT/tensorboard), wandb (offline, OUT/wandb), "
         "mlflow (file store OUT/mlruns). Names: moepath/<metric>/<group>.")]


def parse_log_to(value: str | None) -> tuple[str, ...]:
    """--log-to's comma-separated trackers, checked (an unknown one: a one-line error)."""
    from ..tracer.trackers import parse_trackers

    return parse_trackers(value)


# The vLLM engine flags, declared once: @engine_flags adds them to a command.
Dtype = Annotated[str, typer.Option(help="Model dtype in vLLM (bfloat16, float32, ...).",
                                    rich_help_panel=ENGINE_PANEL)]
MaxModelLen = Annotated[int | None, typer.Option(help="Context length (default: the model's).",
                                                 rich_help_panel=ENGINE_PANEL)]
TensorParallel = Annotated[int, typer.Option("--tensor-parallel-size", "-tp",
                           help="Tensor-parallel workers.", rich_help_panel=ENGINE_PANEL)]
PipelineParallel = Annotated[int, typer.Option(
    "--pipeline-parallel-size", "-pp", help="Pipeline stages (each records its own MoE "
    "layers; the last joins and writes them).", rich_help_panel=ENGINE_PANEL)]
Executor = Annotated[str | None, typer.Option(
    help="vLLM's executor: mp (one node, its default) or ray (a Ray cluster, several nodes; "
         "GPU only in vLLM 0.32).", rich_help_panel=ENGINE_PANEL)]
EnforceEager = Annotated[bool, typer.Option(help="Run eager (skip torch.compile).",
                                            rich_help_panel=SWITCHES_PANEL)]
GpuMemory = Annotated[float, typer.Option(help="Fraction of device memory for vLLM "
                      "(CPU: of the NUMA node's memory).", rich_help_panel=ENGINE_PANEL)]
BatchedTokens = Annotated[int | None, typer.Option(help="vLLM max_num_batched_tokens.",
                                                   rich_help_panel=ENGINE_PANEL)]
EngineCore = Annotated[str, typer.Option(
    help="Where vLLM's engine core runs: auto (in this process on a CPU host with one "
         "worker, where vLLM would reserve a core for a separate one; else vLLM's default), "
         "process, or inline.", rich_help_panel=ENGINE_PANEL)]
StoreProbs = Annotated[bool, typer.Option(help="Also store per-token full router "
                       "distributions (large; small runs only).", rich_help_panel=SWITCHES_PANEL)]
Store = Annotated[str, typer.Option(
    help="What the trace keeps: per-token (every token's experts and gate weights; `show` "
         "needs it) or per-sample (each sample's mean router and top-k distributions and "
         "top-k histogram per layer: ~1/100 the size for 2,048-token samples; metrics and "
         "compare give the same results).")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow code from the model folder to run.",
                                               rich_help_panel=SWITCHES_PANEL)]
# parameter name (an EngineOptions field) -> flag, in --help order
ENGINE_FLAGS = {
    "dtype": Dtype, "max_model_len": MaxModelLen, "tensor_parallel_size": TensorParallel,
    "pipeline_parallel_size": PipelineParallel, "enforce_eager": EnforceEager,
    "gpu_memory_utilization": GpuMemory, "max_num_batched_tokens": BatchedTokens,
    "distributed_executor_backend": Executor, "engine_core": EngineCore,
    "store_probs": StoreProbs, "store": Store, "trust_remote_code": TrustRemoteCode,
}
OPT_IN_FLAGS = ("engine_core", "store_probs", "store")  # flags only where a command names them


def engine_flags(**defaults) -> Callable[[Callable], Callable]:
    """Decorator: add the vLLM engine flags to a command and hand it the ``EngineOptions``
    they build, as its ``engine`` parameter.

    A flag defaults to ``EngineOptions``' own default unless ``defaults`` names it;
    ``--engine-core``, ``--store-probs`` and ``--store`` are flags only in commands that
    name them (elsewhere ``EngineOptions``' defaults apply)::

        @o.engine_flags(engine_core="auto")    # --engine-core defaults to auto here
        def compare(checkpoints: ..., *, engine: o.EngineOptions) -> None:
    """
    if unknown := sorted(defaults.keys() - ENGINE_FLAGS.keys()):
        raise TypeError(f"engine_flags: no engine flag named {', '.join(unknown)}")
    own = {field.name: field.default for field in dataclasses.fields(EngineOptions)}
    flags = {name: (annotation, defaults.get(name, own[name]))
             for name, annotation in ENGINE_FLAGS.items()
             if name in defaults or name not in OPT_IN_FLAGS}
    return _flag_group("engine", "o.EngineOptions", flags, lambda values: EngineOptions(**values))


# Where the engines run: this machine, or Ray actors on a cluster (trace, compare)
Ray = Annotated[str | None, typer.Option(
    "--ray", metavar="ADDRESS",
    help="Run the engines as Ray actors: local (a cluster of this machine alone, on "
         "127.0.0.1, for this run), auto (the cluster `ray start` joined this machine to) or "
         "the HOST:PORT of a cluster's head. Output must be on a path every node mounts.",
    rich_help_panel=CLUSTER_PANEL)]
Engines = Annotated[int | None, typer.Option(
    help="Engines (Ray actors) with --ray (default: as many as the cluster's free GPUs, or "
         "CPUs, hold).", rich_help_panel=CLUSTER_PANEL)]
CpusPerEngine = Annotated[int | None, typer.Option(
    help="With --ray on CPUs: cores of each engine, its threads bound to them (default: one "
         "per tensor-parallel rank).", rich_help_panel=CLUSTER_PANEL)]
CLUSTER_FLAGS = {"ray": (Ray, None), "engines": (Engines, None),
                 "cpus_per_engine": (CpusPerEngine, None)}


def cluster_flags() -> Callable[[Callable], Callable]:
    """Decorator: add --ray, --engines and --cpus-per-engine to a command and hand it the
    ``ClusterOptions`` they build (None without --ray: the engine runs here) as its
    ``cluster`` parameter."""
    return _flag_group("cluster", "o.ClusterOptions | None", CLUSTER_FLAGS, _cluster_options)


def _cluster_options(values: dict) -> ClusterOptions | None:
    address = values.pop("ray")
    if address is None:
        if given := [name for name, value in values.items() if value is not None]:
            raise typer.BadParameter(f"--{given[0].replace('_', '-')} needs --ray")
        return None
    return ClusterOptions(address=address, **values)


# How compare's analysis is configured (compare, watch): parameter -> (flag, default)
ANALYSIS_FLAGS = {
    "group_by": (GroupBy, None), "memorised_only": (MemorisedOnly, False),
    "epsilon": (Epsilon, None), "epsilon_quantile": (EpsilonQuantile, None),
    "epsilon_per_group": (EpsilonPerGroup, True), "delta": (Delta, 0.05),
    "from_step": (FromStep, None), "from_t_star": (FromTStar, True),
    "min_checkpoints": (MinCheckpoints, 5), "min_group_size": (MinGroupSize, 20),
    "control": (Control, "pathway_length"), "tau": (Tau, 0.7), "source": (Source, "full"),
    "unit": (Unit, "char"), "pairs": (Pairs, "auto"), "seed": (Seed, 0),
    "level": (Level, 0.95), "resamples": (Resamples, 1000),
}
_METRIC_FLAGS = ("tau", "source", "unit", "pairs", "seed", "level", "resamples")


def analysis_flags() -> Callable[[Callable], Callable]:
    """Decorator: add the flags of compare's analysis (memorisation, groups, correlation
    limits, metric options) to a command and hand it the ``CompareOptions`` they build,
    as its ``analysis`` parameter::

        @o.analysis_flags()
        def watch(run_dir: ..., *, analysis: o.CompareOptions) -> None:
    """
    return _flag_group("analysis", "o.CompareOptions", ANALYSIS_FLAGS, _compare_options)


# How the samples file is read (trace, compare, watch): parameter -> (flag, default)
READ_FLAGS = {"id_field": (IdField, "id"), "text_field": (TextField, "text"),
              "skip_bad_lines": (SkipBadLines, False), "limit": (Limit, None)}


def read_flags() -> Callable[[Callable], Callable]:
    """Decorator: add the flags of how the samples file is read to a command and hand it
    the ``SampleReadOptions`` they build, as its ``read`` parameter."""
    return _flag_group("read", "o.SampleReadOptions", READ_FLAGS, _read_options)


def _read_options(values: dict):
    from ..tracer.samples import SampleReadOptions

    return SampleReadOptions(**values)


def _compare_options(values: dict):
    from ..tracer.compare import CompareOptions
    from ..tracer.metrics import MetricOptions

    metric = {name: values.pop(name) for name in _METRIC_FLAGS}
    metric["pairs"] = parse_pairs(metric["pairs"])
    control = values.pop("control")
    return CompareOptions(metrics=MetricOptions(**metric),
                          control=None if control in (None, "none") else control, **values)


# the parameters flag groups take the place of (their types are imported only on use)
_GROUP_PARAMETERS = ("engine", "analysis", "read", "cluster")


def _evaluated_signature(command: Callable) -> inspect.Signature:
    """``command``'s signature with its string annotations evaluated (Typer reads types),
    but those of flag groups' parameters, which may name types only imported for type
    checkers."""
    signature = inspect.signature(command)
    namespace = command.__globals__
    return signature.replace(parameters=[
        p if p.name in _GROUP_PARAMETERS or not isinstance(p.annotation, str)
        else p.replace(annotation=eval(p.annotation, namespace))  # annotations of our own source
        for p in signature.parameters.values()])


def _flag_group(parameter: str, kind: str, flags: dict[str, tuple[object, object]],
                build: Callable[[dict], object]) -> Callable[[Callable], Callable]:
    """Decorator: put ``flags`` (name -> (annotation, default)) in place of the command's
    keyword-only ``parameter`` (of type ``kind``) and pass the command ``build(values of
    the flags)`` there.

    Typer never sees ``parameter``: the flags take its place in the signature Typer reads
    (``__signature__``)."""
    declared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                  default=default)
                for name, (annotation, default) in flags.items()]

    def decorate(command: Callable) -> Callable:
        signature = _evaluated_signature(command)
        if parameter not in signature.parameters:
            raise TypeError(f"{command.__name__} needs an '{parameter}: {kind}' parameter "
                            f"to take the {parameter} flags")
        # keyword-only throughout (Typer passes keywords), so that flags, which have
        # defaults, may stand anywhere
        parameters = [new for old in signature.parameters.values()
                      for new in (declared if old.name == parameter
                                  else [old.replace(kind=inspect.Parameter.KEYWORD_ONLY)])]

        @functools.wraps(command)
        def with_options(**values):
            built = build({flag.name: values.pop(flag.name) for flag in declared})
            return command(**values, **{parameter: built})

        with_options.__signature__ = signature.replace(parameters=parameters)
        with_options.__annotations__ = {  # what typing.get_type_hints (Typer) reads
            **{p.name: p.annotation for p in parameters},
            "return": signature.return_annotation}
        return with_options

    return decorate


def parse_part(value: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N); None stays None."""
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdecimal() and count.isdecimal()):  # not isdigit: int("²") fails
        raise typer.BadParameter(f"--part takes I/N such as 0/2, not {value!r}")
    return int(index), int(count)


def parse_pairs(value: str) -> int | None:
    """'auto' -> None (default policy); 'all' -> exact; a number >= 2 -> sampled pairs."""
    from ..tracer.distance import ALL_PAIRS

    if value in ("auto", "all"):
        return None if value == "auto" else ALL_PAIRS
    if value.isdecimal() and int(value) >= 2:
        return int(value)
    raise typer.BadParameter(f"--pairs takes auto, all or a number >= 2, not {value!r}")
