"""Schemathesis against the hub's own OpenAPI schema (FastAPI's /openapi.json), in process: no
generated request, anonymous or signed by an enrolled party, gets a server error (5xx)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from medveil.crypto.signing import SigningKey
from medveil.runtime.auth import HEADER, make_invitation, make_token
from medveil.runtime.hub import BINARY, create_hub_app
from medveil.runtime.hub_store import HubStore
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import seal

schemathesis = pytest.importorskip("schemathesis")

OPERATOR = SigningKey.generate()
PARTIES = {"researcher": ("researcher", SigningKey.generate()), "site_a": ("site", SigningKey.generate())}


def _enrol(client, store: HubStore) -> None:
    """Register the researcher and the site and publish one study, so signed requests go deep."""
    for party, (role, key) in PARTIES.items():
        invitation = make_invitation(OPERATOR, party, role, time.time() + 600)
        envelope = seal(key, {"kind": "register", "sender": party, "nonce": f"register-{party}",
                              "issued_at": time.time()},
                        {"role": role, "public_key": key.verify_key.to_text(), "invitation": invitation})
        client.post("/v1/parties", content=envelope.encode()).raise_for_status()
    researcher_key = PARTIES["researcher"][1]
    spec = StudySpec(id="study-1", researcher="researcher", researcher_key=researcher_key.verify_key.to_text(),
                     sites=["site_a"], site_keys={"site_a": PARTIES["site_a"][1].verify_key.to_text()},
                     datasets={"default": ["x"]}, analyses=["ping"])
    envelope = seal(researcher_key, {"kind": "study", "sender": "researcher", "nonce": "study-1",
                                     "issued_at": time.time(), "study": spec.id}, {"spec": spec.model_dump()})
    client.post("/v1/studies", content=envelope.encode()).raise_for_status()


@schemathesis.serializer(BINARY)
def _binary(ctx, value) -> bytes:
    """Generated envelope bodies (format: binary) go to the hub as they are."""
    return value if isinstance(value, bytes) else str(value).encode()


_WORKDIR = tempfile.TemporaryDirectory(prefix="medveil-schema-")
STORE = HubStore(f"sqlite:///{Path(_WORKDIR.name) / 'hub.db'}")
APP = create_hub_app(STORE, operator_key=OPERATOR.verify_key, max_wait_s=0.01)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def enrolled_hub():
    from fastapi.testclient import TestClient

    with TestClient(APP) as client:
        _enrol(client, STORE)
    yield
    STORE.close()
    _WORKDIR.cleanup()


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case):
    for reader in (None, *PARTIES):
        headers = {}
        if reader is not None:
            headers[HEADER] = make_token(reader, PARTIES[reader][1], case.method.upper(), case.formatted_path)
        response = case.call(headers=headers)
        assert response.status_code < 500, f"{case.method} {case.formatted_path} as {reader} -> {response.status_code}"
