"""Checkpoint comparison: the metric trajectories of checkpoints' traces.

Engine-independent: the checkpoints are found and ordered in ``checkpoints.py``,
their traces produced elsewhere (``patches/sweep.py``, driven by
``patches/comparison.py``); this module turns those traces into the long metrics
table of ``moepath compare``: ``checkpoint, step, group, metric, value`` (one row
per checkpoint x group x metric) plus a per-sample table, following
docs/method.md's protocol (memorised groups by t*, optionally crossed with a user
field). It returns data; ``report.py`` writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import checkpoints as ckpt
from .checkpoints import Checkpoint
from .consistency import is_degenerate
from .correlation import (
    NOT_CORRELATED,
    correlate,
    read_scores,
    table1,
    too_few_checkpoints,
    unused_score_groups,
)
from .errors import InputError
from .memorisation import (
    MemorisationResult,
    check_thresholds,
    loss_matrix,
    memorisation_groups,
    memorise,
    parse_memorised_group,
    pooled_groups,
    pooled_step,
)
from .metrics import (
    ALL_GROUP,
    ConsistencyUnavailable,
    GroupMetrics,
    MetricOptions,
    degenerate_warning,
    group_labels,
    group_metrics,
    label_names,
    lone_sample_metrics,
    per_sample_frame,
    router_weights_or_reason,
    trace_distributions,
)
from .report import METRIC_NAMES
from .samples import TRACE_COLUMNS, SampleSet, sample_table
from .significance import MIN_CHECKPOINTS, MIN_GROUP_SIZE, check_limits
from .trace import Trace

ALL = ALL_GROUP  # the group of every sample
PATHWAY_LENGTH = "pathway_length"  # the default control of the partial correlations


def losses(traces: dict[str, Trace], step_of: dict[str, int]) -> pd.DataFrame:
    """Long frame checkpoint, step, sample_id, loss (mean NLL) of every traced sample."""
    frames = []
    for name, trace in traces.items():
        table = trace.samples[["sample_id", "nll"]].rename(columns={"nll": "loss"})
        frames.append(table.assign(checkpoint=name, step=step_of[name]))
    return pd.concat(frames, ignore_index=True)[["checkpoint", "step", "sample_id", "loss"]]


@dataclass(frozen=True)
class CheckpointData:
    """One checkpoint's inputs to the metrics.

    Attributes:
        sample_ids: the N samples, in trace order.
        distributions: float32 [N, L, E], each sample's routing distribution per MoE
            layer (``MetricOptions.source``: full router means or top-k weights).
        router_weights: W_l of each MoE layer, float32 [E, hidden], or why the served
            model had none (consistency and complexity are then left out; distances are not).
        loss: each sample's mean next-token NLL (nats), indexed by sample id.
    """

    sample_ids: list[str]
    distributions: np.ndarray
    router_weights: list[np.ndarray] | ConsistencyUnavailable
    loss: pd.Series  # by sample_id


def load_checkpoint_data(trace: Trace, source: str = "full") -> CheckpointData:
    """The metrics' inputs from one checkpoint's trace (``source``: "full" or "topk")."""
    ids, distributions = trace_distributions(trace, source)
    loss = trace.samples.set_index("sample_id")["nll"]
    return CheckpointData(ids, distributions, router_weights_or_reason(trace),
                          loss.reindex(ids))


def sample_groups(sample_ids: list[str], memorisation: MemorisationResult,
                  field: pd.Series | None, pooled_from: int | None = None) -> dict[str, list[int]]:
    """Group name -> row indices: ``all``, each field value, each memorised group ``t*=N``
    and, given ``pooled_from`` (S, see ``memorisation.pooled_step``), the pooled group
    ``t*<=S`` of every sample memorised at or before S (one per field value with a field)."""
    groups: dict[str, list[int]] = {ALL: list(range(len(sample_ids)))}
    labels = {}
    if field is not None:
        labels = label_names(field.reindex(sample_ids)).to_dict()
        for value in sorted(set(labels.values())):
            groups[value] = [i for i, s in enumerate(sample_ids) if labels[s] == value]
    memorised = memorisation_groups(memorisation.t_star, field).reindex(sample_ids)
    pooled = pooled_groups(memorisation.t_star, pooled_from, field).reindex(sample_ids)
    for names in (memorised, pooled):
        for name in sorted({g for g in names if isinstance(g, str)}, key=_group_order):
            groups[name] = [i for i, g in enumerate(names) if g == name]
    return groups


def _group_order(name: str) -> tuple[int, str]:
    """Memorised groups ordered by t* then field value (``t*=1000/math``)."""
    t_star, label = parse_memorised_group(name)
    return t_star, label or ""


# The long metrics frame: a metric's bootstrap interval rides on its row (NaN without one),
# so the metric names stay the quantities themselves and correlating by name is unaffected.
METRIC_COLUMNS = ("checkpoint", "step", "group", "metric", "value", "ci_low", "ci_high")
# The per-layer frame (layers.parquet): layer l's distance, and the mean cosine of layers
# l and l+1 (metric "cosine"), kept apart so the metrics frame holds one row per quantity.
LAYER_COLUMNS = ("checkpoint", "step", "group", "layer", "metric", "value")


def checkpoint_metrics(name: str, step: int, data: CheckpointData,
                       groups: dict[str, list[int]], options: MetricOptions) -> list[dict]:
    """Long-format rows (:data:`METRIC_COLUMNS`) for one checkpoint; see
    :func:`checkpoint_tables`."""
    return checkpoint_tables(name, step, data, groups, options)[0]


def checkpoint_tables(name: str, step: int, data: CheckpointData, groups: dict[str, list[int]],
                      options: MetricOptions) -> tuple[list[dict], list[dict]]:
    """(metric rows, per-layer rows) of one checkpoint, from one pass over its groups.

    Metric rows (:data:`METRIC_COLUMNS`), per group: n_samples, loss, distance,
    distance_stderr, normalized_distance, baseline_distance, baseline_normalized_distance,
    excess_sharing, pathway_length, routing_entropy, router_norm, consistency,
    consistency_median, consistency_trimmed_mean, nonpositive_cosine_share, complexity
    (``GroupMetrics`` documents each). distance, normalized_distance, pathway_length,
    routing_entropy and consistency carry a bootstrap interval in ci_low/ci_high.
    A group of one sample has no distance or baseline rows (as in ``moepath metrics``);
    with fewer than 3 MoE layers the consistency rows are constants (docs/method.md,
    degenerate case), so they are left out.

    Per-layer rows (:data:`LAYER_COLUMNS`): metric ``distance`` (or
    ``normalized_distance`` with ``options.normalize="max"``) of layer l's segments, and
    ``cosine``, the group mean of c_l between layers l and l+1.
    """
    rows, layer_rows = [], []
    for group, index in groups.items():
        summary = (group_metrics if len(index) >= 2 else lone_sample_metrics)(
            group, data.distributions[index], data.router_weights, options)
        loss = float(np.nanmean(data.loss.iloc[index]))
        rows += [{"checkpoint": name, "step": step, "group": group, "metric": metric,
                  "value": value, "ci_low": low, "ci_high": high}
                 for metric, (value, low, high) in _group_values(summary, loss).items()
                 if value is not None]
        layer_rows += [{"checkpoint": name, "step": step, "group": group, "layer": layer,
                        "metric": metric, "value": value}
                       for metric, values in _layer_values(summary, options).items()
                       for layer, value in enumerate(values)]
    return rows, layer_rows


def _group_values(m: GroupMetrics, loss: float) -> dict[str, tuple]:
    """metric -> (value, ci_low, ci_high) of one group (None: no value or no interval)."""
    def ci(metric: str) -> tuple:
        return getattr(m, f"{metric}_ci_low"), getattr(m, f"{metric}_ci_high")

    values = {"n_samples": (m.n_samples, None, None), "loss": (loss, None, None),
              "distance": (m.distance_mean, *ci("distance")),
              "distance_stderr": (m.distance_stderr, None, None),
              "normalized_distance": (m.normalized_distance_mean, *ci("normalized_distance")),
              "baseline_distance": (m.baseline_distance, None, None),
              "baseline_normalized_distance": (m.baseline_normalized_distance, None, None),
              "excess_sharing": (m.excess_sharing, None, None),
              "pathway_length": (m.mean_pathway_length, *ci("pathway_length")),
              "routing_entropy": (m.routing_entropy, *ci("routing_entropy")),
              "router_norm": (m.router_norm, None, None)}
    if not m.degenerate:
        values.update(consistency=(m.consistency_mean, *ci("consistency")),
                      consistency_median=(m.consistency_median, None, None),
                      consistency_trimmed_mean=(m.consistency_trimmed_mean, None, None),
                      nonpositive_cosine_share=(m.nonpositive_cosine_share, None, None),
                      complexity=(m.complexity_mean, None, None))
    return values


def _layer_values(m: GroupMetrics, options: MetricOptions) -> dict[str, list[float]]:
    distance = "distance" if options.normalize == "none" else "normalized_distance"
    return {distance: m.per_layer_distance or [], "cosine": m.per_layer_cosine or []}


def checkpoint_samples(name: str, step: int, data: CheckpointData,
                       memorisation: MemorisationResult, options: MetricOptions) -> pd.DataFrame:
    """Per-sample rows of one checkpoint: loss, pathway, consistency, memorised, t*
    (consistency and complexity NaN with fewer than 3 MoE layers: degenerate)."""
    frame = per_sample_frame(data.sample_ids, data.distributions, data.router_weights, options)
    if is_degenerate(data.distributions.shape[1]):
        frame[["consistency", "complexity"]] = np.nan
    t_star = memorisation.t_star.reindex(data.sample_ids).to_numpy()
    return frame.assign(checkpoint=name, step=step, loss=data.loss.to_numpy(),
                        memorised=~pd.isna(t_star), t_star=t_star)


@dataclass(frozen=True)
class CompareOptions:
    """What ``moepath compare`` computes from the checkpoints' traces (docs/method.md protocol).

    ``epsilon`` / ``epsilon_quantile`` / ``delta``: memorisation thresholds (default:
    epsilon = 0.25 quantile of final losses, delta 0.05). ``epsilon_per_group``: with
    ``group_by``, a quantile is taken per value of that field (docs/method.md: epsilon per
    domain), else over all samples. ``memorised_only``: report
    memorised groups only (the paper's protocol), else ``all``, the ``group_by``
    values and the memorised groups. The memorised groups are ``t*=N`` and the pooled
    ``t*<=S`` (every sample memorised by step S, S leaving ``min_checkpoints`` checkpoints
    from ``from_step`` on; docs/method.md "Memorisation and groups"). ``from_step``:
    correlate from this step on. ``from_t_star``: correlate each memorised group ``t*=N``
    (``t*<=N``) from step N on (or from ``from_step`` if later), not over the checkpoints
    before its samples were memorised.
    ``min_checkpoints`` / ``min_group_size``: correlations over fewer checkpoints, or of a
    group of fewer samples, are computed but flagged ``too_small`` and never headlined
    (docs/method.md, "Statistics"). ``control``: the metric(s) each correlation is also
    computed partialled on (same group); None: no partial correlation.

    Validated on construction (InputError for bad thresholds), so that ``moepath
    compare`` refuses them before tracing; :func:`check_before_tracing` checks the rest.
    """

    metrics: MetricOptions = MetricOptions()
    group_by: str | None = None
    memorised_only: bool = False
    epsilon: float | None = None
    epsilon_quantile: float | None = None
    epsilon_per_group: bool = True
    delta: float = 0.05
    scores: Path | None = None
    from_step: int | None = None
    from_t_star: bool = True
    min_checkpoints: int = MIN_CHECKPOINTS
    min_group_size: int = MIN_GROUP_SIZE
    control: str | tuple[str, ...] | None = PATHWAY_LENGTH

    def __post_init__(self) -> None:
        check_thresholds(self.epsilon, self.epsilon_quantile, self.delta)
        check_limits(self.min_checkpoints, self.min_group_size)
        _check_controls(self.control)


def _check_controls(control: str | tuple[str, ...] | None) -> None:
    """InputError unless every control is a metric that compare computes and correlates."""
    names = [] if control is None else [control] if isinstance(control, str) else list(control)
    usable = [m for m in METRIC_NAMES if m not in NOT_CORRELATED]
    unknown = [name for name in names if name not in usable]
    if unknown:
        raise InputError(f"--control {', '.join(map(repr, unknown))} is not a metric compare "
                         f"computes; use one of: {', '.join(usable)}, or none")


def check_before_tracing(found: list[Checkpoint], sample_set: SampleSet,
                         options: CompareOptions) -> None:
    """Refuse, before the hours of tracing, what :func:`analyse` would refuse after them.

    ``group_by`` must name a field of the samples or a column tracing adds
    (:data:`~moepath.tracer.samples.TRACE_COLUMNS`), of one value per sample, none of them
    ``all``; the scores file must be valid for these checkpoints
    (:func:`~moepath.tracer.correlation.read_scores`), leave at least
    :data:`~moepath.tracer.correlation.MIN_POINTS` checkpoints from ``from_step`` on, and
    name only groups this run can have (``all``, a ``group_by`` value, a memorised group).

    Raises:
        MetricError: a bad ``group_by`` (:func:`~moepath.tracer.metrics.group_labels`).
        InputError: a ``group_by`` value ``all``, a bad scores file, too few checkpoints.
    """
    labels = None
    if options.group_by is not None:
        table = sample_table(sample_set.samples).assign(**dict.fromkeys(TRACE_COLUMNS))
        field = _field_labels(table, options.group_by, f"samples file '{sample_set.path}'")
        if options.group_by not in TRACE_COLUMNS:  # those values exist only after tracing
            labels = set(label_names(field))
    if options.scores is not None:
        step_of = ckpt.steps(found)
        scores = read_scores(options.scores, step_of)
        problem = too_few_checkpoints(step_of.values(), options.from_step)
        if problem is not None:
            fix = ("pass an earlier --from-step" if options.from_step is not None
                   else "compare more checkpoints or drop --scores")
            raise InputError(f"{problem}; {fix}")
        if options.group_by is None or labels is not None:
            _check_score_groups(scores, {ALL} | (labels or set()))


def _field_labels(samples: pd.DataFrame, column: str, where: str) -> pd.Series:
    """:func:`~moepath.tracer.metrics.group_labels`, refusing a value named like the group of
    every sample (it would silently replace that group)."""
    labels = group_labels(samples, column, where)
    if (label_names(labels) == ALL).any():
        raise InputError(f"--group-by {column}: a sample has the value '{ALL}', the name of "
                         f"the group of every sample; rename that value in the {where}")
    return labels


def _check_score_groups(scores: pd.DataFrame, groups: set[str]) -> None:
    """InputError for score groups that are neither in ``groups`` nor a memorised group."""
    unknown = [g for g in unused_score_groups(scores, groups)
               if parse_memorised_group(g) is None]
    if unknown:
        raise InputError(f"scores name group(s) {', '.join(map(repr, unknown))} that no group "
                         f"of this run has (groups: {', '.join(sorted(groups))} and the "
                         f"memorised t*=N groups); fix the names or --group-by the field "
                         f"that holds them")


@dataclass
class CompareAnalysis:
    """What :func:`analyse` computed; ``report.write_outputs`` writes it to files.

    Attributes:
        metrics: long: checkpoint, step, group, metric, value.
        samples: one row per checkpoint x sample (:func:`checkpoint_samples`).
        memorisation: t* and thresholds of every sample.
        correlations: each metric against the scores (None: no scores, or too few
            checkpoints: ``no_correlation`` says why).
        table1: ``correlations`` in the paper's Table 1 layout (None without them).
        scores: the scores file as read (None without ``--scores``).
        no_correlation: why no correlation was computed despite scores, else None.
        notes: warnings for the report and the terminal.
        versions: package versions recorded in the first checkpoint's trace.
        layers: long per-layer profiles (:data:`LAYER_COLUMNS`), None if not computed.
    """

    metrics: pd.DataFrame
    samples: pd.DataFrame
    memorisation: MemorisationResult
    correlations: pd.DataFrame | None
    table1: pd.DataFrame | None
    scores: pd.DataFrame | None
    no_correlation: str | None
    notes: list[str]
    versions: dict
    layers: pd.DataFrame | None = None


def analyse(found: list[Checkpoint], traces_dir: Path,
            options: CompareOptions) -> CompareAnalysis:
    """Metrics per checkpoint x group from the ``traces_dir/<name>`` traces (writes nothing)."""
    step_of = ckpt.steps(found)
    traces = {c.name: Trace.open(traces_dir / c.name) for c in found}
    field = _group_field(next(iter(traces.values())), options.group_by)
    memorisation = memorise(loss_matrix(losses(traces, step_of)), options.epsilon,
                            options.epsilon_quantile, options.delta,
                            domains=field if options.epsilon_per_group else None)
    if options.memorised_only and memorisation.fraction_memorised == 0:
        raise InputError(f"no sample is memorised ({memorisation.thresholds()}); raise "
                         f"--epsilon or drop --memorised-only")
    pooled_from = pooled_step(step_of.values(), options.from_step, options.min_checkpoints)
    rows, layer_rows, sample_frames, unavailable = [], [], [], {}
    for name, trace in traces.items():
        data = load_checkpoint_data(trace, options.metrics.source)
        if isinstance(data.router_weights, ConsistencyUnavailable):
            unavailable[name] = data.router_weights.reason
        groups = sample_groups(data.sample_ids, memorisation, field, pooled_from)
        if options.memorised_only:
            groups = {g: rows_ for g, rows_ in groups.items() if parse_memorised_group(g)}
        metric_rows, layer_rows_ = checkpoint_tables(name, step_of[name], data, groups,
                                                     options.metrics)
        rows += metric_rows
        layer_rows += layer_rows_
        sample_frames.append(checkpoint_samples(name, step_of[name], data, memorisation,
                                                options.metrics))
    metrics = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    layers = pd.DataFrame(layer_rows, columns=list(LAYER_COLUMNS))
    notes = _notes(memorisation, traces) + _unavailable_notes(unavailable, len(traces))
    correlations = scores = no_correlation = None
    if options.scores is not None:
        scores = read_scores(options.scores, step_of)
        no_correlation = too_few_checkpoints(step_of.values(), options.from_step)
        if no_correlation is None:
            correlations = correlate(metrics, scores, options.from_step, options.from_t_star,
                                     control=options.control,
                                     min_checkpoints=options.min_checkpoints,
                                     min_group_size=options.min_group_size)
            notes += _small_notes(correlations, options)
            if options.from_t_star and any(map(parse_memorised_group, metrics["group"])):
                notes.append("each t*=N group is correlated from step N on, after its samples "
                             "are memorised (--all-checkpoints: over every checkpoint)")
        else:
            notes.append(f"correlations skipped: {no_correlation}")
        notes += _unused_scores_notes(scores, metrics)
    samples = pd.concat(sample_frames, ignore_index=True)
    versions = next(iter(traces.values())).manifest.versions or {}
    summary = table1(correlations) if correlations is not None else None
    return CompareAnalysis(metrics, samples, memorisation, correlations, summary, scores,
                           no_correlation, notes, versions, layers)


def _group_field(trace: Trace, column: str | None) -> pd.Series | None:
    if column is None:
        return None
    return _field_labels(trace.samples, column, f"samples table of trace '{trace.path}'")


def _notes(memorisation: MemorisationResult, traces: dict) -> list[str]:
    notes = [f"memorised: {memorisation.fraction_memorised:.0%} of samples "
             f"({memorisation.thresholds()})"]
    num_layers = next(iter(traces.values())).num_layers
    if is_degenerate(num_layers):
        notes.append(f"{degenerate_warning(num_layers)}; consistency and complexity are "
                     f"left out of the tables, plots and correlations")
    return notes


def _unavailable_notes(reasons: dict[str, str], num_checkpoints: int) -> list[str]:
    """A note naming the checkpoints whose traces hold no router matrices, if any."""
    if not reasons:
        return []
    first, why = next(iter(reasons.items()))
    return [f"consistency and complexity are unavailable for {len(reasons)} of "
            f"{num_checkpoints} checkpoints (first: '{first}': {why}); pathway distances and "
            f"the other metrics are computed"]


def _small_notes(correlations: pd.DataFrame, options: CompareOptions) -> list[str]:
    """A note counting the correlations flagged too small to headline, if any."""
    small = int(correlations["too_small"].notna().sum())
    if not small:
        return []
    return [f"{small} of {len(correlations)} correlations are over fewer than "
            f"{options.min_checkpoints} checkpoints or a group of fewer than "
            f"{options.min_group_size} samples: computed and listed, but not headlined "
            f"(verdict: cannot tell; --min-checkpoints, --min-group-size)"]


def _unused_scores_notes(scores: pd.DataFrame, metrics: pd.DataFrame) -> list[str]:
    unused = unused_score_groups(scores, set(metrics["group"]))
    if not unused:
        return []
    return [f"the scores of group(s) {', '.join(map(repr, unused))} match no group of this "
            f"run (e.g. no sample of that label is memorised), so they were not used"]

