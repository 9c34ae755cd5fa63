"""Red-team tests of the survival analyses: a hostile researcher tries to read one patient
through Kaplan-Meier, log-rank or Cox, with a study approved the ordinary way.

The sites hold one patient who alone has the longest follow-up, one patient alone in a group
(and stratum) that another site holds often, and one patient alone flagged by a 0/1 column.
Each test asserts the protective coarsening or the named refusal, and that what came out (the
result, and the pooled sums the researcher decodes) never rests on fewer than min_cell_count
patients, nor shows a minimum or maximum time.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.cox import CoxPH
from medveil.analyses.survival import KaplanMeier, Logrank, released_durations
from medveil.privacy.disclosure import DisclosurePolicy
from raw_tasks import refusal_rules, send_raw

pytestmark = pytest.mark.e2e

M = DisclosurePolicy().min_cell_count
LONGEST = 1500.0
COLUMNS = ["t", "e", "grp", "x", "z", "flag"]


def _site(seed: int, n: int, rare: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"t": rng.integers(1, 400, n).astype(float), "e": rng.integers(0, 2, n),
                          "grp": rng.choice(["x", "y"], n), "x": rng.normal(size=n), "z": rng.normal(size=n),
                          "flag": 0.0})
    frame.loc[: rare - 1, "grp"] = "rare"
    return frame


@pytest.fixture(scope="module")
def sites() -> dict[str, pd.DataFrame]:
    lonely = _site(1, 60, rare=1)
    lonely.loc[59, ["t", "e"]] = [LONGEST, 0]  # the longest follow-up, one patient
    lonely.loc[30, "flag"] = 1.0  # a 0/1 column that singles out one patient
    return {"site_a": lonely, "site_b": _site(2, 60, rare=30), "site_c": _site(3, 50, rare=0)}


@pytest.fixture(scope="module")
def fed(sites):
    with mv.Federation.simulate(sites, timeout=60) as federation:
        federation.plain = federation.network.add_study("plain", {"default": COLUMNS}, secure_aggregation=False)
        yield federation


@pytest.fixture
def decoded(monkeypatch):
    """The pooled sums the researcher decodes in each round of kaplan_meier, logrank and coxph."""
    seen: list[dict[str, np.ndarray]] = []
    for cls in (KaplanMeier, Logrank, CoxPH):
        original = cls.global_step

        def spy(self, params, round_no, aggregated, state, _original=original):
            seen.append({name: np.asarray(value) for name, value in aggregated.sums.items()})
            return _original(self, params, round_no, aggregated, state)

        monkeypatch.setattr(cls, "global_step", spy)
    return seen


def _assert_no_small_count(values: np.ndarray) -> None:
    counts = np.asarray(values).ravel()
    assert not np.any((counts > 0.5) & (counts < M - 0.5)), "a released count rests on fewer than m patients"


def _assert_protected_table(table: pd.DataFrame) -> None:
    steps = table.iloc[1:]
    _assert_no_small_count(table["at_risk"])
    _assert_no_small_count(steps["events"])
    _assert_no_small_count(steps["censored"])
    assert table.index.max() < LONGEST


def _released_rows(sites: dict[str, pd.DataFrame], by: str | None = None) -> pd.DataFrame:
    frames = [released_durations(frame, "t", "e", M, by=by) for frame in sites.values()]
    return pd.concat(frames, ignore_index=True).dropna(subset=["t"])


def test_km_never_shows_the_single_longest_follow_up(fed, decoded):
    result = fed.kaplan_meier("t", "e")
    table = result.tables["all"]
    _assert_protected_table(table)
    counts = decoded[-1]
    _assert_no_small_count(counts["events"])
    _assert_no_small_count(counts["removed"] - counts["events"])
    assert not counts["removed"][0, int(LONGEST):].any()
    last = table.index[-1]
    assert table.loc[last, "censored"] >= M  # the longest follow-ups sit, censored, in the last step


def test_km_by_a_group_that_isolates_one_patient(fed, sites, decoded):
    result = fed.kaplan_meier("t", "e", by="grp")
    for table in result.tables.values():
        _assert_protected_table(table)
    _assert_no_small_count(decoded[-1]["events"])
    _assert_no_small_count(decoded[-1]["removed"])
    # site_a's lone "rare" patient never enters the pooled "rare" table; site_b's thirty do.
    assert result.tables["rare"]["at_risk"].iloc[0] == 30


def test_a_time_unit_so_fine_that_each_patient_sits_alone(fed, decoded):
    jittered = fed.kaplan_meier("t", "e", time_unit=0.01, max_time=2000.0)
    _assert_protected_table(jittered.tables["all"])
    _assert_no_small_count(decoded[-1]["events"])
    _assert_no_small_count(decoded[-1]["removed"])


def test_logrank_with_a_tiny_group(fed, sites, decoded):
    result = fed.logrank("t", "e", "grp")
    _assert_no_small_count(result.observed.to_numpy())
    _assert_no_small_count(decoded[-1]["events"])
    rows = _released_rows(sites, "grp")
    assert result.observed["rare"] == rows.loc[rows["grp"] == "rare", "e"].sum()


def test_cox_with_a_stratum_of_one_patient(fed, sites, decoded):
    result = fed.coxph("t", "e", ["x", "z"], strata="grp")
    rows = _released_rows(sites, "grp")
    assert result.nobs == len(rows)  # site_a's lone "rare" patient is left out at site_a
    _assert_no_small_count(decoded[1]["events"])


def test_cox_covariate_that_singles_out_one_patient_is_refused(fed):
    with pytest.raises(mv.RefusedError) as error:
        fed.coxph("t", "e", ["x", "flag"])
    assert {(site, rule) for site, rule, _ in error.value.refusals} == {("site_a", "indicator_isolation")}


# --- raw tasks a well-behaved session never sends -------------------------------------------------

def _send(fed, task: str, step: int, round_no: int, analysis: str, params: dict, broadcast: dict | None = None) -> dict:
    """One raw compute step of the plain study to every site."""
    return send_raw(fed, "plain", task, step, round_no, analysis, params, broadcast)


def _ok(answers: dict) -> bool:
    return all(status == "ok" for status, _ in answers.values())


COX = {"duration": "t", "event": "e", "covariates": ["x", "z"], "max_time": 2000.0}
KM = {"duration": "t", "event": "e", "by": "grp", "max_time": 2000.0}


def _cox_fit_round(fed, task: str) -> list[int]:
    """Rounds 0 and 1 of a Cox task, as a session would send them; the pooled event times."""
    assert _ok(_send(fed, task, 0, 0, "coxph", COX))
    counts = _send(fed, task, 1, 1, "coxph", COX, {"strata": ["all"]})
    assert _ok(counts)
    pooled = sum(body["sums"]["events"] for _, body in counts.values())
    _assert_no_small_count(pooled)
    return np.flatnonzero(pooled[0]).tolist()


def test_cox_coefficients_that_make_one_patient_dominate_are_refused(fed):
    slots = _cox_fit_round(fed, "t-cox-softmax")
    attack = _send(fed, "t-cox-softmax", 2, 2, "coxph", COX,
                   {"strata": ["all"], "beta": np.array([80.0, 0.0]), "event_slots": [slots]})
    assert refusal_rules(attack) == {"weight_dominance"}
    assert all("sums" not in body for status, body in attack.values() if status == "ok")


def test_cox_event_times_the_node_never_agreed_are_refused(fed):
    slots = _cox_fit_round(fed, "t-cox-times")
    off_grid = _send(fed, "t-cox-times", 2, 2, "coxph", COX,
                     {"strata": ["all"], "beta": np.zeros(2), "event_slots": [slots + [10 ** 7]]})
    assert refusal_rules(off_grid) == {"broadcast_malformed"}
    first = _send(fed, "t-cox-times", 3, 2, "coxph", COX,
                  {"strata": ["all"], "beta": np.zeros(2), "event_slots": [slots]})
    assert _ok(first)
    shifted = _send(fed, "t-cox-times", 4, 3, "coxph", COX,
                    {"strata": ["all"], "beta": np.zeros(2), "event_slots": [[s + 1 for s in slots]]})
    assert refusal_rules(shifted) == {"broadcast_changed"}


def test_cox_strata_the_sites_never_released_are_refused(fed):
    assert _ok(_send(fed, "t-cox-strata", 0, 0, "coxph", COX))
    answers = _send(fed, "t-cox-strata", 1, 1, "coxph", COX, {"strata": ["all", "ssn-123"]})
    assert refusal_rules(answers) == {"broadcast_mismatch"}


def test_km_groups_and_rounds_the_sites_never_agreed_are_refused(fed):
    first = _send(fed, "t-km-groups", 0, 0, "kaplan_meier", KM)
    assert _ok(first)
    dropped = _send(fed, "t-km-groups", 1, 1, "kaplan_meier", KM, {"groups": ["rare"]})
    assert refusal_rules(dropped) == {"broadcast_mismatch"}
    assert _ok(_send(fed, "t-km-groups", 2, 1, "kaplan_meier", KM, {"groups": ["rare", "x", "y"]}))
    again = _send(fed, "t-km-groups", 3, 2, "kaplan_meier", KM, {"groups": ["rare"]})
    assert refusal_rules(again) == {"unexpected_round"}
