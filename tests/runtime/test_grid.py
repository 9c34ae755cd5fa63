"""The Grid seam: both grids verify replies alike, refusals name site and rule, and a step with
per-site bodies reaches each site with its own body only."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses import base
from medveil.analyses.base import Aggregated, Analysis, BroadcastRefused, Finished, NextRound, Params, Release
from medveil.crypto.signing import SigningKey
from medveil.runtime.grid import (
    FederationError,
    InProcessGrid,
    RefusedError,
    SiteTimeoutError,
    Step,
    check_replies,
    seal_step,
)
from medveil.runtime.wire import seal

SITES = ["site_a", "site_b", "site_c"]


class EchoParams(Params):
    pass


class Echo(Analysis[EchoParams]):
    """Test-only: round 0 asks each site for nothing; round 1 sends each site its own word,
    which the site releases back (so a site that got another's body would say so)."""

    name = "grid_echo"
    Params = EchoParams
    releases_sums = False

    def variables(self, params: EchoParams) -> list[str]:
        return []

    def check_broadcast(self, params: EchoParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        if set(broadcast) - {"word"}:
            raise BroadcastRefused("unexpected_broadcast", "only a word")

    def local(self, params: EchoParams, round_no: int, broadcast: dict[str, Any], context: Any) -> Release:
        return Release(public={"word": broadcast.get("word"), "site": context.site})

    def global_step(self, params: EchoParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            return NextRound({}, per_site={site: {"word": f"for-{site}"} for site in aggregated.public})
        return Finished({site: facts["word"] for site, facts in aggregated.public.items()})


@pytest.fixture(scope="module")
def fed():
    base.register(Echo)
    frames = {site: pd.DataFrame({"x": np.arange(20.0) + i}) for i, site in enumerate(SITES)}
    try:
        with mv.Federation.in_process(frames) as federation:
            yield federation
    finally:
        base._REGISTRY.pop(Echo.name, None)


def _grid(fed) -> InProcessGrid:
    return fed.session.grid


def _ping(task: str, step: int = 0, sites: list[str] = SITES) -> Step:
    return Step(task, step, "compute", 0, "ping", {s: {"params": {}, "broadcast": {}} for s in sites},
                {s: "default" for s in sites})


def test_per_site_bodies_reach_only_their_site(fed):
    result = fed.run("grid_echo").result
    assert result == {site: f"for-{site}" for site in SITES}
    grid = _grid(fed)
    step1 = [e for e in grid.traffic if e.kind == "task" and e.header["analysis"] == "grid_echo"
             and e.header["step"] == 1]
    assert len(step1) == 3  # one envelope per distinct body
    assert sorted(site for e in step1 for site in e.header["recipients"]) == SITES  # disjoint, covering
    for envelope in step1:
        (site,) = envelope.header["recipients"]
        assert envelope.body()["broadcast"] == {"word": f"for-{site}"}


def test_identical_bodies_travel_as_one_envelope(fed):
    envelopes = seal_step(_grid(fed).seal, fed.study.id, _ping("t-one"))
    assert len(envelopes) == 1 and envelopes[0].header["recipients"] == SITES


def test_a_refusal_is_raised_naming_the_site_and_the_rule(fed):
    grid = _grid(fed)
    step = Step("t-refused", 0, "compute", 0, "run_python", {s: {"params": {}} for s in SITES},
                {s: "default" for s in SITES})
    with pytest.raises(RefusedError) as error:
        grid.exchange(step, timeout=5)
    assert error.value.refusals[0][:2] == ("site_a", "unknown_analysis")
    assert {(site, rule) for site, rule, _ in error.value.refusals} == {(s, "unknown_analysis") for s in SITES}


def _reply(key: SigningKey, study: str, task: str, step: int, sender: str = "site_a", round_no: int = 0):
    return seal(key, {"kind": "reply", "sender": sender, "nonce": f"n-{task}-{step}-{time.time_ns()}",
                      "issued_at": time.time(), "study": study, "task": task, "step": step, "round": round_no,
                      "status": "ok"}, {"sums": {}, "public": {"rows": 1}})


def _node_key(fed, site: str = "site_a") -> SigningKey:
    return fed.network.nodes[site].client.key


def test_a_forged_reply_is_refused(fed):
    forged = _reply(SigningKey.generate(), fed.study.id, "t-forged", 0)
    with pytest.raises(FederationError, match="forged"):
        check_replies(fed.study, "t-forged", 0, 0, [forged], ["site_a"], fed.study.site_key, max_bytes=1 << 20,
                      timeout=1)


@pytest.mark.parametrize("field, value", [("step", 1), ("task", "t-other"), ("study", "other"), ("round", 3)])
def test_a_reply_bound_to_another_step_is_refused(fed, field, value):
    bound = {"study": fed.study.id, "task": "t-bound", "step": 0, "round_no": 0}
    bound["round_no" if field == "round" else field] = value
    reply = _reply(_node_key(fed), bound["study"], bound["task"], bound["step"], round_no=bound["round_no"])
    with pytest.raises(FederationError, match="bound to another"):
        check_replies(fed.study, "t-bound", 0, 0, [reply], ["site_a"], fed.study.site_key, max_bytes=1 << 20,
                      timeout=1)


def test_a_genuine_reply_passes_and_a_missing_site_times_out(fed):
    reply = _reply(_node_key(fed), fed.study.id, "t-ok", 0)
    replies = check_replies(fed.study, "t-ok", 0, 0, [reply], ["site_a"], fed.study.site_key, max_bytes=1 << 20,
                            timeout=1)
    assert replies["site_a"].body["public"] == {"rows": 1}
    with pytest.raises(SiteTimeoutError) as error:
        check_replies(fed.study, "t-ok", 0, 0, [reply], ["site_a", "site_b"], fed.study.site_key,
                      max_bytes=1 << 20, timeout=1)
    assert error.value.sites == ["site_b"]


def test_a_reply_from_a_site_not_asked_is_ignored(fed):
    reply = _reply(_node_key(fed, "site_c"), fed.study.id, "t-unasked", 0, sender="site_c")
    assert check_replies(fed.study, "t-unasked", 0, 0, [reply], ["site_a"], fed.study.site_key,
                         max_bytes=1 << 20, timeout=1, tolerate_missing=True) == {}


def test_the_in_process_grid_answers_senders_from_the_replies_it_holds(fed):
    grid = _grid(fed)
    replies = grid.exchange(_ping("t-senders", sites=["site_a", "site_b"]), timeout=5)
    assert sorted(replies) == ["site_a", "site_b"]
    assert grid.senders("t-senders", 0) == {"site_a", "site_b"}
    assert grid.senders("t-senders", 1) == set()


def test_a_journalled_step_is_resent_not_resealed(fed, tmp_path):
    from medveil.runtime.runs import RunStore

    grid = _grid(fed)
    journal = RunStore(tmp_path).open("t-journal")
    first = grid.exchange(_ping("t-journal"), timeout=5, journal=journal)
    sealed = journal.sealed(0)
    again = grid.exchange(_ping("t-journal"), timeout=5, journal=RunStore(tmp_path).open("t-journal"))
    assert [e.encode() for e in seal_step(grid.seal, fed.study.id, _ping("t-journal"))] != sealed  # fresh nonces
    assert {s: r.envelope.encode() for s, r in again.items()} == {s: r.envelope.encode() for s, r in first.items()}
