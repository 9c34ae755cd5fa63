"""coxph: Cox proportional-hazards model by exact distributed Newton on the partial likelihood.

Durations sit on a grid the node computes from the parameters, and each site coarsens its own
times per stratum exactly as for Kaplan-Meier (`survival.coarsen_times`: every step holds 0 or
>= min_cell_count events and censorings, at least min_cell_count rows stay at risk after it, the
longest follow-ups are censored at the last step), so every risk set, every difference of two
risk sets and every set of tied events a site sums over is 0 or >= min_cell_count of its rows.
Round 0 agrees strata; round 1 sums per-time event counts (the pooled event times come from this
secure sum, never from a site's own list); every later round sends the coefficients and each
site returns, for every pooled event time of each stratum, its risk-set sums (sum of w, w x,
w x x' over rows still at risk, w = exp(x'beta)) and the same sums over the rows that fail at
that time, plus sum of x over its events. From those cross-site sums the researcher computes the
pooled partial log-likelihood, gradient and Hessian with Efron's or Breslow's handling of ties,
exactly as a pooled fit on the released times would (lifelines on them, tested), and takes a
Newton step. On every round a site refuses a fit its rows cannot carry (`saturation`), a
covariate that singles out fewer than min_cell_count rows at the site or in a stratum
(`indicator_isolation`), and coefficients under which one row would carry most of a released
weighted sum (`weight_dominance`); it checks each broadcast against what it agreed before
(`check_broadcast`). A last round sums, per pooled event time, this site's deaths, censorings
and later removals on ten risk-score bins, each time's cells withheld where one is small, for
Harrell's concordance: exact up to pairs that share a bin or involve a withheld row, whose share
bounds the error (reported). An exact pooled concordance would need secure comparisons.
What each party learns: the researcher, the pooled event counts at each time some site shows as
a step, the pooled risk-set sums at those times for each coefficient vector it sent, and the
pooled bin counts; the hub, masked vectors only; a site, nothing of its peers.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
    check_collinearity,
    register,
    released_in,
    union_of_levels,
)
from medveil.analyses.survival import (
    LEFT_OUT,
    check_agreed_levels,
    check_grid,
    check_keys,
    coarsen_by_group,
    grid_size,
    pin,
    step_row_sets,
    time_slots,
)
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    DisclosureRefused,
    public_count,
    releasable_levels,
    require_not_saturated,
    require_time_unit,
)

ALL = "all"
CONCORDANCE_BINS = 10  # risk-score bins of equal expected mass; a site hides a time's row of cells if any is small
CONCORDANCE_MAX_BINS = 2000
MAX_ABS_COEFFICIENT = 1e3
MAX_STEP_SD = 0.25  # longest Newton step, in standard deviations of the linear predictor
MAX_WEIGHT_SHARE = 0.8  # no row may carry more than this share of a released weighted sum (an (1, 80%) dominance rule)
FIT_KEYS = {"strata", "beta", "event_slots"}
CONCORDANCE_KEYS = {"concordance_edges", "concordance_slots"}


class CoxParams(Params):
    duration: str
    event: str
    covariates: list[str] = Field(min_length=1)
    ties: Literal["efron", "breslow"] = "efron"
    strata: str | None = None
    time_unit: float = Field(1.0, gt=0)
    max_time: float = Field(36_500.0, gt=0)
    max_iter: int = Field(50, ge=1, le=500)
    tol: float = Field(1e-10, gt=0)
    alpha: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _grid_is_bounded(self) -> CoxParams:
        check_grid(self.time_unit, self.max_time)
        return self


@dataclass(frozen=True)
class CoxResults:
    """Coefficients as lifelines' CoxPHFitter names them; no row-level data."""

    params: pd.Series
    variance_matrix: pd.DataFrame
    log_likelihood: float
    log_likelihood_null: float
    ties: str
    iterations: int
    converged: bool
    n_events: int
    nobs: int
    concordance: float = float("nan")
    concordance_error_bound: float = float("nan")
    alpha: float = 0.05
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def hazard_ratios(self) -> pd.Series:
        return np.exp(self.params)

    @property
    def standard_errors(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.variance_matrix)), index=self.params.index)

    @property
    def z(self) -> pd.Series:
        return self.params / self.standard_errors

    @property
    def p_values(self) -> pd.Series:
        return pd.Series(2 * stats.norm.sf(np.abs(self.z)), index=self.params.index)

    def confidence_intervals(self) -> pd.DataFrame:
        quantile = stats.norm.ppf(1 - self.alpha / 2)
        return pd.DataFrame({"lower": self.params - quantile * self.standard_errors,
                             "upper": self.params + quantile * self.standard_errors})

    def log_likelihood_ratio_test(self) -> tuple[float, float]:
        """(statistic, p-value) of the model against no covariates."""
        statistic = 2 * (self.log_likelihood - self.log_likelihood_null)
        return statistic, float(stats.chi2.sf(statistic, len(self.params)))

    def summary(self) -> str:
        ci = self.confidence_intervals()
        table = pd.DataFrame({"coef": self.params, "exp(coef)": self.hazard_ratios, "se(coef)": self.standard_errors,
                              "z": self.z, "p": self.p_values, "lower 95%": ci["lower"], "upper 95%": ci["upper"]})
        statistic, p_value = self.log_likelihood_ratio_test()
        return "\n".join([
            f"Federated Cox PH ({self.ties} ties)   sites: {', '.join(self.provenance.get('sites', [])) or '-'}",
            f"observations: {self.nobs}   events: {self.n_events}   partial log-likelihood: {self.log_likelihood:.6g}",
            f"concordance: {self.concordance:.4f} (+/- {self.concordance_error_bound:.1e}, from risk-score bins)",
            f"log-likelihood ratio test: {statistic:.6g} on {len(self.params)} df, p={p_value:.4g}   "
            f"Newton iterations: {self.iterations} (converged: {self.converged})",
            "", table.to_string(float_format=lambda v: f"{v:.6g}"),
        ])

    def __repr__(self) -> str:
        return self.summary()


def _risk_sums(slots: np.ndarray, x: np.ndarray, w: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Per grid slot: sum of w, w x and the upper triangle of w x x' over the rows in that slot."""
    p = x.shape[1]
    s0 = np.bincount(slots, weights=w, minlength=size)
    wx = x * w[:, None]
    s1 = np.stack([np.bincount(slots, weights=wx[:, a], minlength=size) for a in range(p)], axis=1)
    rows, cols = np.triu_indices(p)
    s2 = np.stack([np.bincount(slots, weights=wx[:, a] * x[:, b], minlength=size) for a, b in zip(rows, cols)],
                  axis=1)
    return s0, s1, s2


def isolated_columns(frame: pd.DataFrame, columns: list[str], min_count: int) -> list[str]:
    """Columns where 1..min_count-1 rows differ from the value all the others share (an indicator
    of a few patients, e.g. a 0/1 column with one 1): a model coefficient on it would speak for them."""
    isolated = []
    for column in columns:
        values = frame[column]
        if len(values) == 0:
            continue
        differing = len(values) - int(values.value_counts().iloc[0])
        if 0 < differing < min_count:
            isolated.append(column)
    return isolated


def require_no_isolation(frame: pd.DataFrame, columns: list[str], groups: np.ndarray, min_count: int) -> None:
    """Refuse covariates that isolate fewer than min_count rows, at the site or within a stratum."""
    for group in [None, *np.unique(groups)]:
        part = frame if group is None else frame[groups == group]
        if group is not None and len(part) == len(frame):
            continue
        if isolated_columns(part, columns, min_count):
            raise DisclosureRefused("indicator_isolation",
                                    f"a covariate singles out fewer than {min_count} rows "
                                    f"{'at this site' if group is None else 'within a stratum'}")


def require_no_dominant_weight(weights: np.ndarray, slots: np.ndarray, needed: np.ndarray, size: int) -> None:
    """Refuse risk-set sums in which one row carries most of the weight (a coefficient chosen to
    make exp(x'beta) of one patient dwarf the others would read that patient's covariates)."""
    if len(weights) == 0 or len(needed) == 0:
        return
    total = np.bincount(slots, weights=weights, minlength=size)
    largest = np.zeros(size)
    np.maximum.at(largest, slots, weights)
    risk_total = np.flip(np.cumsum(np.flip(total)))[needed]
    risk_largest = np.flip(np.maximum.accumulate(np.flip(largest)))[needed]
    tied_share = np.divide(largest[needed], total[needed], out=np.zeros(len(needed)), where=total[needed] > 0)
    risk_share = np.divide(risk_largest, risk_total, out=np.zeros(len(needed)), where=risk_total > 0)
    if np.any(risk_share > MAX_WEIGHT_SHARE) or np.any(tied_share > MAX_WEIGHT_SHARE):
        raise DisclosureRefused("weight_dominance", f"one row would carry more than {MAX_WEIGHT_SHARE:.0%} of a "
                                                    f"released risk-set sum at these coefficients")


def _slot_list(value: Any, size: int) -> list[int]:
    """A broadcast list of grid slots: ints, strictly increasing, on the grid."""
    if not isinstance(value, (list, np.ndarray)) or len(value) > size:
        raise BroadcastRefused("broadcast_malformed", "a list of event times is not a list or is too long")
    slots = np.asarray(value)
    if len(slots) and (slots.dtype.kind not in "iu" or slots.min() < 0 or slots.max() >= size
                       or np.any(np.diff(slots) <= 0)):
        raise BroadcastRefused("broadcast_malformed", "event times must be increasing grid points")
    return [int(slot) for slot in slots]


@register
class CoxPH(Analysis[CoxParams]):
    name = "coxph"
    Params = CoxParams

    def variables(self, params: CoxParams) -> list[str]:
        return [params.duration, params.event, *params.covariates] + ([params.strata] if params.strata else [])

    def _prepared(self, params: CoxParams, data: pd.DataFrame, scratch: MutableMapping[str, Any],
                  min_count: int) -> dict[str, Any]:
        """This site's rows as the fit sees them: covariates, times coarsened per stratum (rows the
        coarsening leaves out dropped), event flags, strata. The wire-encodable part (arrays, the
        strata as codes into their labels) is kept in the task's scratch, written once."""
        prepared = scratch.get("prepared")
        if prepared is None:
            mask = data[self.variables(params)].notna().all(axis=1).to_numpy()
            complete = data[mask]
            slots, events = time_slots(complete, params.duration, params.event, params.time_unit, params.max_time)
            strata = (np.array([ALL] * len(complete), dtype=object) if params.strata is None
                      else categorical_column(complete, params.strata).to_numpy(object))
            codes, labels = pd.factorize(strata)
            codes = codes.astype(np.int64)
            released, released_events = coarsen_by_group(slots, events, codes, min_count)
            kept = released != LEFT_OUT
            prepared = {"x": complete[params.covariates].to_numpy(np.float64)[kept], "slots": released[kept],
                        "events": released_events[kept].astype(bool), "strata_codes": codes[kept],
                        "strata_labels": [str(label) for label in labels], "rows": np.flatnonzero(mask)[kept],
                        "n_data": len(data), "complete": len(complete), "dropped": len(data) - len(complete)}
            scratch["prepared"] = prepared
        labels = np.array(prepared["strata_labels"] + [""], dtype=object)  # "" only ever indexes nothing
        return dict(prepared, strata=labels[prepared["strata_codes"]],
                    frame=pd.DataFrame(prepared["x"], columns=list(params.covariates)))

    def check_broadcast(self, params: CoxParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Strata agreed at round 1 and pinned; event times pinned at round 2; coefficients finite and
        of the model's size; one concordance round, at the last coefficients; nothing else."""
        if round_no == 0:
            super().check_broadcast(params, round_no, broadcast, memory)
            return
        if memory.get("concordance_done"):
            raise BroadcastRefused("unexpected_round", "the concordance round was this task's last")
        size = grid_size(params.time_unit, params.max_time)
        if round_no == 1:
            check_keys(broadcast, {"strata"}, {"strata"})
        elif CONCORDANCE_KEYS & set(broadcast):
            check_keys(broadcast, FIT_KEYS | CONCORDANCE_KEYS, FIT_KEYS | CONCORDANCE_KEYS)
        else:
            check_keys(broadcast, FIT_KEYS, FIT_KEYS)
            if round_no - 1 > params.max_iter + 1:
                raise BroadcastRefused("unexpected_round", "more fit rounds than max_iter allows")
        strata = check_agreed_levels(broadcast["strata"], list(released_in(memory, 0).get("strata", [])), "strata")
        if params.strata is None and strata != [ALL]:
            raise BroadcastRefused("broadcast_mismatch", f"without strata=..., the only stratum is {ALL!r}")
        pin(memory, "strata", strata)
        if round_no == 1:
            return
        event_slots = broadcast["event_slots"]
        if not isinstance(event_slots, list) or len(event_slots) != len(strata):
            raise BroadcastRefused("broadcast_malformed", "event times must come as one list per stratum")
        pin(memory, "event_slots", [_slot_list(slots, size) for slots in event_slots])
        beta = broadcast["beta"]
        if not isinstance(beta, (list, np.ndarray)) or np.asarray(beta).shape != (len(params.covariates),):
            raise BroadcastRefused("broadcast_malformed", "coefficients must be one number per covariate")
        beta = np.asarray(beta)
        if beta.dtype.kind not in "iuf" or not np.all(np.isfinite(beta)) or np.max(np.abs(beta)) > MAX_ABS_COEFFICIENT:
            raise BroadcastRefused("broadcast_malformed", "coefficients must be finite and not too large")
        if "concordance_edges" not in broadcast:
            memory["beta"] = beta.astype(np.float64)
            return
        if "beta" not in memory or not np.array_equal(memory["beta"], beta):
            raise BroadcastRefused("broadcast_changed", "the concordance round must use the fitted coefficients")
        edges = np.asarray(broadcast["concordance_edges"])
        if (edges.ndim != 1 or not 1 <= len(edges) <= CONCORDANCE_MAX_BINS or edges.dtype.kind not in "iuf"
                or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0)):
            raise BroadcastRefused("broadcast_malformed", "risk-score edges must be finite and increasing")
        union = sorted(set().union(*map(set, memory["event_slots"])))
        if _slot_list(broadcast["concordance_slots"], size) != union:
            raise BroadcastRefused("broadcast_mismatch", "concordance times must be the agreed event times")
        memory["concordance_done"] = True

    def row_sets(self, params: CoxParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """Round 0: the complete rows; round 1: the rows of each step and risk set the fit rests on
        (later rounds reuse them)."""
        if round_no != 1:
            return super().row_sets(params, data, round_no, broadcast)
        site = self._prepared(params, data, {}, (policy or DisclosurePolicy()).min_cell_count)
        strata = list((broadcast or {}).get("strata", []))
        labels = np.array([strata.index(s) if s in strata else LEFT_OUT for s in site["strata"]], dtype=np.int64)
        complete = np.zeros(site["n_data"], dtype=bool)
        complete[site["rows"]] = True
        return step_row_sets(complete, site["slots"], labels)

    def local(self, params: CoxParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        policy = context.policy
        require_time_unit(params.time_unit, policy)
        site = self._prepared(params, context.data, context.scratch, policy.min_cell_count)
        size = grid_size(params.time_unit, params.max_time)
        if round_no == 0:
            require_not_saturated(site["complete"], len(params.covariates), policy)
            strata = releasable_levels(pd.Series(site["strata"]), params.strata or ALL, policy)
            rows = public_count(site["complete"], policy)  # a small count is withheld, like a hidden cell
            return Release(public={"strata": strata, **({} if rows is None else {"rows": rows}),
                                   "rows_dropped": public_count(site["dropped"], policy)})
        strata = broadcast["strata"]
        used = np.isin(site["strata"], strata)
        require_not_saturated(int(used.sum()), len(params.covariates), policy)
        require_no_isolation(site["frame"][used], list(params.covariates), site["strata"][used],
                             policy.min_cell_count)
        if round_no == 1:
            events = np.zeros((len(strata), size))
            for k, stratum in enumerate(strata):
                mask = (site["strata"] == stratum) & site["events"]
                events[k] = np.bincount(site["slots"][mask], minlength=size)
            x = site["x"][used]
            return Release(sums={"events": events, "n": np.array([float(used.sum())]), "x_sum": x.sum(axis=0),
                                 "xx_sum": x.T @ x})
        if "concordance_edges" in broadcast:
            return Release(sums=self._concordance_counts(site, broadcast, policy.min_cell_count))
        beta = np.asarray(broadcast["beta"], dtype=np.float64)
        sums: dict[str, np.ndarray] = {}
        event_x = np.zeros(len(beta))
        for k, stratum in enumerate(strata):
            slots_needed = np.asarray(broadcast["event_slots"][k], dtype=np.int64)
            rows = site["strata"] == stratum
            x, slots, failed = site["x"][rows], site["slots"][rows], site["events"][rows]
            with np.errstate(over="ignore"):
                w = np.exp(x @ beta)
            if not np.all(np.isfinite(w)):
                raise AnalysisError("exp(x'beta) overflows at these coefficients: a value is too large")
            require_no_dominant_weight(w, slots, slots_needed, size)
            at_slot = _risk_sums(slots, x, w, size)
            # Risk set at time t: rows with duration >= t, i.e. reverse cumulative sums over slots.
            risk = [np.flip(np.cumsum(np.flip(part, axis=0), axis=0), axis=0)[slots_needed] for part in at_slot]
            for name, value in zip(("s0", "s1", "s2"), risk):
                sums[f"{name}_{k}"] = value
            if params.ties == "efron":
                tied = _risk_sums(slots[failed], x[failed], w[failed], size)
                for name, value in zip(("d0", "d1", "d2"), tied):
                    sums[f"{name}_{k}"] = value[slots_needed]
            event_x += x[failed].sum(axis=0)
        sums["event_x"] = event_x
        return Release(sums=sums)

    def global_step(self, params: CoxParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        if round_no == 0:
            strata = union_of_levels(aggregated.public, "strata")
            if not strata:
                raise AnalysisError("no stratum is held by at least min_cell_count rows at any site")
            return NextRound({"strata": strata}, {"strata": strata})
        p = len(params.covariates)
        if round_no == 1:
            events = aggregated.sums["events"]
            event_slots = [np.flatnonzero(row > 0) for row in events]
            counts = [row[slots] for row, slots in zip(events, event_slots)]
            n = aggregated.sums["n"][0]
            mean_x = aggregated.sums["x_sum"] / n
            state = dict(state, event_slots=event_slots, counts=counts, nobs=int(n),
                         n_events=int(events.sum()), beta=np.zeros(p), iteration=0, loglik_history=[],
                         mean_x=mean_x, cov_x=aggregated.sums["xx_sum"] / n - np.outer(mean_x, mean_x))
            return NextRound(self._broadcast(state), state)
        if "fit" in state:
            concordance, bound = _concordance(aggregated.sums)
            return Finished(self._results(params, state, concordance, bound))
        loglik, gradient, hessian = self._derivatives(params, aggregated.sums, state)
        history = state["loglik_history"] + [loglik]
        if state["iteration"] == 0:
            check_collinearity(-hessian, list(params.covariates))
            state = dict(state, loglik_null=loglik)
        try:
            step = np.linalg.solve(-hessian, gradient)
        except np.linalg.LinAlgError as exc:
            raise AnalysisError(f"singular information matrix: covariates {params.covariates} are collinear") from exc
        converged = state["iteration"] > 0 and np.max(np.abs(step)) < params.tol
        if converged or state["iteration"] >= params.max_iter:
            fit = {"variance": np.linalg.inv(-hessian), "loglik": loglik, "converged": bool(converged)}
            # One more round: counts on risk-score bins of equal expected mass for the concordance index.
            beta = state["beta"]
            centre = float(state["mean_x"] @ beta)
            spread = float(np.sqrt(max(beta @ state["cov_x"] @ beta, 1e-300)))
            all_slots = sorted(set().union(*(set(slots.tolist()) for slots in state["event_slots"])))
            edges = centre + spread * stats.norm.ppf(np.arange(1, CONCORDANCE_BINS) / CONCORDANCE_BINS)
            return NextRound(dict(self._broadcast(state), concordance_edges=edges, concordance_slots=all_slots),
                             dict(state, fit=fit))
        # A step moving the log-hazard by more than MAX_STEP_SD standard deviations is shortened, so
        # the path stays where no row dominates a risk set (sites refuse such coefficients).
        spread = float(np.sqrt(max(step @ state["cov_x"] @ step, 0.0)))
        if spread > MAX_STEP_SD:
            step = step * (MAX_STEP_SD / spread)
        state = dict(state, beta=state["beta"] + step, iteration=state["iteration"] + 1, loglik_history=history)
        return NextRound(self._broadcast(state), state)

    @staticmethod
    def _results(params: CoxParams, state: dict[str, Any], concordance: float, bound: float) -> CoxResults:
        """The fitted model from the state's record of its last fit round (wire-encodable, unlike
        the results object) and the concordance round's index."""
        names, fit = list(params.covariates), state["fit"]
        return CoxResults(
            params=pd.Series(np.array(state["beta"]), index=names),
            variance_matrix=pd.DataFrame(np.array(fit["variance"]), index=names, columns=names),
            log_likelihood=fit["loglik"], log_likelihood_null=state["loglik_null"], ties=params.ties,
            iterations=state["iteration"], converged=fit["converged"], n_events=state["n_events"],
            nobs=state["nobs"], alpha=params.alpha, concordance=concordance, concordance_error_bound=bound,
        )

    @staticmethod
    def _concordance_counts(site: dict[str, Any], broadcast: dict[str, Any], min_count: int) -> dict[str, np.ndarray]:
        """Per pooled event time t_j and risk bin, this site's rows in three disjoint cells: deaths
        at t_j, censored at t_j, and removed strictly between t_j and t_(j+1); plus each time's totals.

        Each total is whole coarsened steps (0 or >= min_count rows); a time's row of cells is sent
        only when no cell holds 1..min_count-1 rows, else as zeros (its rows then count as unknown
        pairs in the error bound). Disjoint cells, never cumulative ones, so no difference of two
        released cells isolates a row."""
        used = np.isin(site["strata"], broadcast["strata"])
        x, slots, died = site["x"][used], site["slots"][used], site["events"][used]
        edges = np.asarray(broadcast["concordance_edges"], dtype=np.float64)
        risk_bin = np.searchsorted(edges, x @ np.asarray(broadcast["beta"], dtype=np.float64))
        needed = np.asarray(broadcast["concordance_slots"], dtype=np.int64)
        position = np.searchsorted(needed, slots, side="left")
        at_time = (position < len(needed)) & (needed[np.minimum(position, len(needed) - 1)] == slots)
        cells = {"deaths": at_time & died, "censored_at": at_time & ~died, "between": ~at_time & (position > 0)}
        sums = {}
        for name, rows in cells.items():
            index = position[rows] - (0 if name != "between" else 1)
            counts = np.zeros((len(needed), len(edges) + 1))
            np.add.at(counts, (index, risk_bin[rows]), 1.0)
            small = np.any((counts > 0) & (counts < min_count), axis=1)
            sums[f"{name}_total"] = counts.sum(axis=1)
            sums[name] = np.where(small[:, None], 0.0, counts)
        return sums

    @staticmethod
    def _broadcast(state: dict[str, Any]) -> dict[str, Any]:
        return {"strata": state["strata"], "beta": state["beta"],
                "event_slots": [slots.tolist() for slots in state["event_slots"]]}

    def _derivatives(self, params: CoxParams, sums: dict[str, np.ndarray],
                     state: dict[str, Any]) -> tuple[float, np.ndarray, np.ndarray]:
        """Pooled partial log-likelihood, gradient and Hessian (Efron or Breslow ties)."""
        beta = state["beta"]
        p = len(beta)
        upper = np.triu_indices(p)
        loglik = float(sums["event_x"] @ beta)
        gradient = sums["event_x"].copy()
        hessian = np.zeros((p, p))
        for k in range(len(state["strata"])):
            counts = state["counts"][k].astype(np.int64)
            # One entry per event: its event time j and Efron's fraction l/d (0 for Breslow).
            j = np.repeat(np.arange(len(counts)), counts)
            rank = np.arange(len(j)) - np.repeat(np.cumsum(counts) - counts, counts)
            fraction = rank / counts[j] if params.ties == "efron" else np.zeros(len(j))
            s0, s1, s2 = sums[f"s0_{k}"][j], sums[f"s1_{k}"][j], _symmetric(sums[f"s2_{k}"], p, upper)[j]
            if params.ties == "efron":
                s0 = s0 - fraction * sums[f"d0_{k}"][j]
                s1 = s1 - fraction[:, None] * sums[f"d1_{k}"][j]
                s2 = s2 - fraction[:, None, None] * _symmetric(sums[f"d2_{k}"], p, upper)[j]
            mean = s1 / s0[:, None]
            loglik -= float(np.sum(np.log(s0)))
            gradient -= mean.sum(axis=0)
            hessian -= (s2 / s0[:, None, None]).sum(axis=0) - mean.T @ mean
        return loglik, gradient, hessian


def _comparable(deaths: np.ndarray, censored_at: np.ndarray, between: np.ndarray) -> np.ndarray:
    """Rows comparable with a death at each event time (per last axis' bins, if any): later
    times, or censored at that time, as lifelines' concordance_index pairs them."""
    later = np.flip(np.cumsum(np.flip(between + deaths + censored_at, axis=0), axis=0), axis=0)
    return censored_at + between + np.concatenate([later[1:], np.zeros_like(later[:1])])


def _concordance(sums: dict[str, np.ndarray]) -> tuple[float, float]:
    """Harrell's C from pooled bin counts, and a bound on its error.

    A death in a higher risk bin than a comparable row is concordant, in a lower bin discordant;
    pairs within one bin, and pairs with a row some site withheld, count 1/2 each, so the exact C
    lies within 1/2 x (their share) of it."""
    deaths = sums["deaths"]
    comparable = _comparable(deaths, sums["censored_at"], sums["between"])
    total_comparable = _comparable(sums["deaths_total"], sums["censored_at_total"], sums["between_total"])
    lower = np.cumsum(comparable, axis=1) - comparable
    concordant = float(np.sum(deaths * lower))
    same_bin = float(np.sum(deaths * comparable))
    pairs = float(np.sum(sums["deaths_total"] * total_comparable))
    if pairs == 0:
        return float("nan"), float("nan")
    unknown = pairs - float(np.sum(deaths.sum(axis=1) * comparable.sum(axis=1)))
    return (concordant + 0.5 * (same_bin + unknown)) / pairs, 0.5 * (same_bin + unknown) / pairs


def _symmetric(packed: np.ndarray, p: int, upper: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Rebuild (n, p, p) symmetric matrices from their packed upper triangles (n, p(p+1)/2)."""
    full = np.zeros((packed.shape[0], p, p))
    full[:, upper[0], upper[1]] = packed
    full[:, upper[1], upper[0]] = packed
    return full
