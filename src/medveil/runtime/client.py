"""HubClient: a party's view of the hub over any httpx transport (real HTTP or in-process).

Once `pin`ned (a researcher's client, with a study's site keys), the client verifies parties only
against the pinned keys and never asks the hub for one: a hub serving a wrong key gains nothing.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx
import msgpack

from medveil.crypto.signing import SignatureError, SigningKey, VerifyKey
from medveil.runtime.auth import HEADER, make_token
from medveil.runtime.wire import (
    BINARY,
    DEFAULT_MAX_BYTES,
    Envelope,
    open_envelope,
    seal,
)


class HubError(RuntimeError):
    """The hub refused a request or could not be reached."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"hub answered {status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


def new_nonce() -> str:
    return secrets.token_hex(16)


class HubClient:
    """Signs what it sends and authenticates what it reads, as one party."""

    def __init__(self, base_url: str, party: str, key: SigningKey, *, http: httpx.Client | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 60.0, invitation: str | None = None):
        """`invitation`: the hub operator's signed invitation, sent with the first registration."""
        self.party = party
        self.key = key
        self.max_bytes = max_bytes
        self.invitation = invitation
        # TCP_NODELAY: httpx writes headers and body separately; without it Nagle's algorithm
        # and delayed ACKs add ~40 ms to every request, which multi-round analyses pay per round.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout, transport=transport)
        self._keys: dict[str, VerifyKey] = {}
        self._pinned = False

    def close(self) -> None:
        self.http.close()

    def seal(self, kind: str, body: dict[str, Any] | None = None, **header: Any) -> Envelope:
        return seal(self.key, {"kind": kind, "sender": self.party, "nonce": new_nonce(),
                               "issued_at": time.time(), **header}, body)

    def _request(self, method: str, path: str, *, content: bytes | None = None, params: dict | None = None,
                 timeout: float | None = None) -> httpx.Response:
        headers = {HEADER: make_token(self.party, self.key, method, path)}
        if content is not None:
            headers["Content-Type"] = BINARY
        try:
            response = self.http.request(method, path, content=content, params=params, headers=headers,
                                         timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as exc:
            raise HubError(0, f"cannot reach the hub: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise HubError(response.status_code, str(detail))
        return response

    def post(self, path: str, envelope: Envelope) -> dict[str, Any]:
        return self._request("POST", path, content=envelope.encode()).json()

    def post_until_accepted(self, path: str, envelope: Envelope, patience_s: float = 60.0, *,
                            already_ok: bool = False, stop: threading.Event | None = None) -> None:
        """POST, retrying with backoff while the hub is unreachable or failing (e.g. restarting);
        a refusal (4xx) or running out of patience raises HubError. Safe to repeat: the hub
        refuses a second copy of the same envelope by its nonce (409), which `already_ok` takes
        for delivered (a resumed run re-sending what it journalled). Setting `stop` ends the
        retries at once (a node shutting down while the hub is away)."""
        deadline, pause = time.monotonic() + patience_s, 0.05
        while True:
            try:
                self.post(path, envelope)
                return
            except HubError as exc:
                if already_ok and exc.status == 409:
                    return
                if (exc.status and exc.status < 500) or time.monotonic() > deadline:
                    raise
                if stop is not None and stop.wait(pause):
                    raise HubError(0, "stopped while the hub was unreachable") from exc
                if stop is None:
                    time.sleep(pause)
                pause = min(pause * 2, 2.0)

    # --- every hub URL a party uses, one named method each -----------------------------------

    def post_message(self, envelope: Envelope) -> dict[str, Any]:
        """Post a task (researcher) or a reply (site) once."""
        return self.post("/v1/messages", envelope)

    def post_until_accepted_message(self, envelope: Envelope, patience_s: float = 60.0, *,
                                    already_ok: bool = False, stop: threading.Event | None = None) -> None:
        """Post a task or reply, retrying while the hub is away (see post_until_accepted)."""
        self.post_until_accepted("/v1/messages", envelope, patience_s, already_ok=already_ok, stop=stop)

    def post_study(self, envelope: Envelope) -> dict[str, Any]:
        """Publish a study spec the researcher signed."""
        return self.post("/v1/studies", envelope)

    def post_approval(self, study_id: str, envelope: Envelope) -> dict[str, Any]:
        """Publish a steward's signed approval of a study."""
        return self.post(f"/v1/studies/{study_id}/approvals", envelope)

    def post_result(self, task: str, envelope: Envelope, patience_s: float = 60.0) -> None:
        """Record a finished task's provenance at the hub, retrying while the hub is away."""
        self.post_until_accepted(f"/v1/tasks/{task}/result", envelope, patience_s)

    def task_record(self, task: str) -> dict[str, Any]:
        """The hub's record of a task (status and, once finished, its provenance)."""
        return self.get_json(f"/v1/tasks/{task}")

    def senders(self, task: str, step: int) -> set[str]:
        """Which sites' replies the hub says it holds for a step (a second check, never relied on)."""
        return set(self.get_json(f"/v1/tasks/{task}/steps/{step}/senders"))

    def get_json(self, path: str) -> Any:
        return self._request("GET", path).json()

    def register(self, role: str) -> dict[str, Any]:
        body = {"role": role, "public_key": self.key.verify_key.to_text()}
        if self.invitation is not None:
            body["invitation"] = self.invitation
        return self.post("/v1/parties", self.seal("register", body))

    def pin(self, keys: Mapping[str, str]) -> None:
        """From now on verify only these parties (id -> VerifyKey text), never with a key from the hub."""
        if not self._pinned:
            self._keys.clear()  # keys fetched from the hub before pinning are not kept
        for party, key_text in keys.items():
            pinned = VerifyKey.from_text(key_text)
            if self._pinned and self._keys.get(party, pinned) != pinned:
                raise SignatureError(f"{party!r} is already pinned to another key")
            self._keys[party] = pinned
        self._pinned = True

    def public_key(self, party: str) -> VerifyKey:
        """The key to verify `party` with: its pinned key once pinned, else the hub's record."""
        if party not in self._keys:
            if self._pinned:
                raise SignatureError(f"no key is pinned for {party!r}")
            self._keys[party] = self.hub_public_key(party)
        return self._keys[party]

    def hub_public_key(self, party: str) -> VerifyKey:
        """The key the hub serves for `party`: to be checked against a fingerprint, never trusted alone."""
        return VerifyKey.from_text(self.get_json(f"/v1/parties/{party}")["public_key"])

    def study_envelope(self, study_id: str) -> Envelope:
        return open_envelope(self._request("GET", f"/v1/studies/{study_id}").content, self.max_bytes)

    def inbox(self, after: int, wait: float) -> list[tuple[int, bytes]]:
        """A site's waiting messages after cursor `after`, long-polling up to `wait` s."""
        response = self._request("GET", "/v1/inbox", params={"after": after, "wait": wait}, timeout=wait + 30)
        return [(int(seq), bytes(env)) for seq, env in msgpack.unpackb(response.content, raw=False)]

    def replies(self, task: str, step: int, wait: float) -> list[Envelope]:
        """The replies the hub holds for one step of a task, long-polling up to `wait` s for all."""
        response = self._request("GET", f"/v1/tasks/{task}/steps/{step}/replies", params={"wait": wait},
                                 timeout=wait + 30)
        return [open_envelope(item, self.max_bytes) for item in msgpack.unpackb(response.content, raw=False)]

    def traffic(self) -> list[Envelope]:
        """Every message the hub relayed (a hub that records its traffic, for audits and tests)."""
        response = self._request("GET", "/v1/traffic")
        return [open_envelope(item, self.max_bytes) for item in msgpack.unpackb(response.content, raw=False)]
