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


def _relayed(traffic: pd.DataFrame) -> list[tuple]:
    """The hub's record, in the order it relayed it, as (kind, sender, task, step, phase) per message."""
    return list(traffic[["kind", "sender", "task", "step", "phase"]].itertuples(index=False, name=None))


def test_killed_node_gives_an_error_naming_it_within_the_timeout_then_recovers():
    """A killed node fails the run with an error naming it once the session's timeout passes; the
    restarted node answers again. Every wait is on a marker or a reply; the timeouts only bound a
    hang, generous enough for a loaded machine (the healthy sites answer a long-poll in far less)."""
    sites = _sites()
    with mv.Federation.simulate(sites, processes=True, timeout=120) as fed:
        assert fed.describe("x").loc["x", "n"] == 120
        runner = fed.network.nodes["site_b"]
        runner.kill()
        fed.session.timeout = 20  # the killed site can never answer; the other two have 20 s to
        with pytest.raises(mv.SiteTimeoutError) as error:
            fed.describe("x")
        assert error.value.sites == ["site_b"]
        assert "site_b" in str(error.value)
        fed.session.timeout = 120
        runner.start()
        runner.wait_until_polling()
        pooled = pd.concat(sites.values())["x"]
        result = fed.describe("x")
        assert result.loc["x", "n"] == 120
        assert abs(result.loc["x", "mean"] - pooled.mean()) < 1e-12


def test_hub_restart_between_queries_loses_nothing():
    sites = _sites()
    with mv.Federation.simulate(sites, timeout=20, record_hub_traffic=True) as fed:
        first = fed.describe("x")
        before = _relayed(fed.hub_traffic())
        hub = fed.network.hub
        port = hub.port
        hub.stop()
        hub.start()
        assert hub.port == port
        second = fed.describe("x")
        assert second.loc["x", "n"] == first.loc["x", "n"] == 120
        after = _relayed(fed.hub_traffic())
        assert after[:len(before)] == before  # what the hub relayed before its restart is all still there
        for result in (first, second):
            task = result.attrs["provenance"]["task"]
            steps = {step for kind, _, t, step, phase in after if kind == "task" and t == task and phase != "end"}
            assert steps, f"no task message of {task} was recorded"
            for step in steps:  # every site's one reply to every step, recorded once
                senders = sorted(sender for kind, sender, t, s, _ in after
                                 if kind == "reply" and t == task and s == step)
                assert senders == sorted(sites), (task, step, senders)
        deadline = time.monotonic() + 30
        first_task = first.attrs["provenance"]["task"]
        while fed.session.grid.client.task_record(first_task)["status"] != "done" and time.monotonic() < deadline:
            time.sleep(0.1)  # the first result's record is retried until the restarted hub takes it
        assert fed.session.grid.client.task_record(first_task)["status"] == "done"
