"""How one analysis round is computed over a Grid: in the clear (`PlainRounds`) or under secure
aggregation (`SecureRounds`), a layer over the Grid as Flower's SecAgg+ is a workflow over its
Grid. The session loop calls one of them per round and never sees the choreography.

Secure rounds (runtime/secure_aggregation.py has the protocol and what each party learns): a
"keys" step once per key set (`make_keyset`), then per round a "compute" step whose replies are
double-masked, a "consistency" step only when a site dropped out (every submitter signs the one
dropout set), and an "unmask" step from which the session removes the masks and decodes the sum.
Public facts and per-recipient payloads travel beside the masked sums and are never summed.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

from medveil.runtime.aggregation import aggregate
from medveil.runtime.grid import (
    FederationError,
    Grid,
    Reply,
    SiteTimeoutError,
    Step,
    StepJournal,
)
from medveil.runtime.secure_aggregation import (
    CoordinatorState,
    SecureAggregationAborted,
)
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import MAX_ENDED_PER_STEP


class SecureAggregationError(FederationError, SecureAggregationAborted):
    """Too few sites remained for the secure sum; the round was aborted and nothing revealed."""


class TaskSteps(Protocol):
    """What a channel needs of a task in flight (the session's durable run state)."""

    id: str
    analysis: str
    dataset: str
    sites: list[str]
    step: int
    params_wire: dict[str, Any]
    audit_ids: dict[str, list[str]]


@dataclass
class RoundResult:
    """What one round gave the global step."""

    public: dict[str, dict[str, Any]]
    sums: dict[str, Any]
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)


class EndedTasks:
    """Tasks that finished but whose sites were not yet told, by site. The notice rides on the
    next step sent to the site (its body's "ended" list), so ending a task costs no message of its
    own; `ResearcherSession.close` sends whatever is left in one "end" step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[str]] = {}

    def add(self, task: str, sites: list[str]) -> None:
        with self._lock:
            for site in sites:
                self._pending.setdefault(site, []).append(task)

    def take(self, sites: list[str]) -> list[str]:
        """Up to MAX_ENDED_PER_STEP tasks pending at any of `sites`, removed from their lists."""
        with self._lock:
            taken: list[str] = []
            for site in sites:
                taken += [task for task in self._pending.get(site, []) if task not in taken]
            taken = taken[:MAX_ENDED_PER_STEP]
            for site in sites:
                self._pending[site] = [task for task in self._pending.get(site, []) if task not in taken]
            return taken

    def sites(self) -> list[str]:
        with self._lock:
            return sorted(site for site, tasks in self._pending.items() if tasks)


@dataclass
class TaskChannel:
    """One task's view of a Grid: numbers its steps, adds the task's parameters to every body,
    journals what it seals, and collects the sites' audit entry ids from their replies."""

    grid: Grid
    task: TaskSteps
    timeout: float
    journal: StepJournal | None = None
    ended: EndedTasks | None = None
    keeping: set[str] = field(default_factory=set)  # sites that said they keep state for the task

    def exchange(self, phase: str, round_no: int, bodies: dict[str, dict[str, Any]], *,
                 tolerate_missing: bool = False) -> dict[str, Reply]:
        """Send the task's next step (`bodies` by site, each with the task's parameters) and
        return the verified replies by site (Grid.exchange)."""
        step = self.task.step
        self.task.step += 1
        notice = self._ended_notice(list(bodies))
        full = {site: {"params": self.task.params_wire, **body, **notice} for site, body in bodies.items()}
        replies = self.grid.exchange(
            Step(self.task.id, step, phase, round_no, self.task.analysis, full,
                 {site: self.task.dataset for site in full}),
            timeout=self.timeout, tolerate_missing=tolerate_missing, journal=self.journal)
        for site, reply in replies.items():
            self.task.audit_ids.setdefault(site, []).extend(reply.envelope.header.get("audit_ids", []))
            if reply.body.get("keeps_state") is True:
                self.keeping.add(site)
        return replies

    def _ended_notice(self, sites: list[str]) -> dict[str, Any]:
        """One "ended" list for every site of the step (a site skips tasks it holds nothing of),
        so the notice never splits a step into per-site bodies."""
        taken = [] if self.ended is None else self.ended.take(sites)
        return {"ended": taken} if taken else {}

    def same(self, phase: str, round_no: int, body: dict[str, Any], sites: list[str], *,
             tolerate_missing: bool = False) -> dict[str, Reply]:
        """One body for every site of `sites`."""
        return self.exchange(phase, round_no, {site: body for site in sites}, tolerate_missing=tolerate_missing)


def _payloads(replies: dict[str, Reply]) -> dict[str, dict[str, Any]]:
    """Per-recipient payloads by sender (sealed to their recipients; never summed)."""
    return {site: reply.body["payloads"] for site, reply in replies.items()
            if isinstance(reply.body.get("payloads"), dict) and reply.body["payloads"]}


class PlainRounds:
    """Rounds in the clear: the researcher adds the sites' arrays (the study records that)."""

    def __init__(self, channel: TaskChannel):
        """Rounds of the task behind `channel`."""
        self.channel = channel

    def compute(self, round_no: int, bodies: dict[str, dict[str, Any]]) -> RoundResult:
        """One "compute" step; the sums are the sites' arrays added up (dtypes kept)."""
        replies = self.channel.exchange("compute", round_no, bodies)
        public = {site: reply.body["public"] for site, reply in replies.items()}
        sums = aggregate({site: reply.body.get("sums", {}) for site, reply in replies.items()})
        return RoundResult(public, sums, _payloads(replies))


def make_keyset(channel: TaskChannel, state: CoordinatorState) -> CoordinatorState:
    """The "keys" step: every key-set site makes a fresh key pair and signs its public half."""
    state.record_keys(channel.same("keys", 0, {"secagg": {"keyset": state.keyset}}, state.sites))
    return state


def new_coordinator(study: StudySpec) -> CoordinatorState:
    """A fresh key set for the study's sites (its keys step still to be sent)."""
    return CoordinatorState(uuid.uuid4().hex, study.id, sorted(study.sites), study.threshold())


class KeySets:
    """The key set a researcher's secure tasks of one study share: made (one "keys" step to every
    study site) with the first task and reused, with masks fresh per task and step, until it is
    KEYSET_RENEW_S (runtime/secure_aggregation.py) old. `current` is the one the next task gets
    while it is keyed and young."""

    def __init__(self, study: StudySpec):
        """No key set yet: the first secure task makes one."""
        self.study = study
        self.current: CoordinatorState | None = None

    def for_new_task(self) -> CoordinatorState:
        """The key set a new task is checkpointed with: `current`, or a fresh one (keys step still to send)."""
        current = self.current
        if current is not None and current.keyed and not current.expired():
            return current
        return new_coordinator(self.study)

    def ready(self, channel: TaskChannel, state: CoordinatorState | None) -> CoordinatorState:
        """`state` (a fresh one when None) keyed, by a keys step over `channel` if it is not yet,
        and `current` from now on."""
        state = state if state is not None else new_coordinator(self.study)
        if not state.keyed:
            make_keyset(channel, state)
        self.current = state
        return state


class SecureRounds:
    """Rounds under secure aggregation: compute, (consistency,) unmask; only the total decodes.

    `allow_dropouts`: a site silent in the first round is left out (its masks removed with the
    survivors' help) instead of failing the run; later dropouts fail it (earlier rounds' sums
    included the site), with the round's sum recovered but not used."""

    def __init__(self, channel: TaskChannel, coordinator: CoordinatorState, *, allow_dropouts: bool = False):
        """Rounds of the task behind `channel`, masked under the keyed key set `coordinator`."""
        self.channel = channel
        self.coordinator = coordinator
        self.allow_dropouts = allow_dropouts

    def compute(self, round_no: int, bodies: dict[str, dict[str, Any]]) -> RoundResult:
        """A masked "compute" step, a "consistency" step when sites dropped out, an "unmask"
        step; the sums are the decoded total, never one site's arrays."""
        channel, secure, task = self.channel, self.coordinator, self.channel.task
        step, participants = task.step, list(task.sites)
        request = secure.compute_request(participants)
        replies = channel.exchange("compute", round_no, {site: {**bodies[site], "secagg": request}
                                                         for site in participants},
                                   tolerate_missing=self.allow_dropouts)
        public = {site: reply.body["public"] for site, reply in replies.items()}
        payloads = _payloads(replies)
        masked = {site: reply.body for site, reply in replies.items()}
        dropped = [site for site in participants if site not in replies]
        if len(replies) < max(secure.threshold, 2):
            raise SecureAggregationError(
                f"only {len(replies)} of {len(participants)} sites submitted (threshold {secure.threshold}); "
                f"round aborted, nothing revealed; missing: {', '.join(dropped)}")
        if not any("masked" in body for body in masked.values()):
            if dropped:  # no unmask step in which the sites could record the dropout
                raise SiteTimeoutError(dropped, channel.timeout, step)
            return RoundResult(public, {}, payloads)
        signatures = self._agree_on_dropouts(round_no, step, participants, masked) if dropped else None
        answers = channel.same("unmask", round_no,
                               {"secagg": secure.unmask_request(step, participants, masked, signatures)},
                               sorted(replies), tolerate_missing=True)
        revealed = {site: reply.body["public"] for site, reply in answers.items()}
        try:
            sums = secure.combine(participants, masked, revealed)
        except SecureAggregationAborted as exc:
            raise SecureAggregationError(f"{len(answers)} of {len(replies)} sites answered the unmask step "
                                         f"(threshold {secure.threshold}): {exc}; round aborted") from exc
        if dropped:
            task.sites = sorted(replies)
            warnings.warn(f"site(s) {', '.join(dropped)} dropped out; the sum covers {', '.join(task.sites)}",
                          RuntimeWarning, stacklevel=4)
            if round_no > 0:
                raise SiteTimeoutError(dropped, channel.timeout, step,
                                       "; the round's sum was recovered but earlier rounds included them")
        return RoundResult(public, sums, payloads)

    def _agree_on_dropouts(self, round_no: int, of_step: int, participants: list[str],
                           masked: dict[str, dict]) -> dict[str, str]:
        """The consistency step: every submitter signs the dropouts of the compute step `of_step`,
        and the unmask step carries all the signatures (no site reveals without them)."""
        agreed = self.channel.same("consistency", round_no,
                                   {"secagg": self.coordinator.consistency_request(of_step, participants, masked)},
                                   sorted(masked), tolerate_missing=True)
        silent = sorted(set(masked) - set(agreed))
        if silent:
            raise SecureAggregationError(f"site(s) {', '.join(silent)} did not sign the dropouts; a dropout is "
                                         "recovered only when every submitter does; round aborted, nothing revealed")
        return {site: reply.body["public"]["signature"] for site, reply in agreed.items()}
