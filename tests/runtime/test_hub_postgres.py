"""The hub on a real PostgreSQL server: a federation runs on it and survives a hub restart. (The
hub store's own tests, tests/runtime/test_hub_store.py, run on PostgreSQL too when it is up.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv


@pytest.mark.postgres
def test_federation_on_postgres_survives_hub_restart(postgres_url):
    rng = np.random.default_rng(3)
    sites = {name: pd.DataFrame({"x": rng.normal(size=30), "g": rng.choice(["a", "b"], 30)}) for name in "abc"}
    pooled = pd.concat(sites.values())
    with mv.Federation.simulate(sites, hub_db=postgres_url, record_hub_traffic=True, timeout=20) as fed:
        first = fed.describe("x")
        fed.network.hub.stop()
        fed.network.hub.start()
        table = fed.crosstab("g")
        assert first.loc["x", "n"] == 90
        assert abs(first.loc["x", "mean"] - pooled["x"].mean()) < 1e-12
        assert table["count"].sum() == 90
        assert {"task", "reply"} <= set(fed.hub_traffic()["kind"])
