"""The hub's steps and its pruning, on SQLite and (when a server is up) PostgreSQL: a step may go
out as several task messages with disjoint recipients, a recipient asked twice is a replay, and
the relayed traffic (rows and blob files) of tasks finished or idle past the retention is deleted
while that of running and recent tasks is kept."""

from __future__ import annotations

import sqlite3
import time

import msgpack
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from medveil.crypto.signing import SigningKey
from medveil.runtime.auth import HEADER, make_invitation, make_token
from medveil.runtime.hub import BINARY, MAX_MESSAGE_AGE_S, create_hub_app
from medveil.runtime.hub_store import Conflict, HubStore, Message, StepClosed, Task
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import open_envelope, seal

SITES = ["site_a", "site_b", "site_c"]
RETENTION_S = 7 * 24 * 3600.0
BIG = HubStore.BLOB_THRESHOLD + 1


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    """An empty hub store with a researcher, three sites and study-1."""
    url = f"sqlite:///{tmp_path / 'hub.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    hub_store = HubStore(url, blob_dir=tmp_path / "blobs")
    for party, role in [("researcher", "researcher"), *((site, "site") for site in SITES)]:
        hub_store.register(party, role, f"key-of-{party}")
    hub_store.add_study("study-1", "researcher", {"sites": SITES}, b"study")
    yield hub_store
    hub_store.close()


def send(store: HubStore, task: str, step: int, recipients: list[str], size: int = 100) -> str:
    """Post a task message of `size` bytes for one step (over BLOB_THRESHOLD it is kept as a file);
    returns its nonce, which the stored bytes begin with."""
    nonce = f"{task}-{step}-{'-'.join(recipients)}"
    envelope = nonce.encode().ljust(size, b".")
    store.add_task_step(task, "study-1", "researcher", "ping", step, recipients, nonce, envelope)
    return nonce


def reply(store: HubStore, task: str, step: int, site: str, size: int = 100) -> int:
    nonce = f"{task}-{step}-reply-{site}"
    return store.add_reply(task, step, site, nonce, nonce.encode().ljust(size, b"."))


def age(store: HubStore, task: str, seconds: float) -> None:
    """Move a task's clock back: its creation, result and messages happened `seconds` earlier."""
    with Session(store.engine) as s:
        s.execute(update(Task).where(Task.id == task).values(
            created_at=Task.created_at - seconds, finished_at=Task.finished_at - seconds))
        s.execute(update(Message).where(Message.task == task).values(created_at=Message.created_at - seconds))
        s.commit()


def blob_files(store: HubStore) -> set[str]:
    return {path.name for path in store.blob_dir.iterdir()} if store.blob_dir.exists() else set()


def task_of(message: bytes) -> str:
    return message.decode().split("-")[0]


def nonce_of(message: bytes) -> str:
    return message.decode().rstrip(".")


def test_traffic_of_a_task_finished_past_the_retention_is_deleted_from_disk_and_tables(store):
    for task in ("old", "recent", "running"):
        send(store, task, 0, ["site_a", "site_b"], size=BIG)
        reply(store, task, 0, "site_a", size=BIG)
        reply(store, task, 0, "site_b")
    assert len(blob_files(store)) == 6
    store.set_result("old", "done", {"estimate": 1.5})
    store.set_result("recent", "done", {})
    age(store, "old", RETENTION_S + 60)
    age(store, "recent", RETENTION_S - 60)
    age(store, "running", RETENTION_S - 60)
    kept = {name for name in blob_files(store)
            if task_of((store.blob_dir / name).read_bytes()) in ("recent", "running")}

    assert store.prune_finished(RETENTION_S) == ["old"]

    assert blob_files(store) == kept and len(kept) == 4
    assert {task_of(m.envelope) for m in store.messages()} == {"recent", "running"}
    assert {task_of(m.envelope) for m in store.inbox("site_a", 0)} == {"recent", "running"}
    assert store.replies("old", 0) == [] and store.step("old", 0) is None
    assert len(store.replies("recent", 0)) == 2 and store.step("running", 0).recipients == ["site_a", "site_b"]
    assert store.task("old").result == {"estimate": 1.5}  # the researcher's provenance stays
    assert store.prune_finished(RETENTION_S) == []


def test_a_task_idle_past_the_retention_is_pruned_though_it_never_finished(store):
    send(store, "abandoned", 0, ["site_a"], size=BIG)
    send(store, "busy", 0, ["site_a"])
    age(store, "abandoned", RETENTION_S + 60)
    age(store, "busy", RETENTION_S + 60)
    send(store, "busy", 1, ["site_a"])  # a fresh step: busy is not idle

    assert store.prune_finished(RETENTION_S) == ["abandoned"]
    assert blob_files(store) == set()
    assert [task_of(m.envelope) for m in store.inbox("site_a", 0)] == ["busy", "busy"]
    assert store.task("abandoned").status == "running"


def test_a_step_may_go_out_as_several_messages_with_disjoint_recipients(store):
    first = send(store, "t", 0, ["site_a"])
    second = send(store, "t", 0, ["site_b", "site_c"])
    assert store.step("t", 0).recipients == ["site_a", "site_b", "site_c"]
    assert [nonce_of(m.envelope) for m in store.inbox("site_a", 0)] == [first]
    assert [nonce_of(m.envelope) for m in store.inbox("site_c", 0)] == [second]
    for site in SITES:
        reply(store, "t", 0, site)
    assert len(store.replies("t", 0)) == 3


def test_a_recipient_asked_twice_in_one_step_is_a_replay_and_nothing_is_delivered(store):
    send(store, "t", 0, ["site_a", "site_b"])
    with pytest.raises(Conflict, match="already sent to site_b"):
        send(store, "t", 0, ["site_c", "site_b"])
    assert store.step("t", 0).recipients == ["site_a", "site_b"]
    assert store.inbox("site_c", 0) == [] and len(store.messages()) == 1


def test_a_message_for_a_step_older_than_the_latest_is_refused(store):
    send(store, "t", 0, ["site_a"])
    send(store, "t", 1, ["site_a"])
    with pytest.raises(StepClosed, match="step 1 has begun"):
        send(store, "t", 0, ["site_b"])
    assert store.step("t", 0).recipients == ["site_a"]


# Over HTTP: the hub's step URLs, its 409s, and pruning at start.

OPERATOR = SigningKey.generate()
KEYS = {party: SigningKey.generate() for party in ["researcher", *SITES]}


def envelope(party: str, header: dict, body: dict | None = None) -> bytes:
    return seal(KEYS[party], {"sender": party, "nonce": f"{party}-{time.time_ns()}", "issued_at": time.time(),
                              **header}, body).encode()


def enrol(client: TestClient) -> None:
    for party, key in KEYS.items():
        role = "researcher" if party == "researcher" else "site"
        body = {"role": role, "public_key": key.verify_key.to_text(),
                "invitation": make_invitation(OPERATOR, party, role, time.time() + 600)}
        assert client.post("/v1/parties", content=envelope(party, {"kind": "register"}, body)).status_code == 200
    spec = StudySpec(id="study-1", researcher="researcher", researcher_key=KEYS["researcher"].verify_key.to_text(),
                     sites=SITES, site_keys={site: KEYS[site].verify_key.to_text() for site in SITES},
                     datasets={"default": ["x"]}, analyses=["ping"])
    raw = envelope("researcher", {"kind": "study", "study": "study-1"}, {"spec": spec.model_dump()})
    assert client.post("/v1/studies", content=raw).status_code == 200


def post_task(client: TestClient, step: int, recipients: list[str]):
    header = {"kind": "task", "study": "study-1", "task": "t-http", "step": step, "round": step,
              "phase": "compute", "analysis": "ping", "dataset": "default", "recipients": recipients}
    return client.post("/v1/messages", content=envelope("researcher", header), headers={"Content-Type": BINARY})


def post_reply(client: TestClient, site: str, step: int):
    header = {"kind": "reply", "study": "study-1", "task": "t-http", "step": step, "round": step}
    return client.post("/v1/messages", content=envelope(site, header, {"public": {}}),
                       headers={"Content-Type": BINARY})


def get(client: TestClient, party: str, path: str, **params):
    return client.get(path, params=params, headers={HEADER: make_token(party, KEYS[party], "GET", path)})


@pytest.fixture()
def hub(tmp_path):
    hub_store = HubStore(f"sqlite:///{tmp_path / 'hub.db'}")
    with TestClient(create_hub_app(hub_store, operator_key=OPERATOR.verify_key, max_wait_s=0.05)) as client:
        enrol(client)
        yield client, hub_store
    hub_store.close()


def test_the_hub_takes_a_step_as_messages_to_disjoint_sites_and_answers_on_the_step_urls(hub):
    client, store = hub
    assert post_task(client, 0, ["site_a"]).status_code == 200
    assert post_task(client, 0, ["site_b", "site_c"]).status_code == 200
    refused = post_task(client, 0, ["site_c"])
    assert refused.status_code == 409 and "already sent to site_c" in refused.json()["detail"]
    assert store.events()[-1].kind == "replay"

    for site in ("site_c", "site_a"):
        assert post_reply(client, site, 0).status_code == 200
    assert get(client, "researcher", "/v1/tasks/t-http/steps/0/senders").json() == ["site_a", "site_c"]
    assert get(client, "site_b", "/v1/tasks/t-http/steps/0/senders").json() == ["site_a", "site_c"]
    assert post_reply(client, "site_b", 0).status_code == 200
    replies = get(client, "researcher", "/v1/tasks/t-http/steps/0/replies", wait=0)
    assert replies.status_code == 200
    assert sorted(open_envelope(raw).sender for raw in msgpack.unpackb(replies.content)) == SITES
    assert get(client, "researcher", "/v1/tasks/t-http/rounds/0/replies").status_code == 404

    assert post_task(client, 1, ["site_a"]).status_code == 200
    late = post_task(client, 0, ["site_a"])
    assert late.status_code == 409 and store.events()[-1].kind == "closed"


def test_a_site_outside_every_message_of_the_step_cannot_reply(hub):
    client, store = hub
    assert post_task(client, 0, ["site_a"]).status_code == 200
    assert post_task(client, 0, ["site_b"]).status_code == 200
    assert post_reply(client, "site_c", 0).status_code == 403
    assert store.events()[-1].kind == "not_recipient"
    assert store.replies("t-http", 0) == []


def test_the_hub_prunes_at_start_and_refuses_a_retention_inside_the_freshness_window(store):
    send(store, "old", 0, ["site_a"], size=BIG)
    store.set_result("old", "done", {})
    age(store, "old", RETENTION_S + 60)
    send(store, "new", 0, ["site_a"])

    create_hub_app(store, operator_key=OPERATOR.verify_key, retention_s=RETENTION_S)

    assert blob_files(store) == set() and [task_of(m.envelope) for m in store.messages()] == ["new"]
    assert store.events()[-1].kind == "pruned"
    with pytest.raises(ValueError, match="fresh"):
        create_hub_app(store, operator_key=OPERATOR.verify_key, retention_s=MAX_MESSAGE_AGE_S)


def test_a_database_from_before_steps_is_upgraded_in_place(tmp_path):
    """A hub restarted on a database whose tables still say `rounds` resumes its tasks."""
    path = tmp_path / "old-hub.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE parties (id VARCHAR(128) PRIMARY KEY, role VARCHAR(16), public_key VARCHAR(64),
                                  registered_at FLOAT);
            CREATE TABLE studies (id VARCHAR(128) PRIMARY KEY, researcher VARCHAR(128) REFERENCES parties(id),
                                  spec JSON, envelope BLOB, created_at FLOAT);
            CREATE TABLE tasks (id VARCHAR(64) PRIMARY KEY, study VARCHAR(128) REFERENCES studies(id),
                                researcher VARCHAR(128) REFERENCES parties(id), analysis VARCHAR(64),
                                status VARCHAR(16), result JSON, created_at FLOAT);
            CREATE TABLE rounds (task VARCHAR(64) REFERENCES tasks(id), number INTEGER, recipients JSON,
                                 created_at FLOAT, PRIMARY KEY (task, number));
            CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind VARCHAR(16), sender VARCHAR(128),
                                   task VARCHAR(64), round INTEGER, nonce VARCHAR(64) UNIQUE, envelope BLOB,
                                   blob VARCHAR(64), created_at FLOAT);
            INSERT INTO parties VALUES ('researcher', 'researcher', 'k', 0), ('site_a', 'site', 'k', 0);
            INSERT INTO studies VALUES ('study-1', 'researcher', '{}', x'00', 0);
            INSERT INTO tasks VALUES ('t-old', 'study-1', 'researcher', 'ping', 'running', NULL, 0);
            INSERT INTO rounds VALUES ('t-old', 0, '["site_a"]', 0);
            INSERT INTO messages (kind, sender, task, round, nonce, envelope, blob, created_at)
                VALUES ('task', 'researcher', 't-old', 0, 'n-0', x'01', NULL, 0);
        """)
    store = HubStore(f"sqlite:///{path}")
    try:
        assert store.step("t-old", 0).recipients == ["site_a"] and store.last_step("t-old") == 0
        reply(store, "t-old", 0, "site_a")
        assert [nonce_of(m.envelope) for m in store.replies("t-old", 0)] == ["t-old-0-reply-site_a"]
        store.set_result("t-old", "done", {})
        assert store.prune_finished(RETENTION_S, now=time.time() + RETENTION_S + 60) == ["t-old"]
    finally:
        store.close()
