"""Memorisation: from which checkpoint a sample's training loss is low and settled.

Implements docs/method.md, "Memorisation and groups". Sample i is memorised from
checkpoint t* when, at every checkpoint t >= t*,

    loss_t <= epsilon   and   |loss_t - loss_final| <= delta   (paper: delta = 0.05)

so a sample that dips below epsilon and rises again counts only from the last
stretch that stays low. Both comparisons allow :data:`TOLERANCE` for float
rounding (``1.05 - 1.00`` is 0.050000000000000044 in binary, yet sits on the
boundary). Groups are the samples sharing a t* (and a label, with ``--group-by``).

Choosing epsilon (:func:`memorise`): an explicit value, or the ``q`` quantile
of the final losses, by default q = :data:`DEFAULT_QUANTILE` = 0.25, the upper
end of the paper's "20-25% of samples qualify". The paper chooses epsilon per
domain: given a domain label per sample, the quantile is taken over each
domain's final losses, so a domain of harder text (higher losses) still has
its quarter memorised. The final checkpoint always meets the delta condition,
so the fraction memorised is the fraction of final losses <= epsilon (about q,
less for ties or missing losses); delta decides only how early t* is, and
samples first settled at the final checkpoint form the group ``t*=<last step>``.

Example: steps 0, 10, 20, 30; sample b dips below epsilon at step 10, rises, and settles::

    >>> import pandas as pd
    >>> losses = pd.DataFrame({0: [0.5, 3.0, 4.0], 10: [0.5, 0.5, 3.0], 20: [0.5, 2.0, 2.0],
    ...                        30: [0.5, 0.8, 1.5]}, index=["a", "b", "c"])
    >>> memorised_from(losses, epsilon=1.0).tolist()  # c is never below epsilon
    [0, 30, <NA>]
    >>> memorisation_groups(memorised_from(losses, epsilon=1.0), None).tolist()
    ['t*=0', 't*=30', None]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np
import pandas as pd

from .errors import InputError, MetricError
from .metrics import label_names

# Memorised groups are named "t*=<step>" or "t*=<step>/<label>" (memorised_group_name);
# the pooled group "t*<=<step>" or "t*<=<step>/<label>" (pooled_group_name).
MEMORISED_PREFIX = "t*="
POOLED_PREFIX = "t*<="
DEFAULT_DELTA = 0.05
DEFAULT_QUANTILE = 0.25
# Slack of both comparisons, so a loss exactly on a decimal boundary counts as within it.
TOLERANCE = 1e-9
_LOSS_COLUMNS = ("checkpoint", "step", "sample_id", "loss")


@dataclass(frozen=True)
class MemorisationResult:
    """Which samples are memorised, from which step, under which thresholds.

    Attributes:
        t_star: Int64 Series indexed by sample_id (every sample of the loss matrix):
            the step from which the sample is memorised, ``<NA>`` when never.
        epsilon: the loss threshold of every sample; None when chosen per domain.
        delta: the allowed distance to the final loss.
        epsilon_source: ``"explicit"`` or ``"quantile 0.25"`` (the quantile of final losses).
        fraction_memorised: share of all samples with a t*, in [0, 1].
        epsilon_by_domain: the threshold of each domain label when epsilon was chosen per
            domain (NaN for a domain without a final loss), else None.
    """

    t_star: pd.Series
    epsilon: float | None
    delta: float
    epsilon_source: str
    fraction_memorised: float
    epsilon_by_domain: dict[str, float] | None = None

    def thresholds(self) -> str:
        """The thresholds in words: ``epsilon 0.65 (quantile 0.25 of the final losses),
        delta 0.05``, or with ``epsilon per domain (...): code 1.2, math 0.65``."""
        if self.epsilon_by_domain is None:
            source = self.epsilon_source
            if source != "explicit":
                source += " of the final losses"
            epsilon = f"epsilon {self.epsilon:.4g} ({source})"
        else:
            values = ", ".join(f"{domain} {value:.4g}"
                               for domain, value in self.epsilon_by_domain.items())
            epsilon = f"epsilon per domain ({self.epsilon_source} of each domain's final " \
                      f"losses): {values}"
        return f"{epsilon}, delta {self.delta:g}"


def loss_matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide float64 [sample_id x checkpoint] losses from the long frame of ``compare.losses``.

    ``frame`` has columns checkpoint, step, sample_id, loss (mean NLL per token).
    The result has one row per sample (index ``sample_id``, sorted) and one column
    per checkpoint, labelled by its step (int64, ascending); a sample missing at a
    checkpoint gets NaN there.

    Raises:
        MetricError: a column is missing, a loss is not a number, a checkpoint has two
            steps or two checkpoints share one, or a sample appears twice in a checkpoint.
    """
    _check_columns(frame)
    _check_one_step_each(frame)
    losses = pd.to_numeric(frame["loss"], errors="coerce")
    if losses.isna().ne(frame["loss"].isna()).any():
        bad = frame.loc[losses.isna() & frame["loss"].notna(), "loss"].head(3).tolist()
        raise MetricError(f"losses must be numbers, got {bad}; pass mean NLLs as floats")
    duplicated = frame.duplicated(["checkpoint", "sample_id"])
    if duplicated.any():
        pairs = frame.loc[duplicated, ["sample_id", "checkpoint"]].head(3).to_numpy().tolist()
        raise MetricError(f"samples appear twice in one checkpoint: {pairs}; pass one loss per "
                          "sample and checkpoint")
    wide = frame.assign(loss=losses.astype(float))
    wide = wide.pivot(index="sample_id", columns="step", values="loss").sort_index(axis=1)
    wide.columns = wide.columns.astype(np.int64)
    return wide


def _check_columns(frame: pd.DataFrame) -> None:
    missing = [c for c in _LOSS_COLUMNS if c not in frame.columns]
    if missing:
        raise MetricError(f"loss frame lacks columns {missing}; it needs "
                          f"{', '.join(_LOSS_COLUMNS)} (see compare.losses)")
    if frame.empty:
        raise MetricError("loss frame is empty; trace samples at some checkpoints first")


def _check_one_step_each(frame: pd.DataFrame) -> None:
    """MetricError unless steps are integers and pair one to one with checkpoint names."""
    if not pd.api.types.is_integer_dtype(frame["step"]):
        raise MetricError(f"steps must be integers, got {frame['step'].dtype} "
                          f"({frame['step'].head(3).tolist()}); pass training steps")
    pairs = frame[["checkpoint", "step"]].drop_duplicates()
    for column, other in (("checkpoint", "steps"), ("step", "checkpoints")):
        twice = pairs.loc[pairs[column].duplicated(keep=False)].sort_values(column)
        if len(twice):
            shown = ", ".join(f"{c} at step {s}" for c, s in twice.to_numpy()[:4])
            raise MetricError(f"each checkpoint needs its own step, got two {other} for one "
                              f"{column} ({shown}); name checkpoints by their step")


def memorised_from(losses: pd.DataFrame, epsilon: float | np.ndarray,
                   delta: float = DEFAULT_DELTA) -> pd.Series:
    """Step t* from which each sample stays memorised (docs/method.md), ``<NA>`` when never.

    Args:
        losses: float [N samples, T checkpoints], columns the checkpoints' integer
            steps in training order (``loss_matrix``'s output). NaN fails both conditions
            (a NaN final loss means never memorised).
        epsilon: a loss at most this is low: one number, or float [N] one per sample
            (a NaN there: that sample is never memorised).
        delta: a loss at most this far from the final loss is settled.

    Returns:
        Int64 Series indexed like ``losses`` (name ``t_star``).
    """
    steps = _check_steps(losses.columns)
    _check_delta(delta)
    if np.ndim(epsilon) == 0:
        _check_number("epsilon", epsilon)
        threshold = float(epsilon)
    else:
        threshold = np.asarray(epsilon, dtype=float)[:, None]  # [N, 1]
        if len(threshold) != len(losses):
            raise InputError(f"got {len(threshold)} epsilons for {len(losses)} samples; pass "
                             f"one number or one per sample")
    values = losses.to_numpy(dtype=float)  # [N, T]
    with np.errstate(invalid="ignore"):
        settled = (values <= threshold + TOLERANCE) & (
            np.abs(values - values[:, -1:]) <= delta + TOLERANCE)
    # stays[i, t]: settled at t and at every later checkpoint (an all() over each suffix)
    stays = np.logical_and.accumulate(settled[:, ::-1], axis=1)[:, ::-1]
    first = values.shape[1] - stays.sum(axis=1)  # each row of stays is False..False True..True
    t_star = pd.Series(steps[np.minimum(first, len(steps) - 1)], index=losses.index,
                       name="t_star", dtype="Int64")
    return t_star.where(stays[:, -1])  # memorised iff settled at the final checkpoint


def _check_steps(columns: pd.Index) -> np.ndarray:
    if len(columns) == 0:
        raise MetricError("the loss matrix has no checkpoints; trace at least one")
    if not pd.api.types.is_integer_dtype(columns) or not columns.is_monotonic_increasing \
            or not columns.is_unique:
        raise MetricError(f"loss matrix columns must be increasing integer steps, got "
                          f"{list(columns)[:5]}; build it with loss_matrix()")
    return columns.to_numpy(dtype=np.int64)


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise InputError(f"{name} {value!r} is not a finite number; pass a loss in nats")


def _check_delta(delta: float) -> None:
    _check_number("delta", delta)
    if delta < 0:
        raise InputError(f"delta {delta} is negative; pass a distance to the final loss >= 0 "
                         f"(the paper uses {DEFAULT_DELTA})")


def _check_quantile(q: float) -> None:
    if isinstance(q, bool) or not isinstance(q, Real) or not 0 < q < 1:
        raise InputError(f"quantile {q!r} is outside (0, 1); pass the share of samples to "
                         f"call memorised, e.g. {DEFAULT_QUANTILE}")


def check_thresholds(epsilon: float | None, quantile: float | None,
                     delta: float = DEFAULT_DELTA) -> None:
    """InputError unless :func:`memorise` can use these thresholds: at most one of
    ``epsilon`` (a finite number) and ``quantile`` (in (0, 1)), and a finite ``delta`` >= 0.

    ``compare.CompareOptions`` checks its options with it, so that a bad value fails
    before any checkpoint is traced rather than after all of them.
    """
    if epsilon is not None and quantile is not None:
        raise InputError(f"got epsilon {epsilon} and quantile {quantile}; pass one of them "
                         "(an explicit loss threshold or a share of samples)")
    if epsilon is not None:
        _check_number("epsilon", epsilon)
    if quantile is not None:
        _check_quantile(quantile)
    _check_delta(delta)


def epsilon_from_quantile(final_losses: pd.Series, q: float) -> float:
    """The ``q`` quantile of the final losses (linear interpolation, NaN ignored).

    Raises:
        InputError: ``q`` is outside (0, 1).
        MetricError: no final loss is a number.
    """
    _check_quantile(q)
    values = pd.to_numeric(pd.Series(final_losses), errors="coerce").dropna()
    if values.empty:
        raise MetricError("no sample has a final loss; cannot choose epsilon from a quantile, "
                          "pass an explicit epsilon")
    return float(values.quantile(q))


def memorise(losses: pd.DataFrame, epsilon: float | None = None, quantile: float | None = None,
             delta: float = DEFAULT_DELTA, domains: pd.Series | None = None
             ) -> MemorisationResult:
    """:func:`memorised_from` with epsilon explicit, from ``quantile``, or the default policy.

    With neither ``epsilon`` nor ``quantile``, epsilon is the :data:`DEFAULT_QUANTILE`
    quantile of the final losses (``losses``' last column), so about a quarter of
    the samples qualify, as in the paper.

    Args:
        domains: a label per sample_id (e.g. the ``--group-by`` field), or None. With
            it, a quantile is taken over each domain's final losses (docs/method.md: epsilon
            per domain); samples without a label form the domain ``"(missing)"``.
            An explicit ``epsilon`` serves every domain.

    Raises:
        InputError: both ``epsilon`` and ``quantile`` given, or a bad value
            (:func:`check_thresholds`).
        MetricError: a bad loss matrix.
    """
    check_thresholds(epsilon, quantile, delta)
    _check_steps(losses.columns)
    final = losses.iloc[:, -1]
    by_domain = None
    if epsilon is not None:
        source, threshold = "explicit", epsilon
    else:
        q = DEFAULT_QUANTILE if quantile is None else quantile
        source = f"quantile {q:g}"
        if domains is None:
            epsilon = threshold = epsilon_from_quantile(final, q)
        else:
            labels = label_names(domains.reindex(losses.index))
            by_domain = _epsilon_by_domain(final, labels, q)
            threshold = labels.map(by_domain).to_numpy(dtype=float)
    t_star = memorised_from(losses, threshold, delta)
    fraction = float(t_star.notna().mean()) if len(t_star) else 0.0
    return MemorisationResult(t_star, None if epsilon is None else float(epsilon),
                              float(delta), source, fraction, by_domain)


def _epsilon_by_domain(final: pd.Series, labels: pd.Series, q: float) -> dict[str, float]:
    """{domain: the ``q`` quantile of its final losses} (NaN: none of its samples has one;
    they are never memorised). MetricError when no sample at all has a final loss."""
    epsilon_from_quantile(final, q)  # checks q, and that some sample has a final loss
    return {domain: (float(losses.quantile(q)) if losses.notna().any() else math.nan)
            for domain, losses in final.groupby(labels, sort=True)}


def memorisation_groups(t_star: pd.Series, extra: pd.Series | None = None) -> pd.Series:
    """Group of each memorised sample: ``t*=1000``, or ``t*=1000/math`` with a label.

    Args:
        t_star: step from which each sample is memorised, indexed by sample_id, NA when never.
        extra: a label per sample_id (the ``--group-by`` field), or None. Samples
            without a label get ``(missing)``.

    Returns:
        object Series indexed like ``t_star`` (name ``group``): the group name, None
        for samples never memorised.
    """
    labels = ([None] * len(t_star) if extra is None
              else label_names(extra.reindex(t_star.index)).tolist())
    names = [None if pd.isna(step) else memorised_group_name(int(step), label)
             for step, label in zip(t_star, labels, strict=True)]
    return pd.Series(names, index=t_star.index, name="group", dtype=object)


def memorised_group_name(t_star: int, label: str | None = None) -> str:
    """The group of samples memorised from step ``t_star`` (with ``label``, if given).

    ``memorised_group_name(1000) == "t*=1000"``, ``memorised_group_name(1000, "math") ==
    "t*=1000/math"``.
    """
    name = f"{MEMORISED_PREFIX}{t_star}"
    return name if label is None else f"{name}/{label}"


def pooled_group_name(step: int, label: str | None = None) -> str:
    """The pooled group: every sample memorised at or before ``step`` (with ``label``).

    ``pooled_group_name(300) == "t*<=300"``, ``pooled_group_name(300, "math") ==
    "t*<=300/math"``.
    """
    name = f"{POOLED_PREFIX}{step}"
    return name if label is None else f"{name}/{label}"


def pooled_step(steps, from_step: int | None, min_checkpoints: int) -> int | None:
    """S of the pooled group ``t*<=S`` (docs/method.md "Memorisation and groups"): the
    step that leaves ``min_checkpoints`` of the checkpoints at ``steps`` from ``from_step``
    on, or the first of them when there are fewer; None when none is left.

    >>> pooled_step([0, 100, 200, 300, 400, 500, 600], None, 5), pooled_step([0, 100], None, 5)
    (200, 0)
    """
    kept = sorted(s for s in steps if from_step is None or s >= from_step)
    if not kept:
        return None
    return kept[-min_checkpoints] if len(kept) >= min_checkpoints else kept[0]


def pooled_groups(t_star: pd.Series, step: int | None,
                  extra: pd.Series | None = None) -> pd.Series:
    """Pooled group of each sample memorised at or before ``step`` (:func:`pooled_group_name`,
    per label of ``extra`` as in :func:`memorisation_groups`), None for the others."""
    labels = ([None] * len(t_star) if extra is None
              else label_names(extra.reindex(t_star.index)).tolist())
    names = [None if step is None or pd.isna(t) or t > step else pooled_group_name(step, label)
             for t, label in zip(t_star, labels, strict=True)]
    return pd.Series(names, index=t_star.index, name="group", dtype=object)


def parse_memorised_group(name: str) -> tuple[int, str | None] | None:
    """(step, label) of a memorised or pooled group name, None for any other group name:
    ``step`` is the step from which every sample of the group is memorised.

    ``parse_memorised_group("t*=1000/math") == (1000, "math")``,
    ``parse_memorised_group("t*=1000") == (1000, None)``,
    ``parse_memorised_group("t*<=1000") == (1000, None)``, ``parse_memorised_group("math")``
    is None.
    """
    prefix = next((p for p in (MEMORISED_PREFIX, POOLED_PREFIX) if name.startswith(p)), None)
    if prefix is None:
        return None
    step, slash, label = name.removeprefix(prefix).partition("/")
    if not step.isdigit():
        return None
    return int(step), (label if slash else None)
