"""histogram: pooled bin counts equal np.histogram on the pooled data, small bins withheld."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from medveil.analyses.base import AnalysisError, get_analysis
from medveil.privacy.disclosure import DisclosurePolicy, secondary_suppression

MIN = DisclosurePolicy().min_cell_count


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """np.histogram's bins plus the open-ended bins below the first and above the last edge."""
    inner, _ = np.histogram(values, bins=edges)
    return np.concatenate([[np.sum(values < edges[0])], inner, [np.sum(values > edges[-1])]])


def expected_table(sites, variable, edges, min_count=MIN) -> pd.DataFrame:
    edges = np.asarray(edges, dtype=float)
    per_site = [bin_counts(f[variable].dropna().to_numpy(dtype=float), edges) for f in sites.values()]
    pooled_values = pd.concat([f[variable] for f in sites.values()]).dropna().to_numpy(dtype=float)
    pooled = bin_counts(pooled_values, edges)
    assert pooled.sum() == len(pooled_values)
    np.testing.assert_array_equal(pooled, np.sum(per_site, axis=0))
    policy = DisclosurePolicy(min_cell_count=min_count)
    # Each site hides its small bins, then more (secondary suppression, tested in test_disclosure.py).
    suppressed = np.any([secondary_suppression(c, (c >= 1) & (c < min_count), policy) for c in per_site], axis=0)
    table = pd.DataFrame({
        "left": np.concatenate([[-np.inf], edges]),
        "right": np.concatenate([edges, [np.inf]]),
        "count": pd.array(pooled, dtype="Int64"),
    })
    table["count"] = table["count"].mask(suppressed)
    table["suppressed"] = suppressed
    return table


CASES = {
    "synthetic": [("x", list(np.linspace(20.0, 80.0, 13))), ("count", [float(e) for e in range(0, 11)]),
                  ("y", [100.0, 102.0, 103.0, 104.0, 106.0, 110.0])],
    "gbsg2": [("age", [20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]), ("tsize", [0.0, 10.0, 20.0, 30.0, 50.0, 120.0]),
              ("pnodes", [1.0, 2.0, 3.0, 5.0, 10.0, 20.0])],
}


@pytest.mark.parametrize("case", range(3))
def test_histogram_equals_numpy_on_pooled_data(run_federated, dataset, case):
    name, sites = dataset
    variable, edges = CASES[name][case]
    result = run_federated("histogram", {"variable": variable, "edges": edges}, sites).result
    pd.testing.assert_frame_equal(result, expected_table(sites, variable, edges))


def test_counts_match_numpy_exactly_where_nothing_is_suppressed(run_federated, gbsg2_sites):
    pooled = pd.concat(list(gbsg2_sites.values()), ignore_index=True)
    edges = [20.0, 40.0, 60.0, float(pooled["age"].max())]  # the largest age sits on the closed last edge
    result = run_federated("histogram", {"variable": "age", "edges": edges}, gbsg2_sites).result
    inner, _ = np.histogram(pooled["age"], bins=edges)
    assert not result["suppressed"].iloc[1:-1].any()
    np.testing.assert_array_equal(result["count"].iloc[1:-1].to_numpy(dtype=np.int64), inner)
    assert inner[-1] >= (pooled["age"] == edges[-1]).sum() > 0
    assert result["count"].iloc[-1] == 0  # nothing above the last (closed) edge


def test_small_bins_are_missing_and_marked(run_federated, synthetic_sites):
    edges = list(np.linspace(20.0, 80.0, 25))
    result = run_federated("histogram", {"variable": "x", "edges": edges}, synthetic_sites).result
    expected = expected_table(synthetic_sites, "x", edges)
    assert expected["suppressed"].any() and not expected["suppressed"].all()
    pd.testing.assert_frame_equal(result, expected)
    assert result["count"].isna().equals(result["suppressed"])
    released = result["count"].dropna().to_numpy(dtype=np.int64)
    assert not np.any((released > 0) & (released < MIN))


def test_per_site_rows_are_public_and_missing_values_ignored(run_federated, synthetic_sites):
    run = run_federated("histogram", {"variable": "x", "edges": [0.0, 50.0, 100.0]}, synthetic_sites)
    for site, frame in synthetic_sites.items():
        assert run.rounds[0].public[site] == {"rows": int(frame["x"].count())}
    assert run.result["count"].sum() == pd.concat([f["x"] for f in synthetic_sites.values()]).count()


def test_bool_variable_counts(run_federated, synthetic_sites):
    result = run_federated("histogram", {"variable": "flag", "edges": [0.0, 0.5, 1.0]}, synthetic_sites).result
    pooled = pd.concat([f["flag"] for f in synthetic_sites.values()])
    assert list(result["count"].iloc[1:3]) == [int((~pooled).sum()), int(pooled.sum())]


def test_non_numeric_variable_is_an_analysis_error(run_federated, gbsg2_sites):
    with pytest.raises(AnalysisError, match="not numeric"):
        run_federated("histogram", {"variable": "tgrade", "edges": [0.0, 1.0]}, gbsg2_sites)


@pytest.mark.parametrize("edges", [[1.0], [1.0, 1.0], [2.0, 1.0], [0.0, float("inf")], [0.0, float("nan")]])
def test_edges_must_be_finite_and_increasing(edges):
    with pytest.raises(ValidationError):
        get_analysis("histogram").parse_params({"variable": "x", "edges": edges})
