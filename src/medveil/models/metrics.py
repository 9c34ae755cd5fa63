"""Pooled classification metrics from sums over rows (pure numpy).

Each site computes `bin_sums` (through `medveil.models.training.evaluate`) on its own rows; the
sums are added under secure aggregation, so the researcher learns the pooled sums only, and
`pooled_metrics` turns them into loss, accuracy, AUC, calibration error and a calibration table.
AUC and calibration come from histograms of predicted probabilities in equal-width bins of
[0, 1]: the AUC is exact for the binned scores (rows in one bin count as ties, 1/2 a pair), which
differs from the AUC of the raw scores by at most the pairs that share a bin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SUM_KEYS = ("rows", "loss", "correct", "hist_pos", "hist_neg", "prob_sum")


def score_bins(probabilities: np.ndarray, bins: int) -> np.ndarray:
    """The bin (0..bins-1) of each probability in equal-width bins of [0, 1]; 1 falls in the last."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return np.minimum(np.floor(probabilities * bins).astype(np.int64), bins - 1)


def bin_sums(probabilities: np.ndarray, labels: np.ndarray, *, classes: int, bins: int) -> dict[str, np.ndarray]:
    """Histogram sums of predicted probabilities: `probabilities` is (rows, 1) of P(class 1) for
    two classes or (rows, K) for K >= 3; `labels` are 0..classes-1. Returns "hist_pos"/"hist_neg"
    (int64 (C', bins): rows whose label is / is not the column's class, by bin of its probability)
    and "prob_sum" (float64 (C', bins): those probabilities summed per bin over all rows)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    columns = 1 if classes == 2 else classes
    if probabilities.ndim != 2 or probabilities.shape != (labels.shape[0], columns):
        raise ValueError(f"probabilities must have shape ({labels.shape[0]}, {columns}), got {probabilities.shape}")
    if probabilities.size and (not np.all(np.isfinite(probabilities)) or probabilities.min() < 0 or probabilities.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    index = score_bins(probabilities, bins)
    hist_pos = np.zeros((columns, bins), dtype=np.int64)
    hist_neg = np.zeros((columns, bins), dtype=np.int64)
    prob_sum = np.zeros((columns, bins), dtype=np.float64)
    for column in range(columns):
        positive = labels == (1 if classes == 2 else column)
        hist_pos[column] = np.bincount(index[positive, column], minlength=bins)
        hist_neg[column] = np.bincount(index[~positive, column], minlength=bins)
        prob_sum[column] = np.bincount(index[:, column], weights=probabilities[:, column], minlength=bins)
    return {"hist_pos": hist_pos, "hist_neg": hist_neg, "prob_sum": prob_sum}


def binned_auc(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float:
    """AUC (Mann-Whitney) of scores known by bin: P(a positive's bin > a negative's), ties 1/2;
    nan without both positives and negatives."""
    positives = np.asarray(hist_pos, dtype=np.float64)
    negatives = np.asarray(hist_neg, dtype=np.float64)
    pairs = positives.sum() * negatives.sum()
    if pairs == 0:
        return float("nan")
    below = np.cumsum(negatives) - negatives
    return float((np.dot(positives, below) + 0.5 * np.dot(positives, negatives)) / pairs)


def _checked(sums: dict[str, Any]) -> dict[str, np.ndarray]:
    missing = [key for key in SUM_KEYS if key not in sums]
    if missing:
        raise ValueError(f"metric sums lack {missing}")
    arrays = {key: np.asarray(sums[key], dtype=np.float64) for key in SUM_KEYS}
    for key in ("rows", "loss", "correct"):
        if arrays[key].shape != (1,):
            raise ValueError(f"metric sum {key!r} must have shape (1,), got {arrays[key].shape}")
    shape = arrays["hist_pos"].shape
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1 or any(arrays[k].shape != shape for k in ("hist_neg", "prob_sum")):
        raise ValueError("hist_pos, hist_neg and prob_sum must share one (columns, bins) shape")
    if not all(np.all(np.isfinite(a)) for a in arrays.values()):
        raise ValueError("metric sums must be finite")
    if arrays["rows"][0] < 1:
        raise ValueError("metric sums cover no rows")
    return arrays


def pooled_metrics(sums: dict[str, Any]) -> dict[str, Any]:
    """Metrics of the pooled rows from summed `evaluate` outputs: "rows", "loss" (mean clipped
    cross-entropy), "accuracy", "auc" (binned; for K >= 3 the macro mean of one-vs-rest AUCs over
    classes with positives and negatives), "ece" (expected calibration error over the bins: for
    K >= 3 the mean over classes of each class's one-vs-rest ECE, Kull et al.'s classwise ECE) and
    "calibration" (column -> array, for pandas.DataFrame: class, bin_low, bin_high, rows,
    mean_predicted, observed; the last two nan in an empty bin)."""
    arrays = _checked(sums)
    rows = arrays["rows"][0]
    hist_pos, hist_neg, prob_sum = arrays["hist_pos"], arrays["hist_neg"], arrays["prob_sum"]
    columns, bins = hist_pos.shape
    aucs = [binned_auc(hist_pos[c], hist_neg[c]) for c in range(columns)]
    defined = [auc for auc in aucs if not np.isnan(auc)]
    in_bin = hist_pos + hist_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(in_bin > 0, prob_sum / in_bin, np.nan)
        observed = np.where(in_bin > 0, hist_pos / in_bin, np.nan)
    gaps = np.where(in_bin > 0, np.abs(np.nan_to_num(mean_predicted) - np.nan_to_num(observed)), 0.0)
    ece = float(np.mean((in_bin * gaps).sum(axis=1) / rows))
    edges = np.linspace(0.0, 1.0, bins + 1)
    labels = np.array([1]) if columns == 1 else np.arange(columns)
    calibration = {
        "class": np.repeat(labels, bins),
        "bin_low": np.tile(edges[:-1], columns),
        "bin_high": np.tile(edges[1:], columns),
        "rows": in_bin.astype(np.int64).ravel(),
        "mean_predicted": mean_predicted.ravel(),
        "observed": observed.ravel(),
    }
    return {"rows": int(rows), "loss": float(arrays["loss"][0] / rows), "accuracy": float(arrays["correct"][0] / rows),
            "auc": float(np.mean(defined)) if defined else float("nan"), "ece": ece, "calibration": calibration}
