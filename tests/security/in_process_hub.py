"""An in-process hub (FastAPI's TestClient) with enrolled parties and one study, for red-team
tests that post hand-made envelopes to it."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from medveil.crypto.signing import SigningKey
from medveil.runtime.auth import make_invitation
from medveil.runtime.hub import BINARY
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import seal


def post(client: TestClient, path: str, raw: bytes):
    return client.post(path, content=raw, headers={"Content-Type": BINARY})


def enrol_and_publish(client: TestClient, operator: SigningKey, parties: dict[str, tuple[str, SigningKey]],
                      site_key: SigningKey) -> None:
    """Register each party {id: (role, key)} with the operator's invitation, then publish study-1
    of "researcher" over site_a (pinned to `site_key`), analysis ping."""
    for party, (role, key) in parties.items():
        envelope = seal(key, {"kind": "register", "sender": party, "nonce": f"{party}-register",
                              "issued_at": time.time()},
                        {"role": role, "public_key": key.verify_key.to_text(),
                         "invitation": make_invitation(operator, party, role, time.time() + 600)})
        assert post(client, "/v1/parties", envelope.encode()).status_code == 200
    researcher = parties["researcher"][1]
    spec = StudySpec(id="study-1", researcher="researcher", researcher_key=researcher.verify_key.to_text(),
                     sites=["site_a"], site_keys={"site_a": site_key.verify_key.to_text()},
                     datasets={"default": ["x"]}, analyses=["ping"])
    envelope = seal(researcher, {"kind": "study", "sender": "researcher", "nonce": "study-1",
                                 "issued_at": time.time(), "study": spec.id}, {"spec": spec.model_dump()})
    assert post(client, "/v1/studies", envelope.encode()).status_code == 200
