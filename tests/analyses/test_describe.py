"""describe: pooled n, mean, sd and grid quantiles equal pandas on the pooled data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from medveil.analyses.base import AnalysisError, get_analysis
from medveil.analyses.describe import GRID_HALF_WIDTH_SD, GRID_POINTS, quantile_label
from medveil.privacy.disclosure import DisclosurePolicy

REL = 1e-12


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])]


def concat(sites) -> pd.DataFrame:
    return pd.concat(list(sites.values()), ignore_index=True)


def test_n_mean_sd_equal_pandas_on_pooled_data(run_federated, dataset):
    _, sites = dataset
    pooled = concat(sites)
    variables = numeric_columns(pooled)
    assert len(variables) >= 4
    result = run_federated("describe", {"variables": variables}, sites).result

    assert list(result.index) == variables and result.index.name == "variable"
    assert list(result.columns) == ["n", "mean", "sd", "5%", "25%", "50%", "75%", "95%"]
    for v in variables:
        values = pooled[v].dropna().astype(np.float64)
        assert result.loc[v, "n"] == len(values)
        assert result.loc[v, "mean"] == pytest.approx(values.mean(), rel=REL, abs=0)
        assert result.loc[v, "sd"] == pytest.approx(values.std(ddof=1), rel=REL, abs=0)


def test_round_trips_and_public_facts(run_federated, synthetic_sites):
    run = run_federated("describe", {"variables": ["x"]}, synthetic_sites)
    assert len(run.rounds) == 3
    for site, frame in synthetic_sites.items():
        public = run.rounds[0].public[site]
        # `rows` is released: no variable lacks 1 to 4 values at any site.
        assert public == {"rows": len(frame), "min_cell_count": 5, "excluded_variables": []}
    # Only sums leave the sites: the aggregated arrays of each round, nothing row-shaped.
    assert [sorted(r.sums) for r in run.rounds] == [["n", "sum"], ["ssd"], ["cdf"]]
    assert run.rounds[2].sums["cdf"].shape == (1, GRID_POINTS)


def test_quantiles_lie_within_grid_resolution_of_pandas(run_federated, synthetic_sites):
    """Each site's CDF is coarsened (each count rounded into a bin of min_cell_count counts, so no
    step is one patient): the pooled CDF is within sum(min_cell_count - 1) = `slack` rows of the
    truth, so a quantile lies within `slack` order statistics (and a grid step) of pandas'."""
    pooled = concat(synthetic_sites)
    qs = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    result = run_federated("describe", {"variables": ["x", "y"], "quantiles": qs}, synthetic_sites).result
    slack = len(synthetic_sites) * (DisclosurePolicy().min_cell_count - 1)
    for v in ["x", "y"]:
        values = np.sort(pooled[v].dropna().to_numpy())
        n = len(values)
        step = 2 * GRID_HALF_WIDTH_SD * result.loc[v, "sd"] / (GRID_POINTS - 1)  # 8 * sd / 400
        for q in qs:
            got = result.loc[v, quantile_label(q)]
            assert np.isfinite(got)
            k = math.ceil(q * n)  # 1-based rank of the first order statistic reaching q * n rows
            lowest, highest = values[max(k - 2 - slack, 0)], values[min(k + slack, n - 1)]
            assert lowest - step <= got <= highest + step, (v, q, got, step)
            # pandas' linear quantile lies between the order statistics k-1 and k+1, inside that window.
            reference = pooled[v].quantile(q)
            assert abs(got - reference) <= step + (highest - lowest), (v, q, got, reference, step)
            assert abs(got - reference) <= 0.1 * result.loc[v, "sd"]  # a tenth of an sd at most on 3,000 rows


def test_thin_tail_quantiles_are_withheld(run_federated, synthetic_sites):
    """A quantile with fewer than min_cell_count rows (the strictest site's) beyond it is NaN."""
    policies = {"site_a": DisclosurePolicy(min_cell_count=5), "site_b": DisclosurePolicy(min_cell_count=12),
                "site_c": DisclosurePolicy(min_cell_count=5)}
    qs = [0.001, 0.003, 0.01, 0.5, 0.99, 0.997, 0.999]
    result = run_federated("describe", {"variables": ["x"], "quantiles": qs}, synthetic_sites, policies).result
    n = concat(synthetic_sites)["x"].count()
    strictest = 12
    withheld = [q for q in qs if q * n < strictest or n - q * n < strictest]
    assert 0.003 in withheld  # ~8.8 rows: released under min 5, withheld under min 12
    for q in qs:
        value = result.loc["x", quantile_label(q)]
        assert np.isnan(value) == (q in withheld), (q, value)


@pytest.mark.parametrize("kept, sits_out", [(4, True), (5, False)])
def test_site_with_too_few_values_sits_out(run_federated, synthetic_sites, kept, sits_out):
    sites = {name: frame.copy() for name, frame in synthetic_sites.items()}
    sites["site_c"]["x"] = np.nan
    sites["site_c"].loc[: kept - 1, "x"] = 40.0 + np.arange(kept)
    assert sites["site_c"]["x"].count() == kept
    run = run_federated("describe", {"variables": ["x", "y"]}, sites)
    result = run.result

    public = run.rounds[0].public
    assert public["site_c"]["excluded_variables"] == (["x"] if sits_out else [])
    assert public["site_a"]["excluded_variables"] == public["site_b"]["excluded_variables"] == []

    contributing = [name for name in sites if not (sits_out and name == "site_c")]
    x = pd.concat([sites[name]["x"] for name in contributing]).dropna()
    assert result.loc["x", "n"] == len(x)
    assert result.loc["x", "mean"] == pytest.approx(x.mean(), rel=REL, abs=0)
    assert result.loc["x", "sd"] == pytest.approx(x.std(), rel=REL, abs=0)
    y = concat(sites)["y"].dropna()  # site_c still contributes its other variable
    assert result.loc["y", "n"] == len(y)
    assert result.loc["y", "mean"] == pytest.approx(y.mean(), rel=REL, abs=0)


def test_no_site_with_enough_values_is_an_error(run_federated, synthetic_sites):
    sites = {name: frame.head(4) for name, frame in synthetic_sites.items()}
    with pytest.raises(AnalysisError, match="too few values"):
        run_federated("describe", {"variables": ["y"]}, sites)


@pytest.mark.parametrize("variable", ["horTh", "menostat", "tgrade"])
def test_non_numeric_column_is_an_analysis_error(run_federated, gbsg2_sites, variable):
    with pytest.raises(AnalysisError, match=f"{variable!r} is not numeric"):
        run_federated("describe", {"variables": ["age", variable]}, gbsg2_sites)


def test_a_repeated_variable_is_refused_when_the_parameters_are_read():
    """describe's parameters refuse a variable asked twice (at the researcher and at every node,
    which read them the same way) rather than describing it twice."""
    describe = get_analysis("describe")
    with pytest.raises(ValidationError, match="variables must be distinct"):
        describe.parse_params({"variables": ["age", "tsize", "age"]})
    assert describe.parse_params({"variables": ["age", "tsize"]}).variables == ["age", "tsize"]


@pytest.mark.parametrize("quantiles", [[0.0], [1.0], [-0.1], [0.5, 1.5]])
def test_quantiles_outside_the_open_unit_interval_are_refused(quantiles):
    with pytest.raises(ValidationError):
        get_analysis("describe").parse_params({"variables": ["x"], "quantiles": quantiles})


def test_rows_are_withheld_where_a_variable_lacks_a_few_values(run_federated, synthetic_sites):
    sites = {name: frame.copy() for name, frame in synthetic_sites.items()}
    sites["site_b"]["y"] = sites["site_b"]["y"].astype(float)
    sites["site_b"].loc[sites["site_b"].index[:2], "y"] = np.nan  # two values missing: rows minus n would say so
    run = run_federated("describe", {"variables": ["y"]}, sites)
    assert "rows" not in run.rounds[0].public["site_b"]
    assert run.rounds[0].public["site_a"]["rows"] == len(sites["site_a"])


def test_describe_broadcasts_are_checked():
    from medveil.analyses.base import BroadcastRefused

    describe = get_analysis("describe")
    params = describe.parse_params({"variables": ["x", "y"]})
    memory: dict = {"released": {0: {}}}
    mean = np.array([1.0, 2.0])
    for round_no, broadcast, rule in [(1, {"mean": mean[:1]}, "broadcast_malformed"),
                                      (1, {"mean": np.array([1.0, np.inf])}, "broadcast_malformed"),
                                      (1, {"mean": mean, "grid": mean}, "unexpected_broadcast"),
                                      (3, {}, "round_order")]:
        with pytest.raises(BroadcastRefused) as error:
            describe.check_broadcast(params, round_no, broadcast, memory)
        assert error.value.rule == rule
    describe.check_broadcast(params, 1, {"mean": mean}, memory)
    offsets = np.linspace(-GRID_HALF_WIDTH_SD, GRID_HALF_WIDTH_SD, GRID_POINTS)
    grid = mean[:, None] + np.array([[3.0], [0.5]]) * offsets[None, :]
    describe.check_broadcast(params, 2, {"grid": grid}, memory)  # what the GLOBAL step derives
    for forged in [grid + 0.1, grid * 1.001, np.where(offsets > 3.9, grid + 5, grid), grid[:, ::-1]]:
        with pytest.raises(BroadcastRefused) as error:
            describe.check_broadcast(params, 2, {"grid": forged}, memory)
        assert error.value.rule == "broadcast_not_released"
