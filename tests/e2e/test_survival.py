"""Federated Kaplan-Meier and log-rank against lifelines on the pooled rows (real datasets)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.privacy.disclosure import DisclosurePolicy
from tests.conftest import split_uneven

lifelines = pytest.importorskip("lifelines")
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.datasets import load_waltons  # noqa: E402
from lifelines.statistics import logrank_test, multivariate_logrank_test  # noqa: E402

pytestmark = pytest.mark.e2e


def _assert_km_equal(table: pd.DataFrame, durations: pd.Series, events: pd.Series) -> None:
    reference = KaplanMeierFitter().fit(durations, events)
    expected = reference.survival_function_.iloc[:, 0]
    assert list(table.index) == list(expected.index)
    np.testing.assert_allclose(table["survival"], expected, rtol=1e-12, atol=1e-14)
    intervals = reference.confidence_interval_
    np.testing.assert_allclose(table["ci_lower"], intervals.iloc[:, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["ci_upper"], intervals.iloc[:, 1], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(table["at_risk"], reference.event_table["at_risk"])
    np.testing.assert_array_equal(table["events"], reference.event_table["observed"])


def test_kaplan_meier_by_group_equals_lifelines(gbsg2):
    with mv.Federation.simulate(split_uneven(gbsg2)) as fed:
        result = fed.kaplan_meier("time", "cens", by="horTh")
    assert set(result.tables) == {"no", "yes"}
    for group, table in result.tables.items():
        subset = gbsg2[gbsg2["horTh"] == group]
        _assert_km_equal(table, subset["time"], subset["cens"])
        assert result.median_survival_time[group] == KaplanMeierFitter().fit(
            subset["time"], subset["cens"]).median_survival_time_
    assert result.provenance["secure_aggregation"] is True


def test_kaplan_meier_waltons_overall_and_plot(tmp_path):
    waltons = load_waltons()
    with mv.Federation.simulate(split_uneven(waltons)) as fed:
        result = fed.kaplan_meier("T", "E")
    _assert_km_equal(result.tables["all"], waltons["T"], waltons["E"])
    pytest.importorskip("matplotlib")
    path = tmp_path / "km.png"
    result.plot(str(path))
    assert path.stat().st_size > 5000


def test_logrank_equals_lifelines(gbsg2):
    waltons = load_waltons()
    with mv.Federation.simulate(split_uneven(waltons)) as fed:
        two = fed.logrank("T", "E", "group")
    a, b = waltons[waltons["group"] == "control"], waltons[waltons["group"] == "miR-137"]
    reference = logrank_test(a["T"], b["T"], a["E"], b["E"])
    assert two.test_statistic == pytest.approx(reference.test_statistic, rel=1e-10)
    assert two.p_value == pytest.approx(reference.p_value, rel=1e-8, abs=1e-12)
    with mv.Federation.simulate(split_uneven(gbsg2)) as fed:
        three = fed.logrank("time", "cens", "tgrade")
    reference = multivariate_logrank_test(gbsg2["time"], gbsg2["tgrade"], gbsg2["cens"])
    assert three.test_statistic == pytest.approx(reference.test_statistic, rel=1e-10)
    assert three.p_value == pytest.approx(reference.p_value, rel=1e-8)
    assert three.degrees_of_freedom == 2


def test_a_site_may_refuse_a_time_grid_finer_than_its_policy(gbsg2):
    with mv.Federation.simulate(split_uneven(gbsg2), policy=DisclosurePolicy(min_time_unit=7)) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.kaplan_meier("time", "cens")
        assert error.value.rule == "time_resolution"
        weekly = fed.kaplan_meier("time", "cens", time_unit=7)
    weeks = (gbsg2["time"] / 7).round() * 7
    _assert_km_equal(weekly.tables["all"], weeks, gbsg2["cens"])


def test_hub_never_sees_a_sites_event_times(gbsg2):
    sites = split_uneven(gbsg2)
    with mv.Federation.simulate(sites, record_hub_traffic=True) as fed:
        fed.kaplan_meier("time", "cens")
        bodies = list(fed.hub_traffic()["body"])
    assert all(not body.get("sums") for body in bodies)
    assert any("masked" in body for body in bodies)
