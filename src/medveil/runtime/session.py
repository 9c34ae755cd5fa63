"""The researcher's side of a run: send each round over a Grid, aggregate, step on, checkpoint.

The global step runs here, in the researcher's process, on cross-site sums only. A round is
computed by `PlainRounds` or, with secure aggregation (the default), by `SecureRounds`, a layer
over the Grid (runtime/secure_rounds.py); the loop here never sees which. Replies are verified
by the Grid against the identity keys pinned in the study, never against what the hub serves. A
refusal from any site stops the run with an error naming the site and the rule; a site that does
not answer within the timeout stops it with an error naming the site, never a hang.

Durable: with a runs directory, the task's whole state is checkpointed before its first step and
after every round, and every envelope is journalled before it is sent (runtime/runs.py), so a
killed process resumes the task with `resume(task_id)`. The loop always continues from the
decoded state (pack/unpack of the broadcast and the global state), so a resumed run equals an
uninterrupted one to the last digit. A run that a site refuses, or whose global step fails, is
final and its checkpoint deleted; one stopped by a silent site or an unreachable hub keeps it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    AnalysisError,
    Finished,
    Params,
    UnknownAnalysis,
    get_analysis,
)
from medveil.runtime.client import HubClient, HubError
from medveil.runtime.grid import (
    FederationError,
    Grid,
    HubGrid,
    RefusedError,
    SiteTimeoutError,
    Step,
)
from medveil.runtime.runs import RunFile, RunStore, TaskRun
from medveil.runtime.secure_rounds import (
    EndedTasks,
    KeySets,
    PlainRounds,
    SecureAggregationError,
    SecureRounds,
    TaskChannel,
)
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import pack_body, unpack_body

log = logging.getLogger("medveil.session")

__all__ = ["AnalysisFailed", "FederationError", "RefusedError", "ResearcherSession", "RunOutcome",
           "SecureAggregationError", "SiteTimeoutError"]


class AnalysisFailed(FederationError):
    """The pooled sums do not allow the analysis (e.g. a collinear design); the message says why."""


Progress = Callable[[int, tuple[int, int] | None], None]
"""`progress(round, (done, total) or None)`: called after each round, once it is checkpointed."""
Observer = Callable[[int, Aggregated], None]
"""`observe(round, aggregated)`: what the global step is given in each round (tests, diagnostics)."""


@dataclass
class RunOutcome:
    """A finished run: the analysis' result and its provenance (study, task, sites, rows per
    site, rounds, secure aggregation, DP spent, the sites' audit entry ids)."""

    result: Any
    provenance: dict[str, Any] = field(default_factory=dict)


def wire_round_trip(value: dict[str, Any]) -> dict[str, Any]:
    """`value` as it comes back from the wire framing: what a checkpoint holds and a resume reads."""
    return unpack_body(pack_body(value))


class ResearcherSession:
    """Runs registered analyses for one study over a Grid (a hub, or the nodes in-process)."""

    def __init__(self, grid: Grid | HubClient, study: StudySpec, *, timeout: float = 60.0,
                 allow_dropouts: bool = False, runs_dir: str | Path | None = None, sync_runs: bool = False):
        """`grid`: a Grid, or a HubClient to run over the hub. `allow_dropouts`: with secure
        aggregation, a site silent in an analysis' first round is left out (its masks removed with
        the survivors' shares) instead of failing the run. `runs_dir`: where runs are checkpointed
        (None: not durable); `sync_runs`: fsync the checkpoints too, to survive an OS crash."""
        self.grid: Grid = HubGrid(grid, study) if isinstance(grid, HubClient) else grid
        self.study = study
        self.timeout = timeout
        self.allow_dropouts = allow_dropouts
        self.runs = None if runs_dir is None else RunStore(runs_dir, sync=sync_runs)
        self.keysets = KeySets(study)
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medveil-results")
        self._ended = EndedTasks()
        self._last_end: Step | None = None

    def close(self) -> None:
        """Tell the sites which tasks ended, wait for result records still being sent, then close
        the grid."""
        self._send_end_notices()
        self._background.shutdown(wait=True)
        self.grid.close()

    # --- runs -----------------------------------------------------------------------------

    def run(self, analysis_name: str, params: dict[str, Any], dataset: str, progress: Progress | None = None,
            observe: Observer | None = None) -> RunOutcome:
        """Run an analysis on `dataset` at every study site to its result (see Progress, Observer)."""
        analysis = get_analysis(analysis_name)
        typed = analysis.parse_params(params)
        sites = list(self.study.sites)
        task = TaskRun(uuid.uuid4().hex, self.study.id, analysis_name, wire_round_trip(typed.model_dump()),
                       dataset, sites, audit_ids={site: [] for site in sites},
                       secure=bool(self.study.secure_aggregation and analysis.releases_sums))
        return self._drive(task, analysis, progress, fresh=True, observe=observe)

    def resume(self, task_id: str, progress: Progress | None = None) -> RunOutcome:
        """Continue an unfinished run from its checkpoint: re-send what its journal holds (the hub
        takes a copy it has for delivered), gather the replies and go on to the result."""
        if self.runs is None:
            raise FederationError("this session keeps no run state (no runs directory)")
        task = self.runs.open(task_id).load()
        if task.study != self.study.id:
            raise FederationError(f"run {task_id!r} belongs to study {task.study!r}, not {self.study.id!r}")
        if not set(task.sites) <= set(self.study.sites) or task.analysis not in self.study.analyses:
            raise FederationError(f"run {task_id!r} names sites or an analysis outside study {self.study.id!r}")
        try:
            analysis = get_analysis(task.analysis)
        except UnknownAnalysis as exc:
            raise FederationError(f"run {task_id!r} is of an unknown analysis") from exc
        return self._drive(task, analysis, progress, fresh=False)

    def unfinished(self) -> list[TaskRun]:
        """This study's runs that have a checkpoint and no result yet."""
        return [] if self.runs is None else self.runs.unfinished(self.study.id)

    def _drive(self, task: TaskRun, analysis: Analysis, progress: Progress | None, *, fresh: bool,
               observe: Observer | None = None) -> RunOutcome:
        """The round loop, from whatever round `task` holds. A fresh run is checkpointed before its
        first step (with the key-set id it will use, so that a keys step can be resumed too)."""
        params: Params = analysis.parse_params(task.params_wire)
        run_file = None if self.runs is None else self.runs.open(task.id)
        if fresh:
            if task.secure:
                task.coordinator = self.keysets.for_new_task()
            self._checkpoint(task, run_file)
        try:
            return self._loop(task, analysis, params, progress, run_file, observe)
        except (RefusedError, AnalysisFailed):
            if run_file is not None:  # final: a resume would meet the same refusal
                run_file.delete()
            raise

    def _loop(self, task: TaskRun, analysis: Analysis, params: Params, progress: Progress | None,
              run_file: RunFile | None, observe: Observer | None) -> RunOutcome:
        """Compute, aggregate and step on until the global step finishes (checkpointing every round)."""
        channel = TaskChannel(self.grid, task, self.timeout, run_file, self._ended)
        rounds: PlainRounds | SecureRounds = PlainRounds(channel)
        if task.secure:
            rounds = SecureRounds(channel, self.keysets.ready(channel, task.coordinator),
                                  allow_dropouts=self.allow_dropouts)
            task.coordinator = rounds.coordinator
        while True:
            bodies = self._compute_bodies(task)
            result = rounds.compute(task.round, bodies)
            for site, facts in result.public.items():
                if "rows" in facts:
                    task.rows[site] = int(facts["rows"])
                if "dp_rho" in facts:
                    task.dp_spent[site] = task.dp_spent.get(site, 0.0) + float(facts["dp_rho"])
            aggregated = Aggregated(sums=result.sums, public=result.public, payloads=result.payloads)
            if observe is not None:
                observe(task.round, aggregated)
            try:
                outcome = analysis.global_step(params, task.round, aggregated, task.state)
            except AnalysisError as exc:
                raise AnalysisFailed(f"{task.analysis}: {exc}") from exc
            if isinstance(outcome, Finished):
                if progress is not None:
                    done = analysis.progress(params, task.state)
                    progress(task.round, (done[1], done[1]) if done else done)
                return self._finish(task, outcome, sorted(result.public), run_file, sorted(channel.keeping))
            next_round = wire_round_trip({"broadcast": outcome.broadcast, "state": outcome.state,
                                          "per_site": outcome.per_site, "messages": outcome.messages})
            task.broadcast, task.state = next_round["broadcast"], next_round["state"]
            task.per_site, task.messages = next_round["per_site"], next_round["messages"]
            task.round += 1
            self._checkpoint(task, run_file)
            if progress is not None:
                progress(task.round - 1, analysis.progress(params, task.state))

    def _compute_bodies(self, task: TaskRun) -> dict[str, dict[str, Any]]:
        """Each site's compute body: the broadcast with its own extra keys, and the sealed payloads
        forwarded to it (the key absent when none)."""
        bodies = {}
        for site in task.sites:
            body: dict[str, Any] = {"broadcast": {**task.broadcast, **task.per_site.get(site, {})}}
            if task.messages.get(site):
                body["messages"] = list(task.messages[site])
            bodies[site] = body
        return bodies

    def _checkpoint(self, task: TaskRun, run_file: RunFile | None) -> None:
        if run_file is not None:
            run_file.save(task)

    def _finish(self, task: TaskRun, outcome: Finished, sites: list[str], run_file: RunFile | None,
                keeping: list[str]) -> RunOutcome:
        """The outcome with its provenance (over the sites that answered the last round); the sites
        that keep state for the task (`keeping`) are told it ended with the next step they get, the
        result record goes out in the background, and the run's checkpoint is deleted."""
        provenance = {
            "study": self.study.id, "task": task.id, "analysis": task.analysis, "dataset": task.dataset,
            "sites": sites, "rows": task.rows, "rounds": task.round + 1,
            "secure_aggregation": self.study.secure_aggregation, "dp_rho_spent": task.dp_spent,
            "audit_ids": {site: ids for site, ids in task.audit_ids.items() if site in sites},
        }
        self._ended.add(task.id, keeping)
        self._last_end = Step(task.id, task.step, "end", task.round, task.analysis, {},
                              {site: task.dataset for site in task.sites})
        self._background.submit(self._record_result, task.id, provenance)
        if run_file is not None:
            run_file.delete()
        return RunOutcome(outcome.result, provenance)

    def _record_result(self, task: str, provenance: dict[str, Any]) -> None:
        """Record the provenance at the hub; a hub that stays away only costs the record."""
        try:
            self.grid.record_result(task, provenance)
        except (HubError, FederationError) as exc:
            log.warning("result of task %s not recorded: %s", task, exc)

    def _send_end_notices(self) -> None:
        """Tell the sites about finished tasks no later step told them of (they drop those tasks'
        scratch), in one "end" step of the last finished task; best effort, as node pruning
        removes what a lost notice leaves."""
        end = self._last_end
        sites = [site for site in self._ended.sites() if end is not None and site in end.datasets]
        if end is None or not sites:
            return
        others = [task for task in self._ended.take(sites) if task != end.task]
        bodies = {site: {"ended": others} for site in sites}
        try:
            self.grid.notify(Step(end.task, end.step, end.phase, end.round, end.analysis, bodies,
                                  {site: end.datasets[site] for site in sites}))
        except (HubError, FederationError) as exc:
            log.warning("end of tasks not sent: %s", exc)
