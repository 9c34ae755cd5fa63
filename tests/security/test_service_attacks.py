"""Red-team tests of site services: a hostile researcher (or a hub replaying its traffic) sends
hand-made query envelopes straight to a real node; each is refused with its rule, leaves a
refusal in the audit log and gets no answer, and no query reads a single patient."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pandas as pd
import pytest

from medveil.crypto.signing import SigningKey
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.audit import read_audit_log
from medveil.runtime.config import SiteConfig
from medveil.runtime.node import Node
from medveil.runtime.services import MAX_QUERY_BYTES
from medveil.runtime.study import StudySpec, sign_approval
from medveil.runtime.wire import seal

SITE, STEWARD = SigningKey.generate(), SigningKey.generate()
ALICE, MALLORY = SigningKey.generate(), SigningKey.generate()
# one patient has the rare variant; four share a common one; the rest another
VARIANTS = ["chr1:1000:A:G"] * 20 + ["chr2:555:C:T"] * 4 + ["chr7:117559590:ATCT:A"]


def _spec(study: str, researcher: str = "alice", key: SigningKey = ALICE, services=("count_lookup",)) -> StudySpec:
    return StudySpec(id=study, researcher=researcher, researcher_key=key.verify_key.to_text(), sites=["site_a"],
                     site_keys={"site_a": SITE.verify_key.to_text()}, datasets={"default": ["age"]},
                     analyses=["describe"], services=list(services))


@pytest.fixture
def node(tmp_path):
    config = SiteConfig(site="site_a", hub="http://127.0.0.1:9", identity=tmp_path / "node.key",
                        steward_key=tmp_path / "steward.pub", state_dir=tmp_path / "state",
                        policy=DisclosurePolicy(min_cell_count=5))
    frame = pd.DataFrame({"variant": VARIANTS, "age": np.linspace(30, 80, len(VARIANTS))})
    node = Node(config, SITE, STEWARD.verify_key, frames={"default": frame})
    for spec in (_spec("study-1"), _spec("study-2"), _spec("no-services", services=()),
                 _spec("mallorys", "mallory", MALLORY)):
        node.store.save_approval(spec.id, spec.model_dump(), sign_approval(spec, "site_a", STEWARD, time.time()))
    node.build_service("count_lookup", "default", {"key_column": "variant", "queries_per_day": 3}, STEWARD)
    yield node
    node.close()


def envelope(body: dict | None = None, signer: SigningKey = ALICE, **header) -> bytes:
    fields = {"kind": "task", "sender": "alice", "nonce": uuid.uuid4().hex, "issued_at": time.time(),
              "study": "study-1", "task": f"query-{uuid.uuid4().hex[:12]}", "step": 0, "round": 0,
              "phase": "query", "analysis": "service", "dataset": "count_lookup", "recipients": ["site_a"], **header}
    return seal(signer, fields, {"query": {"key": "chr1:1000:A:G"}} if body is None else body).encode()


def send(node: Node, raw: bytes) -> tuple[str, dict]:
    reply = node.handle(raw)
    reply.verify(SITE.verify_key)
    return reply.header["status"], reply.body()


def refused(node: Node, raw: bytes) -> str:
    """The rule a query was refused under, checked to be the last audit entry and to carry no answer."""
    answers_before = _answers(node)
    status, body = send(node, raw)
    assert status == "refused" and set(body) == {"rule", "message"}
    last = read_audit_log(node.config.state_dir / "audit.jsonl")[-1]
    assert last["kind"] == "refusal" and last["rule"] == body["rule"]
    assert _answers(node) == answers_before
    return body["rule"]


def _answers(node: Node) -> int:
    return sum(e["kind"] == "service_answer" for e in read_audit_log(node.config.state_dir / "audit.jsonl"))


def test_a_key_held_by_one_patient_reads_exactly_as_an_absent_key(node):
    node.build_service("count_lookup", "default", {"key_column": "variant"}, STEWARD)
    one = send(node, envelope({"query": {"key": "chr7:117559590:ATCT:A"}}))
    four = send(node, envelope({"query": {"key": "chr2:555:C:T"}}))
    none = send(node, envelope({"query": {"key": "chr9:1:G:C"}}))
    assert one == four == none == ("ok", {"public": {"count": None, "suppressed": True, "min_count": 5}})
    assert send(node, envelope())[1]["public"]["count"] == 20


def test_exceeding_the_daily_quota_is_refused_and_a_new_study_does_not_refill_it(node):
    assert [send(node, envelope())[0] for _ in range(3)] == ["ok"] * 3
    assert refused(node, envelope()) == "service_quota_exhausted"
    assert refused(node, envelope(study="study-2")) == "service_quota_exhausted"
    # another researcher's quota is their own
    assert send(node, envelope(signer=MALLORY, sender="mallory", study="mallorys"))[0] == "ok"


def test_a_service_not_in_the_study_is_refused(node):
    assert refused(node, envelope(study="no-services")) == "service_not_approved"
    assert refused(node, envelope(dataset="default")) == "service_not_approved"


def test_a_service_listed_but_not_built_or_not_registered_is_refused(node, tmp_path):
    spec = _spec("more", services=("count_lookup", "pir_lookup"))
    node.store.save_approval(spec.id, spec.model_dump(), sign_approval(spec, "site_a", STEWARD, time.time()))
    assert refused(node, envelope(study="more", dataset="pir_lookup")) == "unknown_service"
    (node.config.state_dir / "services" / "count_lookup" / "service.bin").unlink()
    assert refused(node, envelope(study="more")) == "service_not_built"


def test_querying_as_another_researcher_is_refused(node):
    assert refused(node, envelope(signer=MALLORY, sender="mallory")) == "wrong_researcher"
    assert refused(node, envelope(signer=MALLORY)) == "bad_signature"  # claims to be alice
    assert refused(node, envelope(signer=MALLORY, sender="mallory", study="study-unknown")) == "study_not_approved"


def test_a_replayed_query_is_refused_and_not_counted(node):
    raw = envelope()
    assert send(node, raw)[0] == "ok"
    assert refused(node, raw) == "replay"
    assert send(node, envelope(task="query-reused"))[0] == "ok"
    assert refused(node, envelope(task="query-reused")) == "replay"  # a new nonce, the same task id
    assert send(node, envelope())[0] == "ok"  # the third answer: neither replay was counted
    assert refused(node, envelope()) == "service_quota_exhausted"


def test_a_stale_query_is_refused(node):
    assert refused(node, envelope(issued_at=time.time() - 7200)) == "stale"
    assert refused(node, envelope(issued_at=time.time() + 7200)) == "stale"


@pytest.mark.parametrize("header, rule", [
    ({"step": 1}, "malformed"), ({"round": 2}, "malformed"), ({"analysis": "glm"}, "malformed"),
    ({"service": "other_service"}, "malformed"), ({"recipients": ["site_b"]}, "malformed"),
    ({"recipients": None}, "malformed"), ({"study": None}, "malformed"),
], ids=["step", "round", "analysis", "service-differs", "other-recipient", "no-recipients", "no-study"])
def test_hostile_query_headers_are_refused(node, header, rule):
    assert refused(node, envelope(**header)) == rule


@pytest.mark.parametrize("body", [
    {"query": {"key": "x" * 257}},
    {"query": {"key": "x" * (MAX_QUERY_BYTES + 1)}},
    {"query": {"key": float("nan")}},
    {"query": {"key": float("inf")}},
    {"query": {"key": 42}},
    {"query": {"key": True}},
    {"query": {"key": None}},
    {"query": {"key": ["chr1:1000:A:G"]}},
    {"query": {"key": {"$ne": ""}}},
    {"query": {"key": b"chr1:1000:A:G"}},
    {"query": {"key": np.arange(3)}},
    {"query": {"key": ""}},
    {"query": {}},
    {"query": {"key": "chr1:1000:A:G", "limit": 10}},
    {"query": "chr1:1000:A:G"},
    {"query": [{"key": "chr1:1000:A:G"}]},
    {"query": {"key": "chr1:1000:A:G"}, "params": {}},
    {},
], ids=["long-key", "huge-body", "nan", "inf", "int", "bool", "none", "list", "operator", "bytes", "array",
        "empty", "no-key", "extra-field", "not-a-map", "list-query", "extra-body-field", "empty-body"])
def test_hostile_query_fields_are_refused(node, body):
    assert refused(node, envelope(body)) == "invalid_query"


def test_refusals_never_quote_a_hostile_value(node):
    secret = "chr7:117559590:ATCT:A-and-more" * 10
    rule = refused(node, envelope({"query": {"key": secret}}))
    assert rule == "invalid_query"
    assert secret[:40] not in (node.config.state_dir / "audit.jsonl").read_text()
