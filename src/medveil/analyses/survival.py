"""kaplan_meier and logrank: survival curves and the log-rank test from securely summed counts.

Durations are placed on a grid the node computes from the parameters (0, unit, 2*unit, ...
max_time); no site sends its own list of times. Round 0 agrees the groups (levels a site holds
at least min_cell_count times); round 1 sums, per group and grid point, events and removals
(events + censorings).

Before counting, each site coarsens its own times (`coarsen_times`), per group, so that what it
adds to the sum could be published on its own: it pools consecutive grid points into the next
point it shows until that step holds 0 or at least min_cell_count events AND 0 or at least
min_cell_count censorings, and it shows a step only while at least min_cell_count of its rows
remain after it. The rows left after its last step (at least min_cell_count, the longest
follow-ups among them) are reported as censored at that step, so no site shows its maximum
time, and its first step (the m-th row, not the earliest) hides its minimum; a group the site
holds too rarely to show any step is left out of that group's table. The site does this itself,
trusting no grid or step from the researcher: the decoded pooled arrays are sums of releases
that each pass the rule, so every shown step rests on at least min_cell_count patients of every
site contributing to it, and no at-risk count is 1..min_cell_count-1. Sites' steps need not
line up: the result is lifelines' estimate on the pooled rows with each row's time as its site
coarsened it (`released_durations`; tested), which on data that need no pooling equals lifelines
on the raw rows at every shown time.

What each party learns: the researcher, the pooled events and censorings at each time some site
shows as a step (at a time only one site shows, that site's coarsened counts, each 0 or at
least min_cell_count); the hub, masked vectors only; a site, nothing of its peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from scipy import stats

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    AnalysisError,
    BroadcastRefused,
    Finished,
    NextRound,
    Params,
    Release,
    SiteContext,
    categorical_column,
    numeric_column,
    register,
    released_in,
    union_of_levels,
)
from medveil.plotting import axes, save
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    public_count,
    releasable_levels,
    require_time_unit,
)

MAX_GRID = 200_001
MAX_AGREED_LEVELS = 1000
MAX_LEVEL_LENGTH = 200
ALL = "all"
LEFT_OUT = -1


class SurvivalParams(Params):
    duration: str
    event: str
    by: str | None = None
    time_unit: float = Field(1.0, gt=0)
    max_time: float = Field(36_500.0, gt=0)
    alpha: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _grid_is_bounded(self) -> SurvivalParams:
        check_grid(self.time_unit, self.max_time)
        return self


def check_grid(time_unit: float, max_time: float) -> None:
    """Refuse a time grid of more than MAX_GRID points, before any site allocates it."""
    if not max_time / time_unit < MAX_GRID:
        raise ValueError(f"the grid max_time/time_unit has more than {MAX_GRID} points; coarsen time")


def time_slots(data: pd.DataFrame, duration: str, event: str, time_unit: float,
               max_time: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid slot of each row's duration (rounded to the unit) and its event indicator, checked.

    A duration beyond max_time is censored at the grid's last point (administrative censoring),
    never refused: a refusal would tell the researcher whether someone's time exceeds the
    max_time it chose, and so, query by query, the longest follow-up."""
    durations = numeric_column(data, duration).to_numpy()
    events = numeric_column(data, event).to_numpy()
    if np.any(durations < 0):
        raise AnalysisError("durations must not be negative")
    if not np.all((events == 0) | (events == 1)):
        raise AnalysisError(f"event indicator {event!r} must be 0 or 1")
    last = grid_size(time_unit, max_time) - 1
    slots = np.rint(np.minimum(durations, max_time) / time_unit).astype(np.int64)
    return np.minimum(slots, last), np.where(durations > max_time, 0, events)


def grid_size(time_unit: float, max_time: float) -> int:
    """Number of points of the time grid the node derives from the parameters."""
    return int(np.floor(max_time / time_unit)) + 1


def coarsen_times(slots: np.ndarray, events: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid slot and event flag each row is released with, after this site's coarsening.

    Walking up the grid, consecutive points are pooled into the next shown step until it holds
    0 or >= min_count events and 0 or >= min_count censorings, and at least min_count rows remain
    after it. Rows after the last step are released as censored at it (so the longest follow-up
    is never shown); without any step, every row is LEFT_OUT."""
    slots = np.asarray(slots, dtype=np.int64)
    events = np.asarray(events, dtype=np.float64)
    released = np.full(len(slots), LEFT_OUT, dtype=np.int64)
    if len(slots) == 0:
        return released, np.zeros(0)
    occupied, position = np.unique(slots, return_inverse=True)
    died = np.bincount(position, weights=events, minlength=len(occupied))
    censored = np.bincount(position, minlength=len(occupied)) - died
    remaining = len(slots) - np.cumsum(died + censored)
    cuts: list[int] = []
    pooled_died = pooled_censored = 0.0
    for k in range(len(occupied)):
        pooled_died += died[k]
        pooled_censored += censored[k]
        if ((pooled_died == 0 or pooled_died >= min_count) and (pooled_censored == 0 or pooled_censored >= min_count)
                and remaining[k] >= min_count):
            cuts.append(int(occupied[k]))
            pooled_died = pooled_censored = 0.0
    if not cuts:
        return released, np.zeros(len(slots))
    step = np.searchsorted(np.asarray(cuts), slots, side="left")
    tail = step == len(cuts)
    released = np.asarray(cuts)[np.minimum(step, len(cuts) - 1)]
    return released, np.where(tail, 0.0, events)


def coarsen_by_group(slots: np.ndarray, events: np.ndarray, labels: np.ndarray,
                     min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """`coarsen_times` applied within each group label (rows labelled LEFT_OUT stay out)."""
    released = np.full(len(slots), LEFT_OUT, dtype=np.int64)
    released_events = np.zeros(len(slots))
    for label in np.unique(labels):
        if label == LEFT_OUT:
            continue
        rows = labels == label
        released[rows], released_events[rows] = coarsen_times(slots[rows], events[rows], min_count)
    return released, released_events


def released_durations(data: pd.DataFrame, duration: str, event: str, min_count: int, by: str | None = None,
                       time_unit: float = 1.0, max_time: float = 36_500.0) -> pd.DataFrame:
    """One site's rows complete in duration, event (and by), with the duration (NaN when left
    out) and event as its coarsening releases them, other columns as they are.

    What the pooled estimates equal: lifelines on the concatenation of every site's frame."""
    complete = data.dropna(subset=[duration, event] + ([by] if by else []))
    slots, events = time_slots(complete, duration, event, time_unit, max_time)
    labels = (np.zeros(len(complete), dtype=np.int64) if by is None else
              pd.factorize(categorical_column(complete, by))[0].astype(np.int64))
    released, released_events = coarsen_by_group(slots, events, labels, min_count)
    frame = complete.copy()
    frame[duration] = np.where(released == LEFT_OUT, np.nan, released * time_unit)
    frame[event] = released_events
    return frame


def step_row_sets(complete: np.ndarray, released: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Masks over all rows of each released step (per group) and of the risk set at it.

    `released` and `labels` are per complete row (`complete` marks those among all rows)."""
    positions = np.flatnonzero(complete)
    sets = []
    for label in np.unique(labels[labels != LEFT_OUT]):
        in_group = labels == label
        for slot in np.unique(released[in_group]):
            for rows in (in_group & (released == slot), in_group & (released >= slot)):
                mask = np.zeros(len(complete), dtype=bool)
                mask[positions[rows]] = True
                sets.append(mask)
    return sets


def check_agreed_levels(levels: Any, own: list[str], key: str) -> list[str]:
    """An agreed level list from a broadcast: strings, distinct, bounded, holding every level this
    site released (others may come from other sites)."""
    if (not isinstance(levels, list) or not 0 < len(levels) <= MAX_AGREED_LEVELS
            or not all(isinstance(level, str) and 0 < len(level) <= MAX_LEVEL_LENGTH for level in levels)
            or len(set(levels)) != len(levels)):
        raise BroadcastRefused("broadcast_malformed", f"{key!r} must be a list of at most {MAX_AGREED_LEVELS} "
                                                      f"distinct, non-empty strings")
    if not set(own) <= set(levels):
        raise BroadcastRefused("broadcast_mismatch", f"{key!r} leaves out levels this site released")
    return levels


def check_keys(broadcast: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    """Refuse unknown or missing broadcast keys."""
    keys = set(broadcast)
    if not required <= keys <= allowed:
        raise BroadcastRefused("broadcast_malformed", f"broadcast keys must be {sorted(required)} "
                                                      f"(optional {sorted(allowed - required)})")


def pin(memory: dict[str, Any], key: str, value: Any) -> None:
    """Record a broadcast value later rounds must repeat; refuse one that differs from the record."""
    if key in memory and memory[key] != value:
        raise BroadcastRefused("broadcast_changed", f"{key!r} differs from what an earlier round of this task agreed")
    memory[key] = value


@dataclass(frozen=True)
class SurvivalCounts:
    """Pooled events and removals per group on the time grid."""

    groups: list[str]
    times: np.ndarray
    events: np.ndarray  # groups x grid
    removed: np.ndarray  # groups x grid


class _SurvivalCountsAnalysis(Analysis[SurvivalParams]):
    """Round 0 agrees the groups (levels held at least min_cell_count times); round 1 counts."""

    Params = SurvivalParams

    def variables(self, params: SurvivalParams) -> list[str]:
        return [params.duration, params.event] + ([params.by] if params.by else [])

    def check_broadcast(self, params: SurvivalParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Round 0 takes no broadcast; round 1 only the agreed groups (pinned); there is no round 2."""
        if round_no == 0:
            super().check_broadcast(params, round_no, broadcast, memory)
            return
        if round_no != 1:
            raise BroadcastRefused("unexpected_round", f"{self.name} has no round {round_no}")
        check_keys(broadcast, {"groups"}, {"groups"})
        own = released_in(memory, 0).get("groups", [])
        groups = check_agreed_levels(broadcast["groups"], list(own), "groups")
        if params.by is None and groups != [ALL]:
            raise BroadcastRefused("broadcast_mismatch", f"without by=..., the only group is {ALL!r}")
        pin(memory, "groups", groups)

    def row_sets(self, params: SurvivalParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """Round 0: the complete rows; round 1: the rows of each shown step and of each risk set."""
        if round_no != 1:
            return super().row_sets(params, data, round_no, broadcast)
        groups = list((broadcast or {}).get("groups", []))
        min_count = (policy or DisclosurePolicy()).min_cell_count
        complete, released, _, labels = self._released(params, data, groups, min_count)
        return step_row_sets(complete, released, labels)

    def _released(self, params: SurvivalParams, data: pd.DataFrame, groups: list[str],
                  min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(complete-row mask over `data`, then per complete row: released slot, released event, group
        index or LEFT_OUT)."""
        mask = data[self.variables(params)].notna().all(axis=1).to_numpy()
        complete = data[mask]
        slots, events = time_slots(complete, params.duration, params.event, params.time_unit, params.max_time)
        labels = (np.zeros(len(complete), dtype=np.int64) if params.by is None else
                  categorical_column(complete, params.by).map({g: i for i, g in enumerate(groups)})
                  .fillna(LEFT_OUT).to_numpy(np.int64))
        released, released_events = coarsen_by_group(slots, events, labels, min_count)
        return mask, released, released_events, np.where(released == LEFT_OUT, LEFT_OUT, labels)

    def local(self, params: SurvivalParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        data, policy = context.data, context.policy
        require_time_unit(params.time_unit, policy)
        complete = data[self.variables(params)].dropna()
        if round_no == 0:
            groups = [ALL] if params.by is None else releasable_levels(categorical_column(complete, params.by),
                                                                       params.by, policy)
            rows = public_count(len(complete), policy)  # a small count is withheld, like a hidden cell
            return Release(public={"groups": groups, **({} if rows is None else {"rows": rows})})
        groups = broadcast["groups"]
        _, slots, events, labels = self._released(params, data, groups, policy.min_cell_count)
        size = grid_size(params.time_unit, params.max_time)
        keep = labels != LEFT_OUT
        event_counts = np.zeros((len(groups), size))
        removed_counts = np.zeros((len(groups), size))
        np.add.at(removed_counts, (labels[keep], slots[keep]), 1.0)
        np.add.at(event_counts, (labels[keep], slots[keep]), events[keep])
        return Release(sums={"events": event_counts, "removed": removed_counts})

    def _counts(self, params: SurvivalParams, round_no: int, aggregated: Aggregated,
                state: dict[str, Any]) -> NextRound | SurvivalCounts:
        if round_no == 0:
            groups = union_of_levels(aggregated.public, "groups")
            if not groups:
                raise AnalysisError("no group is held by at least min_cell_count patients at any site")
            return NextRound({"groups": groups}, {"groups": groups})
        removed = aggregated.sums["removed"]
        occupied = np.flatnonzero(removed.sum(axis=0) > 0)
        return SurvivalCounts(state["groups"], occupied * params.time_unit, aggregated.sums["events"][:, occupied],
                              removed[:, occupied])


@dataclass(frozen=True)
class KaplanMeierResult:
    """Per-group survival tables (as lifelines' event_table + survival_function_ + CI)."""

    tables: dict[str, pd.DataFrame]
    alpha: float
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def median_survival_time(self) -> dict[str, float]:
        """First time the estimate drops to 0.5 or below (lifelines' median_survival_time_)."""
        medians = {}
        for group, table in self.tables.items():
            below = table.index[table["survival"] <= 0.5]
            medians[group] = float(below[0]) if len(below) else float("inf")
        return medians

    def plot(self, path: str | None = None, ax: Any = None) -> Any:
        """Step curves with confidence bands; saved as PNG when `path` is given."""
        ax = axes(ax, path, figsize=(7, 4.5))
        for group, table in self.tables.items():
            line = ax.step(table.index, table["survival"], where="post", label=group)[0]
            ax.fill_between(table.index, table["ci_lower"], table["ci_upper"], step="post", alpha=0.2,
                            color=line.get_color())
        ax.set_xlabel("time")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Kaplan-Meier (federated, {len(self.provenance.get('sites', []))} sites)")
        ax.legend()
        return save(ax, path)


def kaplan_meier_table(times: np.ndarray, events: np.ndarray, removed: np.ndarray, alpha: float) -> pd.DataFrame:
    """lifelines' KM estimate and exponential-Greenwood interval from pooled counts."""
    entered = removed.sum()
    at_risk = entered - np.concatenate([[0.0], np.cumsum(removed)[:-1]])
    survival = np.cumprod(1.0 - events / at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(events / (at_risk * (at_risk - events)))
        log_s = np.log(survival)
        z = stats.norm.ppf(1 - alpha / 2)
        lower = np.exp(-np.exp(np.log(-log_s) - z * np.sqrt(greenwood) / log_s))
        upper = np.exp(-np.exp(np.log(-log_s) + z * np.sqrt(greenwood) / log_s))
    lower = np.where(survival == 1.0, 1.0, np.where(survival == 0.0, 0.0, lower))
    upper = np.where(survival == 1.0, 1.0, np.where(survival == 0.0, 0.0, upper))
    table = pd.DataFrame({"at_risk": at_risk.astype(np.int64), "events": events.astype(np.int64),
                          "censored": (removed - events).astype(np.int64), "survival": survival,
                          "ci_lower": lower, "ci_upper": upper}, index=pd.Index(times, name="time"))
    if len(times) == 0 or times[0] != 0:
        start = pd.DataFrame({"at_risk": [int(entered)], "events": [0], "censored": [0], "survival": [1.0],
                              "ci_lower": [1.0], "ci_upper": [1.0]}, index=pd.Index([0.0], name="time"))
        table = pd.concat([start, table])
    return table


@register
class KaplanMeier(_SurvivalCountsAnalysis):
    name = "kaplan_meier"

    def global_step(self, params: SurvivalParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        counts = self._counts(params, round_no, aggregated, state)
        if isinstance(counts, NextRound):
            return counts
        tables = {}
        for i, group in enumerate(counts.groups):
            present = counts.removed[i] > 0
            tables[group] = kaplan_meier_table(counts.times[present], counts.events[i][present],
                                               counts.removed[i][present], params.alpha)
        return Finished(KaplanMeierResult(tables, params.alpha))


@dataclass(frozen=True)
class LogrankResult:
    test_statistic: float
    p_value: float
    degrees_of_freedom: int
    observed: pd.Series
    expected: pd.Series
    provenance: dict[str, Any] = field(default_factory=dict)


@register
class Logrank(_SurvivalCountsAnalysis):
    name = "logrank"

    def global_step(self, params: SurvivalParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if params.by is None:
            raise AnalysisError("the log-rank test needs a group variable (by=...)")
        counts = self._counts(params, round_no, aggregated, state)
        if isinstance(counts, NextRound):
            return counts
        if len(counts.groups) < 2:
            raise AnalysisError("the log-rank test needs at least two groups")
        entered = counts.removed.sum(axis=1, keepdims=True)
        at_risk = entered - np.concatenate([np.zeros((len(counts.groups), 1)),
                                            np.cumsum(counts.removed, axis=1)[:, :-1]], axis=1)
        total_at_risk = at_risk.sum(axis=0)
        total_events = counts.events.sum(axis=0)
        share = at_risk / total_at_risk
        expected = (share * total_events).sum(axis=1)
        observed = counts.events.sum(axis=1)
        factor = np.where(total_at_risk > 1, total_events * (total_at_risk - total_events) / np.maximum(total_at_risk - 1, 1), 0.0)
        covariance = np.einsum("t,it,jt->ij", factor, share, -share) + np.diag((factor * share).sum(axis=1))
        difference = (observed - expected)[:-1]
        statistic = float(difference @ np.linalg.solve(covariance[:-1, :-1], difference))
        dof = len(counts.groups) - 1
        return Finished(LogrankResult(statistic, float(stats.chi2.sf(statistic, dof)), dof,
                                      pd.Series(observed, index=counts.groups), pd.Series(expected, index=counts.groups)))
