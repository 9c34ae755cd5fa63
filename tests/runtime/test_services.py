"""Site services at a real node over a temporary state directory: the steward builds one from the
site's own data, queries arrive as task envelopes through `Node.handle`, and each step leaves its
audit entry."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medveil.cli import app
from medveil.crypto.signing import SignatureError, SigningKey
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.audit import read_audit_log, verify_audit_log
from medveil.runtime.config import (
    SiteConfig,
    dump_site_config,
    write_private_file,
    write_private_key,
)
from medveil.runtime.node import Node
from medveil.runtime.services import (
    ServiceError,
    ServiceHost,
    get_service,
    lookup_key,
    query_service,
    query_step,
    service_names,
)
from medveil.runtime.study import StudySpec, sign_approval
from medveil.runtime.wire import open_envelope, seal

SITE, STEWARD, RESEARCHER = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
CODES = ["C18"] * 12 + ["C20"] * 6 + ["E11"] * 4 + ["Q87.4"] * 1 + [None] * 2


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame({"patient": np.arange(len(CODES)), "icd10": CODES, "age": rng.normal(60, 9, len(CODES))})


def _spec(**changes) -> StudySpec:
    fields = {"id": "svc-study", "researcher": "alice", "researcher_key": RESEARCHER.verify_key.to_text(),
              "sites": ["site_a"], "site_keys": {"site_a": SITE.verify_key.to_text()},
              "datasets": {"default": ["age"]}, "analyses": ["describe"], "services": ["count_lookup"], **changes}
    return StudySpec(**fields)


@pytest.fixture
def node(tmp_path):
    config = SiteConfig(site="site_a", hub="http://127.0.0.1:9", identity=tmp_path / "node.key",
                        steward_key=tmp_path / "steward.pub", state_dir=tmp_path / "state",
                        policy=DisclosurePolicy(min_cell_count=5))
    node = Node(config, SITE, STEWARD.verify_key, frames={"default": _frame()})
    spec = _spec()
    node.store.save_approval(spec.id, spec.model_dump(), sign_approval(spec, "site_a", STEWARD, time.time()))
    yield node
    node.close()


def query(node: Node, body: dict, signer: SigningKey = RESEARCHER, **header) -> tuple[str, dict]:
    """Send one query envelope through `node.handle`; (status, reply body), the reply verified."""
    fields = {"kind": "task", "sender": "alice", "nonce": uuid.uuid4().hex, "issued_at": time.time(),
              "study": "svc-study", "task": f"query-{uuid.uuid4().hex[:12]}", "step": 0, "round": 0,
              "phase": "query", "analysis": "service", "dataset": "count_lookup", "service": "count_lookup",
              "recipients": ["site_a"], **header}
    reply = node.handle(seal(signer, fields, body).encode())
    reply.verify(SITE.verify_key)
    assert reply.header["task"] == fields["task"] and reply.header["study"] == fields["study"]
    return reply.header["status"], reply.body()


def build(node: Node, **options) -> dict:
    return node.build_service("count_lookup", "default", {"key_column": "icd10", **options}, STEWARD)


def test_count_lookup_is_registered_with_typed_options_and_query():
    assert "count_lookup" in service_names()
    service = get_service("count_lookup")
    assert service.sensitive_query
    assert service.Options.model_validate({"key_column": "icd10"}).queries_per_day == 1000
    assert lookup_key(11.0) == "11" and lookup_key(" C18 ") == "C18"


def test_build_persists_a_signed_service_file_at_the_site(node):
    manifest = build(node)
    assert manifest["summary"] == {"keys": 4, "rows": len(CODES) - 2}
    path = node.config.state_dir / "services" / "count_lookup" / "service.bin"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert b"C18" in path.read_bytes() and not any(p.name.startswith(".") for p in path.parent.iterdir())
    entry = [e for e in read_audit_log(node.config.state_dir / "audit.jsonl") if e["kind"] == "service_build"][-1]
    assert entry["service"] == "count_lookup" and entry["dataset"] == "default"
    assert entry["options"]["key_column"] == "icd10" and entry["state_sha256"] == manifest["state_sha256"]
    assert ServiceHost(node).manifests() == [manifest]  # a fresh host reads it back from disk


def test_build_needs_the_stewards_key_valid_options_and_the_sites_data(node):
    with pytest.raises(SignatureError):
        node.build_service("count_lookup", "default", {"key_column": "icd10"}, SigningKey.generate())
    for name, dataset, options, rule in [
        ("no_such_service", "default", {"key_column": "icd10"}, "unknown_service"),
        ("count_lookup", "default", {}, "invalid_options"),
        ("count_lookup", "default", {"key_column": "icd10", "queries_per_day": 0}, "invalid_options"),
        ("count_lookup", "default", {"key_column": "icd10", "shell": "rm -rf /"}, "invalid_options"),
        ("count_lookup", "default", {"key_column": "nope"}, "missing_column"),
        ("count_lookup", "elsewhere", {"key_column": "icd10"}, "unknown_dataset"),
    ]:
        with pytest.raises(ServiceError) as caught:
            node.build_service(name, dataset, options, STEWARD)
        assert caught.value.rule == rule, name
    assert ServiceHost(node).manifests() == []


def test_answers_counts_at_or_above_the_minimum_and_suppresses_the_rest(node):
    build(node)
    assert query(node, {"query": {"key": "C18"}}) == ("ok", {"public": {"count": 12, "suppressed": False,
                                                                        "min_count": 5}})
    assert query(node, {"query": {"key": "C20"}})[1]["public"]["count"] == 6
    suppressed = {"public": {"count": None, "suppressed": True, "min_count": 5}}
    assert query(node, {"query": {"key": "E11"}}) == ("ok", suppressed)  # 4 patients
    assert query(node, {"query": {"key": "Q87.4"}}) == ("ok", suppressed)  # one patient
    assert query(node, {"query": {"key": "Z99"}}) == ("ok", suppressed)  # nobody


def test_a_stricter_service_minimum_applies_but_never_a_weaker_one(node):
    build(node, min_count=7)
    assert query(node, {"query": {"key": "C20"}})[1]["public"] == {"count": None, "suppressed": True, "min_count": 7}
    build(node, min_count=1)
    assert query(node, {"query": {"key": "E11"}})[1]["public"]["suppressed"] is True


def test_patients_are_counted_once_per_key(node):
    frame = pd.DataFrame({"patient": [1, 1, 1, 2, 3, 4, 5, 6, 6], "icd10": ["C18"] * 9})
    node.frames["visits"] = frame
    node.build_service("count_lookup", "visits", {"key_column": "icd10", "patient_column": "patient"}, STEWARD)
    assert query(node, {"query": {"key": "C18"}})[1]["public"]["count"] == 6
    node.build_service("count_lookup", "visits", {"key_column": "icd10"}, STEWARD)
    assert query(node, {"query": {"key": "C18"}})[1]["public"]["count"] == 9


def test_every_query_is_audited_with_a_keyed_digest_not_the_key(node):
    build(node)
    host = node.services
    status, _ = query(node, {"query": {"key": "Q87.4"}})
    assert status == "ok"
    log = read_audit_log(node.config.state_dir / "audit.jsonl")
    asked = [e for e in log if e["kind"] == "service_query"][-1]
    answered = [e for e in log if e["kind"] == "service_answer"][-1]
    assert "query" not in asked and asked["query_digest"] == host.query_digest("count_lookup", {"key": "Q87.4"})
    assert asked["query_digest"] != host.query_digest("count_lookup", {"key": "C18"})
    assert "Q87.4" not in (node.config.state_dir / "audit.jsonl").read_text()
    assert answered["answer"] == {"count": None, "suppressed": True, "min_count": 5}
    assert verify_audit_log(node.config.state_dir / "audit.jsonl") == len(log)


def test_the_quota_is_per_researcher_per_utc_day_and_survives_a_restart(node, tmp_path):
    build(node, queries_per_day=2)
    assert [query(node, {"query": {"key": "C18"}})[0] for _ in range(2)] == ["ok", "ok"]
    assert query(node, {"query": {"key": "C18"}}) == ("refused", {
        "rule": "service_quota_exhausted",
        "message": "researcher 'alice' has used all 2 queries of 'count_lookup' at site_a today (UTC)"})
    restarted = Node(node.config, SITE, STEWARD.verify_key, frames=node.frames)
    try:
        assert query(restarted, {"query": {"key": "C18"}})[1]["rule"] == "service_quota_exhausted"
        tomorrow = ServiceHost(restarted, clock=lambda: time.time() + 86400)
        restarted._services = tomorrow
        assert query(restarted, {"query": {"key": "C18"}}, issued_at=time.time() + 86400)[0] == "ok"
    finally:
        restarted.close()


def test_a_service_file_altered_at_rest_is_refused(node):
    build(node)
    path = node.config.state_dir / "services" / "count_lookup" / "service.bin"
    data = bytearray(path.read_bytes())
    position = bytes(data).index(b"C18")
    data[position:position + 3] = b"C19"
    os.remove(path)
    write_private_file(path, bytes(data))
    assert query(node, {"query": {"key": "C19"}})[1]["rule"] == "service_corrupt"


def test_query_service_checks_the_query_and_returns_the_answer(node):
    build(node)
    sent = []

    def send(task: str, body: dict) -> dict:
        step = query_step("site_a", "count_lookup", task, body)
        sent.append(step)
        envelope = seal(RESEARCHER, {"kind": "task", "sender": "alice", "nonce": uuid.uuid4().hex,
                                     "issued_at": time.time(), "study": "svc-study", "task": step.task,
                                     "step": step.step, "round": step.round, "phase": step.phase,
                                     "analysis": step.analysis, "dataset": step.datasets["site_a"],
                                     "recipients": step.recipients}, step.bodies["site_a"])
        reply = open_envelope(node.handle(envelope.encode()).encode())
        return reply.verify(SITE.verify_key).body()

    assert query_service(send, "count_lookup", {"key": "C18"}) == {"count": 12, "suppressed": False, "min_count": 5}
    assert len(sent) == 1 and sent[0].task.startswith("query-") and sent[0].phase == "query"
    with pytest.raises(ValueError, match="invalid query"):
        query_service(send, "count_lookup", {"key": 42})
    assert len(sent) == 1  # refused before anything was sent


def test_service_cli_builds_and_lists(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVEIL_KEY_PASSPHRASE", raising=False)
    write_private_key(tmp_path / "node.key", SITE)
    write_private_key(tmp_path / "steward.key", STEWARD)
    (tmp_path / "steward.pub").write_text(STEWARD.verify_key.to_text())
    _frame().to_csv(tmp_path / "cohort.csv", index=False)
    (tmp_path / "site.yaml").write_text(dump_site_config(SiteConfig(
        site="site_a", hub="http://127.0.0.1:9", datasets={"cohort": {"kind": "csv", "path": "cohort.csv"}})))
    runner = CliRunner()
    listed = runner.invoke(app, ["service", "list", "--config", str(tmp_path / "site.yaml")])
    assert listed.exit_code == 0 and "not built" in listed.output
    result = runner.invoke(app, ["service", "build", "count_lookup", "--config", str(tmp_path / "site.yaml"),
                                 "--dataset", "cohort", "--steward-key", str(tmp_path / "steward.key"),
                                 "--option", "key_column=icd10", "--option", "queries_per_day=20"])
    assert result.exit_code == 0, result.output
    assert "{'keys': 4, 'rows': 23}" in result.output
    listed = runner.invoke(app, ["service", "list", "--config", str(tmp_path / "site.yaml")])
    count_line = next(line for line in listed.output.splitlines() if "count_lookup" in line)
    assert listed.exit_code == 0 and "cohort" in count_line and "not built" not in count_line
    refused = runner.invoke(app, ["service", "build", "count_lookup", "--config", str(tmp_path / "site.yaml"),
                                  "--dataset", "cohort", "--steward-key", str(tmp_path / "steward.key"),
                                  "--option", "queries_per_day"])
    assert refused.exit_code == 1 and "KEY=VALUE" in refused.output
    refused = runner.invoke(app, ["service", "build", "count_lookup", "--config", str(tmp_path / "site.yaml"),
                                  "--dataset", "cohort", "--steward-key", str(tmp_path / "node.key"),
                                  "--option", "key_column=icd10"])
    assert refused.exit_code == 1 and "not the steward key" in refused.output


def test_node_status_shows_the_datasets_a_study_may_read_at_this_site(tmp_path):
    from medveil.runtime.node_store import NodeStore

    (tmp_path / "site.yaml").write_text(dump_site_config(SiteConfig(site="site_a", hub="http://127.0.0.1:9")))
    spec = _spec(site_datasets={"site_a": {"claims_2024": ["cost"]}})
    store = NodeStore(tmp_path / "state" / "node.db")
    store.save_approval(spec.id, spec.model_dump(), sign_approval(spec, "site_a", STEWARD, time.time()))
    store.close()
    result = CliRunner().invoke(app, ["node", "status", "--config", str(tmp_path / "site.yaml")])
    assert result.exit_code == 0, result.output
    assert "claims_2024" in result.output and "default" not in result.output
