"""Pooled metrics from binned sums, against scikit-learn on the binned scores, and additivity:
sums of several sites' splits give the metrics of their union."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import label_binarize

from medveil.models import bin_sums, binned_auc, pooled_metrics, score_bins


def _sums(probabilities, labels, classes, bins, loss=0.0, correct=0):
    return {"rows": np.array([len(labels)]), "loss": np.array([loss]), "correct": np.array([correct])} | bin_sums(
        probabilities, labels, classes=classes, bins=bins)


def _binary(rows, seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(rows) < 0.4).astype(int)
    scores = np.clip(rng.beta(2, 3, size=rows) + 0.25 * labels, 0, 1)
    return scores, labels


@pytest.mark.parametrize("bins", [1, 2, 7, 20, 100])
def test_binary_auc_equals_sklearn_on_bin_indices(bins):
    scores, labels = _binary(500, bins)
    metrics = pooled_metrics(_sums(scores[:, None], labels, 2, bins))
    assert abs(metrics["auc"] - roc_auc_score(labels, score_bins(scores, bins))) < 1e-12
    if bins == 100:
        assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=0.01)  # close to the raw AUC


def test_score_bins_are_the_equal_width_bins():
    p = np.random.default_rng(1).random(10_000)
    np.testing.assert_array_equal(score_bins(p, 20), np.digitize(p, np.linspace(0, 1, 21)[1:-1]))
    assert score_bins(np.array([0.0, 1.0]), 5).tolist() == [0, 4]


def test_multiclass_auc_is_sklearns_macro_one_vs_rest_on_bin_indices():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=400)
    logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = pooled_metrics(_sums(probabilities, labels, 4, 10))
    binned = score_bins(probabilities, 10)
    expected = roc_auc_score(label_binarize(labels, classes=range(4)), binned, average="macro")
    assert abs(metrics["auc"] - expected) < 1e-12


def test_ece_and_calibration_table_match_sklearns_calibration_curve():
    scores, labels = _binary(800, 11)
    bins = 10
    metrics = pooled_metrics(_sums(scores[:, None], labels, 2, bins))
    observed, predicted = calibration_curve(labels, scores, n_bins=bins, strategy="uniform")
    table = metrics["calibration"]
    filled = table["rows"] > 0
    np.testing.assert_allclose(table["observed"][filled], observed, atol=1e-12)
    np.testing.assert_allclose(table["mean_predicted"][filled], predicted, atol=1e-12)
    assert np.all(np.isnan(table["observed"][~filled]))
    assert table["rows"].sum() == 800 and set(table["class"]) == {1}
    np.testing.assert_allclose(table["bin_high"] - table["bin_low"], 1 / bins)
    counts = table["rows"][filled]
    assert metrics["ece"] == pytest.approx(float(np.sum(counts * np.abs(observed - predicted)) / 800), abs=1e-12)


def test_loss_accuracy_and_undefined_auc():
    metrics = pooled_metrics(_sums(np.full((4, 1), 0.7), np.ones(4, dtype=int), 2, 5, loss=2.0, correct=3))
    assert (metrics["rows"], metrics["loss"], metrics["accuracy"]) == (4, 0.5, 0.75)
    assert np.isnan(metrics["auc"])  # no negatives
    assert metrics["ece"] == pytest.approx(0.3)
    assert np.isnan(binned_auc(np.zeros(3), np.ones(3)))


@pytest.mark.parametrize("change", [
    lambda s: s.pop("hist_neg"),
    lambda s: s.update(rows=np.array([0])),
    lambda s: s.update(loss=np.array([1.0, 2.0])),
    lambda s: s.update(prob_sum=np.zeros((2, 5))),
    lambda s: s.update(hist_pos=np.full((1, 5), np.nan)),
])
def test_malformed_sums_are_refused(change):
    sums = _sums(np.full((4, 1), 0.5), np.array([0, 1, 0, 1]), 2, 5)
    change(sums)
    with pytest.raises(ValueError):
        pooled_metrics(sums)


def _split_sums(probabilities, labels, classes, bins, cuts):
    parts = np.split(np.arange(len(labels)), sorted(cuts))
    summed = None
    for part in parts:
        sums = _sums(probabilities[part], labels[part], classes, bins, loss=float(part.size) / 3, correct=part.size // 2)
        summed = sums if summed is None else {k: summed[k] + sums[k] for k in sums}
    return summed, parts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(2, 120), classes=st.sampled_from([2, 3, 5]), bins=st.integers(1, 30),
       seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 120), max_size=4))
def test_sums_of_splits_equal_the_union(rows, classes, bins, seed, cuts):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=rows)
    columns = 1 if classes == 2 else classes
    probabilities = rng.dirichlet(np.ones(max(columns, 2)), size=rows)[:, :columns]
    summed, parts = _split_sums(probabilities, labels, classes, bins, [c for c in cuts if c <= rows])
    union = _sums(probabilities, labels, classes, bins, loss=rows / 3, correct=sum(p.size // 2 for p in parts))
    for key in ("hist_pos", "hist_neg", "rows", "correct"):
        np.testing.assert_array_equal(summed[key], union[key])
    np.testing.assert_allclose(summed["prob_sum"], union["prob_sum"], rtol=1e-12, atol=1e-12)
    pooled, whole = pooled_metrics(summed), pooled_metrics(union)
    for key in ("rows", "loss", "accuracy", "auc", "ece"):
        np.testing.assert_allclose(pooled[key], whole[key], rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 79), min_size=1, max_size=3),
       classes=st.sampled_from([2, 3]))
def test_evaluate_sums_over_sites_equal_the_pooled_evaluation(seed, cuts, classes):
    pytest.importorskip("torch")
    from medveil.models import LOGISTIC, evaluate

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(80, 3)).astype(np.float32)
    y = rng.integers(0, classes, size=80)
    weights = rng.normal(size=4 if classes == 2 else 12)
    sites = [evaluate(LOGISTIC, None, weights, X[part], y[part], classes=classes, bins=8)
             for part in np.split(np.arange(80), sorted(set(cuts)))]
    summed = {key: sum(site[key] for site in sites) for key in sites[0]}
    pooled = evaluate(LOGISTIC, None, weights, X, y, classes=classes, bins=8)
    for key in ("rows", "correct", "hist_pos", "hist_neg"):
        np.testing.assert_array_equal(summed[key], pooled[key])
    for key in ("loss", "prob_sum"):
        np.testing.assert_allclose(summed[key], pooled[key], rtol=1e-9)
    a, b = pooled_metrics(summed), pooled_metrics(pooled)
    for key in ("loss", "accuracy", "auc", "ece"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12)
