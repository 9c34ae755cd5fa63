"""The hub: a FastAPI app that relays signed tasks and replies and keeps study state.

Threat model: the operator is honest-but-curious. It checks who may send what (every write is
a signed envelope from a registered party, fresh and never replayed; every read carries a
signed token) but it cannot forge a task or a release, and it sees only what sites chose to
release (masked, once secure aggregation is on). It never runs analysis code.
Long-polls wake at once when a message arrives: waiters park on an asyncio.Event per inbox.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any, Callable

import msgpack
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from medveil.crypto.signing import SignatureError, VerifyKey
from medveil.runtime.auth import HEADER, AuthError, check_token, token_party
from medveil.runtime.hub_store import Conflict, HubStore
from medveil.runtime.wire import DEFAULT_MAX_BYTES, Envelope, WireError, open_envelope

BINARY = "application/x-medveil"
MAX_WAIT_S = 30.0
MAX_MESSAGE_AGE_S = 300.0


class Notifier:
    """Wakes long-polls waiting on a key (an inbox or a task round)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.closed = False

    def event(self, key: str) -> asyncio.Event:
        return self._events[key]

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def close(self) -> None:
        self.closed = True
        for key in list(self._events):
            self.notify(key)

    async def wait(self, key: str, seconds: float) -> None:
        if self.closed or seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.event(key).wait(), seconds)
        except asyncio.TimeoutError:
            pass


def create_hub_app(store: HubStore, *, max_bytes: int = DEFAULT_MAX_BYTES, record_traffic: bool = False) -> FastAPI:
    """Build the hub's HTTP API over a store."""
    app = FastAPI(title="medveil hub", version="1")
    notifier = Notifier()
    app.state.notifier = notifier
    app.state.store = store

    def refuse(status: int, kind: str, detail: str) -> HTTPException:
        store.log_event(kind, detail)
        return HTTPException(status, detail)

    async def read_envelope(request: Request) -> Envelope:
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit():
            raise refuse(411, "refused", "a Content-Length header is required")
        if int(declared) > max_bytes:
            raise refuse(413, "oversized", f"request of {declared} bytes exceeds the hub's limit of {max_bytes}")
        body = await request.body()
        try:
            return open_envelope(body, max_bytes)
        except WireError as exc:
            raise refuse(400, "malformed", str(exc)) from exc

    def verify_sender(envelope: Envelope, role: str | None = None) -> None:
        party = store.party(envelope.sender)
        if party is None:
            raise refuse(403, "unknown_sender", f"sender {envelope.sender!r} is not registered")
        if role is not None and party.role != role:
            raise refuse(403, "wrong_role", f"{envelope.sender!r} is a {party.role}, not a {role}")
        try:
            envelope.verify(VerifyKey.from_text(party.public_key))
        except SignatureError as exc:
            raise refuse(403, "forged", str(exc)) from exc
        age = abs(time.time() - float(envelope.header["issued_at"]))
        if age > MAX_MESSAGE_AGE_S:
            raise refuse(403, "stale", f"message from {envelope.sender!r} is {age:.0f} s old")

    def reader(request: Request, role: str | None = None) -> str:
        token = request.headers.get(HEADER)
        if not token:
            raise refuse(401, "unauthenticated", f"missing {HEADER} header")
        try:
            party_id = token_party(token)
            party = store.party(party_id)
            if party is None:
                raise AuthError(f"{party_id!r} is not registered")
            check_token(token, VerifyKey.from_text(party.public_key), request.method, request.url.path, time.time())
        except AuthError as exc:
            raise refuse(401, "unauthenticated", str(exc)) from exc
        if role is not None and party.role != role:
            raise refuse(403, "wrong_role", f"{party_id!r} is a {party.role}, not a {role}")
        return party_id

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "time": time.time()}

    @app.post("/v1/parties")
    async def register(request: Request) -> dict[str, Any]:
        envelope = await read_envelope(request)
        body = envelope.body(max_bytes)
        role, key_text = body.get("role"), body.get("public_key")
        if envelope.kind != "register" or role not in ("site", "researcher") or not isinstance(key_text, str):
            raise refuse(400, "malformed", "registration needs role 'site' or 'researcher' and a public key")
        try:
            envelope.verify(VerifyKey.from_text(key_text))
            created = store.register(envelope.sender, role, key_text)
        except (SignatureError, ValueError) as exc:
            raise refuse(403 if isinstance(exc, (SignatureError, Conflict)) else 400, "registration", str(exc)) from exc
        return {"party": envelope.sender, "created": created}

    @app.get("/v1/parties/{party_id}")
    def get_party(party_id: str) -> dict[str, Any]:
        party = store.party(party_id)
        if party is None:
            raise HTTPException(404, f"{party_id!r} is not registered")
        return {"id": party.id, "role": party.role, "public_key": party.public_key}

    @app.post("/v1/studies")
    async def create_study(request: Request) -> dict[str, Any]:
        envelope = await read_envelope(request)
        verify_sender(envelope, "researcher")
        spec = envelope.body(max_bytes).get("spec")
        if envelope.kind != "study" or not isinstance(spec, dict) or spec.get("researcher") != envelope.sender:
            raise refuse(400, "malformed", "a study message carries a spec whose researcher is its sender")
        try:
            store.add_study(str(spec["id"]), envelope.sender, spec, envelope.encode())
        except (Conflict, KeyError) as exc:
            raise refuse(409, "conflict", str(exc)) from exc
        return {"study": spec["id"]}

    @app.get("/v1/studies")
    def list_studies() -> list[dict[str, Any]]:
        return [
            {"id": st.id, "researcher": st.researcher, "title": st.spec.get("title", ""),
             "sites": st.spec.get("sites", []), "approved_by": sorted(a.site for a in store.approvals(st.id))}
            for st in store.studies()
        ]

    @app.get("/v1/studies/{study_id}")
    def get_study(study_id: str) -> Response:
        study = store.study(study_id)
        if study is None:
            raise HTTPException(404, f"study {study_id!r} does not exist")
        return Response(study.envelope, media_type=BINARY)

    @app.post("/v1/studies/{study_id}/approvals")
    async def post_approval(study_id: str, request: Request) -> dict[str, Any]:
        envelope = await read_envelope(request)
        verify_sender(envelope, "site")
        if envelope.kind != "approval" or envelope.header.get("study") != study_id or store.study(study_id) is None:
            raise refuse(400, "malformed", f"not an approval of an existing study {study_id!r}")
        store.add_approval(study_id, envelope.sender, envelope.encode())
        return {"study": study_id, "site": envelope.sender}

    @app.post("/v1/messages")
    async def post_message(request: Request) -> dict[str, Any]:
        envelope = await read_envelope(request)
        header = envelope.header
        if envelope.kind == "task":
            verify_sender(envelope, "researcher")
            return post_task(envelope)
        if envelope.kind == "reply":
            verify_sender(envelope, "site")
            return post_reply(envelope)
        raise refuse(400, "malformed", f"unknown message kind {header.get('kind')!r}")

    def post_task(envelope: Envelope) -> dict[str, Any]:
        header = envelope.header
        study = store.study(str(header.get("study")))
        if study is None or study.researcher != envelope.sender:
            raise refuse(403, "not_owner", f"{envelope.sender!r} does not own study {header.get('study')!r}")
        recipients = header.get("recipients")
        if not isinstance(recipients, list) or not set(recipients) <= set(study.spec.get("sites", [])):
            raise refuse(400, "malformed", "task recipients must be sites of the study")
        try:
            seq = store.add_task_round(
                str(header["task"]), study.id, envelope.sender, str(header["analysis"]), int(header["step"]),
                recipients, str(header["nonce"]), envelope.encode(),
            )
        except Conflict as exc:
            raise refuse(409, "replay", str(exc)) from exc
        except KeyError as exc:
            raise refuse(400, "malformed", f"task header lacks {exc}") from exc
        for site in recipients:
            notifier.notify(f"inbox:{site}")
        return {"seq": seq}

    def post_reply(envelope: Envelope) -> dict[str, Any]:
        header = envelope.header
        task_id, number = str(header.get("task")), int(header.get("step", -1))
        round_row = store.round(task_id, number)
        if round_row is None or envelope.sender not in round_row.recipients:
            raise refuse(403, "not_recipient", f"{envelope.sender!r} was not asked step {number} of {task_id!r}")
        if store.last_step(task_id) > number:
            raise refuse(409, "closed", f"step {number} of task {task_id!r} is closed; a later step has begun")
        try:
            seq = store.add_reply(task_id, number, envelope.sender, str(header["nonce"]), envelope.encode())
        except Conflict as exc:
            raise refuse(409, "replay", str(exc)) from exc
        notifier.notify(f"replies:{task_id}:{number}")
        return {"seq": seq}

    async def long_poll(key: str, wait: float, fetch: Callable[[], list], ready: Callable[[list], bool]) -> list:
        """Fetch until `ready` or `wait` seconds pass, sleeping on the key's event between tries."""
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT_S)
        while True:
            notifier.event(key)  # registered before the fetch, so a message arriving after it wakes us
            items = fetch()
            remaining = deadline - time.monotonic()
            if ready(items) or remaining <= 0 or notifier.closed:
                return items
            await notifier.wait(key, remaining)

    @app.get("/v1/inbox")
    async def inbox(request: Request, after: int = 0, wait: float = 0.0) -> Response:
        site = reader(request, "site")
        items = await long_poll(f"inbox:{site}", wait, lambda: store.inbox(site, after), bool)
        payload = [[m.seq, m.envelope] for m in items]
        return Response(msgpack.packb(payload, use_bin_type=True), media_type=BINARY)

    @app.get("/v1/tasks/{task_id}/rounds/{number}/replies")
    async def replies(task_id: str, number: int, request: Request, wait: float = 0.0) -> Response:
        researcher = reader(request, "researcher")
        task, round_row = store.task(task_id), store.round(task_id, number)
        if task is None or round_row is None or task.researcher != researcher:
            raise refuse(404, "not_found", f"no round {number} of task {task_id!r} for {researcher!r}")
        items = await long_poll(f"replies:{task_id}:{number}", wait, lambda: store.replies(task_id, number),
                                lambda found: len(found) >= len(round_row.recipients))
        return Response(msgpack.packb([m.envelope for m in items], use_bin_type=True), media_type=BINARY)

    @app.get("/v1/tasks/{task_id}/rounds/{number}/senders")
    def senders(task_id: str, number: int, request: Request) -> list[str]:
        """Which sites' replies the hub holds for a step: what secure aggregation's unmasking relies on."""
        party = reader(request)
        round_row = store.round(task_id, number)
        task = store.task(task_id)
        if round_row is None or task is None or (party not in round_row.recipients and party != task.researcher):
            raise refuse(404, "not_found", f"no step {number} of task {task_id!r} for {party!r}")
        return sorted({open_envelope(m.envelope, max_bytes).sender for m in store.replies(task_id, number)})

    @app.post("/v1/tasks/{task_id}/result")
    async def post_result(task_id: str, request: Request) -> dict[str, Any]:
        envelope = await read_envelope(request)
        verify_sender(envelope, "researcher")
        task = store.task(task_id)
        if task is None or task.researcher != envelope.sender or envelope.kind != "result":
            raise refuse(403, "not_owner", f"{envelope.sender!r} cannot close task {task_id!r}")
        body = envelope.body(max_bytes)
        store.set_result(task_id, str(body.get("status", "done")), body.get("summary", {}))
        return {"task": task_id}

    @app.get("/v1/tasks/{task_id}")
    def get_task(task_id: str, request: Request) -> dict[str, Any]:
        reader(request)
        task = store.task(task_id)
        if task is None:
            raise HTTPException(404, f"task {task_id!r} does not exist")
        return {"id": task.id, "study": task.study, "analysis": task.analysis, "status": task.status,
                "result": task.result}

    @app.get("/v1/traffic")
    def traffic(request: Request) -> Response:
        if not record_traffic:
            raise HTTPException(404, "this hub does not expose its traffic record")
        reader(request)
        return Response(msgpack.packb([m.envelope for m in store.messages()], use_bin_type=True), media_type=BINARY)

    @app.get("/v1/events")
    def events(request: Request) -> JSONResponse:
        reader(request)
        return JSONResponse([{"at": e.at, "kind": e.kind, "detail": e.detail} for e in store.events()])

    return app
