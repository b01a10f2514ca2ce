"""A training job's evaluation log as scores for ``moepath watch``: read again on every
update, so that correlations appear as evaluations arrive.

The log is a CSV (``checkpoint,score[,group][,val_loss]``, as ``compare --scores``
takes) or JSON lines (``{"step": 200, "score": 0.41, "group": "math", "val_loss": 2.3}``;
``checkpoint`` may stand for ``step``, ``eval_loss`` for ``val_loss``), with ``.jsonl`` /
``.json`` / ``.ndjson`` read as JSON lines. A row
may name a checkpoint by folder name or step. Rows for checkpoints not traced yet
(the evaluation ran first) or never (another run's) are left out here, not refused:
:func:`known_scores` keeps the rows of the traced checkpoints, in the CSV layout that
:func:`~moepath.tracer.correlation.read_scores` validates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .correlation import VALIDATION_LOSS, VALIDATION_LOSS_NAMES
from .errors import InputError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COLUMNS = ["checkpoint", "score", "group", VALIDATION_LOSS]


def read_log(path: str | Path) -> pd.DataFrame:
    """The log's rows as strings, columns checkpoint, score, group, val_loss ("" where
    absent; a CSV's ``eval_loss`` is read as val_loss).

    Raises:
        InputError: the file is missing, a JSON line does not parse or has no
            checkpoint/step, or a CSV lacks the checkpoint column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scores file '{path}' does not exist; pass the evaluation log (CSV "
                         f"checkpoint,score[,group] or JSON lines with step and score)")
    if path.suffix.lower() in JSON_SUFFIXES:
        return pd.DataFrame([_json_row(path, n, line) for n, line in
                             enumerate(path.read_text().splitlines(), 1) if line.strip()],
                            columns=COLUMNS)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"scores file '{path}' is not a CSV ({str(exc).strip()}); pass "
                         f"columns checkpoint, score and optionally group") from None
    if "checkpoint" not in frame.columns and "step" in frame.columns:
        frame = frame.rename(columns={"step": "checkpoint"})
    if "checkpoint" not in frame.columns:
        raise InputError(f"scores file '{path}' has no checkpoint (or step) column; pass "
                         f"columns checkpoint, score and optionally group")
    if VALIDATION_LOSS not in frame.columns:
        frame = frame.rename(columns={"eval_loss": VALIDATION_LOSS})
    return frame.reindex(columns=COLUMNS, fill_value="")


def _json_row(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    key = next((k for k in ("checkpoint", "step") if isinstance(record, dict) and k in record),
               None)
    if key is None:
        raise InputError(f"scores file '{path}' line {number}: not a JSON object with "
                         f"'step' (or 'checkpoint') and 'score'; fix the line")
    loss = next((record[k] for k in VALIDATION_LOSS_NAMES if record.get(k) is not None), "")
    return {"checkpoint": str(record[key]), "score": str(record.get("score", "")),
            "group": "" if record.get("group") is None else str(record["group"]),
            VALIDATION_LOSS: str(loss)}


def known_scores(path: str | Path, known: dict[str, int], dest: str | Path) -> int:
    """Write the rows of ``path`` whose checkpoint is one of ``known`` (name -> step), by
    name or step, into the CSV ``dest``; return how many (0: ``dest`` is not written).

    Raises:
        InputError: see :func:`read_log`.
    """
    frame = read_log(path)
    by_step = {str(step): name for name, step in known.items()}
    names = [text if text in known else by_step.get(_integer_text(text))
             for text in frame["checkpoint"].str.strip()]
    kept = frame.assign(checkpoint=names)[[name is not None for name in names]]
    if kept.empty:
        return 0
    kept = kept.drop(columns=[c for c in ("group", VALIDATION_LOSS) if not (kept[c] != "").any()])
    kept.to_csv(dest, index=False)
    return len(kept)


def _integer_text(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text
