"""Train the grokking testbed (``testbed.DEFAULT``) and print its curve.

Run from the repository root (about 10 minutes on 2 idle CPU cores):

    .venv/bin/python bench/grokking/train.py out/grokking

Writes the checkpoints, scores.csv, samples.jsonl and testbed.json into the
folder (see ``moepath.fixtures.testbed``), logs progress to stderr, and prints to
stdout a Markdown table of the checkpoints (step, seconds, train and held-out
accuracy) and a JSON summary with the load average before and after, since
the wall time depends on what else the machine runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from moepath.fixtures import testbed


def main(out: Path) -> None:
    load_before = os.getloadavg()
    result = testbed.train(testbed.DEFAULT, out, log=lambda line: print(line, file=sys.stderr))
    print("| step | time (s) | train acc | held-out acc |\n|---|---|---|---|")
    for s in result.scores:
        print(f"| {s.step} | {s.seconds:.0f} | {s.train_accuracy:.3f} | "
              f"{s.heldout_accuracy:.3f} |")
    print(json.dumps({
        **testbed.summary(result),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(), "out": str(out)}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/grokking/train.py OUT_DIR")
    main(Path(sys.argv[1]))
