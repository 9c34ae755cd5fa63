"""The Grid: the one seam between a researcher's run and the transport that reaches the sites.

A run sends `Step`s (one step of a task, with a body per site) and gets back verified `Reply`s.
Two implementations share every check on what comes back:
- `HubGrid` posts the step's envelopes to a hub and long-polls the hub for the replies (every
  URL lives in a named `HubClient` method);
- `InProcessGrid` hands the same envelopes to `Node.handle` directly, with no HTTP at all, for
  fast unit tests of every analysis through the real nodes' guards.
A step whose sites get different bodies (per-site broadcast keys, forwarded per-recipient
payloads) travels as one envelope per distinct body, each with its own disjoint recipients and
the same task, step, phase and round. Replies are verified against the identity keys pinned in
the study (never against keys the hub serves), must be bound to this study, task, step and
round, and a refusal from any site raises `RefusedError` naming the site and its rule.
What the Grid learns: everything the researcher does (the bodies it sends, the replies' bodies);
nothing more. Secure aggregation is a layer over a Grid (runtime/secure_rounds.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from medveil.crypto.signing import SignatureError, SigningKey, VerifyKey
from medveil.runtime.client import HubClient, HubError, new_nonce
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import (
    DEFAULT_MAX_BYTES,
    Envelope,
    open_envelope,
    pack_body,
    seal,
)


class FederationError(RuntimeError):
    """Base of the errors a researcher sees from a federated run."""


class RefusedError(FederationError):
    """A site refused the task; `site` and `rule` say which and why."""

    def __init__(self, refusals: list[tuple[str, str, str]]):
        self.refusals = refusals
        self.site, self.rule, self.detail = refusals[0]
        text = "; ".join(f"site {site!r} refused [{rule}]: {message}" for site, rule, message in refusals)
        super().__init__(text)


class SiteTimeoutError(FederationError):
    """Sites did not answer in time."""

    def __init__(self, sites: list[str], timeout: float, step: int, note: str = ""):
        self.sites = sites
        super().__init__(f"no answer from site(s) {', '.join(sites)} within {timeout:g} s (step {step}){note}")


@dataclass
class Step:
    """One step of a task as the researcher sends it: a body and a dataset name per recipient site."""

    task: str
    step: int
    phase: str
    round: int
    analysis: str
    bodies: dict[str, dict[str, Any]]
    datasets: dict[str, str]

    @property
    def recipients(self) -> list[str]:
        """The sites the step addresses, sorted."""
        return sorted(self.bodies)


@dataclass
class Reply:
    """A site's verified answer to one step."""

    site: str
    envelope: Envelope
    body: dict[str, Any]


class StepJournal(Protocol):
    """Where a run keeps every envelope it sealed for a step before sending it (write-ahead)."""

    def sealed(self, step: int) -> list[bytes] | None:
        """The envelopes journalled for `step`, if any (a resumed run re-sends exactly these)."""

    def record(self, step: int, envelopes: list[bytes]) -> None:
        """Journal a step's envelopes durably (written and fsynced) before any is sent."""


class Grid(Protocol):
    """Reaches a study's sites: sends steps, gathers their verified replies."""

    party: str

    def exchange(self, step: Step, *, timeout: float, tolerate_missing: bool = False,
                 journal: StepJournal | None = None) -> dict[str, Reply]:
        """Send `step` and return the replies by site; a refusal raises RefusedError, a silent site
        SiteTimeoutError (unless `tolerate_missing`: then it is only absent from the result)."""

    def notify(self, step: Step) -> None:
        """Send `step` without waiting for replies (phase "end")."""

    def record_result(self, task: str, provenance: dict[str, Any]) -> None:
        """Record a finished task's provenance where the study's parties can read it."""

    def close(self) -> None:
        """Release connections (and, for an in-process grid, the nodes)."""


def seal_step(signer: Callable[..., Envelope], study: str, step: Step) -> list[Envelope]:
    """The step's envelopes: one per distinct (body, dataset), recipients disjoint, all bound to
    the same study, task, step, phase, round and analysis."""
    groups: dict[tuple[bytes, str], list[str]] = {}
    packed: dict[bytes, dict[str, Any]] = {}
    for site in step.recipients:
        body = pack_body(step.bodies[site])
        packed[body] = step.bodies[site]
        groups.setdefault((body, step.datasets[site]), []).append(site)
    return [signer("task", packed[body], study=study, task=step.task, step=step.step, phase=step.phase,
                   round=step.round, analysis=step.analysis, dataset=dataset, recipients=recipients)
            for (body, dataset), recipients in sorted(groups.items(), key=lambda item: item[1][0])]


def recipients_of(envelopes: Iterable[Envelope]) -> list[str]:
    """Every site the envelopes address."""
    return sorted({site for envelope in envelopes for site in envelope.header.get("recipients", [])})


def check_replies(study: StudySpec, task: str, step: int, round_no: int | None, envelopes: Iterable[Envelope],
                  sites: Iterable[str], key_for: Callable[[str], VerifyKey], *, max_bytes: int, timeout: float,
                  tolerate_missing: bool = False, study_id: str | None = None) -> dict[str, Reply]:
    """Verify the replies to one step, as both grids do: envelopes from sites outside `sites`
    are ignored; a forged reply, or one bound to another study (`study_id`: the study the step
    was sent under, default `study`'s own, e.g. another study of the same researcher and sites),
    task, step or round (when given), raises FederationError; refusals raise RefusedError (every
    refusing site, sorted); a site without a reply raises SiteTimeoutError unless `tolerate_missing`."""
    bound_study = study.id if study_id is None else study_id
    sites = set(sites)
    replies: dict[str, Reply] = {}
    refusals: list[tuple[str, str, str]] = []
    for envelope in envelopes:
        sender = envelope.header.get("sender")
        if sender not in sites:
            continue
        try:
            envelope.verify(key_for(sender))
        except SignatureError as exc:
            raise FederationError(f"reply claiming to be from {sender!r} is forged: {exc}") from exc
        header = envelope.header
        if (envelope.kind != "reply" or header.get("study") != bound_study or header.get("task") != task
                or header.get("step") != step or (round_no is not None and header.get("round") != round_no)):
            raise FederationError(f"reply from {sender!r} is bound to another study, task or step")
        body = envelope.body(max_bytes)
        if header.get("status") != "ok":
            refusals.append((sender, str(body.get("rule")), str(body.get("message"))))
        else:
            replies[sender] = Reply(sender, envelope, body)
    if refusals:
        raise RefusedError(sorted(refusals))
    missing = sorted(sites - set(replies))
    if missing and not tolerate_missing:
        raise SiteTimeoutError(missing, timeout, step)
    return replies


def _pinned_key(study: StudySpec, fallback: Callable[[str], VerifyKey]) -> Callable[[str], VerifyKey]:
    """A site's identity key as the study pins it (the fallback only for a spec without pins)."""
    def key_for(site: str) -> VerifyKey:
        return study.site_key(site) if study.site_keys else fallback(site)
    return key_for


def _envelopes(signer: Callable[..., Envelope], study: str, step: Step, journal: StepJournal | None,
               max_bytes: int) -> tuple[list[Envelope], bool]:
    """The envelopes to send for a step and whether they are a journalled replay."""
    if journal is not None:
        sealed = journal.sealed(step.step)
        if sealed is not None:
            return [open_envelope(raw, max_bytes) for raw in sealed], True
    envelopes = seal_step(signer, study, step)
    if journal is not None:
        journal.record(step.step, [envelope.encode() for envelope in envelopes])
    return envelopes, False


class HubGrid:
    """A Grid over a hub: posts each step's envelopes and long-polls for the replies."""

    def __init__(self, client: HubClient, study: StudySpec, *, post_patience_s: float = 60.0):
        """A grid for `study` over the researcher's `client`; `post_patience_s`: how long a post is
        retried while the hub is away (resumed steps and result records)."""
        self.client = client
        self.study = study
        self.post_patience_s = post_patience_s
        self._key_for = _pinned_key(study, client.public_key)

    @property
    def party(self) -> str:
        """The researcher's party id at the hub."""
        return self.client.party

    def exchange(self, step: Step, *, timeout: float, tolerate_missing: bool = False,
                 journal: StepJournal | None = None) -> dict[str, Reply]:
        """Post the step's envelopes (a journalled replay: until the hub has them) and gather the replies."""
        envelopes, replayed = _envelopes(self.client.seal, self.study.id, step, journal, self.client.max_bytes)
        for envelope in envelopes:
            if replayed:  # a resumed run: the hub may hold it already (409 replay = delivered)
                self.client.post_until_accepted_message(envelope, self.post_patience_s, already_ok=True)
            else:
                self.client.post_message(envelope)
        return self.gather(step.task, step.step, recipients_of(envelopes), timeout=timeout,
                           tolerate_missing=tolerate_missing, round_no=step.round)

    def gather(self, task: str, step: int, sites: list[str], *, timeout: float, tolerate_missing: bool = False,
               round_no: int | None = None, study_id: str | None = None) -> dict[str, Reply]:
        """Long-poll the hub for one step's replies until every site answered, one refused, or
        `timeout` passed; then verify them (check_replies). For a step posted outside `exchange`
        (tools, red-team tests), under this study or `study_id`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            envelopes = self.client.replies(task, step, wait=max(0.0, min(remaining, 25.0)))
            answered = {e.sender for e in envelopes}
            if answered >= set(sites) or remaining <= 0:
                break
            if any(e.header.get("status") != "ok" for e in envelopes):
                break
        return check_replies(self.study, task, step, round_no, envelopes, sites, self._key_for,
                             max_bytes=self.client.max_bytes, timeout=timeout, tolerate_missing=tolerate_missing,
                             study_id=study_id)

    def notify(self, step: Step) -> None:
        """Post once: a lost "end" step costs the sites only the wait until they prune the task."""
        for envelope in seal_step(self.client.seal, self.study.id, step):
            self.client.post_message(envelope)

    def record_result(self, task: str, provenance: dict[str, Any]) -> None:
        """Post the signed result record, retrying while the hub is away."""
        envelope = self.client.seal("result", {"status": "done", "summary": provenance}, task=task)
        self.client.post_result(task, envelope, self.post_patience_s)

    def relayed(self) -> list[Envelope]:
        """Every message the hub relayed (a hub that records its traffic): what its operator sees."""
        return self.client.traffic()

    def close(self) -> None:
        """Close the hub client's connections."""
        self.client.close()


class InProcessClient(HubClient):
    """A node's HubClient inside an InProcessGrid: it signs, and reaches no hub. The study
    envelopes it serves are the researcher's own; an approval it is asked to post is kept."""

    def __init__(self, party: str, key: SigningKey, studies: Mapping[str, Envelope], *,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        """`party` signing with `key`; `studies`: the researcher's signed study envelopes by id."""
        super().__init__("http://in-process.invalid", party, key, max_bytes=max_bytes)
        self.studies = studies
        self.approvals: list[Envelope] = []

    def study_envelope(self, study_id: str) -> Envelope:
        """The researcher's signed study envelope (a fresh copy), as the hub would serve it."""
        if study_id not in self.studies:
            raise HubError(404, f"no study {study_id!r}")
        return open_envelope(self.studies[study_id].encode(), self.max_bytes)

    def post(self, path: str, envelope: Envelope) -> dict[str, Any]:
        """Keep a steward's approval; anything else would need a hub, which there is none of."""
        if envelope.kind != "approval":
            raise HubError(0, "an in-process party reaches no hub")
        self.approvals.append(envelope)
        return {}


@dataclass
class InProcessGrid:
    """A Grid that calls each site's `Node.handle` directly (no HTTP, no hub), for unit tests.

    It keeps every reply it got, as a hub would, and answers the nodes' `senders(task, step)`
    from them; replies pass the same checks as over a hub (check_replies). Node calls are
    serialised (a node handles one message at a time, as its polling loop does)."""

    nodes: dict[str, Any]
    study: StudySpec
    researcher: SigningKey
    party: str = "researcher"
    max_bytes: int = DEFAULT_MAX_BYTES
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    traffic: list[Envelope] = field(default_factory=list)
    _replies: dict[tuple[str, int], dict[str, Envelope]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def seal(self, kind: str, body: dict[str, Any] | None = None, **header: Any) -> Envelope:
        """Sign as the researcher, with the header fields HubClient.seal gives."""
        return seal(self.researcher, {"kind": kind, "sender": self.party, "nonce": new_nonce(),
                                      "issued_at": time.time(), **header}, body)

    def senders(self, task: str, step: int) -> set[str]:
        """The sites whose replies this grid holds for a step (what the nodes' secure aggregation asks)."""
        with self._lock:
            return set(self._replies.get((task, step), {}))

    def deliver(self, envelope: Envelope) -> None:
        """Hand one task envelope to its recipients' nodes and keep what they answer."""
        with self._lock:
            self.traffic.append(envelope)
            held = self._replies.setdefault((envelope.header["task"], envelope.header["step"]), {})
            for site in envelope.header.get("recipients", []):
                if site in held or site not in self.nodes:
                    continue
                reply = self.nodes[site].handle(envelope.encode())
                if reply is not None:
                    raw = reply.encode()
                    held[site] = open_envelope(raw, self.max_bytes)
                    self.traffic.append(held[site])

    def exchange(self, step: Step, *, timeout: float, tolerate_missing: bool = False,
                 journal: StepJournal | None = None) -> dict[str, Reply]:
        """Hand the step's envelopes to the nodes (a replay the nodes answered already is not
        handed again) and verify the replies."""
        envelopes, replayed = _envelopes(self.seal, self.study.id, step, journal, self.max_bytes)
        for envelope in envelopes:
            if not (replayed and self.senders(step.task, step.step)):
                self.deliver(envelope)
        return self.gather(step.task, step.step, recipients_of(envelopes), timeout=timeout,
                           tolerate_missing=tolerate_missing, round_no=step.round)

    def gather(self, task: str, step: int, sites: list[str], *, timeout: float, tolerate_missing: bool = False,
               round_no: int | None = None, study_id: str | None = None) -> dict[str, Reply]:
        """Verify the replies this grid holds for one step (check_replies), under this study or `study_id`."""
        with self._lock:
            held = list(self._replies.get((task, step), {}).values())
        return check_replies(self.study, task, step, round_no, held, sites, self.study.site_key,
                             max_bytes=self.max_bytes, timeout=timeout, tolerate_missing=tolerate_missing,
                             study_id=study_id)

    def notify(self, step: Step) -> None:
        """Hand the step to its nodes (they answer at once; nobody waits on it)."""
        for envelope in seal_step(self.seal, self.study.id, step):
            self.deliver(envelope)

    def record_result(self, task: str, provenance: dict[str, Any]) -> None:
        """Keep the provenance in `results`."""
        self.results[task] = provenance

    def relayed(self) -> list[Envelope]:
        """Every envelope this grid handed to a node or got back, in order (what a hub would relay)."""
        with self._lock:
            return list(self.traffic)

    def close(self) -> None:
        """Close every node (their stores and scratch files)."""
        with self._lock:
            for node in self.nodes.values():
                node.close()
            self.nodes = {}
