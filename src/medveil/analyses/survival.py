"""kaplan_meier and logrank: survival curves and the log-rank test from securely summed counts.

Durations are placed on a grid agreed up front (0, unit, 2*unit, ... max_time), so no site ever
sends its own list of event times: each site sends, per group, its counts of events and of
removals (events + censorings) at every grid point, and only the cross-site sums (masked under
secure aggregation) are decoded. From those the researcher gets lifelines' event table,
Kaplan-Meier estimate with exponential-Greenwood intervals, and the (multivariate) log-rank
test. Durations are rounded to the unit (exact for integer days with unit 1); a node whose
policy sets `min_time_unit` refuses a finer grid, so a site can coarsen time (e.g. to weeks).
What leaks: the pooled number of events and censorings at each grid time, as any published
at-risk table shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field
from scipy import stats

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    AnalysisError,
    Finished,
    NextRound,
    Params,
    Release,
    categorical_column,
    numeric_column,
    register,
    union_of_levels,
)
from medveil.plotting import axes, save
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    releasable_levels,
    require_time_unit,
)

MAX_GRID = 200_001
ALL = "all"


class SurvivalParams(Params):
    duration: str
    event: str
    by: str | None = None
    time_unit: float = Field(1.0, gt=0)
    max_time: float = Field(36_500.0, gt=0)
    alpha: float = Field(0.05, gt=0, lt=1)


def time_slots(data: pd.DataFrame, duration: str, event: str, time_unit: float,
               max_time: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid slot of each row's duration (rounded to the unit) and its event indicator, checked."""
    durations = numeric_column(data, duration).to_numpy()
    events = numeric_column(data, event).to_numpy()
    if np.any(durations < 0) or np.any(durations > max_time):
        raise AnalysisError(f"durations must lie in [0, max_time={max_time:g}]")
    if not np.all((events == 0) | (events == 1)):
        raise AnalysisError(f"event indicator {event!r} must be 0 or 1")
    return np.rint(durations / time_unit).astype(np.int64), events


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

    def local(self, params: SurvivalParams, round_no: int, broadcast: dict[str, Any], data: pd.DataFrame,
              policy: DisclosurePolicy) -> Release:
        require_time_unit(params.time_unit, policy)
        complete = data[self.variables(params)].dropna()
        if round_no == 0:
            if params.by is None:
                return Release(public={"groups": [ALL], "rows": len(complete)})
            return Release(public={"groups": releasable_levels(categorical_column(complete, params.by), params.by,
                                                               policy), "rows": len(complete)})
        groups = broadcast["groups"]
        slots, events = time_slots(complete, params.duration, params.event, params.time_unit, params.max_time)
        size = int(np.floor(params.max_time / params.time_unit)) + 1
        labels = (np.zeros(len(complete), dtype=np.int64) if params.by is None else
                  categorical_column(complete, params.by).map({g: i for i, g in enumerate(groups)})
                  .fillna(-1).to_numpy(np.int64))
        keep = labels >= 0
        event_counts = np.zeros((len(groups), size))
        removed_counts = np.zeros((len(groups), size))
        np.add.at(removed_counts, (labels[keep], slots[keep]), 1.0)
        np.add.at(event_counts, (labels[keep], slots[keep]), events[keep])
        return Release(sums={"events": event_counts, "removed": removed_counts})

    def _counts(self, params: SurvivalParams, round_no: int, aggregated: Aggregated,
                state: dict[str, Any]) -> NextRound | SurvivalCounts:
        if round_no == 0:
            if int(np.floor(params.max_time / params.time_unit)) + 1 > MAX_GRID:
                raise AnalysisError(f"the grid max_time/time_unit has more than {MAX_GRID} points; coarsen time")
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
