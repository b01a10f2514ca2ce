"""bench/bench_cuda_hook.py is meant for a GPU session's one device call; its checks
(buffer rows against an eager pass, hooked output equal to hookless) run on the CPU
too, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "bench" / "bench_cuda_hook.py"


def test_the_cuda_hook_benchmark_passes_its_checks_on_a_cpu_dry_run(tmp_path):
    out = tmp_path / "cuda-hook.json"
    subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--layers", "3",
                    "--hidden", "64", "--intermediate", "32", "--experts", "8", "--top-k", "2",
                    "--decode", "1", "5", "--eager-decode", "4", "--prefill", "48",
                    "--iters", "1", "--repeats", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    results = json.loads(out.read_text())
    assert results["passed"] is True
    assert set(results["decode"]) == {"1", "5"} and set(results["prefill"]) == {"48"}
    check = results["prefill"]["48"]["check"]
    assert check["ids_equal"] and check["weights_equal"] and check["output_equal_to_hookless"]
    assert check["max_score_error"] < 1e-6
    host = results["host_ms_per_call_64x(16+128)"]
    assert host["rows"] > 0 and host["write"] > 0
