"""Refusals end to end: each check at the node or hub stops the run with an error naming the site and rule."""

from __future__ import annotations

import socket
import time

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from medveil.crypto.signing import SigningKey
from medveil.data.sources import DataError
from medveil.runtime.client import HubClient, HubError
from medveil.runtime.session import ResearcherSession
from medveil.runtime.wire import open_envelope, seal

pytestmark = pytest.mark.e2e


def _frame(seed: int, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.normal(60, 10, n).round(), "bmi": rng.normal(27, 4, n),
                         "stage": rng.choice(["I", "II", "III"], n), "ssn": rng.integers(1e8, 1e9, n)})


@pytest.fixture(scope="module")
def fed():
    sites = {"site_a": _frame(1), "site_b": _frame(2).drop(columns="bmi"), "site_c": _frame(3)}
    with mv.Federation.simulate(sites, timeout=120) as federation:
        yield federation


def _session(fed, spec) -> ResearcherSession:
    return ResearcherSession(fed.network.researcher, spec, timeout=120)


def test_unapproved_study_is_refused_by_each_site_that_did_not_approve(fed):
    spec = fed.network.add_study("unapproved", {"default": ["age"]}, approved_by=["site_a"])
    with pytest.raises(mv.RefusedError) as error:
        _session(fed, spec).run("describe", {"variables": ["age"]}, "default")
    assert {(site, rule) for site, rule, _ in error.value.refusals} == {
        ("site_b", "study_not_approved"), ("site_c", "study_not_approved")}
    assert "site_b" in str(error.value) and "study_not_approved" in str(error.value)


def test_variable_outside_the_approved_list_is_refused(fed):
    spec = fed.network.add_study("age-only", {"default": ["age", "stage"]})
    assert _session(fed, spec).run("describe", {"variables": ["age"]}, "default").result.loc["age", "n"] == 180
    with pytest.raises(mv.RefusedError) as error:
        _session(fed, spec).run("describe", {"variables": ["ssn"]}, "default")
    assert error.value.rule == "variable_not_approved"
    assert "ssn" in str(error.value)


def test_missing_column_names_the_column_and_site(fed):
    with pytest.raises(mv.RefusedError) as error:
        fed.describe(["bmi"])
    assert error.value.site == "site_b" and error.value.rule == "missing_column"
    assert "bmi" in error.value.detail


def test_unregistered_analysis_is_refused_by_the_node(fed):
    session = fed.session
    task = session.grid.client.seal("task", {"params": {}, "broadcast": {}}, study=fed.study.id, task="t-unknown",
                               step=0, phase="keys", round=0, analysis="run_python", dataset="default", recipients=fed.sites)
    session.grid.client.post_message(task)
    with pytest.raises(mv.RefusedError) as error:
        session.grid.gather("t-unknown", 0, fed.sites, timeout=120)
    assert {rule for _, rule, _ in error.value.refusals} == {"unknown_analysis"}


def test_forged_task_is_refused_by_hub_and_by_node(fed):
    forger = SigningKey.generate()
    header = {"kind": "task", "sender": "researcher", "nonce": "f" * 32, "issued_at": time.time(),
              "study": fed.study.id, "task": "t-forged", "step": 0,
              "phase": "keys", "round": 0, "analysis": "describe", "dataset": "default",
              "recipients": fed.sites}
    forged = seal(forger, header, {"params": {"variables": ["age"]}, "broadcast": {}})
    with pytest.raises(HubError) as hub_error:
        fed.session.grid.client.post_message(forged)
    assert hub_error.value.status == 403 and "forged" in hub_error.value.detail
    assert any(e.kind == "forged" for e in fed.network.hub.store.events())
    node = fed.network.nodes["site_a"].node
    reply = node.handle(forged.encode())
    assert reply.header["status"] == "refused" and reply.body()["rule"] == "bad_signature"


def test_replayed_task_is_refused_by_hub_and_by_node(fed):
    client = fed.session.grid.client
    task = client.seal("task", {"params": {}, "broadcast": {}}, study=fed.study.id, task="t-replay", step=0,
                       phase="compute", round=0, analysis="ping", dataset="default", recipients=fed.sites)
    client.post_message(task)
    assert len(fed.session.grid.gather("t-replay", 0, fed.sites, timeout=120)) == 3
    with pytest.raises(HubError) as hub_error:
        client.post_message(task)
    assert hub_error.value.status == 409
    node = fed.network.nodes["site_a"].node
    reply = node.handle(task.encode())
    assert reply.body()["rule"] == "replay"


def test_oversized_request_is_refused_before_parsing(fed):
    hub = fed.network.hub
    request = (f"POST /v1/messages HTTP/1.1\r\nHost: {hub.host}\r\nContent-Length: {hub.max_bytes + 1}\r\n"
               "Content-Type: application/x-medveil\r\n\r\nxx").encode()
    with socket.create_connection((hub.host, hub.port), timeout=120) as connection:
        connection.sendall(request)
        status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    assert b" 413 " in status_line
    assert any(e.kind == "oversized" for e in hub.store.events())


def test_tampered_reply_is_detected_by_the_researcher(fed):
    client = fed.session.grid.client
    task = client.seal("task", {"params": {}, "broadcast": {}}, study=fed.study.id, task="t-tamper", step=0,
                       phase="keys", round=0, analysis="ping", dataset="default", recipients=fed.sites)
    client.post_message(task)
    replies = client.replies("t-tamper", 0, wait=10)
    original = replies[0]
    tampered = open_envelope(original.encode())
    object.__setattr__(tampered, "body_bytes", original.body_bytes + b"\x00")
    with pytest.raises(Exception, match="does not match"):
        tampered.verify(client.public_key(original.sender))


def test_malformed_csv_names_file_and_line(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("age,stage\n" + "\n".join(f"{50 + i},I" for i in range(20)) + "\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("age,stage\n61,I\n62,II,extra\n63,I\n")
    with pytest.raises(DataError) as error:
        mv.Federation.simulate({"a": good, "b": bad})
    assert str(bad) in str(error.value) and "line 3" in str(error.value)


def test_csv_broken_after_start_is_refused_with_file_and_line(tmp_path):
    paths = {}
    for name in ("a", "b"):
        paths[name] = tmp_path / f"{name}.csv"
        paths[name].write_text("age\n" + "\n".join(str(40 + i) for i in range(30)) + "\n")
    with mv.Federation.simulate(paths, timeout=120) as fed:
        assert fed.describe("age").loc["age", "n"] == 60
        paths["b"].write_text("age\n41\n42,43\n")
        with pytest.raises(mv.RefusedError) as error:
            fed.describe("age")
    assert error.value.site == "b" and error.value.rule == "data_error"
    assert str(paths["b"]) in error.value.detail and "line 3" in error.value.detail


def test_unknown_party_cannot_read_the_hub(fed):
    stranger = HubClient(fed.network.hub.url, "stranger", SigningKey.generate())
    try:
        with pytest.raises(HubError) as error:
            stranger.inbox(0, 0)
        assert error.value.status == 401
    finally:
        stranger.close()
