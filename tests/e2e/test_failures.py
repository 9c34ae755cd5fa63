"""A node killed mid-study and a hub restarted between queries: errors, not hangs; nothing lost."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

import medveil as mv

pytestmark = pytest.mark.e2e


def _sites() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(11)
    return {name: pd.DataFrame({"x": rng.normal(size=40)}) for name in ("site_a", "site_b", "site_c")}


def test_killed_node_gives_an_error_naming_it_within_the_timeout_then_recovers():
    sites = _sites()
    with mv.Federation.simulate(sites, processes=True, timeout=3) as fed:
        assert fed.describe("x").loc["x", "n"] == 120
        runner = fed.network.nodes["site_b"]
        runner.kill()
        started = time.monotonic()
        with pytest.raises(mv.SiteTimeoutError) as error:
            fed.describe("x")
        assert error.value.sites == ["site_b"]
        assert "site_b" in str(error.value)
        assert time.monotonic() - started < 3 + 5
        runner.start()
        pooled = pd.concat(sites.values())["x"]
        result = fed.describe("x")
        assert result.loc["x", "n"] == 120
        assert abs(result.loc["x", "mean"] - pooled.mean()) < 1e-12


def test_hub_restart_between_queries_loses_nothing():
    sites = _sites()
    with mv.Federation.simulate(sites, timeout=20, record_hub_traffic=True) as fed:
        first = fed.describe("x")
        hub = fed.network.hub
        port = hub.port
        hub.stop()
        hub.start()
        assert hub.port == port
        second = fed.describe("x")
        assert second.loc["x", "n"] == first.loc["x", "n"] == 120
        assert len(fed.hub_traffic()) > 0
        deadline = time.monotonic() + 30
        task_path = f"/v1/tasks/{first.attrs['provenance']['task']}"
        while fed.session.client.get_json(task_path)["status"] != "done" and time.monotonic() < deadline:
            time.sleep(0.1)  # the first result's record is retried until the restarted hub takes it
        assert fed.session.client.get_json(task_path)["status"] == "done"
