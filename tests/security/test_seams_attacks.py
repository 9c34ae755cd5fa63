"""Red-team tests of the seams of issue 19, as a hostile researcher (who writes study specs, holds
every sealed payload and signs every step) or a hostile hub (which drops, reorders and replays)
would attack them: per-recipient payloads, the "end" and "query" phases, site services, durable
node scratch, several messages per step, per-site dataset maps, and the researcher's own run
files read back on resume. Each attack tries to read one patient or one site's value, or to get
around a rule, and must meet the named refusal.
"""

from __future__ import annotations

import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from node_harness import NodeHarness, probe_registered

from medveil.crypto.sealed import generate_encryption_key
from medveil.crypto.signing import SigningKey
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.config import SiteConfig
from medveil.runtime.node import Node, Refusal
from medveil.runtime.runs import _LENGTH, RunFile, RunStateError, RunStore, TaskRun
from medveil.runtime.scratch import NodeScratch
from medveil.runtime.study import StudySpec, sign_approval
from medveil.runtime.wire import pack_body, seal, unpack_body

PROBE = "payload_probe"
SCRATCH_BOUND = 16 * 1024


@pytest.fixture()
def harness(tmp_path):
    frame = pd.DataFrame({"x": np.arange(20.0), "y": np.linspace(1.0, 3.0, 20)})
    with probe_registered():
        harness = NodeHarness(tmp_path, {"a": frame, "b": frame}, [PROBE, "describe"],
                              policy=DisclosurePolicy(max_scratch_bytes=SCRATCH_BOUND))
        yield harness
        harness.close()


def _approve(harness: NodeHarness, spec: StudySpec) -> None:
    """Every site's steward approves `spec` (as the researcher wrote it)."""
    for site, node in harness.nodes.items():
        node.store.save_approval(spec.id, spec.model_dump(), sign_approval(spec, site, harness.stewards[site],
                                                                            time.time()))


def _other_study(harness: NodeHarness, study: str, researcher: str, key: SigningKey, **update: Any) -> StudySpec:
    spec = StudySpec.model_validate({**harness.spec.model_dump(), "id": study, "researcher": researcher,
                                     "researcher_key": key.verify_key.to_text(), **update})
    _approve(harness, spec)
    return spec


def _send(harness: NodeHarness, site: str, task: str, step: int, round_no: int, body: dict[str, Any], *,
          study: str = "study-1", analysis: str = PROBE, phase: str = "compute", dataset: str = "default",
          sender: str = "researcher", signer: SigningKey | None = None) -> tuple[str, dict[str, Any]]:
    header = {"kind": "task", "sender": sender, "nonce": uuid.uuid4().hex, "issued_at": time.time(),
              "study": study, "task": task, "step": step, "phase": phase, "round": round_no,
              "analysis": analysis, "dataset": dataset, "recipients": [site]}
    reply = harness.nodes[site].handle(seal(signer or harness.researcher, header, body).encode())
    assert reply is not None
    reply.verify(harness.identities[site].verify_key)
    return reply.header["status"], reply.body()


def _compute(broadcast: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"params": {}, "broadcast": broadcast or {}, **extra}


# --- per-recipient payloads -----------------------------------------------------------------------


def test_a_payload_withheld_for_a_round_cannot_be_handed_in_later(harness):
    """a seals b a payload in round 0; the researcher holds it back in round 1 and hands it in in
    round 2, in place of what a sends then: b takes payloads of the round just before only."""
    status, body = _send(harness, "a", "t-1", 0, 0, _compute({"to": "b"}))
    assert status == "ok"
    withheld = body["payloads"]["b"]
    assert _send(harness, "b", "t-1", 0, 0, _compute())[0] == "ok"
    assert _send(harness, "b", "t-1", 1, 1, _compute())[0] == "ok"
    status, body = _send(harness, "b", "t-1", 2, 2, _compute(messages=[withheld]))
    assert (status, body["rule"]) == ("refused", "payload_stale")
    assert "received" not in str(body)


def test_a_study_pinning_another_encryption_key_for_the_site_is_not_approved(harness):
    """The researcher writes the spec: pinning an X25519 key of its own for b would make every peer
    seal b's payloads to the researcher. b's steward refuses to approve it."""
    node = harness.nodes["b"]
    posted: list[Any] = []
    node.client.post_approval = lambda study, envelope: posted.append(study)  # type: ignore[method-assign]

    def publish(spec: StudySpec) -> None:
        envelope = seal(harness.researcher, {"kind": "study", "sender": "researcher", "nonce": uuid.uuid4().hex,
                                             "issued_at": time.time(), "study": spec.id}, {"spec": spec.model_dump()})
        node.client.study_envelope = lambda study: envelope  # type: ignore[method-assign]

    _, researchers_own = generate_encryption_key()
    hostile = StudySpec.model_validate({**harness.spec.model_dump(), "id": "study-pinned",
                                        "site_encryption_keys": {"a": harness.encryption["a"],
                                                                 "b": researchers_own}})
    publish(hostile)
    with pytest.raises(Refusal) as refused:
        node.approve(hostile.id, harness.stewards["b"])
    assert refused.value.rule == "pinned_encryption_key_mismatch"
    assert node.store.approval(hostile.id) is None and posted == []
    honest = StudySpec.model_validate({**harness.spec.model_dump(), "id": "study-honest"})
    publish(honest)
    node.approve(honest.id, harness.stewards["b"])
    assert posted == ["study-honest"]


# --- durable scratch --------------------------------------------------------------------------------


def test_scratch_left_by_a_refused_first_step_is_not_read_by_a_task_reusing_its_id(harness):
    """A first step that kept a value in scratch and was then refused (here: a payload to a site
    outside the study) leaves no task record; another researcher's study reusing the task id
    must start from an empty scratch, never from what was computed for the first."""
    status, body = _send(harness, "a", "t-shared", 0, 0, _compute({"keep": "study-1 data", "to": "nowhere"}))
    assert (status, body["rule"]) == ("refused", "payload_recipient")
    mallory = SigningKey.generate()
    _other_study(harness, "study-2", "mallory", mallory)
    status, body = _send(harness, "a", "t-shared", 1, 0, _compute(), study="study-2", sender="mallory",
                         signer=mallory)
    assert status == "ok", body
    assert body["public"]["kept"] is None and body["public"]["scratch_keys"] == []


def test_a_hostile_task_id_never_reaches_a_path(harness, tmp_path):
    root = tmp_path / "scratch-root"
    scratch = NodeScratch(root, SCRATCH_BOUND)
    scratch.task("../../escaped")["k"] = 1
    assert [p.parent for p in root.rglob("*.val")] == [scratch.task("../../escaped").folder]
    assert scratch.task("../../escaped").folder.parent == root
    scratch.delete("..")
    assert root.is_dir() and not (tmp_path / "escaped").exists()
    # at the node, a task id with path characters is refused before anything is written
    header = {"kind": "task", "sender": "researcher", "nonce": uuid.uuid4().hex, "issued_at": time.time(),
              "study": "study-1", "task": "../../etc", "step": 0, "phase": "compute", "round": 0,
              "analysis": PROBE, "dataset": "default", "recipients": ["a"]}
    assert harness.nodes["a"].handle(seal(harness.researcher, header, _compute({"keep": 1})).encode()) is None


def test_a_broadcast_cannot_make_a_site_keep_more_than_its_scratch_bound(harness):
    big = np.zeros(SCRATCH_BOUND // 4, dtype=np.float64)  # twice the bound once encoded
    status, body = _send(harness, "a", "t-big", 0, 0, _compute({"keep": big}))
    assert status == "ok" and body["public"]["scratch_keys"] == []
    assert harness.nodes["a"].scratch.task("t-big").size_bytes <= SCRATCH_BOUND


# --- phase "end", several messages per step, reordering -----------------------------------------------


def test_another_studys_researcher_cannot_end_a_task_and_an_ended_task_runs_nothing(harness):
    assert _send(harness, "a", "t-run", 0, 0, _compute({"keep": "working"}))[0] == "ok"
    mallory = SigningKey.generate()
    _other_study(harness, "study-2", "mallory", mallory)
    status, body = _send(harness, "a", "t-run", 1, 0, {}, phase="end", study="study-2", sender="mallory",
                         signer=mallory)
    assert (status, body["rule"]) == ("refused", "task_mismatch")
    assert "kept" in harness.nodes["a"].scratch.task("t-run")  # the task's scratch is untouched
    assert _send(harness, "a", "t-run", 2, 0, {}, phase="end") == ("ok", {"public": {}})
    assert "kept" not in harness.nodes["a"].scratch.task("t-run")
    status, body = _send(harness, "a", "t-run", 3, 1, _compute())
    assert (status, body["rule"]) == ("refused", "task_ended")


def test_a_second_body_for_one_site_in_one_step_is_refused(harness):
    """The hub refuses a recipient twice in a step; a hub that delivers both anyway meets the node."""
    assert _send(harness, "a", "t-two", 0, 0, _compute({"keep": "first"}))[0] == "ok"
    status, body = _send(harness, "a", "t-two", 0, 0, _compute({"keep": "second"}))
    assert (status, body["rule"]) == ("refused", "replay")
    assert harness.nodes["a"].scratch.task("t-two")["kept"] == "first"


def test_steps_a_hub_reorders_are_refused(harness):
    assert _send(harness, "a", "t-order", 5, 0, _compute())[0] == "ok"
    status, body = _send(harness, "a", "t-order", 3, 1, _compute())
    assert (status, body["rule"]) == ("refused", "round_order")


# --- per-site dataset maps ----------------------------------------------------------------------------


def test_a_site_is_held_to_its_own_dataset_map(harness):
    """b's map (and the common one) approve `default` with y; a's own map approves only `a_only`
    with x. The researcher addresses a with b's dataset, then with a variable only b's map has."""
    harness.nodes["a"].frames["a_only"] = harness.frames["a"]
    _other_study(harness, "study-maps", "researcher", harness.researcher,
                 datasets={"default": ["x", "y"]},
                 site_datasets={"a": {"a_only": ["x"]}, "b": {"default": ["x", "y"]}})
    describe = {"params": {"variables": ["y"]}, "broadcast": {}}
    status, body = _send(harness, "a", "t-maps-1", 0, 0, describe, study="study-maps", analysis="describe")
    assert (status, body["rule"]) == ("refused", "dataset_not_approved")
    status, body = _send(harness, "a", "t-maps-2", 0, 0, describe, study="study-maps", analysis="describe",
                         dataset="a_only")
    assert (status, body["rule"]) == ("refused", "variable_not_approved")
    status, body = _send(harness, "b", "t-maps-3", 0, 0, describe, study="study-maps", analysis="describe")
    assert status == "ok", body


# --- site services ------------------------------------------------------------------------------------

ALICE, NEW_KEY, SITE, STEWARD = (SigningKey.generate() for _ in range(4))
# five patients with E11, one more written " E11\t", one with "e11"; a rare code held by one
CODES = ["E11"] * 5 + [" E11\t", "e11", "Q87.4"] + ["I10"] * 12


def _service_spec(study: str, researcher: str, key: SigningKey) -> StudySpec:
    return StudySpec(id=study, researcher=researcher, researcher_key=key.verify_key.to_text(), sites=["site_a"],
                     site_keys={"site_a": SITE.verify_key.to_text()}, datasets={"default": ["age"]},
                     analyses=["describe"], services=["count_lookup"])


@pytest.fixture()
def service_node(tmp_path):
    config = SiteConfig(site="site_a", hub="http://127.0.0.1:9", state_dir=tmp_path / "state",
                        policy=DisclosurePolicy(min_cell_count=5))
    frame = pd.DataFrame({"code": CODES, "age": np.linspace(30.0, 80.0, len(CODES))})
    node = Node(config, SITE, STEWARD.verify_key, frames={"default": frame})
    for spec in (_service_spec("study-1", "alice", ALICE), _service_spec("alias", "alice-2", ALICE),
                 _service_spec("rekeyed", "alice", NEW_KEY)):
        node.store.save_approval(spec.id, spec.model_dump(), sign_approval(spec, "site_a", STEWARD, time.time()))
    node.build_service("count_lookup", "default", {"key_column": "code", "queries_per_day": 2}, STEWARD)
    yield node
    node.close()


def _query(node: Node, key: Any, *, study: str = "study-1", sender: str = "alice", signer: SigningKey = ALICE,
           query: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    header = {"kind": "task", "sender": sender, "nonce": uuid.uuid4().hex, "issued_at": time.time(),
              "study": study, "task": f"query-{uuid.uuid4().hex[:12]}", "step": 0, "round": 0, "phase": "query",
              "analysis": "service", "dataset": "count_lookup", "recipients": ["site_a"]}
    reply = node.handle(seal(signer, header, {"query": query if query is not None else {"key": key}}).encode())
    reply.verify(SITE.verify_key)
    return reply.header["status"], reply.body()


def test_the_quota_follows_the_researchers_key_and_name_across_aliases(service_node):
    """A study naming the same key under another name, or the same name under a new key, does not
    get a fresh quota."""
    assert [_query(service_node, "I10")[0] for _ in range(2)] == ["ok", "ok"]
    status, body = _query(service_node, "I10", study="alias", sender="alice-2")
    assert (status, body["rule"]) == ("refused", "service_quota_exhausted")
    status, body = _query(service_node, "I10", study="rekeyed", signer=NEW_KEY)
    assert (status, body["rule"]) == ("refused", "service_quota_exhausted")


def test_key_variants_cannot_single_out_a_patient(service_node):
    """Case, padding and unicode-space variants of a key either read the one merged count (six:
    the padded row counts with the five) or read as absent: no two answers differ by one patient."""
    service_node.build_service("count_lookup", "default", {"key_column": "code"}, STEWARD)
    answers = {key: _query(service_node, key)[1]["public"]["count"]
               for key in ["E11", " E11", "E11\t", "\u00a0E11\u2003", "e11", "E11 ", "Q87.4", "q87.4 ", "E1"]}
    assert answers == {"E11": 6, " E11": 6, "E11\t": 6, "\u00a0E11\u2003": 6, "e11": None, "E11 ": 6,
                       "Q87.4": None, "q87.4 ": None, "E1": None}


@pytest.mark.parametrize("query", [
    {"key": "E11", "patient_column": "age"}, {"key": "E11", "key_column": "age"}, {"key": "E11", "min_count": 1},
    {"key": "E11", "queries_per_day": 10**6}, {"key": "E11", "messages": []},
], ids=["patient-column", "key-column", "min-count", "quota", "messages"])
def test_a_query_cannot_carry_build_options(service_node, query):
    status, body = _query(service_node, None, query=query)
    assert (status, body["rule"]) == ("refused", "invalid_query")


# --- resume: the run files are hostile local input --------------------------------------------------


def _run_file(tmp_path: Path, task: str = "t1") -> tuple[RunFile, SigningKey]:
    run_file = RunStore(tmp_path / "runs").open(task)
    run_file.save(TaskRun(task, "study-1", "glm", {"formula": "y ~ x"}, "default", ["a", "b"],
                          rows={"a": 20}, audit_ids={"a": ["id-1"]}))
    return run_file, SigningKey.generate()


def _task_envelope(key: SigningKey, task: str, step: int) -> bytes:
    header = {"kind": "task", "sender": "researcher", "nonce": uuid.uuid4().hex, "issued_at": time.time(),
              "study": "study-1", "task": task, "step": step, "phase": "compute", "round": 0, "analysis": "glm",
              "dataset": "default", "recipients": ["a"]}
    return seal(key, header, {}).encode()


def _rewrite(run_file: RunFile, **changes: Any) -> None:
    data = unpack_body(run_file.checkpoint.read_bytes())
    data.update(changes)
    run_file.checkpoint.write_bytes(pack_body(data))


def test_an_honest_checkpoint_and_journal_load(tmp_path):
    run_file, key = _run_file(tmp_path)
    raw = _task_envelope(key, "t1", 0)
    run_file.record(0, [raw])
    again = RunStore(tmp_path / "runs").open("t1")
    assert again.load().rows == {"a": 20} and again.sealed(0) == [raw]


@pytest.mark.parametrize("changes", [
    {"id": "t2"}, {"rows": [20]}, {"rows": {"a": "20"}}, {"step": "1"}, {"step": True}, {"step": -1},
    {"analysis": "../../glm"}, {"sites": ["a", "a"]}, {"sites": "ab"}, {"dp_spent": {"a": "0.1"}},
    {"coordinator": {"key_envelopes": {"a": 10**12}}}, {"extra": 1}, {"secure": "yes"},
], ids=["other-task", "rows-list", "rows-text", "step-text", "step-bool", "step-negative", "analysis-path",
        "sites-repeat", "sites-text", "dp-text", "huge-envelope", "extra-field", "secure-text"])
def test_a_tampered_checkpoint_is_refused(tmp_path, changes):
    run_file, _ = _run_file(tmp_path)
    _rewrite(run_file, **changes)
    with pytest.raises(RunStateError):
        RunStore(tmp_path / "runs").open("t1").load()
    assert RunStore(tmp_path / "runs").unfinished() == []


def test_a_checkpoint_copied_under_another_task_id_is_refused(tmp_path):
    run_file, _ = _run_file(tmp_path)
    (tmp_path / "runs" / "t2.run").write_bytes(run_file.checkpoint.read_bytes())
    with pytest.raises(RunStateError, match="holds run 't1'"):
        RunStore(tmp_path / "runs").open("t2").load()


class _Marker:
    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path):
    run_file, _ = _run_file(tmp_path)
    marker = _Marker()
    marker.path = str(tmp_path / "executed")
    run_file.checkpoint.write_bytes(pickle.dumps(marker))
    with pytest.raises(RunStateError):
        RunStore(tmp_path / "runs").open("t1").load()
    assert not (tmp_path / "executed").exists()


@pytest.mark.parametrize("record", [
    "garbage", "huge", "other-task", "other-step", "not-an-envelope", "step-text",
])
def test_a_tampered_journal_is_refused(tmp_path, record):
    run_file, key = _run_file(tmp_path)
    if record == "garbage":
        run_file.journal_path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00\xc1\xc1\xc1\xc1\xc1")
    else:
        envelopes = {"huge": [10**12], "other-task": [_task_envelope(key, "t-other", 0)],
                     "other-step": [_task_envelope(key, "t1", 7)], "not-an-envelope": [b"\x00" * 40],
                     "step-text": [_task_envelope(key, "t1", 0)]}[record]
        step = "0" if record == "step-text" else 0
        packed = pack_body({"step": step, "envelopes": envelopes})
        run_file.journal_path.write_bytes(_LENGTH.pack(len(packed)) + packed)
    with pytest.raises(RunStateError):
        RunStore(tmp_path / "runs").open("t1").sealed(0)


@pytest.mark.parametrize("changes", [{"sites": ["site_a", "elsewhere"]}, {"analysis": "pca"},
                                     {"analysis": "not_registered"}])
def test_resume_refuses_a_run_outside_the_study(tmp_path, changes):
    """A run file that names a site or an analysis the study does not hold is never continued."""
    import medveil as mv
    from medveil.runtime.grid import FederationError

    table = pd.DataFrame({"x": np.arange(40.0), "y": np.arange(40.0) % 7})
    sites = {"site_a": table.iloc[:20], "site_b": table.iloc[20:]}
    with mv.Federation.in_process(sites, runs_dir=tmp_path / "runs", secure_aggregation=False) as fed:
        fed.session.study = fed.study.model_copy(update={"analyses": ["describe"]})  # as if approved so
        store = RunStore(tmp_path / "runs")
        run_file = store.open("t-outside")
        run_file.save(TaskRun("t-outside", fed.study.id, "describe", {"variables": ["x"]}, "default",
                              ["site_a", "site_b"]))
        _rewrite(run_file, **changes)
        with pytest.raises(FederationError, match="outside study|unknown analysis"):
            fed.resume("t-outside")
