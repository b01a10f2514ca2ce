"""Packaging: install layout, console script, vLLM plugin entry point, import boundaries."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tracer", "patches", "cli", "fixtures")


def test_distribution_installs_only_the_moepath_package(tmp_path):
    assert metadata.distribution("moepath").read_text("top_level.txt").split() == ["moepath"]
    # outside the repository, only moepath.* resolves (nothing generic in site-packages)
    code = ("import importlib.util as u; "
            "print([n for n in ('tracer', 'patches', 'cli') if u.find_spec(n)], "
            "u.find_spec('moepath.tracer').origin)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    assert out.startswith("[] ") and out.strip().endswith("tracer/__init__.py")


def test_vllm_plugin_entry_point_is_discoverable_and_register_is_idempotent():
    (entry,) = [ep for ep in metadata.entry_points(group="vllm.general_plugins")
                if ep.name == "moepath"]
    assert entry.value == "moepath.patches:register"
    register = entry.load()
    register()
    from moepath.patches import compat

    wrapped = compat.worker_class().load_model
    register()
    assert compat.worker_class().load_model is wrapped
    assert wrapped.__moepath_wrapped__


def test_tracer_imports_without_vllm_typer_or_rich():
    code = ("import sys, moepath.tracer, moepath.tracer.store, moepath.tracer.trace; "
            "print(sorted(m for m in ('vllm', 'typer', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "moepath.cli.main", "--help"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "80"}).stdout
    panel = out[out.index("─ Commands ─"):].splitlines()
    listed = [line.split()[1] for line in panel  # "│ name  help", "│       more help"
              if line.startswith("│ ") and line[2] != " "]
    assert listed == ["trace", "merge", "metrics", "show", "compare", "watch", "eval", "demo",
                      "toy-model"]


def test_traced_and_untraced_engines_never_share_a_compile_cache_entry():
    """vLLM keys its compile cache on the config hash, which covers additional_config: a
    graph compiled without the hook cannot be loaded by a traced engine, nor vice versa."""
    from vllm.config import VllmConfig

    untraced = VllmConfig().compute_hash()
    traced = VllmConfig(additional_config={"moepath": {"dir": "t"}}).compute_hash()
    assert traced != untraced


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_inside_the_package_import_each_other_relatively(package):
    """``from ..tracer.store import ...`` names a folder of the tree; ``moepath.tracer`` is
    the installed name, which readers and code navigation cannot resolve without an install."""
    absolute = [f"{path.relative_to(ROOT)}:{node.lineno}"
                for path in sorted((ROOT / package).glob("*.py"))
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level == 0
                and (node.module or "").split(".")[0] == "moepath"
                or isinstance(node, ast.Import)
                and any(alias.name.split(".")[0] == "moepath" for alias in node.names)]
    assert absolute == []


def test_the_analysis_core_imports_no_fixture():
    """tracer/ is the engine-independent analysis and storage core: toy models, the
    testbed and the HF reference live in fixtures/, which may use tracer/, not the reverse."""
    code = ("import sys, moepath.tracer, moepath.tracer.compare, moepath.tracer.metrics; "
            "print(sorted(m for m in sys.modules if m.startswith('moepath.fixtures')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


STORAGE = ("tracer/store.py", "tracer/manifest.py", "tracer/writer.py")
# keys of manifest.json (docs/trace-format.md) that only the storage modules spell out; the
# generic ones (also keys of worker replies, kwargs, samples columns) when read off a manifest
MANIFEST_KEYS = {"format_version", "status", "capture_error", "router_weights", "counts",
                 "versions", "created", "merged_from", "num_layers", "num_experts", "top_k",
                 "layer_ids", "config_sha256", "reload_blocker", "routing_records",
                 "skipped_lines", "router_weights_unavailable"}
GENERIC_KEYS = {"shards", "model", "input", "options", "truncated", "samples", "tokens"}


def _manifest_key_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, key) of every ``x["key"]`` and ``x.get("key", ...)`` with a manifest key."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            key, owner = node.slice, node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault") and node.args):
            key, owner = node.args[0], node.func.value
        else:
            continue
        if isinstance(key, ast.Constant) and (key.value in MANIFEST_KEYS or (
                key.value in GENERIC_KEYS and "manifest" in ast.unparse(owner))):
            found.append((node.lineno, key.value))
    return found


def test_only_the_storage_modules_read_manifest_keys_or_trace_parquet():
    """The trace directory has one owner: drivers use TraceWriter and typed Manifest
    fields, readers Trace; no other module spells a manifest key or opens a trace's
    Parquet files (samples.py reads the user's samples file, which may be Parquet)."""
    modules = [path for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))
               if path.relative_to(ROOT).as_posix() not in STORAGE]
    keys, parquet = [], []
    for path in modules:
        name = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        keys += [f"{name}:{line} {key!r}" for line, key in _manifest_key_reads(tree)]
        imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        if "pyarrow.parquet" in imports and name != "tracer/samples.py":
            parquet.append(name)
    assert keys == []
    assert parquet == []
