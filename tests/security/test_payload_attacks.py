"""Red-team tests of per-recipient payloads at the node.

A site's release may carry a payload for one other site, sealed end to end (HPKE to the
recipient's pinned X25519 key, signed with the sender's pinned identity key) and relayed by the
researcher. The researcher (or the hub) holds every sealed payload and the researcher's real
signing key, and tries: forging a sender, tampering with the ciphertext, replaying a payload,
moving one to another task, delivering one to a site it was not sealed for, making a site send
to a party outside the study. Each is refused with its named rule; the plaintext never leaves
in the clear.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from node_harness import NodeHarness, PayloadProbe, probe_registered

from medveil.crypto.sealed import seal_payload
from medveil.crypto.signing import SigningKey
from medveil.runtime.audit import read_audit_log
from medveil.runtime.wire import pack_body

PROBE = "payload_probe"


@pytest.fixture()
def harness(tmp_path):
    frame = pd.DataFrame({"x": np.arange(20.0)})
    with probe_registered():
        harness = NodeHarness(tmp_path, {"a": frame, "b": frame, "c": frame}, [PROBE],
                              pin_encryption={"a", "b"}, extra_sites={"d": SigningKey.generate()})
        yield harness
        harness.close()


def _sealed_from_a(harness: NodeHarness, task: str = "t-1", to: str = "b") -> dict:
    """Round 0 of `task` at site a, sending `to` a payload; the sealed payload the reply carries."""
    status, body = harness.send("a", task, 0, 0, PROBE, broadcast={"to": to})
    assert status == "ok", body
    assert set(body["payloads"]) == {to}
    return body["payloads"][to]


def _deliver(harness: NodeHarness, site: str, sealed: list[dict], task: str = "t-1", step: int = 1,
             round_no: int = 1) -> tuple[str, dict]:
    """Bring `site` to `round_no` of `task` and hand it the payloads in that round."""
    for earlier in range(round_no):
        if harness.nodes[site].store.task_state(task) is None or \
                harness.nodes[site].store.task_state(task).last_round < earlier:
            status, body = harness.send(site, task, 100 + earlier, earlier, PROBE)
            assert status == "ok", body
    return harness.send(site, task, 200 + step, round_no, PROBE, messages=sealed)


def test_a_payload_reaches_its_recipient_sealed_and_is_audited(harness):
    sealed = _sealed_from_a(harness)
    assert sealed["sender"] == "a" and sealed["recipient"] == "b"
    assert sealed["context"] == {"study": "study-1", "task": "t-1", "step": 0, "round": 0}
    assert PayloadProbe.SECRET.tobytes() not in pack_body(sealed)  # only ciphertext leaves the site
    status, body = _deliver(harness, "b", [sealed])
    assert status == "ok"
    assert body["public"]["received"] == {"a": {"from": "a", "round": 0, "secret": PayloadProbe.SECRET.tolist()}}
    digest = hashlib.sha256(sealed["ct"]).hexdigest()
    released = [e for e in read_audit_log(harness.root / "a" / "audit.jsonl") if e["kind"] == "release"]
    assert released[-1]["payloads"] == [{"recipient": "b", "sha256": digest}]
    decisions = [e for e in read_audit_log(harness.root / "b" / "audit.jsonl") if e["kind"] == "decision"]
    assert decisions[-1]["messages"] == [{"sender": "a", "sha256": digest}]


def test_a_forged_sender_is_refused(harness):
    """The researcher seals a payload to b's pinned key itself and claims a sent it."""
    forged = seal_payload({"from": "a", "round": 0, "secret": np.zeros(5, np.int64)}, sender="a", recipient="b",
                          context={"study": "study-1", "task": "t-1", "step": 0, "round": 0},
                          recipient_key=harness.encryption["b"], signer=harness.researcher)
    status, body = _deliver(harness, "b", [forged])
    assert (status, body["rule"]) == ("refused", "payload_forged")


def test_a_payload_relabelled_as_another_senders_is_refused(harness):
    sealed = dict(_sealed_from_a(harness), sender="c")
    status, body = _deliver(harness, "b", [sealed])
    assert (status, body["rule"]) == ("refused", "payload_forged")


def test_a_tampered_ciphertext_is_refused(harness):
    sealed = _sealed_from_a(harness)
    ct = bytearray(sealed["ct"])
    ct[-1] ^= 0x01
    status, body = _deliver(harness, "b", [dict(sealed, ct=bytes(ct))])
    assert (status, body["rule"]) == ("refused", "payload_forged")
    assert "secret" not in str(body)


def test_a_replayed_payload_is_refused(harness):
    sealed = _sealed_from_a(harness)
    assert _deliver(harness, "b", [sealed])[0] == "ok"
    status, body = _deliver(harness, "b", [sealed], step=2, round_no=2)
    assert (status, body["rule"]) == ("refused", "payload_replayed")


def test_the_same_payload_twice_in_one_step_is_refused(harness):
    sealed = _sealed_from_a(harness)
    status, body = _deliver(harness, "b", [sealed, sealed])
    assert (status, body["rule"]) == ("refused", "payload_replayed")


def test_a_payload_of_another_task_is_refused(harness):
    sealed = _sealed_from_a(harness, task="t-1")
    status, body = _deliver(harness, "b", [sealed], task="t-other")
    assert (status, body["rule"]) == ("refused", "payload_misaddressed")


def test_a_payload_of_this_round_or_later_is_refused(harness):
    sealed = _sealed_from_a(harness)
    status, body = harness.send("b", "t-1", 50, 0, PROBE, messages=[sealed])  # made in round 0, used in round 0
    assert (status, body["rule"]) == ("refused", "payload_misaddressed")


def test_a_payload_addressed_to_another_site_is_refused(harness):
    sealed = _sealed_from_a(harness, to="b")
    status, body = _deliver(harness, "a", [sealed])  # a holds its own key, but the payload is b's
    assert (status, body["rule"]) == ("refused", "payload_misaddressed")
    status, body = _deliver(harness, "a", [dict(sealed, recipient="a")], step=2, round_no=2)  # relabelled
    assert (status, body["rule"]) == ("refused", "payload_forged")


@pytest.mark.parametrize("recipient", ["outsider", "c", "d", "a"])
def test_a_site_sends_payloads_only_to_other_study_sites_with_a_pinned_key(harness, recipient):
    """outsider: not in the study; c: a study site without a pinned encryption key; d: a study site
    no node here runs, without a key either; a: the sender itself."""
    status, body = harness.send("a", f"t-to-{recipient}", 0, 0, PROBE, broadcast={"to": recipient})
    assert (status, body["rule"]) == ("refused", "payload_recipient")
    assert "payloads" not in body


def test_malformed_messages_are_refused(harness):
    status, body = _deliver(harness, "b", [{"sender": "a"}])
    assert (status, body["rule"]) == ("refused", "payload_malformed")
    status, body = harness.send("b", "t-2", 0, 0, PROBE, messages="not a list")  # type: ignore[arg-type]
    assert (status, body["rule"]) == ("refused", "payload_malformed")
