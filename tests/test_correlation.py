"""Correlation with scores: against scipy, the from_step cut, notes instead of silent NaN,
the statistics columns, small data flagged and kept out of Table 1, CSVs."""

from __future__ import annotations

import doctest

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moepath.tracer import correlation as correlation_module
from moepath.tracer.correlation import (
    CORRELATION_COLUMNS,
    TABLE1_ROWS,
    TOO_SMALL_CELL,
    VALIDATION_LOSS,
    correlate,
    read_scores,
    table1,
    too_few_checkpoints,
    unused_score_groups,
)
from moepath.tracer.errors import InputError, MetricError
from moepath.tracer.report import METRIC_NAMES
from moepath.tracer.significance import trend_preserving_test

CHECKPOINTS = {"step0": 0, "step100": 100, "step200": 200, "step300": 300, "step400": 400}
STEPS = list(CHECKPOINTS.values())
SCORE = [0.10, 0.15, 0.30, 0.28, 0.45]
# group -> metric -> one value per checkpoint
TRAJECTORIES = {
    "math": {"distance": [520.0, 540.0, 500.0, 495.0, 480.0],
             "consistency": [0.24, 0.26, 0.31, 0.33, 0.40],
             "loss": [2.0, 1.1, 1.0, 1.0, 1.0],  # flat from step 200: constant after the cut
             "n_samples": [4, 4, 4, 4, 4]},
    "code": {"distance": [500.0, 480.0, 470.0, 471.0, 460.0],
             "consistency": [0.30, 0.31, 0.30, 0.35, 0.36],
             "loss": [1.5, 1.4, 1.2, 1.3, 1.1],
             "n_samples": [3, 3, 3, 3, 3]},
}


def metrics_frame(trajectories=TRAJECTORIES) -> pd.DataFrame:
    return pd.DataFrame([
        {"checkpoint": name, "step": step, "group": group, "metric": metric, "value": value}
        for group, by_metric in trajectories.items() for metric, values in by_metric.items()
        for (name, step), value in zip(CHECKPOINTS.items(), values, strict=True)])


def scores_frame(**columns) -> pd.DataFrame:
    return pd.DataFrame({"checkpoint": list(CHECKPOINTS), "score": SCORE, **columns})


def row(result: pd.DataFrame, group: str, metric: str) -> pd.Series:
    (index,) = np.flatnonzero((result["group"] == group) & (result["metric"] == metric))
    return result.iloc[index]


def test_matches_scipy_on_every_group_and_metric():
    result = correlate(metrics_frame(), scores_frame())
    assert list(result.columns) == list(CORRELATION_COLUMNS)
    assert list(zip(result["group"], result["metric"], strict=True)) == [
        (g, m) for g in ("math", "code") for m in ("distance", "consistency", "loss")]
    for group, by_metric in TRAJECTORIES.items():
        for metric in ("distance", "consistency", "loss"):
            got = row(result, group, metric)
            pearson = stats.pearsonr(by_metric[metric], SCORE)
            spearman = stats.spearmanr(by_metric[metric], SCORE)
            assert got["pearson"] == pytest.approx(pearson.statistic)
            assert got["pearson_p"] == pytest.approx(pearson.pvalue)
            assert got["spearman"] == pytest.approx(spearman.statistic)
            assert got["spearman_p"] == pytest.approx(spearman.pvalue)
            assert (got["n"], got["first_step"], got["last_step"]) == (5, 0, 400)
            assert got["note"] is None


def test_hand_computed_spearman():
    # math distance ranks 4,5,3,2,1 against score ranks 1,2,4,3,5: sum d^2 = 9+9+1+1+16 = 36
    got = row(correlate(metrics_frame(), scores_frame()), "math", "distance")
    assert got["spearman"] == pytest.approx(1 - 6 * 36 / (5 * 24))


def test_from_step_keeps_checkpoints_from_that_step_on():
    result = correlate(metrics_frame(), scores_frame(), from_step=100)
    got = row(result, "code", "distance")
    expected = stats.pearsonr(TRAJECTORIES["code"]["distance"][1:], SCORE[1:])
    assert got["pearson"] == pytest.approx(expected.statistic)
    assert (got["n"], got["first_step"], got["last_step"]) == (4, 100, 400)


def test_too_few_points_and_constant_series_get_notes_not_silent_nan():
    result = correlate(metrics_frame(), scores_frame(), from_step=200)
    flat = row(result, "math", "loss")
    assert np.isnan(flat["pearson"]) and np.isnan(flat["spearman"])
    assert flat["note"] == "loss is constant over the 3 checkpoints; correlation is undefined"
    short = row(correlate(metrics_frame(), scores_frame(), from_step=300), "code", "distance")
    assert (short["n"], np.isnan(short["pearson"])) == (2, True)
    assert short["note"] == ("only 2 checkpoints have both a value and a score from step 300; "
                             "correlation needs at least 3")
    constant_score = correlate(metrics_frame(), scores_frame().assign(score=0.5))
    assert row(constant_score, "code", "loss")["note"] == (
        "the score is constant over the 5 checkpoints; correlation is undefined")


def test_a_metric_missing_from_a_group_gets_a_row_with_a_note():
    frame = metrics_frame()
    frame = frame[~((frame["group"] == "code") & (frame["metric"] == "distance"))]
    got = row(correlate(frame, scores_frame()), "code", "distance")
    assert (got["n"], got["note"]) == (0, "the group has no distance values")


def test_missing_values_and_scores_shrink_n():
    frame = metrics_frame()
    frame.loc[(frame["group"] == "math") & (frame["step"] == 0), "value"] = None
    scores = scores_frame().iloc[1:]
    got = row(correlate(frame, scores), "code", "distance")
    assert (got["n"], got["first_step"]) == (4, 100)
    got = row(correlate(frame, scores_frame()), "math", "consistency")
    assert (got["n"], got["first_step"]) == (4, 100)


def test_scores_by_step_or_name_and_per_group():
    by_step = scores_frame().assign(checkpoint=STEPS)
    pd.testing.assert_frame_equal(correlate(metrics_frame(), by_step),
                                  correlate(metrics_frame(), scores_frame()))
    per_group = pd.concat([scores_frame(group="math"),
                           scores_frame(group="code").assign(score=SCORE[::-1])])
    result = correlate(metrics_frame(), per_group)
    assert row(result, "code", "loss")["pearson"] == pytest.approx(
        stats.pearsonr(TRAJECTORIES["code"]["loss"], SCORE[::-1]).statistic)
    assert row(result, "math", "loss")["pearson"] == pytest.approx(
        stats.pearsonr(TRAJECTORIES["math"]["loss"], SCORE).statistic)


def test_memorised_groups_take_their_label_s_scores():
    trajectories = {"t*=200/math": TRAJECTORIES["math"], "all": TRAJECTORIES["code"]}
    scores = pd.concat([scores_frame(group="math"), scores_frame(group="").assign(score=0.5)])
    result = correlate(metrics_frame(trajectories), scores)
    assert row(result, "t*=200/math", "loss")["pearson"] == pytest.approx(
        stats.pearsonr(TRAJECTORIES["math"]["loss"], SCORE).statistic)
    assert row(result, "all", "loss")["note"].startswith("the score is constant")


def test_memorised_groups_are_correlated_from_their_t_star_on():
    trajectories = {"t*=100/math": TRAJECTORIES["math"], "code": TRAJECTORIES["code"]}
    result = correlate(metrics_frame(trajectories), scores_frame(), from_t_star=True)
    got = row(result, "t*=100/math", "distance")
    assert (got["n"], got["first_step"], got["last_step"]) == (4, 100, 400)
    assert got["pearson"] == pytest.approx(
        stats.pearsonr(TRAJECTORIES["math"]["distance"][1:], SCORE[1:]).statistic)
    assert row(result, "code", "distance")["n"] == 5  # not a memorised group: every checkpoint
    later = correlate(metrics_frame(trajectories), scores_frame(), from_step=200,
                      from_t_star=True)
    assert row(later, "t*=100/math", "distance")["first_step"] == 200  # the later of the two
    every = correlate(metrics_frame(trajectories), scores_frame())
    assert row(every, "t*=100/math", "distance")["n"] == 5


def test_a_group_without_scores_is_noted():
    result = correlate(metrics_frame(), scores_frame(group="math"))
    assert row(result, "code", "loss")["note"].startswith("no score applies to this group")


def test_score_groups_that_match_no_metrics_group_are_unused_and_each_group_is_noted():
    scores = scores_frame(group="maths")
    assert unused_score_groups(scores, ["math", "code"]) == ["maths"]
    assert unused_score_groups(scores_frame(group="math"), ["t*=200/math"]) == []
    result = correlate(metrics_frame(), scores)
    assert result["pearson"].isna().all()
    assert result["note"].str.startswith("no score applies to this group").all()


@pytest.mark.parametrize(("steps", "from_step", "reason"), [
    ([0, 100, 200], None, None),
    ([0], None, "1 checkpoint: correlation needs at least 3"),
    ([0, 100], None, "2 checkpoints: correlation needs at least 3"),
    ([0, 100, 200], 100, "--from-step 100 leaves 2 of 3 checkpoints; correlation needs 3"),
])
def test_too_few_checkpoints_says_why(steps, from_step, reason):
    assert too_few_checkpoints(steps, from_step) == reason


def test_nearly_constant_series_are_constant_to_float_rounding():
    frame = metrics_frame()
    near = frame["metric"] == "loss"
    frame.loc[near, "value"] = 0.9 + np.array([0, 1, 0, 1, 0] * 2) * 1e-15  # rounding noise
    assert row(correlate(frame, scores_frame()), "math", "loss")["note"] == (
        "loss is constant over the 5 checkpoints; correlation is undefined")


def test_infinite_scores_are_refused_rather_than_correlated_to_nan():
    scores = scores_frame().assign(score=[0.1, np.inf, 0.3, 0.28, 0.45])
    with pytest.raises(InputError, match=r"infinite score on line\(s\) \[3\]"):
        correlate(metrics_frame(), scores)


def test_metrics_frame_is_validated():
    with pytest.raises(MetricError, match=r"lacks columns \['value'\]"):
        correlate(metrics_frame().drop(columns="value"), scores_frame())
    with pytest.raises(MetricError, match="repeats"):
        correlate(pd.concat([metrics_frame(), metrics_frame().iloc[:1]]), scores_frame())


def test_table1_layout():
    layout = table1(correlate(metrics_frame(), scores_frame(), from_step=200, min_checkpoints=3,
                              min_group_size=1))
    assert layout.index.tolist() == [label for metric, label in TABLE1_ROWS.items()
                                     if metric != "val_loss"]  # no validation loss given
    assert layout.index.name == "metric"
    assert layout.columns.tolist() == ["math", "code"]
    pearson = stats.pearsonr(TRAJECTORIES["math"]["distance"][2:], SCORE[2:]).statistic
    spearman = stats.spearmanr(TRAJECTORIES["math"]["distance"][2:], SCORE[2:]).statistic
    assert layout.loc["pathway distance", "math"] == f"{pearson:.3f} / {spearman:.3f}"
    assert layout.loc["training loss", "math"] == "n/a / n/a"  # constant after the cut
    assert layout.loc["normalised distance", "math"] == "n/a / n/a"  # not in the frame


def test_statistics_columns_match_independent_computations():
    result = correlate(metrics_frame(), scores_frame())
    for group, by_metric in TRAJECTORIES.items():
        for metric in ("distance", "consistency", "loss"):
            x, got = by_metric[metric], row(result, group, metric)
            interval = stats.pearsonr(x, SCORE).confidence_interval(0.95)
            changes = stats.pearsonr(np.diff(x), np.diff(SCORE))
            assert (got["pearson_low"], got["pearson_high"]) == pytest.approx(
                (interval.low, interval.high))
            assert (got["diff_pearson"], got["diff_pearson_p"]) == pytest.approx(
                (changes.statistic, changes.pvalue))
            assert got["trend_p"] == trend_preserving_test(x, SCORE).pvalue
            assert got["trend_min_p"] == pytest.approx(1 / 24)  # 4 changes: 24 orderings
            assert np.isnan(got["partial"]) and got["partial_control"] is None
            assert got["group_size"] == by_metric["n_samples"][0]


def with_pathway_length() -> pd.DataFrame:
    lengths = {"math": [10.0, 11.0, 13.0, 12.0, 15.0], "code": [9.0, 9.5, 9.0, 10.0, 11.0]}
    return metrics_frame({g: {**m, "pathway_length": lengths[g]}
                          for g, m in TRAJECTORIES.items()})


def test_partial_correlation_on_a_control_metric_of_the_same_group():
    result = correlate(with_pathway_length(), scores_frame(), control="pathway_length")
    for group in TRAJECTORIES:
        x = np.array(TRAJECTORIES[group]["distance"])
        z = np.array(with_pathway_length().query("group == @group and metric == "
                                                 "'pathway_length'")["value"])
        r_xy, r_xz, r_yz = (np.corrcoef(a, b)[0, 1] for a, b in ((x, SCORE), (x, z),
                                                                  (SCORE, z)))
        got = row(result, group, "distance")
        assert got["partial"] == pytest.approx(
            (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2)))
        assert got["partial_control"] == "pathway_length"
        itself = row(result, group, "pathway_length")
        assert np.isnan(itself["partial"]) and not np.isnan(itself["pearson"])


def test_any_metric_of_the_frame_is_a_control_and_an_unknown_one_is_refused():
    frame = with_pathway_length()
    entropy = frame[frame["metric"] == "pathway_length"].assign(
        metric="routing_entropy", value=lambda f: f["value"] ** 0.5 + f["step"] / 1000)
    result = correlate(pd.concat([frame, entropy]), scores_frame(),
                       control=["pathway_length", "routing_entropy"])
    assert row(result, "math", "loss")["partial_control"] == "pathway_length, routing_entropy"
    with pytest.raises(InputError, match=r"control metric\(s\) 'entropy' not in the metrics "
                                         r"frame; use one of: distance, consistency, loss"):
        correlate(metrics_frame(), scores_frame(), control="entropy")


def test_small_groups_and_short_series_are_flagged_and_kept_out_of_the_headline():
    result = correlate(metrics_frame(), scores_frame(), from_step=100, min_group_size=4)
    code, math_ = row(result, "code", "distance"), row(result, "math", "distance")
    assert code["too_small"] == ("too few checkpoints (4 < 5) and group too small "
                                 "(3 < 4 samples)")
    assert math_["too_small"] == "too few checkpoints (4 < 5)"
    assert not np.isnan(code["pearson"]) and not np.isnan(code["trend_p"])  # still computed
    assert code["verdict"].startswith(code["too_small"] + ": cannot tell")
    assert table1(result).loc["pathway distance"].tolist() == [TOO_SMALL_CELL] * 2
    sized = correlate(metrics_frame(), scores_frame(), min_group_size=4)
    assert row(sized, "math", "distance")["too_small"] is None
    assert row(sized, "code", "distance")["too_small"] == "group too small (3 < 4 samples)"
    assert table1(sized).loc["pathway distance"].tolist() == [
        f"{row(sized, 'math', 'distance')['pearson']:.3f} / "
        f"{row(sized, 'math', 'distance')['spearman']:.3f}", TOO_SMALL_CELL]
    # no ordering of its changes correlates more (p = 1/24), but 3 rows were tested
    assert row(sized, "math", "distance")["verdict"] == (
        "survives the trend-preserving null (p=0.042) but not the correction for 3 tests "
        "(q=0.12)")
    # 4 checkpoints: at best p = 1/3! > 0.05, so even a headline row cannot tell
    short = correlate(metrics_frame(), scores_frame(), from_step=100, min_checkpoints=4,
                      min_group_size=1)
    assert row(short, "math", "distance")["verdict"] == (
        "cannot tell: with 4 checkpoints the trend-preserving p cannot go below 0.17 > 0.05")


def test_group_size_is_the_smallest_n_samples_over_the_correlated_checkpoints():
    frame = metrics_frame()
    frame.loc[(frame["metric"] == "n_samples") & (frame["group"] == "math"), "value"] = [
        2, 30, 30, 30, 30]
    assert row(correlate(frame, scores_frame()), "math", "loss")["group_size"] == 2
    later = correlate(frame, scores_frame(), from_step=100, min_checkpoints=4)
    assert row(later, "math", "loss")["group_size"] == 30
    assert row(later, "math", "loss")["too_small"] is None


def test_trend_q_adjusts_over_the_headline_rows_only():
    result = correlate(metrics_frame(), scores_frame(), min_group_size=4)
    family = result["too_small"].isna() & result["note"].isna()
    assert result.loc[~family, "trend_q"].isna().all()
    assert result.loc[family, "trend_q"].to_numpy() == pytest.approx(
        stats.false_discovery_control(result.loc[family, "trend_p"]))


def test_bad_thresholds_are_refused():
    with pytest.raises(InputError, match="min_checkpoints must be a whole number"):
        correlate(metrics_frame(), scores_frame(), min_checkpoints=0)


def test_table1_rows_are_metric_names_or_the_scores_validation_loss():
    assert set(TABLE1_ROWS) <= {*METRIC_NAMES, VALIDATION_LOSS}


def write(tmp_path, text: str):
    path = tmp_path / "scores.csv"
    path.write_text(text)
    return path


def test_read_scores(tmp_path):
    path = write(tmp_path, "checkpoint,score,group\nstep0,0.1,math\n100, 0.2 ,math\n"
                           "step200,0.3,\n")
    scores = read_scores(path, CHECKPOINTS)
    assert scores.to_dict("list") == {"checkpoint": ["step0", "step100", "step200"],
                                      "step": [0, 100, 200], "group": ["math", "math", None],
                                      "score": [0.1, 0.2, 0.3]}


def test_read_scores_with_a_validation_loss_column(tmp_path):
    path = write(tmp_path, "checkpoint,score,eval_loss\nstep0,0.1,2.5\nstep100,0.2,\n")
    scores = read_scores(path, CHECKPOINTS)
    assert scores["score"].tolist() == [0.1, 0.2]
    assert scores["val_loss"].tolist()[0] == 2.5 and np.isnan(scores["val_loss"].tolist()[1])
    assert read_scores(path, CHECKPOINTS).equals(scores)  # idempotent on its own output


@pytest.mark.parametrize(("text", "message"), [
    ("checkpoint,score,val_loss\nstep0,0.1,low\nstep100,0.2,inf\nstep200,0.3,\n",
     r"has a non-numeric or infinite val_loss on line\(s\) \[2, 3\]; pass a finite number "
     "or leave it empty$"),
    ("checkpoint,score,val_loss,eval_loss\nstep0,0.1,2,2\n",
     "has both val_loss and eval_loss; keep one validation-loss column$"),
])
def test_read_scores_refuses_a_bad_validation_loss(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        read_scores(write(tmp_path, text), CHECKPOINTS)


def test_a_validation_loss_is_correlated_with_the_score_and_never_too_small_a_group():
    steps = range(6)
    metrics = pd.DataFrame([{"checkpoint": f"c{s}", "step": s, "group": "tiny", "metric": m,
                             "value": v} for s in steps
                            for m, v in (("n_samples", 3), ("distance", 10.0 - s % 4))])
    val_loss = [3.0, 2.5, 2.4, 2.0, 1.9, 1.95]
    scores = pd.DataFrame({"checkpoint": [f"c{s}" for s in steps],
                           "score": [0.1, 0.2, 0.4, 0.5, 0.7, 0.8], "val_loss": val_loss})
    rows = correlate(metrics, scores).set_index("metric")
    assert list(rows.index) == ["distance", "val_loss"]  # the validation loss last
    expected = stats.pearsonr(val_loss, scores["score"])
    assert rows.loc["val_loss", "pearson"] == pytest.approx(expected.statistic, rel=1e-12)
    assert rows.loc["val_loss", "n"] == 6 and np.isnan(rows.loc["val_loss", "group_size"])
    assert rows.loc["val_loss", "too_small"] is None
    assert rows.loc["distance", "too_small"] == "group too small (3 < 20 samples)"
    layout = table1(correlate(metrics, scores))
    assert list(layout.index) == ["pathway distance", "normalised distance",
                                  "pathway consistency", "training loss", "validation loss"]
    assert layout.loc["validation loss", "tiny"] == (
        f"{expected.statistic:.3f} / {stats.spearmanr(val_loss, scores['score'])[0]:.3f}")
    without = table1(correlate(metrics, scores.drop(columns="val_loss")))
    assert "validation loss" not in without.index


def test_read_scores_names_unknown_checkpoints_and_lists_known_ones(tmp_path):
    path = write(tmp_path, "checkpoint,score\nstep0,0.1\nstep999,0.2\nfinal,0.3\n")
    with pytest.raises(InputError) as error:
        read_scores(path, CHECKPOINTS)
    assert str(error.value) == (
        f"scores file '{path}' names checkpoint(s) that were not compared: 'step999', 'final'; "
        "use a name or step of: step0 (0), step100 (100), step200 (200), step300 (300), "
        "step400 (400)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("checkpoint,accuracy\nstep0,0.1\n",
         r"lacks column\(s\) score \(found: checkpoint, accuracy\)"),
        ("step,score\n0,0.1\n", r"lacks column\(s\) checkpoint"),
        ("checkpoint,score\n", "has no rows"),
        ("", "is not a CSV"),
        ("checkpoint,score\nstep0,high\nstep100,\n",
         r"empty, non-numeric or infinite score on line\(s\) \[2, 3\]; pass a finite number"),
        # inf (also 1e400) would make every coefficient NaN without a note
        ("checkpoint,score\nstep0,0.5\nstep100,inf\nstep200,1e400\nstep300,-inf\n",
         r"empty, non-numeric or infinite score on line\(s\) \[3, 4, 5\]"),
        # an extra field in the first row made pandas index by checkpoint and shift the values
        ("checkpoint,score\nstep0,0.1,extra\nstep100,0.2\n",
         "its first row has more fields than the header; pass columns checkpoint, score and "
         "optionally group, one value each per row$"),
        ("checkpoint,score\nstep0,0.1\nstep100,0.2,extra\n",
         r"is not a CSV \(Error tokenizing data. C error: Expected 2 fields in line 3, saw 3\); "),
        ("checkpoint,score\nstep0,0.1\n0,0.2\n", "has several scores for step0"),
    ],
)
def test_read_scores_refuses_bad_files(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        read_scores(write(tmp_path, text), CHECKPOINTS)


def test_read_scores_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_scores(tmp_path / "nope.csv", CHECKPOINTS)


def test_doctests():
    assert doctest.testmod(correlation_module).failed == 0
