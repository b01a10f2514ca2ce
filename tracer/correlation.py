"""Correlation of metric trajectories with a supplied score (test accuracy) over checkpoints.

Implements the last step of docs/method.md "Memorisation and groups": Pearson and
Spearman (``scipy.stats``) between a group's metric and the score across
checkpoints, optionally only from the step where accuracy starts its sustained
rise, laid out like the paper's Table 1 by :func:`table1`. Beside each: the
inference of docs/method.md "Statistics" (:mod:`.significance`): Pearson's
interval, the correlation of changes, a test against a null that keeps the
metric's trend, a partial correlation given a control metric, a flag for too few
checkpoints or too small a group, and a verdict in words.

Scores are one per checkpoint (columns checkpoint, score), or one per checkpoint
and group (plus a group column). A metrics group takes the scores of the same
name, else those of its label (``t*=1000/math`` takes ``math``'s: the paper
correlates memorised groups with their domain's accuracy), else the rows with
an empty group, which apply to every group. A scores file may also carry the
run's validation loss (column ``val_loss``, or ``eval_loss`` as the Hugging Face
Trainer logs it): it is correlated with the score like a metric (row ``val_loss``,
"validation loss" in Table 1), the standard monitor a pathway metric is read against.

Example::

    >>> import pandas as pd
    >>> metrics = pd.DataFrame({"checkpoint": ["a", "b", "c", "d"], "step": [0, 1, 2, 3],
    ...                         "group": "all", "metric": "distance",
    ...                         "value": [4.0, 3.0, 2.0, 2.5]})
    >>> scores = pd.DataFrame({"checkpoint": ["a", "b", "c", "d"], "score": [1, 2, 3, 4]})
    >>> row = correlate(metrics, scores).iloc[0]
    >>> print(row["n"], f"{row['pearson']:.3f}", f"{row['spearman']:.3f}")
    4 -0.832 -0.800
    >>> table1(correlate(metrics, scores)).loc["pathway distance", "all"]
    'too small'
    >>> print(row["verdict"])
    too few checkpoints (4 < 5): cannot tell (trend-preserving p=0.67)
    >>> table1(correlate(metrics, scores, min_checkpoints=4)).loc["pathway distance", "all"]
    '-0.832 / -0.800'
    >>> correlate(metrics, scores, from_step=2).iloc[0]["note"]
    'only 2 checkpoints have both a value and a score from step 2; correlation needs at least 3'
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .errors import InputError, MetricError
from .memorisation import parse_memorised_group
from .significance import (
    ALPHA,
    MIN_CHECKPOINTS,
    MIN_GROUP_SIZE,
    check_limits,
    difference_correlation,
    false_discovery,
    partial_correlation,
    pearson_interval,
    too_small,
    trend_preserving_test,
    verdict,
)

MIN_POINTS = 3  # two points always correlate +-1: no evidence
# A series whose range is at most this times its largest magnitude (or 1) counts as constant.
CONSTANT_RTOL = 1e-12
# Table 1 rows: long-frame metric name -> the paper's label (report.METRIC_NAMES has them all).
TABLE1_ROWS = {
    "distance": "pathway distance",
    "normalized_distance": "normalised distance",
    "consistency": "pathway consistency",
    "loss": "training loss",
    "val_loss": "validation loss",
}
# The optional scores column of the validation loss (read_scores), and the names it may have.
VALIDATION_LOSS = "val_loss"
VALIDATION_LOSS_NAMES = (VALIDATION_LOSS, "eval_loss")
# Bookkeeping rows of the metrics frame, not trajectories to correlate.
NOT_CORRELATED = ("n_samples", "distance_stderr")
GROUP_SIZE = "n_samples"  # the metric holding a group's number of samples per checkpoint
TOO_SMALL_CELL = "too small"  # table1's cell for a correlation too small to headline
CORRELATION_COLUMNS = ("group", "metric", "n", "first_step", "last_step", "pearson",
                       "pearson_p", "spearman", "spearman_p", "note",
                       # docs/method.md "Statistics" (significance.py)
                       "pearson_low", "pearson_high", "diff_pearson", "diff_pearson_p",
                       "trend_p", "trend_min_p", "trend_q", "partial", "partial_p",
                       "partial_control", "group_size", "too_small", "verdict")
_METRIC_COLUMNS = ("checkpoint", "step", "group", "metric", "value")


def read_scores(path: str | Path, known_checkpoints: dict[str, int]) -> pd.DataFrame:
    """A scores CSV (checkpoint, score, optional group and val_loss), validated against the
    checkpoints.

    ``checkpoint`` holds a checkpoint name or step. Returns columns checkpoint (the
    name), step, group (None for rows that apply to every group), score (float), and
    val_loss (float, NaN where a row has none) when the file has a :data:`VALIDATION_LOSS`
    (or ``eval_loss``) column.

    Raises:
        InputError: the file is missing or not CSV, a row has more fields than the
            header, a column is missing, a score is not a finite number, a validation loss
            is neither empty nor a finite number, both val_loss and eval_loss are given, a
            checkpoint is unknown (the message lists the known ones), or a checkpoint and
            group appear twice.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scores file '{path}' does not exist; pass a CSV with columns "
                         "checkpoint, score and optionally group")
    return resolve_scores(_read_cells(path), known_checkpoints, f"scores file '{path}'")


def _read_cells(path: Path) -> pd.DataFrame:
    """The scores CSV's cells as strings, one column per header name.

    ``index_col=False``: when the first row has more fields than the header, pandas
    would otherwise make the first column the index and shift every value one column
    left; with it pandas only warns and drops the extra field, so the warning is an error.
    """
    fix = "pass columns checkpoint, score and optionally group, one value each per row"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True,
                               index_col=False)
    except pd.errors.ParserWarning:
        raise InputError(f"scores file '{path}': its first row has more fields than the "
                         f"header; {fix}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"scores file '{path}' is not a CSV ({str(exc).strip()}); "
                         f"{fix}") from None


def resolve_scores(scores: pd.DataFrame, known_checkpoints: dict[str, int],
                   what: str = "scores") -> pd.DataFrame:
    """``scores`` with checkpoints resolved to names and steps (see :func:`read_scores`)."""
    missing = [c for c in ("checkpoint", "score") if c not in scores.columns]
    if missing:
        found = ", ".join(map(str, scores.columns)) or "(none)"
        raise InputError(f"{what} lacks column(s) {', '.join(missing)} (found: {found}); "
                         "it needs checkpoint, score and optionally group")
    if scores.empty:
        raise InputError(f"{what} has no rows; pass one score per checkpoint")
    names = _checkpoint_names(scores["checkpoint"], known_checkpoints, what)
    score = pd.to_numeric(scores["score"].replace("", np.nan), errors="coerce")
    bad = ~np.isfinite(score.astype(float))  # empty, not a number, NaN or +-inf (1e400 too)
    if bad.any():
        lines = (np.flatnonzero(bad) + 2).tolist()[:5]  # +2: header, 1-based
        raise InputError(f"{what} has an empty, non-numeric or infinite score on line(s) "
                         f"{lines}; pass a finite number per row")
    groups = scores["group"] if "group" in scores.columns else pd.Series(None, scores.index)
    resolved = pd.DataFrame({"checkpoint": names,
                             "step": [known_checkpoints[n] for n in names],
                             "group": [_group_or_none(g) for g in groups],
                             "score": score.astype(float).to_numpy()})
    loss = _validation_loss(scores, what)
    if loss is not None:
        resolved[VALIDATION_LOSS] = loss
    _check_unique(resolved, what)
    return resolved


def _validation_loss(scores: pd.DataFrame, what: str) -> np.ndarray | None:
    """float64 [rows] of the validation-loss column (NaN where empty), None without one."""
    given = [c for c in VALIDATION_LOSS_NAMES if c in scores.columns]
    if len(given) > 1:
        raise InputError(f"{what} has both {' and '.join(given)}; keep one validation-loss "
                         "column")
    if not given:
        return None
    raw = scores[given[0]]
    empty = raw.isna() | (raw.astype(str).str.strip() == "")
    loss = pd.to_numeric(raw.where(~empty), errors="coerce").astype(float)
    bad = ~empty & ~np.isfinite(loss)
    if bad.any():
        lines = (np.flatnonzero(bad) + 2).tolist()[:5]  # +2: header, 1-based
        raise InputError(f"{what} has a non-numeric or infinite {given[0]} on line(s) "
                         f"{lines}; pass a finite number or leave it empty")
    return loss.to_numpy()


def _checkpoint_names(values: pd.Series, known: dict[str, int], what: str) -> list[str]:
    """Name of each checkpoint given by name or step; InputError listing the unknown ones."""
    by_step = {step: name for name, step in known.items()}
    texts = [str(value).strip() for value in values]
    names = [text if text in known else by_step.get(_as_step(text)) for text in texts]
    unknown = [text for text, name in zip(texts, names, strict=True) if name is None]
    if unknown:
        listed = ", ".join(f"{n} ({s})" for n, s in known.items()) or "(none)"
        raise InputError(f"{what} names checkpoint(s) that were not compared: "
                         f"{', '.join(map(repr, dict.fromkeys(unknown)))}; use a name or step "
                         f"of: {listed}")
    return names


def _as_step(text: str) -> int | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _group_or_none(value) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return str(value).strip() or None


def _check_unique(scores: pd.DataFrame, what: str) -> None:
    twice = scores[scores.duplicated(["step", "group"], keep=False)]
    if len(twice):
        shown = sorted({f"{c}" + (f"/{g}" if g else "") for c, g in
                        zip(twice["checkpoint"], twice["group"], strict=True)})
        raise InputError(f"{what} has several scores for {', '.join(shown)}; keep one per "
                         "checkpoint (and group)")


def scores_for_group(scores: pd.DataFrame, group: str, column: str = "score") -> pd.Series:
    """``column`` of the resolved ``scores`` that apply to ``group``, indexed by step (empty
    if none): the score, or :data:`VALIDATION_LOSS`.

    Lookup order: rows of the group itself, rows of its label (``t*=1000/math`` ->
    ``math``), rows without a group.
    """
    label = _memorised_label(group)
    for key in [group] if label is None else [group, label]:
        rows = scores[scores["group"] == key]
        if len(rows):
            break
    else:
        rows = scores[scores["group"].isna()]
    return rows.set_index("step")[column].sort_index()


def _memorised_label(group: str) -> str | None:
    """The label of a memorised group (``t*=1000/math`` -> ``math``), else None."""
    parsed = parse_memorised_group(group)
    return None if parsed is None else parsed[1]


def correlate(metrics: pd.DataFrame, scores: pd.DataFrame, from_step: int | None = None,
              from_t_star: bool = False, *, control: str | Sequence[str] | None = None,
              min_checkpoints: int = MIN_CHECKPOINTS, min_group_size: int = MIN_GROUP_SIZE,
              alpha: float = ALPHA) -> pd.DataFrame:
    """Pearson and Spearman of every (group, metric) trajectory against the scores, with
    the inference of docs/method.md "Statistics".

    Score groups that apply to no metrics group are not used (see
    :func:`unused_score_groups`); the metrics groups left without a score get a note.

    Args:
        metrics: long frame with columns checkpoint, step, group, metric, value; a
            group's ``n_samples`` rows give its size.
        scores: columns checkpoint (name or step), score, optional group and
            :data:`VALIDATION_LOSS`; or :func:`read_scores`'s output. With a validation
            loss, each group also gets a row ``val_loss``: the validation loss of the
            scores that apply to it against its score (never flagged for group size).
        from_step: keep only checkpoints at or after this step (the start of the
            sustained rise of accuracy); None keeps all.
        from_t_star: correlate a memorised group ``t*=N`` (or pooled ``t*<=N``) only from
            step N on (the checkpoints after its samples are memorised), or from
            ``from_step`` if later.
        control: metric name(s) of the frame (e.g. ``pathway_length``) to partial out,
            each taken from the same group; several are partialled out jointly. None:
            no partial correlation.
        min_checkpoints, min_group_size: a correlation over fewer checkpoints, or of a
            group whose smallest ``n_samples`` over them is below this, is still
            computed, but flagged ``too_small`` and not headlined (:func:`table1`).
        alpha: the level of the verdicts.

    Returns:
        One row per (group, metric) in the metrics' order (bookkeeping metrics
        :data:`NOT_CORRELATED` left out; ``val_loss`` last), columns :data:`CORRELATION_COLUMNS`: n
        (checkpoints with both a value and a score), first_step and last_step of
        those, the coefficients with their two-sided p-values, and a note saying
        why they are NaN (too few points, a constant series), else None. Then:
        pearson_low/high, Pearson's 95% interval; diff_pearson(_p), Pearson of the
        first differences; trend_p, the trend-preserving permutation p-value,
        trend_min_p the smallest it could be, trend_q its Benjamini-Hochberg
        adjustment over the rows not too small; partial(_p), the partial correlation
        given ``partial_control`` (comma-joined names; None without ``control``), NaN
        where undefined (the metric is a control, the control is missing or too few
        checkpoints have it); group_size, the smallest ``n_samples`` over the
        checkpoints (NaN if the frame has none); too_small, why the row is too small to
        headline, else None; verdict, :func:`.significance.verdict`'s words.

    Raises:
        MetricError: ``metrics`` lacks a column or repeats a (step, group, metric).
        InputError: bad scores (see :func:`read_scores`), a ``control`` that is not a
            metric of the frame, bad thresholds.
    """
    check_metrics_frame(metrics)
    check_limits(min_checkpoints, min_group_size)
    controls = _controls(metrics, control)
    scores = resolve_scores(scores, checkpoint_steps(metrics))  # idempotent on read_scores'
    values = metrics.assign(value=pd.to_numeric(metrics["value"], errors="coerce"))
    names = [m for m in dict.fromkeys(metrics["metric"]) if m not in NOT_CORRELATED]
    validation = VALIDATION_LOSS in scores.columns and scores[VALIDATION_LOSS].notna().any()
    names += [VALIDATION_LOSS] if validation else []
    rows = []
    for group in map(str, dict.fromkeys(metrics["group"])):
        start = _first_step(group, from_step, from_t_star)
        mine = values[values["group"] == group]
        if start is not None:
            mine = mine[mine["step"] >= start]
        series = {m: s.set_index("step")["value"] for m, s in mine.groupby("metric")}
        if validation:  # a trajectory of the run, not of the group: never too small a group
            loss = scores_for_group(scores, group, VALIDATION_LOSS)
            series[VALIDATION_LOSS] = loss[loss.index >= start] if start is not None else loss
        score = scores_for_group(scores, group)
        sizes = series.get(GROUP_SIZE, pd.Series(dtype=float))
        control_values = pd.concat({c: series.get(c, pd.Series(dtype=float))
                                    for c in controls}, axis=1) if controls else None
        for metric in names:  # every metric for every group: a missing one gets a note
            trajectory = series.get(metric, pd.Series(dtype=float))
            joined = _joined(trajectory, score)
            note = _why_not(str(metric), joined, trajectory.notna().any(), not score.empty,
                            start)
            row = _correlation(group, str(metric), joined, note)
            row |= _inference(row, joined, metric, control_values,
                              sizes if metric != VALIDATION_LOSS else sizes.iloc[:0])
            row["too_small"] = too_small(row["n"], row["group_size"], min_checkpoints,
                                         min_group_size)
            rows.append(row)
    frame = pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))
    frame = _with_verdicts(frame, alpha)
    return frame.astype({"n": "int64", "first_step": "Int64", "last_step": "Int64"})


def _controls(metrics: pd.DataFrame, control: str | Sequence[str] | None) -> list[str]:
    """The control metric names, each checked to be a metric of the frame."""
    names = [] if control is None else [control] if isinstance(control, str) else list(control)
    known = list(dict.fromkeys(metrics["metric"]))
    missing = [name for name in names if name not in known]
    if missing:
        raise InputError(f"control metric(s) {', '.join(map(repr, missing))} not in the "
                         f"metrics frame; use one of: {', '.join(map(str, known))}")
    return names


def _first_step(group: str, from_step: int | None, from_t_star: bool) -> int | None:
    """The first step ``group`` is correlated from (None: every checkpoint)."""
    parsed = parse_memorised_group(group) if from_t_star else None
    if parsed is None:
        return from_step
    return parsed[0] if from_step is None else max(from_step, parsed[0])


def check_metrics_frame(metrics: pd.DataFrame) -> None:
    """MetricError unless ``metrics`` has the long columns and one value per
    (step, group, metric)."""
    missing = [c for c in _METRIC_COLUMNS if c not in metrics.columns]
    if missing:
        raise MetricError(f"metrics frame lacks columns {missing}; it needs "
                          f"{', '.join(_METRIC_COLUMNS)} (see compare.checkpoint_metrics)")
    twice = metrics.duplicated(["step", "group", "metric"])
    if twice.any():
        shown = metrics.loc[twice, ["step", "group", "metric"]].head(3).to_numpy().tolist()
        raise MetricError(f"metrics frame repeats (step, group, metric) {shown}; pass one value "
                          "per checkpoint, group and metric")


def checkpoint_steps(metrics: pd.DataFrame) -> dict[str, int]:
    """{checkpoint name: step} of a long metrics frame, in order of appearance."""
    return dict(zip(metrics["checkpoint"].astype(str), metrics["step"].astype(int),
                    strict=True))


def unused_score_groups(scores: pd.DataFrame, groups) -> list[str]:
    """The resolved ``scores``' groups that apply to none of the metrics ``groups`` (by
    the group's own name or, for a memorised group, its label): a typo, no --group-by, or
    a label none of whose samples is memorised. Rows without a group apply to all."""
    usable = set(groups) | {_memorised_label(g) for g in groups} - {None}
    return [g for g in dict.fromkeys(scores["group"].dropna()) if g not in usable]


def too_few_checkpoints(steps, from_step: int | None = None) -> str | None:
    """Why checkpoints at ``steps`` cannot be correlated with scores, or None when they can.

    ``too_few_checkpoints([0, 100]) == "2 checkpoints: correlation needs at least 3"``
    """
    steps = list(steps)
    kept = [s for s in steps if from_step is None or s >= from_step]
    if len(kept) >= MIN_POINTS:
        return None
    if from_step is None:
        counted = "1 checkpoint" if len(steps) == 1 else f"{len(steps)} checkpoints"
        return f"{counted}: correlation needs at least {MIN_POINTS}"
    return (f"--from-step {from_step} leaves {len(kept)} of {len(steps)} checkpoints; "
            f"correlation needs {MIN_POINTS}")


def _joined(trajectory: pd.Series, score: pd.Series) -> pd.DataFrame:
    """Columns value and score at the steps where both have a number, by step (sorted).

    Both series are indexed by step, each step once.
    """
    steps, mine, theirs = np.intersect1d(trajectory.index.to_numpy(), score.index.to_numpy(),
                                         assume_unique=True, return_indices=True)
    value, scored = trajectory.to_numpy(float)[mine], score.to_numpy(float)[theirs]
    both = ~(np.isnan(value) | np.isnan(scored))
    return pd.DataFrame({"value": value[both], "score": scored[both]},
                        index=pd.Index(steps[both], name="step"))


def _correlation(group: str, metric: str, joined: pd.DataFrame, note: str | None) -> dict:
    """One result row: the coefficients over the steps where both series have a number
    (``joined``); NaN when ``note`` says why there are none."""
    x, y = joined["value"].to_numpy(float), joined["score"].to_numpy(float)
    row = {"group": group, "metric": metric, "n": len(joined),
           "first_step": int(joined.index[0]) if len(joined) else None,
           "last_step": int(joined.index[-1]) if len(joined) else None,
           "pearson": np.nan, "pearson_p": np.nan, "spearman": np.nan, "spearman_p": np.nan,
           "note": note}
    if note is None:
        pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
        row.update(pearson=float(pearson.statistic), pearson_p=float(pearson.pvalue),
                   spearman=float(spearman.statistic), spearman_p=float(spearman.pvalue))
    return row


def _inference(row: dict, joined: pd.DataFrame, metric: str,
               control_values: pd.DataFrame | None, sizes: pd.Series) -> dict:
    """The "Statistics" columns of one row (NaN where its note says no correlation).

    ``control_values``: the group's control metrics by step (one column each; None for no
    control); ``sizes``: its ``n_samples`` by step.
    """
    controls = [] if control_values is None else list(control_values.columns)
    sizes = sizes.reindex(joined.index)
    out = {"pearson_low": np.nan, "pearson_high": np.nan, "diff_pearson": np.nan,
           "diff_pearson_p": np.nan, "trend_p": np.nan, "trend_min_p": np.nan,
           "trend_q": np.nan, "partial": np.nan, "partial_p": np.nan,
           "partial_control": ", ".join(controls) or None,
           "group_size": float(sizes.min()) if sizes.notna().any() else np.nan}
    if row["note"] is not None:
        return out
    x, y = joined["value"].to_numpy(float), joined["score"].to_numpy(float)
    test = trend_preserving_test(x, y)
    out.update(zip(("pearson_low", "pearson_high"), pearson_interval(x, y), strict=True))
    out.update(zip(("diff_pearson", "diff_pearson_p"), difference_correlation(x, y),
                   strict=True))
    out.update(trend_p=test.pvalue, trend_min_p=test.min_pvalue)
    if controls and metric not in controls:
        both = joined.join(control_values, how="inner").dropna()
        out.update(zip(("partial", "partial_p"), partial_correlation(
            both["value"], both["score"], both[controls].to_numpy(float)), strict=True))
    return out


def _with_verdicts(frame: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """``frame`` with trend_q over the rows fit to headline (no note, not too small), and
    each row's verdict."""
    family = frame["note"].isna() & frame["too_small"].isna() & frame["trend_p"].notna()
    frame.loc[family, "trend_q"] = false_discovery(frame.loc[family, "trend_p"])
    tests = int(family.sum())
    frame["verdict"] = [verdict(r.trend_p, r.trend_min_p, r.n, r.too_small, r.note, alpha,
                                r.trend_q, tests) for r in frame.itertuples()]
    return frame


def _why_not(metric: str, joined: pd.DataFrame, has_values: bool, has_scores: bool,
             from_step: int | None) -> str | None:
    """Why no correlation can be computed on these points (:func:`_joined`), or None when
    it can."""
    x, y = joined["value"].to_numpy(float), joined["score"].to_numpy(float)
    since = f" from step {from_step}" if from_step is not None else ""
    if not has_scores:
        return "no score applies to this group; give its scores or rows without a group"
    if not has_values:
        return f"the group has no {metric} values{since}"
    if len(x) < MIN_POINTS:
        counted = "1 checkpoint has" if len(x) == 1 else f"{len(x)} checkpoints have"
        return (f"only {counted} both a value and a score{since}; correlation needs at "
                f"least {MIN_POINTS}")
    if _is_constant(x):
        return f"{metric} is constant over the {len(x)} checkpoints; correlation is undefined"
    if _is_constant(y):
        return f"the score is constant over the {len(x)} checkpoints; correlation is undefined"
    return None


def _is_constant(values: np.ndarray) -> bool:
    """True when ``values`` vary by no more than float rounding (:data:`CONSTANT_RTOL`):
    Pearson of such a series is a correlation with rounding noise."""
    return bool(np.ptp(values) <= CONSTANT_RTOL * max(1.0, float(np.abs(values).max())))


def table1(correlations: pd.DataFrame) -> pd.DataFrame:
    """:func:`correlate`'s rows laid out like the paper's Table 1.

    Rows: the :data:`TABLE1_ROWS` labels (index ``metric``; validation loss only when
    ``correlations`` has it); columns: groups in
    order of appearance; cells ``"pearson / spearman"`` with 3 decimals, ``n/a``
    for a coefficient that could not be computed (see the row's note), and
    :data:`TOO_SMALL_CELL` for one computed over too few checkpoints or too small a
    group (``too_small``): those are no headline, their numbers stay in the rows.
    """
    groups = list(dict.fromkeys(correlations["group"]))
    cells = {(r.group, r.metric): TOO_SMALL_CELL if isinstance(r.too_small, str)
             and r.note is None else f"{_fmt(r.pearson)} / {_fmt(r.spearman)}"
             for r in correlations.itertuples()}
    metrics = [m for m in TABLE1_ROWS  # the validation loss only where the scores have one
               if m != VALIDATION_LOSS or (correlations["metric"] == VALIDATION_LOSS).any()]
    table = pd.DataFrame(
        [[cells.get((group, metric), "n/a / n/a") for group in groups] for metric in metrics],
        index=pd.Index([TABLE1_ROWS[m] for m in metrics], name="metric"), columns=groups)
    return table


def _fmt(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f}"
