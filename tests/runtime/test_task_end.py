"""A finished task's notice rides on the researcher's next step: the sites that said they keep
state for it drop its scratch and secure-aggregation record then, and refuse any later step of it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.runtime.grid import RefusedError, Step


def _sites() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"x": rng.normal(size=300), "z": rng.normal(size=300)})
    frame["y"] = 1.5 * frame["x"] - frame["z"] + rng.normal(size=300)
    return {"site_a": frame.iloc[:160].reset_index(drop=True), "site_b": frame.iloc[160:].reset_index(drop=True)}


def _holds(fed: mv.Federation, task: str) -> dict[str, bool]:
    return {site: node.scratch.holds(task) for site, node in fed.network.nodes.items()}


def test_the_next_step_ends_the_finished_task_at_the_sites_that_keep_its_state():
    with mv.Federation.in_process(_sites(), secure_aggregation=False) as fed:
        first = fed.glm("y ~ x + z").provenance["task"]
        assert _holds(fed, first) == {"site_a": True, "site_b": True}  # the design matrix, kept across rounds
        fed.ping()
        assert _holds(fed, first) == {"site_a": False, "site_b": False}
        for node in fed.network.nodes.values():
            assert node.store.task_state(first).memory["ended"] is True
        grid = fed.session.grid
        late = Step(first, 50, "compute", 0, "glm", {site: {"params": {"formula": "y ~ x + z"}} for site in fed.sites},
                    {site: "default" for site in fed.sites})
        with pytest.raises(RefusedError) as caught:
            grid.exchange(late, timeout=30)
        assert {rule for _, rule, _ in caught.value.refusals} == {"task_ended"}


def test_closing_the_session_sends_what_no_later_step_carried():
    with mv.Federation.in_process(_sites(), secure_aggregation=False) as fed:
        task = fed.glm("y ~ x + z").provenance["task"]
        nodes = fed.network.nodes
        assert all(node.scratch.holds(task) for node in nodes.values())
        fed.session.close()
        assert not any(node.scratch.holds(task) for node in nodes.values())


def test_a_ping_leaves_nothing_to_announce():
    with mv.Federation.in_process(_sites(), secure_aggregation=False) as fed:
        fed.ping()
        assert fed.session._ended.sites() == []


@pytest.mark.parametrize("ended", ["not-a-list", ["ok", 7], [f"t{i}" for i in range(65)]])
def test_a_malformed_notice_is_refused(ended):
    with mv.Federation.in_process(_sites(), secure_aggregation=False) as fed:
        step = Step("t-notice", 0, "compute", 0, "ping", {site: {"params": {}, "ended": ended} for site in fed.sites},
                    {site: "default" for site in fed.sites})
        with pytest.raises(RefusedError) as caught:
            fed.session.grid.exchange(step, timeout=30)
        assert {rule for _, rule, _ in caught.value.refusals} == {"malformed"}
