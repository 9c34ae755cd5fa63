"""Disclosure rules and the differential-privacy budget, end to end over loopback HTTP."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import medveil as mv
from medveil.cli import app
from medveil.runtime.session import ResearcherSession

pytestmark = pytest.mark.e2e


def _frame(seed: int, n: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x": rng.normal(size=n), "grade": rng.choice(["a", "b"], n),
                          "code": [f"c{i}" for i in range(n)]})
    frame["y"] = frame["x"].copy()
    frame.loc[:1, "y"] = np.nan  # two rows lack y
    return frame


def test_differencing_guard_refuses_row_sets_differing_by_a_few_patients():
    with mv.Federation.simulate({"a": _frame(1), "b": _frame(2)}) as fed:
        fed.describe("x")
        with pytest.raises(mv.RefusedError) as error:
            fed.describe("y")
        assert error.value.rule == "differencing"
        fed.describe("x")  # the same rows again reveal nothing new


def test_max_levels_refuses_identifier_like_variables():
    with mv.Federation.simulate({"a": _frame(1), "b": _frame(2)}) as fed:
        with pytest.raises(mv.RefusedError) as error:
            fed.crosstab("code")
        assert error.value.rule == "max_levels"


def test_dp_budget_runs_out_and_stays_out_after_a_node_restart(tmp_path):
    sites = {"a": _frame(1, 400), "b": _frame(2, 400)}
    with mv.Federation.simulate(sites, processes=True, workdir=tmp_path, timeout=20) as fed:
        spec = fed.network.add_study("dp-study", {"default": ["x", "grade"]}, dp_rho_per_release=0.3)
        session = ResearcherSession(fed.network.researcher, spec, timeout=20)
        edges = [-3.0, -1.0, 0.0, 1.0, 3.0]
        outcome = session.run("histogram", {"variable": "x", "edges": edges}, "default")
        assert outcome.provenance["dp_rho_spent"] == {"a": 0.3, "b": 0.3}
        assert outcome.provenance["rows"] == {}  # exact per-site row counts never leave under DP
        exact, _ = np.histogram(pd.concat(sites.values())["x"], bins=edges)
        noisy = outcome.result["count"].to_numpy(dtype=float)[1:-1]
        assert np.all(np.abs(noisy - exact) < 40)
        session.run("histogram", {"variable": "x", "edges": edges}, "default")
        session.run("crosstab", {"row": "grade", "levels": {"grade": ["a", "b"]}}, "default")
        with pytest.raises(mv.RefusedError) as error:
            session.run("histogram", {"variable": "x", "edges": edges}, "default")
        assert error.value.rule == "dp_budget_exhausted"
        with pytest.raises(mv.RefusedError) as error:
            session.run("describe", {"variables": ["x"]}, "default")
        # describe has no DP release: every site says so before it looks at the (spent) budget
        assert sorted((site, rule) for site, rule, _ in error.value.refusals) == [("a", "dp_unsupported"),
                                                                                 ("b", "dp_unsupported")]
        runner = fed.network.nodes["a"]
        runner.stop()
        runner.start()
        with pytest.raises(mv.RefusedError) as error:
            session.run("histogram", {"variable": "x", "edges": edges}, "default")
        assert {site for site, rule, _ in error.value.refusals if rule == "dp_budget_exhausted"} == {"a", "b"}
    status = CliRunner().invoke(app, ["node", "status", "--config", str(tmp_path / "a" / "site.yaml")])
    assert status.exit_code == 0, status.output
    assert "dp-study" in status.output and "0.1 of 1" in status.output


def test_under_dp_a_crosstab_releases_no_exact_level_list_or_row_count():
    with mv.Federation.simulate({"a": _frame(1, 200), "b": _frame(2, 200)}) as fed:
        spec = fed.network.add_study("dp-levels", {"default": ["x", "grade"]}, dp_rho_per_release=0.1)
        session = ResearcherSession(fed.network.researcher, spec, timeout=30)
        with pytest.raises(mv.RefusedError) as error:
            session.run("crosstab", {"row": "grade"}, "default")
        assert {rule for _, rule, _ in error.value.refusals} == {"dp_exact_release"}
        outcome = session.run("crosstab", {"row": "grade", "levels": {"grade": ["a", "b"]}}, "default")
        assert outcome.provenance["rows"] == {}
        assert list(outcome.result.index[:2]) == ["a", "b"]
        exact = pd.concat([_frame(1, 200), _frame(2, 200)])["grade"].value_counts()
        noisy = outcome.result["count"].to_numpy(dtype=float)[:2]
        assert np.all(np.abs(noisy - exact[["a", "b"]].to_numpy()) < 60)
