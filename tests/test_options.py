"""Shared CLI options: the parsers (what each accepts, the one-line refusals of the rest) and
the engine flags declared once."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from moepath.cli.options import ENGINE_FLAGS, EngineOptions, engine_flags, parse_pairs, parse_part
from moepath.tracer.distance import ALL_PAIRS


@pytest.mark.parametrize(("value", "pairs"), [("auto", None), ("all", ALL_PAIRS), ("200", 200)])
def test_parse_pairs(value, pairs):
    assert parse_pairs(value) == pairs


# '²' and '³' are digits to str.isdigit, but int() refuses them
@pytest.mark.parametrize("value", ["1", "-5", "many", "²", "2²", ""])
def test_parse_pairs_refuses_what_is_not_a_count(value):
    with pytest.raises(typer.BadParameter) as error:
        parse_pairs(value)
    assert error.value.message == f"--pairs takes auto, all or a number >= 2, not {value!r}"


@pytest.mark.parametrize(("value", "part"), [(None, None), ("0/2", (0, 2)), ("11/12", (11, 12))])
def test_parse_part(value, part):
    assert parse_part(value) == part


@pytest.mark.parametrize("value", ["²/3", "1/³", "1", "-1/2", "a/b", "1/2/3"])
def test_parse_part_refuses_what_is_not_i_of_n(value):
    with pytest.raises(typer.BadParameter) as error:
        parse_part(value)
    assert error.value.message == f"--part takes I/N such as 0/2, not {value!r}"


def test_skipped_bad_lines_are_counted_on_stderr_in_the_file_s_own_unit(tmp_path, capsys):
    from moepath.cli import render
    from moepath.tracer.samples import SampleReadOptions, read_samples

    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "text": "x"}\nnot json\n{"id": "b", "text": "y"}\n{"id": 3\n')
    render.skipped_lines(read_samples(path, SampleReadOptions(skip_bad_lines=True)))
    assert capsys.readouterr().err.strip() == "skipped 2 bad line(s) (first: line 2)"


# --- the engine flags, declared once in cli/options.py ---------------------------------------

ENGINE_DEFAULTS = {"dtype": "bfloat16", "max_model_len": None, "tensor_parallel_size": 1,
                   "pipeline_parallel_size": 1, "enforce_eager": False,
                   "gpu_memory_utilization": 0.3, "max_num_batched_tokens": None,
                   "distributed_executor_backend": None, "trust_remote_code": False}


@pytest.mark.parametrize(("command", "own_defaults"), [
    ("trace_cmd.trace", {"engine_core": "auto", "store_probs": False, "store": "per-token"}),
    ("compare_cmd.compare", {"engine_core": "auto", "store": "per-token"}),
    ("watch_cmd.watch", {"engine_core": "auto", "store": "per-token"}),
    ("eval_cmd.eval_", {}),  # engine core: EngineOptions' "process"; no --store-probs, --store
])
def test_each_command_keeps_its_engine_flags_and_defaults(command, own_defaults):
    import importlib
    import inspect

    module, name = command.split(".")
    parameters = inspect.signature(
        getattr(importlib.import_module(f"moepath.cli.{module}"), name)).parameters
    assert "engine" not in parameters
    shown = {flag: parameters[flag].default for flag in ENGINE_FLAGS if flag in parameters}
    assert shown == {**ENGINE_DEFAULTS, **own_defaults}


def test_engine_flags_hand_the_command_the_options_they_build():
    app, seen = typer.Typer(), []

    @app.command()
    @engine_flags(engine_core="auto")
    def run(name: str, *, engine: EngineOptions) -> None:
        seen.append((name, engine))

    result = CliRunner().invoke(app, ["x", "--dtype", "float32", "-tp", "2", "-pp", "2",
                                      "--trust-remote-code", "--max-model-len", "512"])
    assert result.exit_code == 0, result.output
    assert seen == [("x", EngineOptions(dtype="float32", tensor_parallel_size=2,
                                        pipeline_parallel_size=2,
                                        trust_remote_code=True, max_model_len=512,
                                        engine_core="auto"))]
    assert CliRunner().invoke(app, ["y"]).exit_code == 0
    assert seen[-1] == ("y", EngineOptions(engine_core="auto"))


def test_engine_core_and_store_probs_are_flags_only_where_named():
    app, seen = typer.Typer(), []

    @app.command()
    @engine_flags()
    def run(*, engine: EngineOptions) -> None:
        seen.append(engine)

    assert CliRunner().invoke(app, []).exit_code == 0
    assert seen == [EngineOptions()]
    for flag in ("--engine-core", "--store-probs"):
        assert CliRunner().invoke(app, [flag]).exit_code == 2  # no such option


def test_engine_flags_refuse_an_unknown_flag_and_a_command_without_engine():
    with pytest.raises(TypeError, match="no engine flag named seed"):
        engine_flags(seed=1)
    with pytest.raises(TypeError, match="needs an 'engine: o.EngineOptions' parameter"):
        engine_flags()(lambda name: None)


def test_analysis_flags_hand_compare_and_watch_the_compare_options_they_build():
    from moepath.cli.options import analysis_flags
    from moepath.tracer.compare import CompareOptions
    from moepath.tracer.distance import ALL_PAIRS
    from moepath.tracer.metrics import MetricOptions

    app, seen = typer.Typer(), []

    @app.command()
    @engine_flags()
    @analysis_flags()
    def run(name: str, *, analysis: CompareOptions, engine: EngineOptions) -> None:
        seen.append((name, analysis, engine))

    result = CliRunner().invoke(app, ["x", "--group-by", "domain", "--memorised-only",
                                      "--min-group-size", "5", "--control", "none",
                                      "--tau", "0.8", "--pairs", "all", "--resamples", "0",
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert seen == [("x", CompareOptions(
        metrics=MetricOptions(tau=0.8, pairs=ALL_PAIRS, resamples=0), group_by="domain",
        memorised_only=True, min_group_size=5, control=None),
        EngineOptions(dtype="float32"))]
    assert CliRunner().invoke(app, ["y"]).exit_code == 0
    assert seen[-1][1] == CompareOptions()  # the flags' defaults are the library's


def test_compare_and_watch_declare_the_same_analysis_flags():
    import inspect

    from moepath.cli.compare_cmd import compare
    from moepath.cli.options import ANALYSIS_FLAGS
    from moepath.cli.watch_cmd import watch

    for command in (compare, watch):
        parameters = inspect.signature(command).parameters
        assert "analysis" not in parameters
        assert {name: parameters[name].default for name in ANALYSIS_FLAGS} == {
            name: default for name, (_, default) in ANALYSIS_FLAGS.items()}


def test_read_flags_hand_trace_compare_and_watch_the_sample_read_options():
    import inspect

    from moepath.cli.compare_cmd import compare
    from moepath.cli.options import READ_FLAGS, read_flags
    from moepath.cli.trace_cmd import trace
    from moepath.cli.watch_cmd import watch
    from moepath.tracer.samples import SampleReadOptions

    app, seen = typer.Typer(), []

    @app.command()
    @read_flags()
    def run(*, read: SampleReadOptions) -> None:
        seen.append(read)

    result = CliRunner().invoke(app, ["--id-field", "key", "--skip-bad-lines", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [SampleReadOptions(id_field="key", skip_bad_lines=True, limit=3)]
    for command in (trace, compare, watch):
        parameters = inspect.signature(command).parameters
        assert {name: parameters[name].default for name in READ_FLAGS} == {
            name: default for name, (_, default) in READ_FLAGS.items()}


def test_cluster_flags_build_cluster_options_only_with_ray():
    from moepath.cli.options import ClusterOptions, cluster_flags

    app, seen = typer.Typer(), []

    @app.command()
    @cluster_flags()
    def run(*, cluster: ClusterOptions | None) -> None:
        seen.append(cluster)

    assert CliRunner().invoke(app, ["--ray", "auto", "--engines", "8"]).exit_code == 0
    assert CliRunner().invoke(app, []).exit_code == 0
    assert seen == [ClusterOptions(address="auto", engines=8), None]  # None: this machine
    refused = CliRunner().invoke(app, ["--cpus-per-engine", "4"])
    assert refused.exit_code == 2 and "--cpus-per-engine needs --ray" in refused.output


def test_trace_refuses_part_with_ray_before_reading_anything(tmp_path):
    from moepath.cli.main import app

    result = CliRunner().invoke(app, ["trace", str(tmp_path), "--samples",
                                      str(tmp_path / "missing.jsonl"), "--out",
                                      str(tmp_path / "o"), "--part", "0/2", "--ray", "local"])
    assert result.exit_code == 2
    assert "--part and --ray exclude each other" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()
