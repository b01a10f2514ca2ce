"""`moepath eval`: lm-evaluation-harness tasks through a traced engine, scores on the trace.

One `moepath eval` run (one engine start) of three local tasks shipped in
tests/data/lm_eval/: multiple choice (loglikelihood), generation
(generate_until) and perplexity (loglikelihood_rolling). The toy model answers
at chance, so the tests check structure, never accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_MEMORY
from test_cli_trace import assert_one_line_error, dense_checkpoint

from moepath.tracer import Trace

pytestmark = pytest.mark.vllm

TASK_DIR = Path(__file__).parent / "data" / "lm_eval"
REQUEST_TYPES = {"moepath_mc": "loglikelihood", "moepath_gen": "generate_until",
                 "moepath_ppl": "loglikelihood_rolling"}
# moepath_ppl's documents in windows of the 256-token context: two short texts, and one of
# 606 tokens that lm-eval scores in three windows (at most 254 new tokens each)
PPL_WINDOWS = {0: 1, 1: 1, 2: 3}


def moepath(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moepath.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def evaluated(toy_olmoe, tmp_path_factory) -> Path:
    """`moepath eval` of the three tasks, run where the YAMLs' data_files (relative to the
    repository root: `datasets` resolves them against the working directory) resolve."""
    root = tmp_path_factory.mktemp("lm_eval")
    shutil.copytree(TASK_DIR, root / "tests" / "data" / "lm_eval")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(root / "datasets-cache")}
    result = moepath("eval", toy_olmoe, "--tasks", ",".join(REQUEST_TYPES), "--include-path",
                     "tests/data/lm_eval", "--out", root / "out", "--enforce-eager",
                     "--gpu-memory-utilization", str(TEST_MEMORY),
                     "--max-model-len", 256, cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "samples traced" in result.stderr
    return root / "out"


def logged(out: Path, task: str) -> list[dict]:
    lines = (out / "lm_eval" / f"samples_{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def request_ids(out: Path, task: str) -> list[tuple[str, dict, int]]:
    """(sample id, logged document, request index) of every request lm-eval logged (of
    every window of a perplexity request)."""
    def suffixes(doc) -> list[str]:
        if REQUEST_TYPES[task] != "loglikelihood_rolling":
            return [""]
        return [f"/{window}" for window in range(PPL_WINDOWS[doc["doc_id"]])]

    return [(f"{task}/{doc['doc_id']}/{i}/{REQUEST_TYPES[task]}{suffix}", doc, i)
            for doc in logged(out, task) for i in range(len(doc["arguments"]))
            for suffix in suffixes(doc)]


def slice_of(text: list[int], window: list[int]) -> tuple[int, int]:
    """(start, end) of ``window`` in ``text``, the last place it occurs."""
    ends = [end for end in range(len(window), len(text) + 1)
            if text[end - len(window):end] == window]
    assert ends, "the window is not a slice of the document"
    return ends[-1] - len(window), ends[-1]


def lm_eval_scored_tokens(tokenizer, context: str, continuation: str) -> list[int]:
    """The tokens lm-eval scores for (context, continuation): TemplateLM._encode_pair."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer(context).input_ids
    return context_ids + tokenizer(context + continuation).input_ids[len(context_ids):]


def test_lm_eval_results_and_samples_are_written(evaluated):
    results = json.loads((evaluated / "lm_eval" / "results.json").read_text())
    assert set(results["results"]) == set(REQUEST_TYPES)
    assert "acc,none" in results["results"]["moepath_mc"]
    assert "exact_match,none" in results["results"]["moepath_gen"]
    assert [len(logged(evaluated, task)) for task in REQUEST_TYPES] == [7, 4, 3]


def test_one_traced_sample_per_request(evaluated):
    trace = Trace.open(evaluated / "trace")
    expected = [sid for task in REQUEST_TYPES for sid, _, _ in request_ids(evaluated, task)]
    assert len(expected) == 21 + 4 + 5  # 21 answer choices, 4 questions, 3 texts in 5 windows
    assert trace.manifest.status == "complete"
    assert sorted(trace.sample_ids()) == sorted(expected)
    assert sorted(trace.samples["sample_id"]) == sorted(expected)
    assert trace.manifest.counts.samples == len(expected)


def test_samples_carry_request_and_document_scores(evaluated):
    samples = Trace.open(evaluated / "trace").samples.set_index("sample_id")
    for task, metric in (("moepath_mc", "acc"), ("moepath_gen", "exact_match")):
        for sid, doc, index in request_ids(evaluated, task):
            row = samples.loc[sid]
            assert (row["task"], row["doc_id"]) == (task, doc["doc_id"])
            assert (row["request_index"], row["request_type"]) == (index, REQUEST_TYPES[task])
            assert row[metric] == doc[metric]
    assert np.isnan(samples.loc["moepath_mc/0/0/loglikelihood", "exact_match"])  # other task
    ppl = samples[samples["task"] == "moepath_ppl"]
    assert sorted(ppl["window"]) == [0, 0, 0, 1, 2]
    assert "word_perplexity" not in samples.columns  # per-document terms are pairs: not joined


def test_every_prompt_token_of_a_scoring_request_is_traced(evaluated, toy_olmoe):
    """Scoring reads prompt log-probs: every prompt token is computed, the last included."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_olmoe)
    trace = Trace.open(evaluated / "trace")
    requests = request_ids(evaluated, "moepath_mc")
    for sid, doc, index in requests:
        expected = lm_eval_scored_tokens(tokenizer, *doc["arguments"][index])
        np.testing.assert_array_equal(trace.token_ids(sid), expected)
        np.testing.assert_array_equal(trace.positions(sid), np.arange(len(expected)))
        assert trace.num_prompt_tokens(sid) == len(expected)
    # documents 0 and 6 are identical: same tokens, each request traced under its own id
    np.testing.assert_array_equal(trace.token_ids("moepath_mc/0/1/loglikelihood"),
                                  trace.token_ids("moepath_mc/6/1/loglikelihood"))
    for doc in logged(evaluated, "moepath_ppl"):
        # the windows are slices of the document after its prefix token, at most a context
        # long, each ending further on, together covering it to its end
        windows = [trace.token_ids(f"moepath_ppl/{doc['doc_id']}/0/loglikelihood_rolling/{j}")
                   for j in range(PPL_WINDOWS[doc["doc_id"]])]
        text = [int(windows[0][0])] + tokenizer(doc["arguments"][0][0]).input_ids
        spans = [slice_of(text, window.tolist()) for window in windows]
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(end - start <= 255 for start, end in spans)
        assert all(a_end < b_end and b_start <= a_end
                   for (_, a_end), (b_start, b_end) in zip(spans, spans[1:], strict=False))


def test_generation_is_traced_from_the_prompt_on(evaluated, toy_olmoe):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_olmoe)
    trace = Trace.open(evaluated / "trace")
    for sid, doc, _ in request_ids(evaluated, "moepath_gen"):
        prompt = tokenizer(doc["arguments"][0][0]).input_ids
        assert trace.num_prompt_tokens(sid) == len(prompt)
        np.testing.assert_array_equal(trace.token_ids(sid)[:len(prompt)], prompt)
        np.testing.assert_array_equal(trace.positions(sid), np.arange(len(trace.positions(sid))))


@pytest.mark.parametrize("column, groups", [
    ("task", {"moepath_mc": 21, "moepath_gen": 4, "moepath_ppl": 5}),
    ("request_type", {"loglikelihood": 21, "generate_until": 4, "loglikelihood_rolling": 5}),
])
def test_metrics_group_by_eval_columns(evaluated, column, groups):
    result = moepath("metrics", evaluated / "trace", "--group-by", column, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert {g["name"]: g["n_samples"] for g in payload["groups"]} == groups


def test_metrics_group_by_accuracy(evaluated):
    result = moepath("metrics", evaluated / "trace", "--group-by", "acc", "--json")
    assert result.returncode == 0, result.stderr
    groups = {g["name"]: g["n_samples"] for g in json.loads(result.stdout)["groups"]}
    assert groups.pop("(missing)") == 9  # generation and perplexity requests have no acc
    assert set(groups) <= {"0", "1"} and sum(groups.values()) == 21  # acc 0.0 and 1.0


@pytest.mark.parametrize("kind, message", [
    ("toy", "unknown lm-eval task(s) ['no_such_task']"),
    ("missing", "model path '{model}' does not exist"),
    ("dense", "model '{model}' (LlamaForCausalLM) has no MoE layers"),
], ids=["unknown-task", "missing-model", "dense-model"])
def test_an_unknown_task_or_a_missing_or_dense_model_is_refused_before_an_engine_starts(
        request, tmp_path, kind, message):
    model = {"toy": lambda: request.getfixturevalue("toy_olmoe"),
             "missing": lambda: tmp_path / "nope",
             "dense": lambda: dense_checkpoint(tmp_path / "dense")}[kind]()
    result = moepath("eval", model, "--tasks", "no_such_task", "--out", tmp_path / "o",
                     env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert_one_line_error(result, message.format(model=model))
    assert not (tmp_path / "o").exists()


def task_yaml(folder: Path, name: str, extra: str) -> Path:
    """moepath_mc as task ``name`` in ``folder``, with the YAML lines ``extra`` added."""
    folder.mkdir(parents=True, exist_ok=True)
    yaml = (TASK_DIR / "moepath_mc.yaml").read_text().replace("task: moepath_mc", f"task: {name}")
    yaml = yaml.replace("tests/data/lm_eval/moepath_mc.jsonl", str(TASK_DIR / "moepath_mc.jsonl"))
    yaml = yaml.replace("dataset_kwargs:", f"dataset_kwargs:\n  cache_dir: {folder / 'cache'}")
    (folder / f"{name}.yaml").write_text(yaml + extra)
    return folder


def test_a_task_running_model_code_needs_confirmation_before_an_engine_starts(toy_olmoe,
                                                                             tmp_path):
    tasks = task_yaml(tmp_path / "tasks", "runs_code", "unsafe_code: true\n")
    result = moepath("eval", toy_olmoe, "--tasks", "runs_code", "--include-path", tasks,
                     "--out", tmp_path / "o", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "moepath: error: task(s) ['runs_code'] execute model-generated "
                                  "code (lm-eval marks them unsafe); pass "
                                  "--confirm-run-unsafe-code to run them")
    assert not (tmp_path / "o").exists()


def test_confirmed_tasks_are_built_once_for_the_check_and_the_run(tmp_path):
    from moepath.patches.lm_eval_backend import EvalOptions, _task_manager

    tasks = task_yaml(tmp_path / "tasks", "runs_code", "unsafe_code: true\n")
    options = EvalOptions(tasks=("runs_code",), include_path=tasks, confirm_run_unsafe_code=True)
    manager = _task_manager(options, "toy")
    loaded = manager.load(["runs_code"])  # what simple_evaluate asks for
    assert loaded is manager.load(["runs_code"])
    assert loaded["tasks"]["runs_code"].UNSAFE_CODE
    assert len(loaded["tasks"]["runs_code"].eval_docs) == 7


def test_a_task_with_image_input_is_refused_before_an_engine_starts(tmp_path):
    from moepath.patches.lm_eval_backend import EvalOptions, _task_manager
    from moepath.tracer.errors import InputError

    tasks = task_yaml(tmp_path / "tasks", "with_image", "doc_to_image: [image]\n")
    with pytest.raises(InputError, match=r"task\(s\) \['with_image'\] need image or audio input"):
        _task_manager(EvalOptions(tasks=("with_image",), include_path=tasks), "toy")


def test_force_empties_an_earlier_eval_output_and_refuses_any_other_directory(tmp_path):
    from moepath.patches.lm_eval_backend import EvalSummary, _prepare
    from moepath.tracer.errors import InputError
    from moepath.tracer.store import FORMAT_NAME

    out = tmp_path / "out"
    (out / "trace").mkdir(parents=True)
    (out / "trace" / "manifest.json").write_text(json.dumps({"format": FORMAT_NAME}))
    (out / "lm_eval").mkdir()
    (out / "lm_eval" / "results.json").write_text("{}")
    summary = EvalSummary(out, out / "trace", out / "lm_eval")
    with pytest.raises(InputError, match="already exists; pass --force"):
        _prepare(summary, force=False)
    _prepare(summary, force=True)
    assert [p.name for p in out.iterdir()] == ["trace"] and not any((out / "trace").iterdir())

    (out / "thesis.tex").write_text("months of work")
    with pytest.raises(InputError, match="not a moepath eval output .*thesis.tex"):
        _prepare(summary, force=True)
    assert (out / "thesis.tex").read_text() == "months of work"


def test_an_interrupted_eval_keeps_its_requests_in_a_trace_marked_failed(toy_olmoe, tmp_path,
                                                                         monkeypatch):
    """The engine's shutdown commits what was traced; the eval marks it as not finished."""
    from test_store import make_record, write_trace

    from moepath.patches import lm_eval_backend
    from moepath.patches.lm_eval_backend import EvalOptions, run_eval

    class Backend:  # stands in for MoepathVLLM: its close() commits the requests sent
        def __init__(self, trace_dir, **_):
            self.trace_dir = Path(trace_dir)

        def close(self):  # as the worker's final commit: the trace is complete
            write_trace(self.trace_dir,
                        [make_record("moepath_mc/0/0/loglikelihood", 6, 1)]).finish()

    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_eval_backend, "MoepathVLLM", Backend)
    monkeypatch.setattr("lm_eval.simple_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(toy_olmoe, tmp_path / "out", EvalOptions(tasks=("moepath_mc",),
                                                           include_path=TASK_DIR))
    trace = Trace.open(tmp_path / "out" / "trace")
    assert trace.sample_ids() == ["moepath_mc/0/0/loglikelihood"]
    assert trace.status == "failed"
    assert "(capture error: moepath eval stopped before lm-eval finished: the requests " \
           "traced so far are kept, without scores; re-run moepath eval with --force)" \
           in trace.incomplete_warning()


class EngineStarted(Exception):
    """Raised by the stand-in for lm-eval's vLLM constructor: no engine starts in the test."""


@pytest.fixture
def upstream_kwargs(monkeypatch):
    """What MoepathVLLM hands lm-eval's vLLM backend, which would start the engine."""
    from moepath.patches import lm_eval_backend

    seen = {}

    def start(self, pretrained, **kwargs):
        seen.update(kwargs, pretrained=pretrained)
        raise EngineStarted

    monkeypatch.setattr(lm_eval_backend._upstream.VLLM, "__init__", start)
    # unset during the test and as before after it (the backend may set it)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    return seen


def test_the_backend_starts_its_engine_with_what_tracing_needs(upstream_kwargs, tmp_path,
                                                              monkeypatch):
    from moepath.patches.lm_eval_backend import MoepathVLLM

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    with pytest.raises(EngineStarted):
        MoepathVLLM("toy", trace_dir=str(tmp_path / "t"), tensor_parallel_size=2)
    assert "enable_prefix_caching" not in upstream_kwargs  # vLLM's default: on
    assert upstream_kwargs["async_scheduling"] is False
    assert upstream_kwargs["additional_config"]["moepath"]["dir"] == str(tmp_path / "t")
    # CPU tensor parallelism: each rank on its own core (vLLM's own binding fails there)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_the_backend_refuses_a_trace_dir_that_holds_a_trace(upstream_kwargs, tmp_path):
    from moepath.patches.lm_eval_backend import MoepathVLLM
    from moepath.tracer.errors import InputError

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="trace_dir '.*' already holds a trace; pass a new"):
        MoepathVLLM("toy", trace_dir=str(tmp_path / "t"))
    assert upstream_kwargs == {}
