"""Hostile headers: a NaN, a string, a list or a huge number where the wire format expects an id,
a counter or a time is refused as malformed by the hub (a 4xx and a logged event, never a 5xx)
and by the node (no reply, a `malformed` audit entry, no exception), and nothing is stored,
delivered or computed from such a message."""

from __future__ import annotations

import hashlib
import json
import math
import time

import msgpack
import pytest
from fastapi.testclient import TestClient

from medveil.crypto.signing import SigningKey
from medveil.runtime.audit import read_audit_log
from medveil.runtime.auth import HEADER, make_token
from medveil.runtime.config import SiteConfig
from medveil.runtime.hub import create_hub_app
from medveil.runtime.hub_store import HubStore
from medveil.runtime.node import Node
from in_process_hub import enrol_and_publish, post
from medveil.runtime.wire import MAX_HEADER_BYTES, PROTOCOL_VERSION, pack_body, seal

OPERATOR = SigningKey.generate()
RESEARCHER = SigningKey.generate()
SITE = SigningKey.generate()
STEWARD = SigningKey.generate()

HOSTILE = [
    ("step", math.nan), ("step", math.inf), ("step", "1"), ("step", 10**30), ("step", -1), ("step", 2.0),
    ("step", True), ("round", math.nan), ("round", -math.inf), ("round", "0"), ("round", 2**70),
    ("issued_at", math.nan), ("issued_at", math.inf), ("issued_at", -math.inf), ("issued_at", "now"),
    ("issued_at", 1e308), ("sender", ["researcher"]), ("sender", {"id": "researcher"}), ("study", ["study-1"]),
    ("task", {"t": 1}), ("task", 12), ("recipients", "site_a"), ("recipients", [1, 2]),
    ("recipients", [["site_a"]]), ("nonce", ["n"]), ("analysis", ["ping"]), ("dataset", 3.5),
    ("audit_ids", "site_a:1"), ("padding", "x" * (MAX_HEADER_BYTES + 1)),
]
IDS = [f"{field}={str(value)[:10]}" for field, value in HOSTILE]


def hostile_envelope(key: SigningKey, changes: dict, body: dict | None = None) -> bytes:
    """A task envelope, correctly signed by `key`, whose header carries `changes`; written with
    json.dumps, which (unlike the canonical encoder) writes NaN and Infinity as an attacker may."""
    body_bytes = pack_body(body or {"params": {}, "broadcast": {}})
    header = {"v": PROTOCOL_VERSION, "kind": "task", "sender": "researcher", "nonce": "ab" * 16,
              "issued_at": time.time(), "study": "study-1", "task": "t-hostile", "step": 0, "round": 0,
              "phase": "compute", "analysis": "ping", "dataset": "default", "recipients": ["site_a"],
              "body_sha256": hashlib.sha256(body_bytes).hexdigest()}
    header.update(changes)
    header_bytes = json.dumps(header, sort_keys=True).encode()
    return msgpack.packb({"h": header_bytes, "s": key.sign(header_bytes), "b": body_bytes}, use_bin_type=True)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An in-process hub with a registered researcher and site and one study."""
    store = HubStore(f"sqlite:///{tmp_path_factory.mktemp('hub') / 'hub.db'}")
    app = create_hub_app(store, operator_key=OPERATOR.verify_key, max_wait_s=0.05)
    with TestClient(app) as client:
        enrol_and_publish(client, OPERATOR, {"researcher": ("researcher", RESEARCHER), "site_a": ("site", SITE)},
                          SITE)
        yield client, store
    store.close()


def get(client: TestClient, path: str, party: str, key: SigningKey, **params):
    return client.get(path, params=params, headers={HEADER: make_token(party, key, "GET", path)})


def event_kinds(store: HubStore) -> list[str]:
    return [event.kind for event in store.events()]


@pytest.mark.parametrize("field, value", HOSTILE, ids=IDS)
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/parties", "/v1/studies", "/v1/studies/study-1/approvals",
                                  "/v1/tasks/t-hostile/result"])
def test_hostile_header_gets_a_4xx_and_a_logged_event_at_the_hub(hub, path, field, value):
    client, store = hub
    events_before = len(store.events())
    response = post(client, path, hostile_envelope(RESEARCHER, {field: value}))
    assert 400 <= response.status_code < 500
    assert event_kinds(store)[events_before:] == ["malformed"]
    assert store.messages() == [] and store.inbox("site_a", 0) == []


@pytest.mark.parametrize("params", [{"wait": "nan"}, {"wait": "inf"}, {"wait": "-1"}, {"wait": "1e309"},
                                    {"wait": "soon"}, {"after": str(2**64)}, {"after": "-5"}, {"after": "1.5"}],
                         ids=lambda params: "&".join(f"{k}={v}" for k, v in params.items()))
def test_hostile_long_poll_parameters_get_a_4xx_and_a_logged_event(hub, params):
    client, store = hub
    events_before = len(store.events())
    response = get(client, "/v1/inbox", "site_a", SITE, **params)
    assert response.status_code == 422
    assert event_kinds(store)[events_before:] == ["malformed"]


@pytest.mark.parametrize("number", [str(2**64), "-1", "nan", "1e3"])
def test_hostile_step_number_in_a_path_gets_a_4xx_and_a_logged_event(hub, number):
    client, store = hub
    events_before = len(store.events())
    path = f"/v1/tasks/t-hostile/steps/{number}/replies"
    response = get(client, path, "researcher", RESEARCHER, wait="0")
    assert response.status_code == 422
    assert event_kinds(store)[events_before:] == ["malformed"]


def _token(claims: dict, key: SigningKey) -> str:
    from medveil.crypto.signing import b64encode

    text = json.dumps(claims).encode()
    return f"{b64encode(text)}.{b64encode(key.sign(text))}"


@pytest.mark.parametrize("claims", [
    {"who": "site_a", "ts": math.nan, "nonce": "n", "method": "GET", "path": "/v1/inbox"},
    {"who": "site_a", "ts": "now", "nonce": "n", "method": "GET", "path": "/v1/inbox"},
    {"who": ["site_a"], "ts": 0, "nonce": "n", "method": "GET", "path": "/v1/inbox"},
    ["site_a"],
], ids=["ts-nan", "ts-string", "who-list", "claims-list"])
def test_hostile_read_token_gets_a_401_and_a_logged_event(hub, claims):
    client, store = hub
    events_before = len(store.events())
    response = client.get("/v1/inbox", headers={HEADER: _token(claims, SITE)})
    assert response.status_code == 401
    assert event_kinds(store)[events_before:] == ["unauthenticated"]


@pytest.mark.parametrize("summary", [{"x": math.nan}, {"x": b"\x00"}, ["not", "a", "map"], {"deep": [[[[1]]]] * 3}],
                         ids=["nan", "bytes", "list", "fine"])
def test_result_summary_that_is_not_finite_json_gets_a_4xx(hub, summary):
    client, store = hub
    task = seal(RESEARCHER, {"kind": "task", "sender": "researcher", "nonce": f"task-{id(summary)}",
                             "issued_at": time.time(), "study": "study-1", "task": f"t-result-{id(summary)}",
                             "step": 0, "round": 0, "analysis": "ping", "recipients": ["site_a"]})
    assert post(client, "/v1/messages", task.encode()).status_code == 200
    task_id = task.header["task"]
    result = seal(RESEARCHER, {"kind": "result", "sender": "researcher", "nonce": f"result-{id(summary)}",
                               "issued_at": time.time(), "task": task_id}, {"status": "done", "summary": summary})
    response = post(client, f"/v1/tasks/{task_id}/result", result.encode())
    assert response.status_code == (200 if isinstance(summary, dict) and "deep" in summary else 400)


def test_a_body_that_is_not_msgpack_gets_a_4xx_and_a_logged_event(hub):
    client, store = hub
    envelope = seal(RESEARCHER, {"kind": "study", "sender": "researcher", "nonce": "bad-body",
                                 "issued_at": time.time(), "study": "s2"})
    broken = msgpack.packb({"h": envelope.header_bytes, "s": envelope.signature, "b": b"\xc1"}, use_bin_type=True)
    events_before = len(store.events())
    assert post(client, "/v1/studies", broken).status_code == 403  # the body digest no longer matches
    envelope = seal(RESEARCHER, {"kind": "study", "sender": "researcher", "nonce": "bad-spec",
                                 "issued_at": time.time(), "study": "s2"}, {"spec": {"id": ["s2"],
                                                                                     "researcher": "researcher"}})
    assert post(client, "/v1/studies", envelope.encode()).status_code == 400
    assert event_kinds(store)[events_before:] == ["forged", "malformed"]
    assert store.study("s2") is None


@pytest.fixture
def node(tmp_path):
    config = SiteConfig(site="site_a", hub="http://127.0.0.1:9", identity=tmp_path / "node.key",
                        steward_key=tmp_path / "steward.pub", state_dir=tmp_path / "state")
    node = Node(config, SITE, STEWARD.verify_key, frames={})
    yield node
    node.close()


@pytest.mark.parametrize("field, value", HOSTILE, ids=IDS)
def test_hostile_header_is_refused_by_the_node_without_raising(node, field, value):
    reply = node.handle(hostile_envelope(RESEARCHER, {field: value}))
    assert reply is None or reply.header["status"] == "refused"
    last = read_audit_log(node.config.state_dir / "audit.jsonl")[-1]
    assert last["kind"] == "refusal" and last["rule"] == "malformed"
    assert not any(entry["kind"] in ("decision", "release")
                   for entry in read_audit_log(node.config.state_dir / "audit.jsonl"))
