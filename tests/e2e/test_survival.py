"""Federated Kaplan-Meier and log-rank against lifelines on the pooled rows (real datasets).

Each site coarsens its own times before anything leaves it (no step of fewer than
min_cell_count patients, no minimum or maximum time), so the reference is lifelines on the
pooled rows with each row's time as its site releases it (`released_durations`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.survival import released_durations
from medveil.privacy.disclosure import DisclosurePolicy
from tests.conftest import split_uneven

lifelines = pytest.importorskip("lifelines")
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.datasets import load_waltons  # noqa: E402
from lifelines.statistics import logrank_test, multivariate_logrank_test  # noqa: E402

pytestmark = pytest.mark.e2e


def _released(sites: dict[str, pd.DataFrame], duration: str, event: str, by: str | None = None,
              time_unit: float = 1.0) -> pd.DataFrame:
    """The pooled rows with each row's time as its site coarsens it (left-out rows dropped)."""
    frames = [released_durations(frame, duration, event, DisclosurePolicy().min_cell_count, by=by,
                                 time_unit=time_unit) for frame in sites.values()]
    return pd.concat(frames, ignore_index=True).dropna(subset=[duration])


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
    sites = split_uneven(gbsg2)
    with mv.Federation.simulate(sites) as fed:
        result = fed.kaplan_meier("time", "cens", by="horTh")
    assert set(result.tables) == {"no", "yes"}
    released = _released(sites, "time", "cens", by="horTh")
    for group, table in result.tables.items():
        subset = released[released["horTh"] == group]
        assert len(subset) > 0.8 * (gbsg2["horTh"] == group).sum()
        _assert_km_equal(table, subset["time"], subset["cens"])
        assert result.median_survival_time[group] == KaplanMeierFitter().fit(
            subset["time"], subset["cens"]).median_survival_time_
    assert result.provenance["secure_aggregation"] is True


def test_kaplan_meier_waltons_overall_and_plot(tmp_path):
    waltons = load_waltons()
    sites = split_uneven(waltons)
    with mv.Federation.simulate(sites) as fed:
        result = fed.kaplan_meier("T", "E")
    released = _released(sites, "T", "E")
    _assert_km_equal(result.tables["all"], released["T"], released["E"])
    pytest.importorskip("matplotlib")
    path = tmp_path / "km.png"
    result.plot(str(path))
    assert path.stat().st_size > 5000


def test_logrank_equals_lifelines(gbsg2):
    waltons = load_waltons()
    sites = split_uneven(waltons)
    with mv.Federation.simulate(sites) as fed:
        two = fed.logrank("T", "E", "group")
    released = _released(sites, "T", "E", by="group")
    a, b = released[released["group"] == "control"], released[released["group"] == "miR-137"]
    reference = logrank_test(a["T"], b["T"], a["E"], b["E"])
    assert two.test_statistic == pytest.approx(reference.test_statistic, rel=1e-10)
    assert two.p_value == pytest.approx(reference.p_value, rel=1e-8, abs=1e-12)
    sites = split_uneven(gbsg2)
    with mv.Federation.simulate(sites) as fed:
        three = fed.logrank("time", "cens", "tgrade")
    released = _released(sites, "time", "cens", by="tgrade")
    reference = multivariate_logrank_test(released["time"], released["tgrade"], released["cens"])
    assert three.test_statistic == pytest.approx(reference.test_statistic, rel=1e-10)
    assert three.p_value == pytest.approx(reference.p_value, rel=1e-8)
    assert three.degrees_of_freedom == 2


def test_a_site_may_refuse_a_time_grid_finer_than_its_policy(gbsg2):
    sites = split_uneven(gbsg2)
    with mv.Federation.simulate(sites, policy=DisclosurePolicy(min_time_unit=7)) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.kaplan_meier("time", "cens")
        assert error.value.rule == "time_resolution"
        weekly = fed.kaplan_meier("time", "cens", time_unit=7)
    released = _released(sites, "time", "cens", time_unit=7)
    _assert_km_equal(weekly.tables["all"], released["time"], released["cens"])


def test_hub_never_sees_a_sites_event_times(gbsg2):
    sites = split_uneven(gbsg2)
    with mv.Federation.simulate(sites, record_hub_traffic=True) as fed:
        fed.kaplan_meier("time", "cens")
        bodies = list(fed.hub_traffic()["body"])
    assert all(not body.get("sums") for body in bodies)
    assert any("masked" in body for body in bodies)
