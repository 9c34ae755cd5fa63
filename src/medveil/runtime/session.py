"""The researcher's side of a run: send each step, gather signed replies, aggregate, step on.

The global step runs here, in the researcher's process, on cross-site sums only. With secure
aggregation (the default) the sums arrive double-masked and only their total can be decoded:
each compute step is followed by one unmask step in which the sites reveal what removes the
self masks (and a dropout's pairwise masks); when a site dropped out, a consistency step comes
first, in which every submitter signs the dropouts that the unmask step then names; see
runtime/secure_aggregation.py. Replies are verified against the identity keys pinned in the
study, never against what the hub serves. A refusal from any site stops the run with an error
naming the site and the rule; a site that does not answer within the timeout stops it with an
error naming the site, never a hang.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from medveil.analyses.base import (
    Aggregated,
    AnalysisError,
    Finished,
    NextRound,
    Params,
    get_analysis,
)
from medveil.crypto.signing import SignatureError, VerifyKey
from medveil.runtime.aggregation import aggregate
from medveil.runtime.client import HubClient, HubError
from medveil.runtime.secure_aggregation import (
    CoordinatorState,
    SecureAggregationAborted,
)
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import Envelope

log = logging.getLogger("medveil.session")


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


class AnalysisFailed(FederationError):
    """The pooled sums do not allow the analysis (e.g. a collinear design); the message says why."""


class SecureAggregationError(FederationError, SecureAggregationAborted):
    """Too few sites remained for the secure sum; the round was aborted and nothing revealed."""


@dataclass
class RunOutcome:
    result: Any
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Task:
    """One analysis run in flight: its id, step counter and what it has gathered so far."""

    id: str
    analysis: str
    params: Params
    dataset: str
    sites: list[str]
    step: int = 0
    audit_ids: dict[str, list[str]] = field(default_factory=dict)


class ResearcherSession:
    """Runs registered analyses for one study through a hub."""

    def __init__(self, client: HubClient, study: StudySpec, *, timeout: float = 60.0, allow_dropouts: bool = False):
        """`allow_dropouts`: with secure aggregation, a site silent in an analysis' first round is
        left out (its masks removed with the survivors' shares) instead of failing the run."""
        self.client = client
        self.study = study
        self.timeout = timeout
        self.allow_dropouts = allow_dropouts
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medveil-results")
        self._keyset: CoordinatorState | None = None

    def close(self) -> None:
        """Wait for result records still being sent to the hub, then close the connection."""
        self._background.shutdown(wait=True)
        self.client.close()

    def _record_result(self, task_id: str, provenance: dict[str, Any], patience_s: float = 60.0) -> None:
        """Record the run's provenance at the hub, retrying while the hub is away (e.g. restarting)."""
        envelope = self.client.seal("result", {"status": "done", "summary": provenance}, task=task_id)
        try:
            self.client.post_until_accepted(f"/v1/tasks/{task_id}/result", envelope, patience_s)
        except HubError as exc:
            log.warning("result of task %s not recorded at the hub: %s", task_id, exc)

    def run(self, analysis_name: str, params: dict[str, Any], dataset: str,
            progress: Callable[[int, tuple[int, int] | None], None] | None = None) -> RunOutcome:
        """Run an analysis to its result; `progress(round, (done, total) or None)` is called after each round."""
        analysis = get_analysis(analysis_name)
        task = _Task(uuid.uuid4().hex, analysis_name, analysis.parse_params(params), dataset, list(self.study.sites))
        task.audit_ids = {site: [] for site in task.sites}
        secure_needed = self.study.secure_aggregation and analysis.releases_sums
        broadcast: dict[str, Any] = {}
        state: dict[str, Any] = {}
        rows: dict[str, int] = {}
        dp_spent: dict[str, float] = {}
        round_no = 0
        secure = self._secure_keys(task) if secure_needed else None
        while True:
            public, sums = self._compute(task, round_no, broadcast, secure)
            for site, facts in public.items():
                if "rows" in facts:
                    rows[site] = int(facts["rows"])
                if "dp_rho" in facts:
                    dp_spent[site] = dp_spent.get(site, 0.0) + float(facts["dp_rho"])
            try:
                outcome = analysis.global_step(task.params, round_no, Aggregated(sums=sums, public=public), state)
            except AnalysisError as exc:
                raise AnalysisFailed(f"{analysis_name}: {exc}") from exc
            if progress is not None:
                state_now = outcome.state if isinstance(outcome, NextRound) else state
                done = analysis.progress(task.params, state_now)
                progress(round_no, (done[1], done[1]) if isinstance(outcome, Finished) and done else done)
            if isinstance(outcome, Finished):
                provenance = {
                    "study": self.study.id, "task": task.id, "analysis": analysis_name, "dataset": dataset,
                    "sites": sorted(public), "rows": rows, "rounds": round_no + 1,
                    "secure_aggregation": self.study.secure_aggregation,
                    "dp_rho_spent": dp_spent,
                    "audit_ids": {site: ids for site, ids in task.audit_ids.items() if site in public},
                }
                self._background.submit(self._record_result, task.id, provenance)
                return RunOutcome(outcome.result, provenance)
            broadcast, state = outcome.broadcast, outcome.state
            round_no += 1

    def _compute(self, task: _Task, round_no: int, broadcast: dict[str, Any],
                 secure: CoordinatorState | None) -> tuple[dict[str, dict], dict[str, Any]]:
        """One analysis round: the sites' public facts and the cross-site sums."""
        if secure is None:
            replies = self._exchange(task, "compute", round_no, {"broadcast": broadcast})
            public = {site: body["public"] for site, (_, body) in replies.items()}
            return public, aggregate({site: body["sums"] for site, (_, body) in replies.items()})
        step, participants = task.step, list(task.sites)
        replies = self._exchange(task, "compute", round_no,
                                 {"broadcast": broadcast, "secagg": secure.compute_request(participants)},
                                 recipients=participants, tolerate_missing=self.allow_dropouts)
        public = {site: body["public"] for site, (_, body) in replies.items()}
        masked = {site: body for site, (_, body) in replies.items()}
        dropped = [site for site in participants if site not in replies]
        floor = max(secure.threshold, 2)
        if len(replies) < floor:
            raise SecureAggregationError(
                f"only {len(replies)} of {len(participants)} sites submitted (threshold {secure.threshold}); "
                f"round aborted, nothing revealed; missing: {', '.join(dropped)}")
        if not any("masked" in body for body in masked.values()):
            if dropped:  # no unmask step in which the sites could record the dropout
                raise SiteTimeoutError(dropped, self.timeout, step)
            return public, {}
        signatures = self._agree_on_dropouts(task, round_no, step, participants, masked, secure) if dropped else None
        answers = self._exchange(task, "unmask", round_no,
                                 {"secagg": secure.unmask_request(step, participants, masked, signatures)},
                                 recipients=sorted(replies), tolerate_missing=True)
        revealed = {site: body["public"] for site, (_, body) in answers.items()}
        try:
            sums = secure.combine(participants, masked, revealed)
        except SecureAggregationAborted as exc:
            raise SecureAggregationError(f"{len(answers)} of {len(replies)} sites answered the unmask step "
                                         f"(threshold {secure.threshold}): {exc}; round aborted") from exc
        if dropped:
            task.sites = sorted(replies)
            warnings.warn(f"site(s) {', '.join(dropped)} dropped out; the sum covers {', '.join(task.sites)}",
                          RuntimeWarning, stacklevel=3)
            if round_no > 0:
                raise SiteTimeoutError(dropped, self.timeout, step,
                                       "; the round's sum was recovered but earlier rounds included them")
        return public, sums

    def _agree_on_dropouts(self, task: _Task, round_no: int, of_step: int, participants: list[str],
                           masked: dict[str, dict], secure: CoordinatorState) -> dict[str, str]:
        """The consistency step: every submitter signs the dropouts of the compute step `of_step`,
        and the unmask step carries all the signatures (no site reveals without them)."""
        agreed = self._exchange(task, "consistency", round_no,
                                {"secagg": secure.consistency_request(of_step, participants, masked)},
                                recipients=sorted(masked), tolerate_missing=True)
        silent = sorted(set(masked) - set(agreed))
        if silent:
            raise SecureAggregationError(f"site(s) {', '.join(silent)} did not sign the dropouts; a dropout is "
                                         "recovered only when every submitter does; round aborted, nothing revealed")
        return {site: body["public"]["signature"] for site, (_, body) in agreed.items()}

    def _secure_keys(self, task: _Task) -> CoordinatorState:
        """The session's key set, bound to its study: made (one keys step to every study site) with the
        first secure task and reused, with masks fresh per task and step, until it is KEYSET_RENEW_S old."""
        if self._keyset is not None and not self._keyset.expired():
            return self._keyset
        state = CoordinatorState(uuid.uuid4().hex, self.study.id, sorted(self.study.sites), self.study.threshold())
        state.record_keys(self._exchange(task, "keys", 0, {"secagg": {"keyset": state.keyset}},
                                         recipients=state.sites))
        self._keyset = state
        return state

    def _exchange(self, task: _Task, phase: str, round_no: int, body: dict[str, Any], *,
                  recipients: list[str] | None = None, tolerate_missing: bool = False) -> dict[str, tuple[Envelope, dict]]:
        """Send one step to the sites and gather their verified replies."""
        recipients = recipients or task.sites
        step = task.step
        task.step += 1
        message = self.client.seal("task", {"params": task.params.model_dump(), **body}, study=self.study.id,
                                   task=task.id, step=step, phase=phase, round=round_no, analysis=task.analysis,
                                   dataset=task.dataset, recipients=recipients)
        self.client.post("/v1/messages", message)
        replies = self._gather(task.id, step, recipients, tolerate_missing)
        for site, (envelope, _) in replies.items():
            task.audit_ids.setdefault(site, []).extend(envelope.header.get("audit_ids", []))
        return replies

    def _site_key(self, site: str) -> VerifyKey:
        """The identity key pinned for `site` in the study (the hub's copy only for a spec without pins)."""
        pinned = getattr(self.study, "site_keys", None)
        return VerifyKey.from_text(pinned[site]) if pinned else self.client.public_key(site)

    def _gather(self, task_id: str, step: int, sites: list[str],
                tolerate_missing: bool = False) -> dict[str, tuple[Envelope, dict]]:
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            envelopes = self.client.replies(task_id, step, wait=max(0.0, min(remaining, 25.0)))
            answered = {e.sender for e in envelopes}
            if answered >= set(sites) or remaining <= 0:
                break
            if any(e.header.get("status") != "ok" for e in envelopes):
                break
        replies, refusals = {}, []
        for envelope in envelopes:
            if envelope.sender not in sites:
                continue
            try:
                envelope.verify(self._site_key(envelope.sender))
            except SignatureError as exc:
                raise FederationError(f"reply claiming to be from {envelope.sender!r} is forged: {exc}") from exc
            header = envelope.header
            if header.get("task") != task_id or header.get("step") != step:
                raise FederationError(f"reply from {envelope.sender!r} is bound to another task or step")
            body = envelope.body(self.client.max_bytes)
            if header.get("status") != "ok":
                refusals.append((envelope.sender, str(body.get("rule")), str(body.get("message"))))
            else:
                replies[envelope.sender] = (envelope, body)
        if refusals:
            raise RefusedError(sorted(refusals))
        missing = sorted(set(sites) - set(replies))
        if missing and not tolerate_missing:
            raise SiteTimeoutError(missing, self.timeout, step)
        return replies
