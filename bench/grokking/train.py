"""Train the grokking testbed (``testbed.DEFAULT``, or another seed) and print its curve.

Run from the repository root (minutes on 2 idle CPU cores):

    .venv/bin/python bench/grokking/train.py out/grokking [--seed 1]

Writes the checkpoints, scores.csv, samples.jsonl and testbed.json into the
folder (see ``moepath.fixtures.testbed``), logs progress to stderr, and prints to
stdout a Markdown table of the checkpoints (step, seconds, and per domain the train
and held-out accuracy) and a JSON summary with the load average before and after,
since the wall time depends on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from moepath.fixtures import testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=testbed.DEFAULT.seed)
    args = parser.parse_args()
    config = replace(testbed.DEFAULT, seed=args.seed)
    load_before = os.getloadavg()
    result = testbed.train(config, args.out, log=lambda line: print(line, file=sys.stderr))
    names = config.domain_names
    print("| step | time (s) | " + " | ".join(f"{n} train / held-out" for n in names)
          + " |\n|---|---|" + "---|" * len(names))
    for step in config.checkpoint_steps:
        rows = {s.domain: s for s in result.scores if s.step == step}
        print(f"| {step} | {rows[names[0]].seconds:.0f} | " + " | ".join(
            f"{rows[n].train_accuracy:.3f} / {rows[n].heldout_accuracy:.3f}" for n in names)
            + " |")
    print(json.dumps({
        **testbed.summary(result),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(), "out": str(args.out)}, indent=2))


if __name__ == "__main__":
    main()
