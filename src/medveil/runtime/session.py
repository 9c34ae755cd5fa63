"""The researcher's side of a run: send each round, gather signed replies, aggregate, step.

The global step runs here, in the researcher's process, on cross-site sums only. A refusal
from any site stops the run with an error naming the site and the rule; a site that does not
answer within the timeout stops it with an error naming the site, never a hang.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from medveil.analyses.base import Aggregated, Finished, get_analysis
from medveil.crypto.signing import SignatureError
from medveil.runtime.aggregation import PlainAggregation
from medveil.runtime.client import HubClient
from medveil.runtime.study import StudySpec


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

    def __init__(self, sites: list[str], timeout: float, round_no: int):
        self.sites = sites
        super().__init__(f"no answer from site(s) {', '.join(sites)} within {timeout:g} s (round {round_no})")


@dataclass
class RunOutcome:
    result: Any
    provenance: dict[str, Any] = field(default_factory=dict)


class ResearcherSession:
    """Runs registered analyses for one study through a hub."""

    def __init__(self, client: HubClient, study: StudySpec, *, timeout: float = 60.0):
        self.client = client
        self.study = study
        self.timeout = timeout
        self.aggregation = PlainAggregation()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medveil-results")

    def close(self) -> None:
        """Wait for result records still being sent to the hub, then close the connection."""
        self._background.shutdown(wait=True)
        self.client.close()

    def _record_result(self, task_id: str, provenance: dict[str, Any]) -> None:
        envelope = self.client.seal("result", {"status": "done", "summary": provenance}, task=task_id)
        self.client.post(f"/v1/tasks/{task_id}/result", envelope)

    def run(self, analysis_name: str, params: dict[str, Any], dataset: str,
            progress: Callable[[int], None] | None = None) -> RunOutcome:
        analysis = get_analysis(analysis_name)
        typed = analysis.parse_params(params)
        task_id = uuid.uuid4().hex
        sites = list(self.study.sites)
        broadcast: dict[str, Any] = {}
        state: dict[str, Any] = {}
        audit_ids: dict[str, list[str]] = {site: [] for site in sites}
        rows: dict[str, int] = {}
        round_no = 0
        while True:
            task = self.client.seal("task", {"params": typed.model_dump(), "broadcast": broadcast},
                                    study=self.study.id, task=task_id, round=round_no, analysis=analysis_name,
                                    dataset=dataset, recipients=sites)
            self.client.post("/v1/messages", task)
            replies = self._gather(task_id, round_no, sites)
            contributions, public = {}, {}
            for site, body, header in replies:
                audit_ids[site].extend(header.get("audit_ids", []))
                contributions[site] = body["sums"]
                public[site] = body["public"]
                if "rows" in body["public"]:
                    rows[site] = int(body["public"]["rows"])
            aggregated = Aggregated(sums=self.aggregation.combine(contributions), public=public)
            outcome = analysis.global_step(typed, round_no, aggregated, state)
            if progress is not None:
                progress(round_no)
            if isinstance(outcome, Finished):
                provenance = {
                    "study": self.study.id, "task": task_id, "analysis": analysis_name, "dataset": dataset,
                    "sites": sites, "rows": rows, "rounds": round_no + 1,
                    "secure_aggregation": self.aggregation.secure, "audit_ids": audit_ids,
                }
                self._background.submit(self._record_result, task_id, provenance)
                return RunOutcome(outcome.result, provenance)
            broadcast, state = outcome.broadcast, outcome.state
            round_no += 1

    def _gather(self, task_id: str, round_no: int, sites: list[str]) -> list[tuple[str, dict, dict]]:
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            envelopes = self.client.replies(task_id, round_no, wait=max(0.0, min(remaining, 25.0)))
            answered = {e.sender for e in envelopes}
            if answered >= set(sites) or remaining <= 0:
                break
            if any(e.header.get("status") != "ok" for e in envelopes):
                break
        replies, refusals = [], []
        for envelope in envelopes:
            if envelope.sender not in sites:
                continue
            try:
                envelope.verify(self.client.public_key(envelope.sender))
            except SignatureError as exc:
                raise FederationError(f"reply claiming to be from {envelope.sender!r} is forged: {exc}") from exc
            header = envelope.header
            if header.get("task") != task_id or header.get("round") != round_no:
                raise FederationError(f"reply from {envelope.sender!r} is bound to another task or round")
            body = envelope.body(self.client.max_bytes)
            if header.get("status") != "ok":
                refusals.append((envelope.sender, str(body.get("rule")), str(body.get("message"))))
            else:
                replies.append((envelope.sender, body, header))
        if refusals:
            raise RefusedError(sorted(refusals))
        missing = sorted(set(sites) - {site for site, _, _ in replies})
        if missing:
            raise SiteTimeoutError(missing, self.timeout, round_no)
        return replies
