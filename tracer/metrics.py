"""Group metrics: pathways, pathway distance and pathway consistency together.

Composes :mod:`.pathways`, :mod:`.distance` and :mod:`.consistency` into the
numbers docs/method.md reports per group of samples (Metric 1 and Metric 2), and a
per-sample table. Options flow one way: :class:`MetricOptions` (validated on
construction) -> these functions. The same numbers over a trace directory
(:func:`trace_metrics`, :func:`trace_sample_frame`, :func:`trace_sample_detail`)
are thin glue that reads distributions and router weights from a
:class:`~moepath.tracer.trace.Trace`.

Example::

    >>> import numpy as np
    >>> g = np.array([[[0.6, 0.3, 0.1]] * 3, [[0.1, 0.3, 0.6]] * 3])  # N=2, L=3, E=3
    >>> w = [np.eye(3)] * 3
    >>> m = group_metrics("math", g, w)  # pathways '0,1-0,1-0,1' and '2,1-2,1-2,1'
    >>> m.distance_mean, m.normalized_distance_mean, round(m.consistency_mean, 6)  # 3 of 11 chars
    (3.0, 0.2727272727272727, 1.0)
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .baseline import excess_sharing, random_routing_baseline
from .consistency import is_degenerate, routing_consistency, summarise
from .controls import router_norm, routing_entropy
from .distance import (
    NORMALIZATIONS,
    UNITS,
    PairDistances,
    check_choice,
    check_pairs,
    check_seed,
    pair_distances,
    per_layer_distance,
)
from .errors import InputError, MetricError
from .intervals import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Interval,
    IntervalOptions,
    check_interval_options,
    mean_interval,
    pair_mean_interval,
    sampled_pair_mean_interval,
)
from .pathways import (
    DEFAULT_TAU,
    SOURCES,
    Pathway,
    check_tau,
    pathways,
    select_experts,
    topk_to_distribution,
)

if TYPE_CHECKING:
    from .trace import Trace

# trace_metrics: the one group without --group-by, and the name of samples missing the label.
ALL_GROUP = "all"
MISSING_GROUP = "(missing)"


@dataclass(frozen=True)
class MetricOptions:
    """How pathways are cut and distances measured; validated on construction.

    Attributes:
        tau: cumulative weight share a layer's kept experts must exceed, in (0, 1].
        unit: distance unit, "char" (the paper's) or "expert" (docs/method.md Decision A4).
        normalize: normalisation of ``per_layer_distance``, "none" or "max"; the
            whole-pathway distance is always reported both ways.
        source: which per-sample distributions the caller passes (Decision A3): "full"
            router means or "topk" gate weights (``pathways.topk_to_distribution``).
            Readers of traces use it to pick the array; the metrics do not.
        pairs: None for the default exact/sampled policy, or pairs to sample
            (``distance.plan_pairs``).
        seed: seeds pair sampling, the bootstrap and the random-routing baseline, an int >= 0.
        level: confidence level of the bootstrap intervals, in (0, 1).
        resamples: bootstrap resamples per interval (``intervals.py``); 0 computes none.
    """

    tau: float = DEFAULT_TAU
    unit: str = "char"
    normalize: str = "none"
    source: str = "full"
    pairs: int | None = None
    seed: int = 0
    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES

    def __post_init__(self) -> None:
        check_tau(self.tau)
        check_choice("unit", self.unit, UNITS)
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_choice("source", self.source, SOURCES)
        check_pairs(self.pairs)
        check_seed(self.seed)
        check_interval_options(self.level, self.resamples)

    @property
    def intervals(self) -> IntervalOptions:
        return IntervalOptions(self.level, self.resamples, self.seed)


DEFAULT_OPTIONS = MetricOptions()


@dataclass(frozen=True)
class GroupMetrics:
    """Both metrics of one group of samples at one checkpoint (plain data, render elsewhere).

    Attributes:
        name: the group's name.
        n_samples: samples in the group.
        n_pairs: pairs behind the distance means (all n(n-1)/2 when exact).
        distance_mean, distance_stderr: mean raw pathway distance (Metric 1) in
            ``options.unit``, and its standard error (0.0 when exact).
        distance_exact: True when every pair was compared.
        normalized_distance_mean, normalized_distance_stderr: the same with each pair
            divided by the longer pathway's length (``normalize="max"``), in [0, 1].
        consistency_mean, complexity_mean: means over samples of Metric 2 (NaN when L = 1;
            None when the trace has no router matrices, with the reason in ``note``).
        mean_pathway_length: mean number of experts kept per sample, over all layers.
        per_layer_distance: mean distance of each layer's segment, ``options.normalize``d.
        degenerate: True when there are fewer than 3 MoE layers: consistency and complexity
            are then constants, not measurements (docs/method.md "Degenerate case").
        note: why fields are empty, else None. A group of one sample (only from
            :func:`trace_metrics`) has no pairs: its distance fields and
            ``per_layer_distance`` are None and ``n_pairs`` is 0.

    Uncertainty, baseline, controls and robust Metric 2 (docs/method.md, "Uncertainty"
    onwards; fields default to None so older constructors still work):

        <metric>_ci_low, <metric>_ci_high: bootstrap interval over samples
            (``options.level``) of distance, normalized_distance, consistency,
            pathway_length (of ``mean_pathway_length``) and routing_entropy; None for
            groups of fewer than ``intervals.MIN_SAMPLES`` samples or ``resamples=0``.
            For a sampled-pairs group the distance interval also carries the
            pair-sampling noise (``intervals.sampled_pair_mean_interval``).
        baseline_distance, baseline_distance_stderr, baseline_normalized_distance: the
            expected distance of random routing with the group's per-layer lengths
            (``baseline.py``), with its simulation standard error.
        excess_sharing: ``1 - distance_mean / baseline_distance``.
        consistency_median, consistency_trimmed_mean (10% cut from each end),
        nonpositive_cosine_share: robust Metric 2 (``consistency.summarise``).
        per_layer_cosine: [L-1] group mean cosine of layers l and l+1.
        routing_entropy: mean over samples and layers of the entropy of g_l (nats).
        router_norm: mean L2 norm of the router rows (a property of the checkpoint).
    """

    name: str
    n_samples: int
    n_pairs: int
    distance_mean: float | None
    distance_stderr: float | None
    distance_exact: bool
    normalized_distance_mean: float | None
    normalized_distance_stderr: float | None
    consistency_mean: float | None
    complexity_mean: float | None
    mean_pathway_length: float
    per_layer_distance: list[float] | None
    degenerate: bool
    note: str | None = None
    distance_ci_low: float | None = None
    distance_ci_high: float | None = None
    normalized_distance_ci_low: float | None = None
    normalized_distance_ci_high: float | None = None
    baseline_distance: float | None = None
    baseline_distance_stderr: float | None = None
    baseline_normalized_distance: float | None = None
    excess_sharing: float | None = None
    consistency_ci_low: float | None = None
    consistency_ci_high: float | None = None
    consistency_median: float | None = None
    consistency_trimmed_mean: float | None = None
    nonpositive_cosine_share: float | None = None
    per_layer_cosine: list[float] | None = None
    pathway_length_ci_low: float | None = None
    pathway_length_ci_high: float | None = None
    routing_entropy: float | None = None
    routing_entropy_ci_low: float | None = None
    routing_entropy_ci_high: float | None = None
    router_norm: float | None = None


def group_metrics(
    name: str, distributions, router_weights, options: MetricOptions = DEFAULT_OPTIONS
) -> GroupMetrics:
    """Metric 1 and Metric 2 of one group from its samples' distributions [N, L, E].

    Args:
        name: the group's name (used in error messages).
        distributions: [N, L, E] per-layer expert distributions, N >= 2.
        router_weights: L router matrices [E, hidden], in layer order, or
            :class:`ConsistencyUnavailable` (Metric 2 then left empty, with its reason).
        options: see :class:`MetricOptions`.

    Raises:
        MetricError: fewer than 2 samples, or bad distributions or router matrices.
    """
    paths = pathways(distributions, options.tau)
    sampling = {"pairs": options.pairs, "seed": options.seed, "name": name}
    pairs = pair_distances(paths, options.unit, **sampling)
    layers = per_layer_distance(paths, options.unit, options.normalize, **sampling)
    raw, normalized = pairs.summary["none"], pairs.summary["max"]
    baseline = random_routing_baseline(paths, np.shape(distributions)[2], options.unit,
                                       seed=options.seed)
    return GroupMetrics(
        name=name,
        n_samples=raw.n_samples,
        n_pairs=raw.n_pairs,
        distance_mean=raw.mean,
        distance_stderr=raw.stderr,
        distance_exact=raw.exact,
        normalized_distance_mean=normalized.mean,
        normalized_distance_stderr=normalized.stderr,
        per_layer_distance=layers.tolist(),
        **_distance_intervals(pairs, options.intervals),
        baseline_distance=baseline.distance,
        baseline_distance_stderr=baseline.stderr,
        baseline_normalized_distance=baseline.normalized_distance,
        excess_sharing=excess_sharing(raw.mean, baseline.distance),
        note=_unavailable_note(router_weights),
        **_within_samples(paths, distributions, router_weights, options.intervals),
    )


def lone_sample_metrics(
    name: str, distributions, router_weights, options: MetricOptions
) -> GroupMetrics:
    """A group of one sample: Metric 2 of that sample, Metric 1 left empty with a note."""
    paths = pathways(distributions, options.tau)
    return GroupMetrics(
        name=name,
        n_samples=1,
        n_pairs=0,
        distance_mean=None,
        distance_stderr=None,
        distance_exact=True,
        normalized_distance_mean=None,
        normalized_distance_stderr=None,
        per_layer_distance=None,
        note=" ".join(filter(None, (
            f"group {name!r} has 1 sample: pathway distance needs at least 2, so it is "
            "left empty (consistency and complexity are that sample's own)",
            _unavailable_note(router_weights)))),
        **_within_samples(paths, distributions, router_weights, options.intervals),
    )


def _within_samples(paths: list[Pathway], distributions, router_weights,
                    intervals: IntervalOptions) -> dict:
    """The GroupMetrics fields from per-sample values (Metric 2, pathway length, controls),
    with their bootstrap intervals (a separate random stream each). Metric 2's fields are
    None when the router matrices are :class:`ConsistencyUnavailable`."""
    lengths = np.array([p.n_experts for p in paths], dtype=np.float64)
    entropy = routing_entropy(distributions)
    per_sample = {
        "mean_pathway_length": float(lengths.mean()),
        **_bounds("pathway_length", mean_interval(lengths, intervals, stream=4)),
        "routing_entropy": float(entropy.mean()),
        **_bounds("routing_entropy", mean_interval(entropy, intervals, stream=5)),
    }
    if isinstance(router_weights, ConsistencyUnavailable):
        return {**per_sample, "consistency_mean": None, "complexity_mean": None,
                "degenerate": is_degenerate(len(paths[0].layers)), **_bounds("consistency", None),
                "consistency_median": None, "consistency_trimmed_mean": None,
                "nonpositive_cosine_share": None, "per_layer_cosine": None, "router_norm": None}
    routing = routing_consistency(distributions, router_weights)
    robust = summarise(routing)
    return {
        **per_sample,
        "consistency_mean": float(routing.consistency.mean()),
        "complexity_mean": float(routing.complexity.mean()),
        "degenerate": routing.degenerate,
        **_bounds("consistency", mean_interval(routing.consistency, intervals, stream=3)),
        "consistency_median": robust.median,
        "consistency_trimmed_mean": robust.trimmed_mean,
        "nonpositive_cosine_share": robust.nonpositive_share,
        "per_layer_cosine": robust.layer_cosines,
        "router_norm": router_norm(router_weights),
    }


def _distance_intervals(pairs: PairDistances, intervals: IntervalOptions) -> dict:
    """distance_ci_* and normalized_distance_ci_* from the pair distances of the group."""
    if pairs.matrix is not None:
        raw = pair_mean_interval(pairs.matrix, intervals, stream=1)
        normalized = pair_mean_interval(pairs.matrix, intervals, stream=2,
                                        divisor=np.maximum(pairs.lengths, 1))
    else:
        sampled = (pairs.first, pairs.second)
        raw = sampled_pair_mean_interval(*sampled, pairs.raw, pairs.n_samples, intervals, 1)
        normalized = sampled_pair_mean_interval(*sampled, pairs.normalized, pairs.n_samples,
                                                intervals, 2)
    return {**_bounds("distance", raw), **_bounds("normalized_distance", normalized)}


def _bounds(metric: str, interval: Interval | None) -> dict:
    """``{metric}_ci_low`` and ``{metric}_ci_high`` (None without an interval)."""
    low, high = (None, None) if interval is None else (interval.low, interval.high)
    return {f"{metric}_ci_low": low, f"{metric}_ci_high": high}


def per_sample_frame(
    sample_ids, distributions, router_weights, options: MetricOptions = DEFAULT_OPTIONS
) -> pd.DataFrame:
    """One row per sample: its pathway and Metric 2 values.

    Columns: sample_id, pathway (``Pathway.to_string()``), consistency, complexity,
    pathway_length (experts kept over all layers), layer_lengths (list: experts per layer).

    Raises:
        MetricError: ``sample_ids`` and ``distributions`` disagree on N, or bad inputs.
    """
    ids = list(sample_ids)
    paths = pathways(distributions, options.tau)
    if len(ids) != len(paths):
        raise MetricError(
            f"got {len(ids)} sample ids for {len(paths)} distributions; pass one id per "
            "sample, in the order of the distributions"
        )
    if isinstance(router_weights, ConsistencyUnavailable):
        consistency = complexity = np.full(len(ids), np.nan)
    else:
        routing = routing_consistency(distributions, router_weights)
        consistency, complexity = routing.consistency, routing.complexity
    return pd.DataFrame(
        {
            "sample_id": ids,
            "pathway": [p.to_string() for p in paths],
            "consistency": consistency,
            "complexity": complexity,
            "pathway_length": [p.n_experts for p in paths],
            "layer_lengths": [list(p.lengths()) for p in paths],
        }
    )


# --- over a trace directory ---------------------------------------------------------------


def trace_metrics(
    trace: Trace, options: MetricOptions = DEFAULT_OPTIONS, group_by: str | None = None
) -> list[GroupMetrics]:
    """:func:`group_metrics` of every group of a trace's samples, in display order.

    Groups are the values of the samples-table column ``group_by`` (e.g. a carried
    ``domain``), sorted by value (numbers numerically), samples without a value last
    as group :data:`MISSING_GROUP`; with ``group_by=None``, one group :data:`ALL_GROUP`.
    Distributions come from ``options.source`` (see :func:`trace_distributions`).
    A group of one sample gets empty distance fields and a ``note`` instead of an
    error. Fewer than 3 MoE layers emit a ``UserWarning`` (and set ``degenerate``).

    Raises:
        MetricError: ``group_by`` is not a samples-table column of one label per sample
            (see :func:`group_labels`), the trace has no samples or no router weights, or
            bad routing.
    """
    ids, distributions = trace_distributions(trace, options.source)
    weights = router_weights_or_reason(trace)
    groups = _groups(trace, ids, group_by)
    _warn_if_degenerate(trace)
    return [
        (group_metrics if len(rows) > 1 else lone_sample_metrics)(
            name, distributions[rows], weights, options
        )
        for name, rows in groups
    ]


def trace_sample_frame(trace: Trace, options: MetricOptions = DEFAULT_OPTIONS) -> pd.DataFrame:
    """:func:`per_sample_frame` of every sample of a trace, then its samples-table columns.

    One row per sample in trace order: sample_id, pathway, consistency, complexity,
    pathway_length, layer_lengths, then the carried columns (e.g. domain, num_tokens,
    nll; a carried column whose name is taken gets the suffix ``_input``).

    Raises:
        MetricError: the trace has no samples or no router weights, or bad routing.
    """
    ids, distributions = trace_distributions(trace, options.source)
    frame = per_sample_frame(ids, distributions, router_weights_or_reason(trace), options)
    _warn_if_degenerate(trace)
    return frame.merge(trace.samples, on="sample_id", how="left", suffixes=("", "_input"))


def trace_distributions(trace: Trace, source: str = "full") -> tuple[list[str], np.ndarray]:
    """(sample ids, float32 [N, L, E]) per-layer distributions of every sample, ordered by
    sample id.

    The order is the samples', not the trace's: shards are committed in the order the
    engine finished requests, which batch sizes, resumed runs and merged parts (data
    parallel, a Ray cluster) change, while bootstrap intervals, the random-routing
    baseline and sampled pairs draw rows by position. Ordered by id, the same samples
    give the same metrics however they were traced.

    ``source="full"`` reads the trace's router means (the full router distribution
    averaged over prompt tokens); ``source="topk"`` averages each sample's top-k gate
    weights over its prompt tokens, the first ``trace.num_prompt_tokens(id)`` rows of
    ``trace.topk(id)`` (``pathways.topk_to_distribution``; docs/method.md Decision A3),
    which a ``--store per-sample`` trace holds ready (``Trace.iter_topk_means``, the same
    values: the worker computed them from the weights a per-token trace stores).
    Both ignore generated tokens, so both describe the same prefill. Both read one
    routing shard at a time.

    Raises:
        MetricError: the trace has no samples, or ``source`` is not full or topk.
    """
    check_choice("source", source, SOURCES)
    if source == "full":
        ids, distributions = trace.router_means()
    elif trace.per_sample:
        ids, distributions = trace.topk_means()
    else:
        ids = trace.sample_ids()
        distributions = [_topk_distribution(trace, sid) for sid in ids]
    if not len(ids):
        raise MetricError(f"trace '{trace.path}' has no samples; trace some samples first")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    distributions = np.asarray(distributions, np.float32)  # a list of [L, E] stacks to [N, L, E]
    return [ids[i] for i in order], distributions[order]


def _topk_distribution(trace: Trace, sample_id: str) -> np.ndarray:
    """float32 [L, E]: one sample's top-k gate weights averaged over its prompt tokens."""
    prompt = trace.num_prompt_tokens(sample_id)
    if prompt < 1:
        raise MetricError(
            f"sample {sample_id!r} has no prompt tokens in the trace; source 'topk' averages "
            "over prompt tokens, so re-trace it or drop it"
        )
    expert_ids, gate_weights = trace.topk(sample_id)
    return topk_to_distribution(expert_ids[:prompt], gate_weights[:prompt], trace.num_experts)


@dataclass(frozen=True)
class ConsistencyUnavailable:
    """Stands for the router matrices of a trace whose served model had none that moepath
    could read (``manifest.router_weights_unavailable``): Metric 2 is left empty (None,
    NaN per sample) with ``reason``; Metric 1 does not need them."""

    reason: str


def _unavailable_note(router_weights) -> str | None:
    if isinstance(router_weights, ConsistencyUnavailable):
        return f"consistency and complexity are unavailable: {router_weights.reason}"
    return None


def router_weights_or_reason(trace: Trace) -> list[np.ndarray] | ConsistencyUnavailable:
    """The trace's router matrices, or :class:`ConsistencyUnavailable` with the reason the
    traced model had none (MetricError for a trace that never stored them)."""
    if trace.manifest.router_weights_unavailable:
        return ConsistencyUnavailable(
            f"the traced model has no router matrix moepath could read "
            f"({trace.manifest.router_weights_unavailable})")
    if not trace.manifest.router_weights:
        raise MetricError(
            f"trace '{trace.path}' has no router weights, which pathway consistency needs "
            "(expert embeddings, docs/method.md Metric 2); re-trace the samples with `moepath "
            "trace`, which saves them"
        )
    return trace.router_weights()


def _groups(trace: Trace, ids: list[str], group_by: str | None) -> list[tuple[str, np.ndarray]]:
    """(group name, positions in ``ids``) per group, in display order (``all`` first)."""
    if group_by is None:
        return [(ALL_GROUP, np.arange(len(ids)))]
    labels = group_labels(trace.samples, group_by, f"samples table of trace '{trace.path}'")
    positions = pd.Series(np.arange(len(ids)))
    groups = [
        (_label_name(value), rows.to_numpy())
        for value, rows in positions.groupby(
            labels.reindex(ids).to_numpy(), sort=True, dropna=False
        )
    ]
    return sorted(groups, key=lambda group: group[0] != ALL_GROUP)  # stable: keeps value order


def group_labels(samples: pd.DataFrame, column: str, where: str) -> pd.Series:
    """The labels ``--group-by column`` groups by: that column of a samples table, by sample_id.

    ``where`` names the table in messages, e.g. ``"samples table of trace 'out'"``.

    Raises:
        MetricError: ``column`` is not a column of ``samples`` (the message lists them), is
            ``sample_id`` (every sample would be a group of its own), or holds lists (a
            sample in several groups; pandas cannot group by them).
    """
    columns = ", ".join(str(c) for c in samples.columns if c != "sample_id") or "(none)"
    if column == "sample_id":
        raise MetricError(f"cannot group by 'sample_id': every sample would be a group of its "
                          f"own; group by one of: {columns}")
    if column not in samples.columns:
        raise MetricError(f"{where} has no column {column!r}; group by one of: {columns}")
    labels = samples.set_index("sample_id")[column]
    listed = labels[labels.map(pd.api.types.is_list_like)]
    if len(listed):
        raise MetricError(f"column {column!r} of the {where} holds lists (sample "
                          f"{listed.index[0]!r}); group by a column of single values")
    return labels


def label_names(labels: pd.Series) -> pd.Series:
    """The group name of each label (the ``--group-by`` value it names, see :func:`_label_name`).

    ``label_names(pd.Series([1.0, None, 2.5, "math"])).tolist() == ["1", "(missing)", "2.5",
    "math"]``
    """
    return labels.map(_label_name)


def _label_name(value: object) -> str:
    """``str(value)``, :data:`MISSING_GROUP` for a missing value, and an integral float as an
    integer: an integer column with a null reads back as float, and its groups must still be
    named "1", "2" as in the samples file (and in a scores file's group column)."""
    if pd.isna(value):
        return MISSING_GROUP
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def degenerate_warning(num_layers: int) -> str:
    """The warning of docs/method.md "Degenerate case" for a trace of ``num_layers`` MoE layers."""
    return (
        f"the trace has {num_layers} MoE layer(s), fewer than 3: pathway consistency and "
        "complexity are then constants, not measurements of routing (docs/method.md, "
        "degenerate case); compare samples by pathway distance instead"
    )


def _warn_if_degenerate(trace: Trace) -> None:
    if is_degenerate(trace.num_layers):
        warnings.warn(degenerate_warning(trace.num_layers), UserWarning, stacklevel=3)


# --- one sample ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleDetail:
    """One traced sample's routing, for display (``moepath show``).

    Attributes:
        sample_id: the sample.
        carried: its samples-table row without ``sample_id`` (e.g. domain, num_tokens).
        pathway: its pathway at ``options.tau`` from ``options.source`` distributions.
        weights: per layer, the kept experts' mean weights, in the pathway's rank order.
        layer_share: per layer, the share of the layer's weight the kept experts carry.
        num_experts: E, experts per layer.
        cosines: float64 [L-1], cosine of the routing embeddings of layers l and l+1.
        consistency, complexity: Metric 2 of the sample (NaN when L = 1).
        degenerate: True when L < 3 (Metric 2 is then a constant).
        positions, token_ids: int32 [T], every traced token, prompt tokens first.
        expert_ids: int64 [T, L, k], the top-k experts each token was routed to.
        num_prompt_tokens: the first this many tokens are the prompt, the rest generated.
    """

    sample_id: str
    carried: dict
    pathway: Pathway
    weights: list[list[float]]
    layer_share: list[float]
    num_experts: int
    cosines: list[float]
    consistency: float
    complexity: float
    degenerate: bool
    positions: np.ndarray
    token_ids: np.ndarray
    expert_ids: np.ndarray
    num_prompt_tokens: int


def trace_sample_detail(
    trace: Trace, sample_id: str, options: MetricOptions = DEFAULT_OPTIONS
) -> SampleDetail:
    """One sample's pathway with weights, Metric 2 profile and per-token routing.

    Raises:
        InputError: ``sample_id`` is not in the trace (the message suggests close ids).
        MetricError: the trace has no router weights, or bad routing.
    """
    trace.require_per_token("`moepath show` (the sample's token-by-token routing)")
    _check_sample(trace, sample_id)
    if options.source == "full":
        g = trace.router_mean(sample_id).astype(np.float64)  # [L, E]
    else:
        g = _topk_distribution(trace, sample_id).astype(np.float64)
    pathway = select_experts(g, options.tau)
    weights = router_weights_or_reason(trace)
    if isinstance(weights, ConsistencyUnavailable):
        raise MetricError(f"no consistency profile for sample {sample_id!r}: {weights.reason}; "
                          "`moepath metrics` still reports its pathway distances")
    routing = routing_consistency(g[None], weights)
    expert_ids, _ = trace.topk(sample_id)
    samples = trace.samples
    row = samples[samples["sample_id"] == sample_id].drop(columns="sample_id")
    return SampleDetail(
        sample_id=sample_id,
        carried=row.iloc[0].to_dict() if len(row) else {},
        pathway=pathway,
        weights=[[float(g[layer, e]) for e in kept] for layer, kept in enumerate(pathway.layers)],
        layer_share=[
            float(g[layer, list(kept)].sum() / np.maximum(g[layer], 0).sum())
            for layer, kept in enumerate(pathway.layers)
        ],
        num_experts=trace.num_experts,
        cosines=routing.cosines[0].tolist(),
        consistency=float(routing.consistency[0]),
        complexity=float(routing.complexity[0]),
        degenerate=routing.degenerate,
        positions=trace.positions(sample_id),
        token_ids=trace.token_ids(sample_id),
        expert_ids=expert_ids,
        num_prompt_tokens=trace.num_prompt_tokens(sample_id),
    )


def _check_sample(trace: Trace, sample_id: str) -> None:
    """Raise InputError naming ``sample_id`` and close ids unless the trace has it."""
    ids = trace.sample_ids()
    if sample_id in ids:
        return
    close = difflib.get_close_matches(sample_id, ids, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    raise InputError(
        f"sample {sample_id!r} is not in trace '{trace.path}' ({len(ids)} samples); {hint}"
        f"list its ids with `moepath metrics {trace.path} --per-sample ids.csv`"
    )
