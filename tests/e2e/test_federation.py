"""End-to-end: a real hub and three real nodes over loopback HTTP, against pandas on the pooled data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.runtime.audit import read_audit_log, verify_audit_log
from tests.conftest import split_uneven

pytestmark = pytest.mark.e2e
NUMERIC = ["age", "tsize", "pnodes", "progrec", "estrec", "time"]


@pytest.fixture(scope="module")
def pooled(gbsg2) -> pd.DataFrame:
    return gbsg2


@pytest.fixture(scope="module")
def fed(pooled):
    with mv.Federation.simulate(split_uneven(pooled), record_hub_traffic=True) as federation:
        yield federation


def test_describe_equals_pandas_on_pooled_data(fed, pooled):
    result = fed.describe(NUMERIC)
    expected = pooled[NUMERIC]
    assert list(result.index) == NUMERIC
    assert (result["n"].to_numpy() == expected.count().to_numpy()).all()
    np.testing.assert_allclose(result["mean"], expected.mean(), rtol=1e-12)
    np.testing.assert_allclose(result["sd"], expected.std(), rtol=1e-12)
    assert not {"min", "max"} & set(result.columns)
    for name in NUMERIC:
        grid_step = 8 * result.loc[name, "sd"] / 400
        assert abs(result.loc[name, "50%"] - expected[name].median()) <= max(grid_step, 1.0)


def test_crosstab_equals_pandas_where_released(fed, pooled):
    result = fed.crosstab("tgrade", "menostat")
    expected = pd.crosstab(pooled["tgrade"], pooled["menostat"])
    suppressed = result.attrs["suppressed"]
    for row in expected.index:
        for col in expected.columns:
            if suppressed.loc[row, col]:
                assert result.loc[row, col] is pd.NA
            else:
                assert result.loc[row, col] == expected.loc[row, col]
    assert not suppressed.to_numpy().all()


def test_small_cells_are_suppressed_and_marked(fed, pooled):
    result = fed.crosstab("pnodes")
    counts = pooled["pnodes"].astype(str).value_counts()
    rare = counts[counts < 5].index
    assert len(rare) > 0
    for level in rare.intersection(result.index):
        assert result.attrs["suppressed"].loc[level, "count"]
        assert result.loc[level, "count"] is pd.NA


def test_histogram_equals_numpy(fed, pooled):
    edges = [0, 500, 1000, 1500, 2000, 2500, 3000]
    result = fed.histogram("time", edges)
    inner, _ = np.histogram(pooled["time"], bins=edges)
    inner_bins = result.iloc[1:-1]
    released = ~inner_bins["suppressed"].to_numpy()
    assert released.sum() >= 4  # one small bin, and one more hidden beside it (secondary suppression)
    assert (inner_bins["count"].to_numpy(dtype=float)[released] == inner[released]).all()
    assert inner_bins["count"][~released].isna().all()


def test_provenance_and_audit(fed, pooled):
    result = fed.describe(["age"])
    provenance = result.attrs["provenance"]
    assert provenance["sites"] == ["site_a", "site_b", "site_c"]
    assert sum(provenance["rows"].values()) == len(pooled)
    assert provenance["secure_aggregation"] is True
    for site in provenance["sites"]:
        path = fed.network.workdir / site / "state" / "audit.jsonl"
        assert verify_audit_log(path) > 0
        ids = {entry["id"] for entry in read_audit_log(path)}
        assert set(provenance["audit_ids"][site]) <= ids
        kinds = {entry["kind"] for entry in read_audit_log(path) if entry["id"] in provenance["audit_ids"][site]}
        assert {"request", "decision", "release"} <= kinds


def test_hub_traffic_holds_every_relayed_message(fed):
    before = len(fed.hub_traffic())
    fed.ping()
    traffic = fed.hub_traffic().iloc[before:]
    task = traffic[(traffic["kind"] == "task") & (traffic["phase"] == "compute")]["task"].iloc[-1]
    ping = traffic[(traffic["task"] == task) & (traffic["step"] == 0)]
    assert list(ping["kind"]) == ["task"] + ["reply"] * 3
    assert set(ping["sender"]) == {"researcher", "site_a", "site_b", "site_c"}
    assert set(traffic["phase"].dropna()) <= {"compute", "end"}  # the task's "end" step may follow


def test_ping_reaches_every_site(fed):
    assert fed.ping() == ["site_a", "site_b", "site_c"]
