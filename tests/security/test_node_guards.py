"""Red-team tests of the node's own task state, guard pipeline, DP accounting and polling loop.

A hostile researcher sends raw task messages (signed with their real key, for a study the
sites approved the ordinary way) that a well-behaved session never would: a task starting at
round 3, a rewound round, parameters changed mid-task, broadcasts the analysis never asked
for, a message the node fails on. Each is refused with a named rule, or quarantined, and the
node goes on serving.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.analyses.base import get_analysis
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.audit import read_audit_log
from medveil.runtime.session import ResearcherSession
from medveil.runtime.wire import canonical_json
from raw_tasks import refusal_rules, send_raw

pytestmark = pytest.mark.e2e

EDGES = [-2.0, 0.0, 2.0]


def _frame(seed: int, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": rng.normal(size=n), "grade": rng.choice(["a", "b"], n)})


@pytest.fixture(scope="module")
def fed():
    policy = DisclosurePolicy(max_broadcast_bytes=4096, dp_budget_rho=1.0)
    with mv.Federation.simulate({"a": _frame(1), "b": _frame(2), "c": _frame(3)}, policy=policy,
                                timeout=30) as federation:
        federation.plain = federation.network.add_study("plain", {"default": ["x", "grade"]},
                                                        secure_aggregation=False)
        yield federation


def test_a_task_cannot_start_at_round_3(fed):
    answers = send_raw(fed, "plain", "t-round3", 0, 3, "histogram", {"variable": "x", "edges": EDGES})
    assert refusal_rules(answers) == {"round_order"}
    assert all(status == "refused" for status, _ in answers.values())


def test_a_round_cannot_be_rewound_or_repeated(fed):
    params = {"variable": "x", "edges": EDGES}
    first = send_raw(fed, "plain", "t-rewind", 0, 0, "histogram", params)
    assert all(status == "ok" for status, _ in first.values())
    again = send_raw(fed, "plain", "t-rewind", 1, 0, "histogram", params)
    assert refusal_rules(again) == {"round_order"}
    assert all("sums" not in body for status, body in again.values() if status == "ok")


def test_parameters_cannot_change_within_a_task(fed):
    """Shifted edges inside one task would difference two histograms; the task pins its parameters."""
    send_raw(fed, "plain", "t-shift", 0, 0, "ping", {})
    shifted = send_raw(fed, "plain", "t-shift", 1, 1, "histogram", {"variable": "x", "edges": EDGES})
    assert refusal_rules(shifted) == {"task_mismatch"}


def test_a_broadcast_the_analysis_never_asks_for_is_refused(fed):
    answers = send_raw(fed, "plain", "t-bcast", 0, 0, "ping", {}, broadcast={"levels": {"x": ["97"]}})
    assert refusal_rules(answers) == {"unexpected_broadcast"}


def test_an_oversized_broadcast_is_refused_before_the_analysis_sees_it(fed):
    answers = send_raw(fed, "plain", "t-big", 0, 0, "ping", {}, broadcast={"filler": np.zeros(1024)})
    assert refusal_rules(answers) == {"broadcast_too_large"}


def test_every_reply_quotes_the_audit_head_and_decisions_digest_what_was_asked(fed):
    params = {"variable": "x", "edges": EDGES}
    client = fed.session.grid.client
    message = client.seal("task", {"params": params, "broadcast": {}}, study="plain", task="t-audit", step=0,
                          phase="compute", round=0, analysis="histogram", dataset="default", recipients=["a"])
    client.post_message(message)
    reply = client.replies("t-audit", 0, wait=30)[0]
    head = reply.header["audit_head"]
    entries = read_audit_log(fed.network.workdir / "a" / "state" / "audit.jsonl")
    by_seq = {entry["seq"]: entry for entry in entries}
    assert by_seq[head["seq"]]["hash"] == head["hash"]
    assert by_seq[head["seq"]]["kind"] == "release"
    decision = next(e for e in entries if e["kind"] == "decision" and e.get("task") == "t-audit")
    parsed = get_analysis("histogram").parse_params(params)
    assert decision["params_sha256"] == hashlib.sha256(canonical_json(parsed.model_dump(mode="json"))).hexdigest()
    assert len(decision["broadcast_sha256"]) == 64


def test_a_message_the_node_fails_on_is_quarantined_and_the_node_goes_on(fed):
    node = fed.network.nodes["a"].node
    original = node.handle
    failed = threading.Event()

    def failing(raw: bytes):
        failed.set()
        raise RuntimeError("simulated failure inside the node")

    node.handle = failing
    try:
        client = fed.session.grid.client
        message = client.seal("task", {"params": {}, "broadcast": {}}, study="plain", task="t-poison", step=0,
                              phase="compute", round=0, analysis="ping", dataset="default", recipients=["a"])
        client.post_message(message)
        assert failed.wait(60)
        audit_path = fed.network.workdir / "a" / "state" / "audit.jsonl"
        deadline = time.monotonic() + 60
        while not any(e["kind"] == "quarantine" for e in read_audit_log(audit_path)):
            assert time.monotonic() < deadline, "the failed message was never quarantined"
            time.sleep(0.05)
    finally:
        node.handle = original
    quarantined = list((fed.network.workdir / "a" / "state" / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].stat().st_mode & 0o777 == 0o600
    assert quarantined[0].read_bytes() == message.encode()
    assert sorted(fed.ping()) == fed.sites  # the node still serves


def test_the_dp_budget_belongs_to_the_researcher_across_studies(fed):
    """A new study of the same researcher does not refill the budget it spent at a site."""
    first = fed.network.add_study("dp-one", {"default": ["x"]}, dp_rho_per_release=0.6)
    second = fed.network.add_study("dp-two", {"default": ["x"]}, dp_rho_per_release=0.6)
    ResearcherSession(fed.network.researcher, first, timeout=30).run(
        "histogram", {"variable": "x", "edges": EDGES}, "default")
    with pytest.raises(mv.RefusedError) as error:
        ResearcherSession(fed.network.researcher, second, timeout=30).run(
            "histogram", {"variable": "x", "edges": EDGES}, "default")
    assert {rule for _, rule, _ in error.value.refusals} == {"dp_budget_exhausted"}


def test_noise_drawn_for_a_release_that_is_then_refused_is_still_charged(fed):
    node = fed.network.nodes["b"].node
    spec = fed.network.add_study("dp-refused", {"default": ["x"]}, dp_rho_per_release=0.25)
    account = node.dp_account(spec)
    before = node.store.budget_spent(account)
    charger = node._privacy_charger(spec)
    noise = node._dp_noise(spec, get_analysis("histogram"), charger)
    noise(np.array([10.0, 20.0]))  # the release would be refused after this point
    assert node.store.budget_spent(account) == pytest.approx(before + 0.25)
    assert json.loads(json.dumps(charger.charged)) == 0.25


def test_a_second_study_of_the_same_researcher_cannot_difference_the_first():
    """Row sets are kept per researcher (name and key), not per study: two histograms whose first
    bins differ by one patient at site a are refused even when each runs in its own study."""
    frame = _frame(1)
    positive = np.sort(frame["x"][frame["x"] > 0].to_numpy())
    one_more = float((positive[0] + positive[1]) / 2)  # [-2, one_more) holds exactly one row more than [-2, 0)
    with mv.Federation.simulate({"a": frame, "b": _frame(2)}, timeout=30) as federation:
        first = federation.network.add_study("diff-one", {"default": ["x"]})
        second = federation.network.add_study("diff-two", {"default": ["x"]})
        ResearcherSession(federation.network.researcher, first, timeout=30).run(
            "histogram", {"variable": "x", "edges": [-10.0, 0.0, 10.0]}, "default")
        with pytest.raises(mv.RefusedError) as error:
            ResearcherSession(federation.network.researcher, second, timeout=30).run(
                "histogram", {"variable": "x", "edges": [-10.0, one_more, 10.0]}, "default")
    assert ("a", "differencing") in {(site, rule) for site, rule, _ in error.value.refusals}
