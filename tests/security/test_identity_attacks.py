"""Identity attacks: whoever registers a site's name first, or a hub operator serving a wrong key,
cannot stand in for that site. Registration needs the operator's invitation (`not_enrolled`),
studies pin each site's key, stewards approve only their own node's key
(`pinned_key_mismatch`), and researchers and peers verify sites only against the pinned keys."""

from __future__ import annotations

import base64
import os
import time
import uuid

import numpy as np
import pandas as pd
import pytest
import yaml
from sqlalchemy import update
from typer.testing import CliRunner

import medveil as mv
from medveil.cli import app as cli_app
from medveil.crypto.signing import SignatureError, SigningKey
from medveil.runtime.audit import read_audit_log
from medveil.runtime.auth import make_invitation
from medveil.runtime.client import HubClient, HubError
from medveil.runtime.config import write_private_key
from medveil.runtime.hub_store import Party
from medveil.runtime.node import Node, Refusal
from medveil.runtime.runs import TaskRun
from medveil.runtime.secure_rounds import TaskChannel, make_keyset, new_coordinator
from medveil.runtime.servers import HubServer
from medveil.runtime.session import FederationError, ResearcherSession
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import open_envelope, seal

MALLORY = SigningKey.generate()


def _sites() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(4)
    return {name: pd.DataFrame({"x": rng.normal(size=30)}) for name in ("site_a", "site_b", "site_c")}


@pytest.fixture(scope="module")
def fed():
    with mv.Federation.simulate(_sites(), timeout=60) as federation:
        yield federation


def _serve_wrong_key(hub: HubServer, site: str, key: SigningKey) -> None:
    """The operator edits its own table: from now on the hub serves `key` as `site`'s identity."""
    with hub.store.engine.begin() as connection:
        connection.execute(update(Party).where(Party.id == site).values(public_key=key.verify_key.to_text()))
    hub.store._parties.pop(site, None)


def _events(hub: HubServer) -> list[str]:
    return [event.kind for event in hub.store.events()]


# --- squatting: registration needs the operator's enrolment --------------------------------


@pytest.fixture
def bare_hub(tmp_path):
    hub = HubServer(f"sqlite:///{tmp_path / 'hub.db'}").start()
    yield hub
    hub.stop()


def _client(hub: HubServer, party: str, key: SigningKey, invitation: str | None = None) -> HubClient:
    return HubClient(hub.url, party, key, invitation=invitation)


def test_squatter_registering_a_site_name_first_is_refused(bare_hub):
    squatter = _client(bare_hub, "hospital_a", MALLORY)
    with pytest.raises(HubError) as error:
        squatter.register("site")
    assert error.value.status == 403 and "not_enrolled" in _events(bare_hub)
    assert bare_hub.store.party("hospital_a") is None
    genuine_key = SigningKey.generate()
    genuine = _client(bare_hub, "hospital_a", genuine_key, bare_hub.invite("hospital_a", "site"))
    assert genuine.register("site")["created"] is True
    assert bare_hub.store.party("hospital_a").public_key == genuine_key.verify_key.to_text()
    for client in (squatter, genuine):
        client.close()


@pytest.mark.parametrize("invitation", [
    lambda hub: make_invitation(MALLORY, "hospital_a", "site", time.time() + 600),
    lambda hub: hub.invite("mallory", "site"),
    lambda hub: hub.invite("hospital_a", "researcher"),
    lambda hub: hub.invite("hospital_a", "site", ttl_s=-1),
    lambda hub: hub.invite("hospital_a", "site", public_key=SigningKey.generate().verify_key.to_text()),
    lambda hub: hub.invite("hospital_a", "site")[:-4] + "AAAA",
    lambda hub: "not an invitation",
], ids=["signed-by-the-squatter", "for-another-party", "for-another-role", "expired", "bound-to-another-key",
        "tampered-signature", "garbage"])
def test_squatter_without_a_valid_invitation_for_the_name_is_refused(bare_hub, invitation):
    squatter = _client(bare_hub, "hospital_a", MALLORY, invitation(bare_hub))
    with pytest.raises(HubError) as error:
        squatter.register("site")
    squatter.close()
    assert error.value.status == 403 and _events(bare_hub)[-1] == "not_enrolled"
    assert bare_hub.store.party("hospital_a") is None


def test_a_used_invitation_cannot_re_key_an_enrolled_site(fed):
    """A leaked invitation for site_a, replayed with another key once site_a registered, is refused."""
    hub = fed.network.hub
    squatter = _client(hub, "site_a", MALLORY, hub.invite("site_a", "site"))
    with pytest.raises(HubError) as error:
        squatter.register("site")
    squatter.close()
    assert error.value.status == 403 and _events(hub)[-1] == "not_enrolled"
    assert hub.store.party("site_a").public_key == fed.study.site_keys["site_a"]


def test_an_enrolled_party_re_registers_its_own_key_without_an_invitation(fed):
    node = fed.network.nodes["site_a"].node
    again = HubClient(fed.network.hub.url, "site_a", node.client.key)
    assert again.register("site")["created"] is False
    again.close()


# --- a hub that serves a wrong key ---------------------------------------------------------


def test_hub_serving_a_wrong_key_cannot_make_the_researcher_accept_a_forged_reply(fed):
    hub = fed.network.hub
    _serve_wrong_key(hub, "site_b", MALLORY)
    try:
        task_id = "t-forged-reply"
        hub.store.add_task_step(task_id, fed.study.id, "researcher", "ping", 0, [], "forged-task-nonce", b"")
        forged = seal(MALLORY, {"kind": "reply", "sender": "site_b", "nonce": "forged-reply-nonce",
                                "issued_at": time.time(), "study": fed.study.id, "task": task_id, "step": 0,
                                "round": 0, "status": "ok"}, {"sums": {}, "public": {"rows": 1}})
        hub.store.add_reply(task_id, 0, "site_b", "forged-reply-nonce", forged.encode())
        unpinned = HubClient(hub.url, "researcher", fed.network.researcher.key)
        assert unpinned.public_key("site_b") == MALLORY.verify_key  # what a hub-trusting researcher would use
        forged.verify(unpinned.public_key("site_b"))
        unpinned.close()
        with pytest.raises(FederationError, match="forged"):
            fed.session.grid.gather(task_id, 0, ["site_b"], timeout=60)
        assert fed.session.grid.client.public_key("site_b").to_text() == fed.study.site_keys["site_b"]
    finally:
        _serve_wrong_key(hub, "site_b", fed.network.nodes["site_b"].node.client.key)


def test_connect_verifies_sites_against_the_pinned_keys_not_the_hub(fed):
    hub = fed.network.hub
    with mv.connect(hub.url, fed.network.researcher.key, fed.study.id, timeout=60) as connected:
        _serve_wrong_key(hub, "site_c", MALLORY)
        try:
            client = connected.session.grid.client
            assert client.public_key("site_c").to_text() == fed.study.site_keys["site_c"]
            with pytest.raises(SignatureError, match="no key is pinned"):
                client.public_key("mallory")
        finally:
            _serve_wrong_key(hub, "site_c", fed.network.nodes["site_c"].node.client.key)
        assert connected.ping() == ["site_a", "site_b", "site_c"]


def test_study_create_refuses_a_hub_key_that_does_not_match_the_stewards_fingerprint(fed, tmp_path):
    hub = fed.network.hub
    genuine = fed.network.nodes["site_b"].node.client.key.verify_key
    researcher_key = tmp_path / "researcher.key"
    write_private_key(researcher_key, fed.network.researcher.key)
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({"id": "pinned-by-fingerprint", "sites": ["site_b"],
                                    "site_keys": {"site_b": genuine.fingerprint()},
                                    "datasets": {"default": ["x"]}, "analyses": ["ping"]}))
    arguments = ["study", "create", "--spec", str(spec), "--hub", hub.url, "--identity", str(researcher_key),
                 "--researcher", "researcher"]
    _serve_wrong_key(hub, "site_b", MALLORY)
    try:
        result = CliRunner().invoke(cli_app, arguments)
        assert result.exit_code == 1 and "does not match the fingerprint" in result.output
        assert hub.store.study("pinned-by-fingerprint") is None
    finally:
        _serve_wrong_key(hub, "site_b", fed.network.nodes["site_b"].node.client.key)
    result = CliRunner().invoke(cli_app, arguments)
    assert result.exit_code == 0, result.output
    assert hub.store.study("pinned-by-fingerprint").spec["site_keys"] == {"site_b": genuine.to_text()}


def test_hub_and_researcher_cannot_slip_a_forged_secure_aggregation_key_to_the_peers(fed):
    """A new key set is made by an honest keys step; then the hub starts serving Mallory's key for
    site_b and the colluding researcher runs with the key set in which site_b's key reply is
    replaced by one signed by Mallory: the peers check it against the pinned key and mask
    nothing under it."""
    hub, session = fed.network.hub, fed.session
    task = TaskRun(uuid.uuid4().hex, fed.study.id, "describe", {"variables": ["x"]}, "default", fed.sites)
    state = make_keyset(TaskChannel(session.grid, task, session.timeout), new_coordinator(fed.study))
    original = open_envelope(state.key_envelopes["site_b"])
    public = dict(original.body()["public"], secagg_public=base64.b64encode(os.urandom(32)).decode())
    header = {k: v for k, v in original.header.items() if k not in ("v", "body_sha256")}
    state.key_envelopes["site_b"] = seal(MALLORY, header, {**original.body(), "public": public}).encode()
    _serve_wrong_key(hub, "site_b", MALLORY)
    session.keysets.current = state  # the next run uses the forged key set
    try:
        with pytest.raises(mv.RefusedError) as error:
            fed.describe("x")
        assert {site for site, _, _ in error.value.refusals} >= {"site_a", "site_c"}
        assert {rule for _, rule, _ in error.value.refusals} == {"secagg_peer_key"}
    finally:
        session.keysets.current = None
        _serve_wrong_key(hub, "site_b", fed.network.nodes["site_b"].node.client.key)


# --- stewards approve exactly their node's key ---------------------------------------------


def test_study_pinning_another_key_for_the_site_is_not_approved_by_its_steward(fed):
    network = fed.network
    keys = dict(fed.study.site_keys, site_a=MALLORY.verify_key.to_text())
    spec = StudySpec(id="mallory-pins-site-a", researcher="researcher", researcher_key=fed.study.researcher_key,
                     sites=fed.study.sites, site_keys=keys, datasets={"default": ["x"]}, analyses=["ping", "describe"])
    network.researcher.post("/v1/studies", network.researcher.seal("study", {"spec": spec.model_dump()},
                                                                   study=spec.id))
    node = Node.from_config_file(network.workdir / "site_a" / "site.yaml")
    try:
        with pytest.raises(Refusal) as error:
            node.approve(spec.id, SigningKey.from_pem(network.steward_key_path("site_a").read_bytes()))
        assert error.value.rule == "pinned_key_mismatch"
        assert node.store.approval(spec.id) is None
    finally:
        node.close()
    assert "site_a" not in {a.site for a in network.hub.store.approvals(spec.id)}
    with pytest.raises(FederationError):  # site_a refuses, and its refusal does not verify under Mallory's pin
        ResearcherSession(network.researcher, spec, timeout=60).run("describe", {"variables": ["x"]}, "default")
    refusals = [entry for entry in read_audit_log(network.workdir / "site_a" / "state" / "audit.jsonl")
                if entry["kind"] == "refusal" and entry.get("study") == spec.id]
    assert refusals and {entry["rule"] for entry in refusals} == {"study_not_approved"}
    assert not any(entry["kind"] == "release" and entry.get("study") == spec.id
                   for entry in read_audit_log(network.workdir / "site_a" / "state" / "audit.jsonl"))


def test_connect_warns_about_an_unencrypted_key_file(fed, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVEIL_KEY_PASSPHRASE", raising=False)
    path = tmp_path / "researcher.key"
    write_private_key(path, fed.network.researcher.key)
    with pytest.warns(UserWarning, match="not encrypted"):
        connected = mv.connect(fed.network.hub.url, path, fed.study.id, timeout=60)
    connected.close()
