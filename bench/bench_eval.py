"""`moepath eval` and vLLM's prefix caching: traced (cache on), traced (cache off), untraced.

Run (from the repository root, inside .venv):

    python bench/bench_eval.py --docs 64 --rounds 2

A generated multiple-choice task: each question follows its own passage of
about ``--passage-lines`` lines, and lm-eval scores its four answer choices as
four loglikelihood requests that share the passage. Three configurations, one
engine alive at a time, in rotating order each round:

- ``traced``: moepath's lm-eval backend (``moepath eval``), vLLM's prefix caching on;
- ``traced-nocache``: the same with ``enable_prefix_caching=False``;
- ``untraced``: lm-eval's own vLLM backend, prefix caching on.

Each phase starts its backend (not timed), then times one ``simple_evaluate`` of
the task. Tokens computed: the prompt tokens of every request vLLM ran minus
those it read from its prefix cache (``RequestOutput.num_cached_tokens``, counted
by wrapping ``vllm.LLM.generate`` in this process). vLLM computes every prompt
token of a request with prompt log-probs, so none of these scoring requests
reads the cache, traced or not: the shared passage is computed once per
choice in every configuration. Prints and saves bench/results/eval-<preset>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_overhead import RESULTS, toy

TASK = "moepath_bench_mc"
COUNTS = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}


def write_task(folder: Path, docs: int, passage_lines: int) -> None:
    """A multiple-choice task of ``docs`` questions behind their own passages."""
    import random

    from moepath.fixtures.toy import corpus

    rng = random.Random(0)
    lines = corpus(docs * (passage_lines + 5), seed=3)
    records = []
    for d in range(docs):
        block = lines[d * (passage_lines + 5):(d + 1) * (passage_lines + 5)]
        records.append({"passage": " ".join(block[:passage_lines]), "question": block[-5],
                        "choices": [line.split(".")[0] for line in block[-4:]],
                        "answer": rng.randrange(4)})
    (folder / f"{TASK}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / f'{TASK}.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{passage}}\\nQuestion: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")


def count_tokens() -> None:
    """Wrap ``vllm.LLM.generate`` so that every call adds its requests, prompt tokens and
    cached tokens to :data:`COUNTS`."""
    from vllm import LLM

    original = LLM.generate

    def generate(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        COUNTS["requests"] += len(outputs)
        COUNTS["prompt_tokens"] += sum(len(o.prompt_token_ids) for o in outputs)
        COUNTS["cached_tokens"] += sum(o.num_cached_tokens for o in outputs)
        return outputs

    LLM.generate = generate


def start_backend(kind: str, model: Path, trace_dir: Path):
    from moepath.patches.lm_eval_backend import MoepathVLLM, _upstream
    from moepath.patches.options import EngineOptions

    kwargs = EngineOptions(prefix_caching=kind != "traced-nocache").llm_kwargs(str(model), None)
    kwargs["pretrained"] = kwargs.pop("model")
    if kind == "untraced":
        return _upstream.VLLM(batch_size="auto", **kwargs)
    return MoepathVLLM(trace_dir=str(trace_dir), batch_size="auto", **kwargs)


def close(kind: str, backend) -> None:
    if kind == "untraced":
        backend.model.llm_engine.engine_core.shutdown()
    else:
        backend.close()
    del backend
    gc.collect()


def phase(kind: str, model: Path, task_dir: Path) -> dict:
    """Start ``kind``'s backend, time one evaluation of the task; its seconds, requests
    and tokens."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    trace_dir = Path(tempfile.mkdtemp(prefix="moepath-bench-eval-")) / "trace"
    backend = start_backend(kind, model, trace_dir)
    manager = TaskManager(include_path=str(task_dir))
    before = dict(COUNTS)
    start = time.perf_counter()
    simple_evaluate(model=backend, tasks=[TASK], task_manager=manager)
    seconds = time.perf_counter() - start
    close(kind, backend)
    shutil.rmtree(trace_dir.parent, ignore_errors=True)
    counts = {name: COUNTS[name] - before[name] for name in COUNTS}
    return {"seconds": seconds, "requests": counts["requests"],
            "prompt_tokens": counts["prompt_tokens"],
            "tokens_computed": counts["prompt_tokens"] - counts["cached_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="olmoe-shaped")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--passage-lines", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    model = toy(args.preset)
    count_tokens()
    task_dir = Path(tempfile.mkdtemp(prefix="moepath-bench-task-"))
    write_task(task_dir, args.docs, args.passage_lines)
    kinds = ["traced", "traced-nocache", "untraced"]
    runs = {kind: [] for kind in kinds}
    for round_ in range(args.rounds):
        for kind in kinds[round_ % 3:] + kinds[:round_ % 3]:
            runs[kind].append(phase(kind, model, task_dir))
            print(kind, runs[kind][-1], flush=True)
    shutil.rmtree(task_dir, ignore_errors=True)
    median = {kind: statistics.median(r["seconds"] for r in runs[kind]) for kind in kinds}
    result = {
        "preset": args.preset, "docs": args.docs, "passage_lines": args.passage_lines,
        "rounds": args.rounds, "runs": runs, "median_seconds": median,
        "tokens_computed": {kind: runs[kind][0]["tokens_computed"] for kind in kinds},
        "prompt_tokens": runs["untraced"][0]["prompt_tokens"],
        # throughput ratios: untraced seconds over traced seconds
        "traced_vs_untraced": median["untraced"] / median["traced"],
        "traced_nocache_vs_untraced": median["untraced"] / median["traced-nocache"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"eval-{args.preset}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
