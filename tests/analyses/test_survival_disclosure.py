"""Unit tests of the survival analyses' disclosure rules: each site's own coarsening of times,
the covariate and weight rules of Cox, and the broadcast checks of kaplan_meier, logrank, coxph."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medveil.analyses.base import Aggregated, BroadcastRefused, SiteContext, get_analysis
from medveil.analyses.survival import LEFT_OUT, coarsen_times
from medveil.privacy.disclosure import DisclosurePolicy, DisclosureRefused

lifelines = pytest.importorskip("lifelines")
from lifelines import KaplanMeierFitter  # noqa: E402

POLICY = DisclosurePolicy()
M = POLICY.min_cell_count


def _assert_protected(slots: np.ndarray, released: np.ndarray, released_events: np.ndarray, m: int) -> None:
    """Every step holds 0 or >= m events and censorings, >= m rows stay after the last, no minimum or
    maximum is shown, and only the longest follow-ups move earlier (as censorings)."""
    kept = released != LEFT_OUT
    steps = np.unique(released[kept])
    if kept.any():
        assert steps[-1] < slots.max()
        assert steps[0] >= np.sort(slots)[m - 1]
    for step in steps:
        at = kept & (released == step)
        died = int(released_events[at].sum())
        censored = int(at.sum()) - died
        assert died == 0 or died >= m
        assert censored == 0 or censored >= m
        assert int((kept & (released >= step)).sum()) >= m
    if kept.any():
        assert int((slots[kept] > steps[-1]).sum()) >= m
    moved_earlier = kept & (released < slots)
    assert np.all(released_events[moved_earlier] == 0)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("m", [3, 5])
def test_coarsening_never_shows_a_small_step_a_minimum_or_a_maximum(seed, m):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    slots = rng.integers(0, int(rng.integers(2, 400)), n)
    events = (rng.random(n) < rng.random()).astype(float)
    released, released_events = coarsen_times(slots, events, m)
    _assert_protected(slots, released, released_events, m)


def test_too_few_rows_for_any_step_are_left_out():
    released, _ = coarsen_times(np.array([3, 8, 9]), np.array([1.0, 1.0, 0.0]), M)
    assert np.all(released == LEFT_OUT)


def _km_table(frame: pd.DataFrame, policy: DisclosurePolicy = POLICY) -> pd.DataFrame:
    analysis = get_analysis("kaplan_meier")
    params = analysis.parse_params({"duration": "t", "event": "e", "max_time": 100})
    first = analysis.local(params, 0, {}, SiteContext("s", frame, policy, {}, {}))
    agreed = analysis.global_step(params, 0, Aggregated({}, {"s": first.public}), {})
    counts = analysis.local(params, 1, agreed.broadcast, SiteContext("s", frame, policy, {}, {}))
    return analysis.global_step(params, 1, Aggregated(counts.sums, {"s": {}}), agreed.state).result.tables["all"]


def test_data_needing_no_coarsening_equal_lifelines_at_every_shown_time():
    times = [10] * 5 + [15] * 5 + [20] * 6 + [30] * 5 + [40, 45, 50, 55, 60, 70]
    events = [1] * 5 + [0] * 5 + [1] * 6 + [1] * 5 + [1, 0, 1, 0, 1, 1]
    frame = pd.DataFrame({"t": times, "e": events})
    table = _km_table(frame)
    assert list(table.index) == [0.0, 10.0, 15.0, 20.0, 30.0]
    reference = KaplanMeierFitter().fit(frame["t"], frame["e"])
    np.testing.assert_allclose(table["survival"], reference.survival_function_at_times(table.index), rtol=1e-12)
    np.testing.assert_array_equal(table["at_risk"], reference.event_table.loc[table.index, "at_risk"])
    assert table["censored"].iloc[-1] == 6  # the longest follow-ups, censored at the last step


def test_a_single_longest_follow_up_is_hidden_in_the_last_step():
    frame = pd.DataFrame({"t": list(range(1, 21)) + [99], "e": [1] * 20 + [0]})
    table = _km_table(frame)
    assert table.index.max() < 99 and table.index[1] >= 5
    assert (table["at_risk"] >= M).all()
    assert set(table["events"].iloc[1:]) <= {0} | set(range(M, 100))


def test_km_row_sets_are_each_step_and_each_risk_set():
    analysis = get_analysis("kaplan_meier")
    params = analysis.parse_params({"duration": "t", "event": "e", "max_time": 100})
    frame = pd.DataFrame({"t": list(range(1, 21)) + [np.nan], "e": [1] * 20 + [0]})
    sets = analysis.row_sets(params, frame, 1, {"groups": ["all"]}, POLICY)
    assert sets and all(len(s) == len(frame) and s.sum() >= M and not s[-1] for s in sets)


# --- broadcast checks --------------------------------------------------------------------------

def _memory(**released: list[str]) -> dict:
    return {"released": {0: dict(released)}}


@pytest.mark.parametrize("name", ["kaplan_meier", "logrank"])
def test_survival_broadcasts_are_checked_and_pinned(name):
    analysis = get_analysis(name)
    params = analysis.parse_params({"duration": "t", "event": "e", "by": "g"})
    with pytest.raises(BroadcastRefused) as error:
        analysis.check_broadcast(params, 0, {"groups": ["a"]}, _memory())
    assert error.value.rule == "unexpected_broadcast"
    hostile = [({"groups": ["a", "b"], "grid": [0, 1]}, "broadcast_malformed"),
               ({"groups": "a"}, "broadcast_malformed"),
               ({"groups": [1, 2]}, "broadcast_malformed"),
               ({"groups": ["a", "a"]}, "broadcast_malformed"),
               ({"groups": ["x"] * 2000}, "broadcast_malformed"),
               ({"groups": ["b"]}, "broadcast_mismatch")]
    for broadcast, rule in hostile:
        with pytest.raises(BroadcastRefused) as error:
            analysis.check_broadcast(params, 1, broadcast, _memory(groups=["a"]))
        assert error.value.rule == rule
    memory = _memory(groups=["a"])
    analysis.check_broadcast(params, 1, {"groups": ["a", "b"]}, memory)
    assert memory["groups"] == ["a", "b"]
    with pytest.raises(BroadcastRefused) as error:
        analysis.check_broadcast(params, 1, {"groups": ["a", "c"]}, memory)
    assert error.value.rule == "broadcast_changed"
    with pytest.raises(BroadcastRefused) as error:
        analysis.check_broadcast(params, 2, {"groups": ["a", "b"]}, memory)
    assert error.value.rule == "unexpected_round"


def _cox_params(**extra):
    return get_analysis("coxph").parse_params({"duration": "t", "event": "e", "covariates": ["x", "z"],
                                               "max_time": 100, **extra})


def _fit_broadcast(**changes) -> dict:
    return {"strata": ["all"], "beta": np.zeros(2), "event_slots": [[10, 20, 30]], **changes}


def test_cox_broadcasts_are_checked_against_earlier_rounds():
    analysis, params = get_analysis("coxph"), _cox_params()
    memory = _memory(strata=["all"])
    analysis.check_broadcast(params, 1, {"strata": ["all"]}, memory)
    analysis.check_broadcast(params, 2, _fit_broadcast(), memory)
    hostile = [(_fit_broadcast(beta=np.array([np.nan, 0.0])), "broadcast_malformed"),
               (_fit_broadcast(beta=np.array([1e6, 0.0])), "broadcast_malformed"),
               (_fit_broadcast(beta=np.zeros(3)), "broadcast_malformed"),
               (_fit_broadcast(event_slots=[[10, 20, 5000]]), "broadcast_malformed"),
               (_fit_broadcast(event_slots=[[20, 10, 30]]), "broadcast_malformed"),
               (_fit_broadcast(event_slots=[[10, 20, 30], [1]]), "broadcast_malformed"),
               (_fit_broadcast(event_slots=[[10, 20, 31]]), "broadcast_changed"),
               (_fit_broadcast(strata=["all", "other"]), "broadcast_mismatch"),
               (dict(_fit_broadcast(), code="print(1)"), "broadcast_malformed")]
    for broadcast, rule in hostile:
        with pytest.raises(BroadcastRefused) as error:
            analysis.check_broadcast(params, 3, broadcast, memory)
        assert error.value.rule == rule, broadcast
    fitted = np.array([0.5, -0.25])
    analysis.check_broadcast(params, 3, _fit_broadcast(beta=fitted), memory)
    edges = {"concordance_edges": np.array([-1.0, 0.0, 1.0]), "concordance_slots": [10, 20, 30]}
    with pytest.raises(BroadcastRefused) as error:
        analysis.check_broadcast(params, 4, _fit_broadcast(beta=np.array([9.0, 0.0]), **edges), memory)
    assert error.value.rule == "broadcast_changed"
    with pytest.raises(BroadcastRefused) as error:
        analysis.check_broadcast(params, 4, _fit_broadcast(beta=fitted, **dict(edges, concordance_slots=[20])), memory)
    assert error.value.rule == "broadcast_mismatch"
    analysis.check_broadcast(params, 4, _fit_broadcast(beta=fitted, **edges), memory)
    with pytest.raises(BroadcastRefused) as error:
        analysis.check_broadcast(params, 5, _fit_broadcast(beta=fitted), memory)
    assert error.value.rule == "unexpected_round"


def _cox_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"t": rng.integers(1, 90, n), "e": rng.integers(0, 2, n), "x": rng.normal(size=n),
                         "z": rng.normal(size=n)})


def test_cox_refuses_a_covariate_that_singles_out_a_patient():
    analysis, params = get_analysis("coxph"), _cox_params()
    frame = _cox_frame().assign(z=0.0)
    frame.loc[7, "z"] = 1.0
    analysis.local(params, 0, {}, SiteContext("s", frame, POLICY, {}, {}))
    with pytest.raises(DisclosureRefused) as error:
        analysis.local(params, 1, {"strata": ["all"]}, SiteContext("s", frame, POLICY, {}, {}))
    assert error.value.rule == "indicator_isolation"


def test_cox_refuses_coefficients_under_which_one_row_dominates():
    analysis, params = get_analysis("coxph"), _cox_params()
    frame = _cox_frame()
    scratch: dict = {}
    analysis.local(params, 1, {"strata": ["all"]}, SiteContext("s", frame, POLICY, scratch, {}))
    slots = sorted(set(scratch["prepared"]["slots"][scratch["prepared"]["events"]].tolist()))
    honest = analysis.local(params, 2, _fit_broadcast(event_slots=[slots]), SiteContext("s", frame, POLICY, scratch, {}))
    assert "s0_0" in honest.sums
    with pytest.raises(DisclosureRefused) as error:
        analysis.local(params, 2, _fit_broadcast(beta=np.array([60.0, 0.0]), event_slots=[slots]),
                       SiteContext("s", frame, POLICY, scratch, {}))
    assert error.value.rule == "weight_dominance"


def test_cox_checks_saturation_on_every_fit_round():
    analysis = get_analysis("coxph")
    params = analysis.parse_params({"duration": "t", "event": "e", "covariates": ["x", "z"], "strata": "s",
                                    "max_time": 100})
    frame = _cox_frame(40).assign(s=["big"] * 35 + ["small"] * 5)
    analysis.local(params, 0, {}, SiteContext("s", frame, POLICY, {}, {}))
    with pytest.raises(DisclosureRefused) as error:
        analysis.local(params, 1, {"strata": ["small"]}, SiteContext("s", frame, POLICY, {}, {}))
    assert error.value.rule == "saturation"
