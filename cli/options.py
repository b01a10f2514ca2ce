"""Options shared by several commands, defined once (Typer ``Annotated`` style)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..patches.options import EngineOptions

Model = Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder of an MoE model.")]
Samples = Annotated[Path, typer.Option("--samples", "-s",
                    help="Samples file: .jsonl (or .json: one JSON object per line), .parquet, "
                         ".csv or .txt (one sample per line).")]
IdField = Annotated[str, typer.Option(help="JSONL/CSV/Parquet field holding the sample id "
                    "(optional as 'id'; a field named otherwise must exist).")]
TextField = Annotated[str, typer.Option(help="Field holding the text (or use 'input_ids').")]
SkipBadLines = Annotated[bool, typer.Option(help="Skip malformed lines and report how many.")]
Limit = Annotated[int | None, typer.Option(help="Use only the first N samples.")]
MaxModelLen = Annotated[int | None, typer.Option(help="Context length (default: the model's).")]
Truncate = Annotated[bool, typer.Option(help="Cut samples longer than the context "
                     "(--max-model-len, else the model's) minus the generated tokens (counted).")]
Nll = Annotated[bool, typer.Option(help="Record each sample's mean NLL (same prefill pass).")]
MaxTokens = Annotated[int, typer.Option(help="Generated tokens to trace too (0: prefill only).")]
Dtype = Annotated[str, typer.Option(help="Model dtype in vLLM (bfloat16, float32, ...).")]
TensorParallel = Annotated[int, typer.Option("--tensor-parallel-size", "-tp",
                           help="Tensor-parallel workers.")]
EnforceEager = Annotated[bool, typer.Option(help="Run eager (skip torch.compile).")]
GpuMemory = Annotated[float, typer.Option(help="Fraction of device memory for vLLM "
                      "(CPU: of the NUMA node's memory).")]
EngineCore = Annotated[str, typer.Option(
    help="Where vLLM's engine core runs: auto (in this process on a CPU host with one "
         "worker, where vLLM would reserve a core for a separate one; else vLLM's default), "
         "process, or inline.")]
BatchedTokens = Annotated[int | None, typer.Option(help="vLLM max_num_batched_tokens.")]
StoreProbs = Annotated[bool, typer.Option(help="Also store per-token full router "
                       "distributions (large; small runs only).")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow code from the model folder to run.")]
BatchSize = Annotated[int, typer.Option(help="Samples per committed batch (the unit of "
                                           "resume after an interruption).")]
Part = Annotated[str | None, typer.Option(
    help="Trace only part I/N of the samples (0-based: samples I, I+N, ...), to run N engines "
         "in parallel; join the parts with `moepath merge`.")]
Resume = Annotated[bool, typer.Option(help="Continue an interrupted trace in --out.")]
Force = Annotated[bool, typer.Option(help="Overwrite --out if it holds moepath output (a "
                  "trace, or an eval's); other directories are refused.")]
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
Seed = Annotated[int, typer.Option(help="Seed of sampled pairs.")]


def engine_options(dtype: str, max_model_len: int | None, tensor_parallel_size: int,
                   enforce_eager: bool, gpu_memory_utilization: float,
                   max_num_batched_tokens: int | None, trust_remote_code: bool,
                   store_probs: bool = False, engine_core: str = "process") -> EngineOptions:
    return EngineOptions(
        dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
        enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
        max_num_batched_tokens=max_num_batched_tokens, trust_remote_code=trust_remote_code,
        store_probs=store_probs, engine_core=engine_core)


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
