"""The hub: a FastAPI app that relays signed tasks and replies and keeps study state.

Threat model: the operator may be malicious for integrity and is honest-but-curious for
secrecy. It checks who may send what (every write is a signed envelope from a registered party,
fresh and never replayed; every read carries a signed token, and only the operator reads the
event log; a party registers only with the operator's signed invitation; only a study's sites
post approvals of it) but it cannot forge a task or a release, its key list is never what
researchers or peers verify sites against (they use the keys pinned in the study), and it
sees only what sites chose to release (masked, once secure aggregation is on). It never runs
analysis code. Every malformed request gets a 4xx and a `hub_events` entry, never a 5xx.
Long-polls wake at once when a message arrives: waiters park on an asyncio.Event per inbox.
A task is a sequence of steps; one step may go out as several task messages (a different body
per site) with disjoint recipients. The relayed traffic of finished or long-idle tasks is
pruned after `retention_s` (at start, then at most once per `prune_every_s`, on posts).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Annotated, Any, Callable

import msgpack
from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from medveil.crypto.signing import SignatureError, VerifyKey
from medveil.runtime.auth import HEADER, AuthError, check_invitation, check_token, token_party
from medveil.runtime.hub_store import Conflict, HubStore, StepClosed
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import (
    BINARY,
    DEFAULT_MAX_BYTES,
    MAX_ID_LENGTH,
    MAX_STEP,
    Envelope,
    WireError,
    canonical_json,
    is_id,
    open_envelope,
)

MAX_WAIT_S = 30.0
MAX_MESSAGE_AGE_S = 300.0
MAX_SUMMARY_BYTES = 1024 * 1024
RETENTION_S = 30 * 24 * 3600.0
PRUNE_EVERY_S = 3600.0
ROLES = ("site", "researcher")
ENVELOPE_BODY = {"requestBody": {"required": True, "content": {BINARY: {"schema": {"type": "string",
                                                                                   "format": "binary"}}}}}
Id = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)]
StepNumber = Annotated[int, Path(ge=0, le=MAX_STEP)]
Cursor = Annotated[int, Query(ge=0, le=2**62)]
WaitSeconds = Annotated[float, Query(ge=0, le=3600, allow_inf_nan=False)]


class Notifier:
    """Wakes long-polls waiting on a key (an inbox or a task step)."""

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


class Pruner:
    """Prunes the store's finished tasks now and then: at most once per `every_s`, when asked."""

    def __init__(self, store: HubStore, retention_s: float, every_s: float):
        self.store, self.retention_s, self.every_s = store, retention_s, every_s
        self._last: float | None = None

    def maybe(self) -> None:
        """Prune unless the last prune is less than `every_s` old; a failure is logged, never raised."""
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        try:
            pruned = self.store.prune_finished(self.retention_s)
        except (SQLAlchemyError, OSError) as exc:  # the request that triggered it still goes through
            self.store.log_event("prune_failed", f"{type(exc).__name__}: {exc}")
            return
        if pruned:
            self.store.log_event("pruned", f"relayed traffic of {len(pruned)} finished task(s) deleted")


def create_hub_app(store: HubStore, *, operator_key: VerifyKey, max_bytes: int = DEFAULT_MAX_BYTES,
                   record_traffic: bool = False, max_wait_s: float = MAX_WAIT_S, retention_s: float = RETENTION_S,
                   prune_every_s: float = PRUNE_EVERY_S) -> FastAPI:
    """Build the hub's HTTP API over a store; `operator_key` signs the invitations that enrol parties.

    The relayed traffic of tasks finished (or idle) for more than `retention_s` is deleted, once
    here and then at most every `prune_every_s` seconds. Pruning forgets those messages' nonces,
    so the retention must outlast the freshness window (MAX_MESSAGE_AGE_S) that stops replays.
    """
    if not retention_s > MAX_MESSAGE_AGE_S:
        raise ValueError(f"retention_s must exceed the {MAX_MESSAGE_AGE_S:g} s in which a message counts as fresh")
    app = FastAPI(title="medveil hub", version="1")
    notifier = Notifier()
    pruner = Pruner(store, retention_s, prune_every_s)
    pruner.maybe()
    app.state.notifier = notifier
    app.state.store = store
    app.state.pruner = pruner

    def refuse(status: int, kind: str, detail: str) -> HTTPException:
        store.log_event(kind, detail)
        return HTTPException(status, detail)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = sorted({".".join(str(part) for part in error.get("loc", ())) for error in exc.errors()})
        store.log_event("malformed", f"{request.method} {request.url.path}: invalid {', '.join(fields)}")
        return JSONResponse({"detail": f"invalid request parameters: {', '.join(fields)}"}, status_code=422)

    async def read_envelope(request: Request) -> Envelope:
        declared = request.headers.get("content-length")
        if declared is None or not (declared.isascii() and declared.isdigit()):
            raise refuse(411, "refused", "a Content-Length header is required")
        if int(declared) > max_bytes:
            raise refuse(413, "oversized", f"request exceeds the hub's limit of {max_bytes} bytes")
        body = await request.body()
        try:
            return open_envelope(body, max_bytes)
        except WireError as exc:
            raise refuse(400, "malformed", str(exc)) from exc

    def read_body(envelope: Envelope) -> dict[str, Any]:
        try:
            return envelope.body(max_bytes)
        except WireError as exc:
            raise refuse(400, "malformed", f"body of {envelope.kind} message: {exc}") from exc

    def required(header: dict[str, Any], *fields: str) -> None:
        missing = [field for field in fields if header.get(field) is None]
        if missing:
            raise refuse(400, "malformed", f"{header['kind']} header lacks {', '.join(missing)}")

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
        if abs(time.time() - envelope.header["issued_at"]) > MAX_MESSAGE_AGE_S:
            raise refuse(403, "stale", f"message from {envelope.sender!r} is not fresh")

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

    def operator_reader(request: Request) -> None:
        """Admit only a read token signed by the operator's key: the event log is the operator's."""
        token = request.headers.get(HEADER)
        if not token:
            raise refuse(401, "unauthenticated", f"missing {HEADER} header")
        try:
            check_token(token, operator_key, request.method, request.url.path, time.time())
        except AuthError as exc:
            raise refuse(403, "not_operator", "only the hub's operator reads its event log") from exc

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "time": time.time()}

    @app.post("/v1/parties", openapi_extra=ENVELOPE_BODY)
    async def register(request: Request) -> dict[str, Any]:
        """Register a party's key: needs the operator's invitation, unless this exact key is already enrolled."""
        envelope = await read_envelope(request)
        body = read_body(envelope)
        role, key_text = body.get("role"), body.get("public_key")
        if envelope.kind != "register" or role not in ROLES or not isinstance(key_text, str):
            raise refuse(400, "malformed", "registration needs role 'site' or 'researcher' and a public key")
        try:
            envelope.verify(VerifyKey.from_text(key_text))
        except (SignatureError, ValueError) as exc:
            raise refuse(403, "registration", f"registration of {envelope.sender!r} is not signed by its key") from exc
        known = store.party(envelope.sender)
        if known is not None and known.public_key == key_text and known.role == role:
            return {"party": envelope.sender, "created": False}
        try:
            check_invitation(body.get("invitation"), operator_key, envelope.sender, role, key_text, time.time())
        except AuthError as exc:
            raise refuse(403, "not_enrolled", f"{envelope.sender!r} is not enrolled: {exc}") from exc
        try:
            created = store.register(envelope.sender, role, key_text)
        except Conflict as exc:
            raise refuse(403, "not_enrolled", str(exc)) from exc
        store.log_event("enrolled", f"{envelope.sender!r} registered as a {role}")
        return {"party": envelope.sender, "created": created}

    @app.get("/v1/parties/{party_id}")
    def get_party(party_id: Id) -> dict[str, Any]:
        party = store.party(party_id)
        if party is None:
            raise HTTPException(404, f"{party_id!r} is not registered")
        return {"id": party.id, "role": party.role, "public_key": party.public_key}

    @app.post("/v1/studies", openapi_extra=ENVELOPE_BODY)
    async def create_study(request: Request) -> dict[str, Any]:
        envelope = await read_envelope(request)
        verify_sender(envelope, "researcher")
        spec = read_body(envelope).get("spec")
        if envelope.kind != "study" or not isinstance(spec, dict) or spec.get("researcher") != envelope.sender:
            raise refuse(400, "malformed", "a study message carries a spec whose researcher is its sender")
        try:
            study = StudySpec.model_validate(spec)
        except ValidationError as exc:
            raise refuse(400, "malformed", f"invalid study spec: {exc.error_count()} error(s)") from exc
        if envelope.header.get("study") != study.id:
            raise refuse(400, "malformed", "a study message's header names the study it carries")
        try:
            store.add_study(study.id, envelope.sender, study.model_dump(), envelope.encode())
        except Conflict as exc:
            raise refuse(409, "conflict", str(exc)) from exc
        return {"study": study.id}

    @app.get("/v1/studies")
    def list_studies() -> list[dict[str, Any]]:
        return [
            {"id": st.id, "researcher": st.researcher, "title": st.spec.get("title", ""),
             "sites": st.spec.get("sites", []), "approved_by": sorted(a.site for a in store.approvals(st.id))}
            for st in store.studies()
        ]

    @app.get("/v1/studies/{study_id}")
    def get_study(study_id: Id) -> Response:
        study = store.study(study_id)
        if study is None:
            raise HTTPException(404, f"study {study_id!r} does not exist")
        return Response(study.envelope, media_type=BINARY)

    @app.post("/v1/studies/{study_id}/approvals", openapi_extra=ENVELOPE_BODY)
    async def post_approval(study_id: Id, request: Request) -> dict[str, Any]:
        envelope = await read_envelope(request)
        verify_sender(envelope, "site")
        study = store.study(study_id)
        if envelope.kind != "approval" or envelope.header.get("study") != study_id or study is None:
            raise refuse(400, "malformed", f"not an approval of an existing study {study_id!r}")
        if envelope.sender not in study.spec["sites"]:
            raise refuse(403, "not_in_study", f"{envelope.sender!r} is not a site of study {study_id!r}")
        store.add_approval(study_id, envelope.sender, envelope.encode())
        return {"study": study_id, "site": envelope.sender}

    @app.post("/v1/messages", openapi_extra=ENVELOPE_BODY)
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
        required(header, "study", "task", "step", "analysis", "recipients")
        study = store.study(header["study"])
        if study is None or study.researcher != envelope.sender:
            raise refuse(403, "not_owner", f"{envelope.sender!r} does not own study {header['study']!r}")
        recipients = header["recipients"]
        if not recipients or len(set(recipients)) != len(recipients) or not set(recipients) <= set(study.spec["sites"]):
            raise refuse(400, "malformed", "task recipients must be distinct sites of the study")
        pruner.maybe()
        try:
            seq = store.add_task_step(header["task"], study.id, envelope.sender, header["analysis"], header["step"],
                                      recipients, header["nonce"], envelope.encode())
        except StepClosed as exc:
            raise refuse(409, "closed", str(exc)) from exc
        except Conflict as exc:
            raise refuse(409, "replay", str(exc)) from exc
        for site in recipients:
            notifier.notify(f"inbox:{site}")
        return {"seq": seq}

    def post_reply(envelope: Envelope) -> dict[str, Any]:
        header = envelope.header
        required(header, "task", "step")
        task_id, number = header["task"], header["step"]
        step = store.step(task_id, number)
        if step is None or envelope.sender not in step.recipients:
            raise refuse(403, "not_recipient", f"{envelope.sender!r} was not asked step {number} of {task_id!r}")
        if store.last_step(task_id) > number:
            raise refuse(409, "closed", f"step {number} of task {task_id!r} is closed; a later step has begun")
        try:
            seq = store.add_reply(task_id, number, envelope.sender, header["nonce"], envelope.encode())
        except Conflict as exc:
            raise refuse(409, "replay", str(exc)) from exc
        notifier.notify(f"replies:{task_id}:{number}")
        return {"seq": seq}

    async def long_poll(key: str, wait: float, fetch: Callable[[], list], ready: Callable[[list], bool]) -> list:
        """Fetch until `ready` or `wait` seconds pass, sleeping on the key's event between tries."""
        deadline = time.monotonic() + min(max(wait, 0.0), max_wait_s)
        while True:
            notifier.event(key)  # registered before the fetch, so a message arriving after it wakes us
            items = fetch()
            remaining = deadline - time.monotonic()
            if ready(items) or remaining <= 0 or notifier.closed:
                return items
            await notifier.wait(key, remaining)

    @app.get("/v1/inbox")
    async def inbox(request: Request, after: Cursor = 0, wait: WaitSeconds = 0.0) -> Response:
        site = reader(request, "site")
        items = await long_poll(f"inbox:{site}", wait, lambda: store.inbox(site, after), bool)
        payload = [[m.seq, m.envelope] for m in items]
        return Response(msgpack.packb(payload, use_bin_type=True), media_type=BINARY)

    def all_replied(task_id: str, number: int, found: list) -> bool:
        """Whether every recipient of the step has replied, read afresh: a step's recipients grow
        when a further message of it is posted while the researcher waits."""
        step = store.step(task_id, number)
        return step is None or len(found) >= len(step.recipients)

    @app.get("/v1/tasks/{task_id}/steps/{number}/replies")
    async def replies(task_id: Id, number: StepNumber, request: Request, wait: WaitSeconds = 0.0) -> Response:
        researcher = reader(request, "researcher")
        task, step = store.task(task_id), store.step(task_id, number)
        if task is None or step is None or task.researcher != researcher:
            raise refuse(404, "not_found", f"no step {number} of task {task_id!r} for {researcher!r}")
        await long_poll(
            f"replies:{task_id}:{number}", wait, lambda: store.reply_senders(task_id, number),
            lambda found: len(found) >= len(step.recipients) and all_replied(task_id, number, found))
        items = store.replies(task_id, number)
        return Response(msgpack.packb([m.envelope for m in items], use_bin_type=True), media_type=BINARY)

    @app.get("/v1/tasks/{task_id}/steps/{number}/senders")
    def senders(task_id: Id, number: StepNumber, request: Request) -> list[str]:
        """Which sites' replies the hub holds for a step: what secure aggregation's unmasking relies on."""
        party = reader(request)
        step = store.step(task_id, number)
        task = store.task(task_id)
        if step is None or task is None or (party not in step.recipients and party != task.researcher):
            raise refuse(404, "not_found", f"no step {number} of task {task_id!r} for {party!r}")
        return sorted(set(store.reply_senders(task_id, number)))

    @app.post("/v1/tasks/{task_id}/result", openapi_extra=ENVELOPE_BODY)
    async def post_result(task_id: Id, request: Request) -> dict[str, Any]:
        envelope = await read_envelope(request)
        verify_sender(envelope, "researcher")
        task = store.task(task_id)
        if (task is None or task.researcher != envelope.sender or envelope.kind != "result"
                or envelope.header.get("task") != task_id):
            raise refuse(403, "not_owner", f"{envelope.sender!r} cannot close task {task_id!r}")
        body = read_body(envelope)
        status, summary = body.get("status", "done"), body.get("summary", {})
        if not is_id(status) or not isinstance(summary, dict):
            raise refuse(400, "malformed", "a result carries a status id and a summary map")
        try:
            size = len(canonical_json(summary))
        except (TypeError, ValueError, RecursionError) as exc:
            raise refuse(400, "malformed", "a result summary must be finite JSON") from exc
        if size > MAX_SUMMARY_BYTES:
            raise refuse(413, "oversized", f"a result summary exceeds {MAX_SUMMARY_BYTES} bytes")
        store.set_result(task_id, status, summary)
        pruner.maybe()
        return {"task": task_id}

    @app.get("/v1/tasks/{task_id}")
    def get_task(task_id: Id, request: Request) -> dict[str, Any]:
        researcher = reader(request)
        task = store.task(task_id)
        if task is None or task.researcher != researcher:  # its summary is the researcher's provenance
            raise refuse(404, "not_found", f"no task {task_id!r} for {researcher!r}")
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
        operator_reader(request)
        return JSONResponse([{"at": e.at, "kind": e.kind, "detail": e.detail} for e in store.events()])

    return app
