"""coxph: Cox proportional-hazards model by exact distributed Newton on the partial likelihood.

Durations sit on a time grid agreed up front, as for Kaplan-Meier. Round 0 agrees strata;
round 1 sums per-time event counts (the pooled event times come from this secure sum, never
from a site's own list); every later round sends the coefficients and each site returns, for
every pooled event time of each stratum, its risk-set sums (sum of w, w x, w x x' over rows
still at risk, w = exp(x'beta)) and the same sums over the rows that fail at that time, plus
sum of x over its events. From those cross-site sums the researcher computes the pooled
partial log-likelihood, gradient and Hessian with Efron's or Breslow's handling of ties,
exactly as a pooled fit would, and takes a Newton step. A last round sums, per pooled event
time, deaths and comparable rows on up to 2,000 bins of the risk score (fewer when there are
many event times, to bound the upload) for Harrell's concordance:
exact up to pairs that share a bin, whose share bounds the error (reported). An exact pooled
concordance would need secure comparisons between sites' rows; no site reveals a row's score.
What leaks: the pooled number of events at each grid time, and the pooled binned counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

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
    check_collinearity,
    register,
    union_of_levels,
)
from medveil.analyses.survival import time_slots
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    releasable_levels,
    require_not_saturated,
    require_time_unit,
)

ALL = "all"
CONCORDANCE_MAX_BINS = 2000
CONCORDANCE_MAX_CELLS = 400_000  # event times x bins per released array: caps each site's upload
CONCORDANCE_SPAN_SD = 6.0


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


@register
class CoxPH(Analysis[CoxParams]):
    name = "coxph"
    Params = CoxParams
    uses_scratch = True

    def variables(self, params: CoxParams) -> list[str]:
        return [params.duration, params.event, *params.covariates] + ([params.strata] if params.strata else [])

    def _prepared(self, params: CoxParams, data: pd.DataFrame, scratch: dict[str, Any]) -> dict[str, Any]:
        if "prepared" not in scratch:
            complete = data[self.variables(params)].dropna()
            x = complete[params.covariates].to_numpy(np.float64)
            slots, events = time_slots(complete, params.duration, params.event, params.time_unit, params.max_time)
            strata = (np.array([ALL] * len(complete), dtype=object) if params.strata is None
                      else categorical_column(complete, params.strata).to_numpy(object))
            scratch["prepared"] = {"x": x, "slots": slots,
                                   "events": events.astype(bool), "strata": strata,
                                   "dropped": len(data) - len(complete)}
        return scratch["prepared"]

    def local(self, params: CoxParams, round_no: int, broadcast: dict[str, Any], data: pd.DataFrame,
              policy: DisclosurePolicy, scratch: dict[str, Any] | None = None) -> Release:
        require_time_unit(params.time_unit, policy)
        site = self._prepared(params, data, {} if scratch is None else scratch)
        size = int(np.floor(params.max_time / params.time_unit)) + 1
        if round_no == 0:
            require_not_saturated(len(site["x"]), len(params.covariates), policy)
            strata = releasable_levels(pd.Series(site["strata"]), params.strata or ALL, policy)
            return Release(public={"strata": strata, "rows": len(site["x"]), "rows_dropped": site["dropped"]})
        strata = broadcast["strata"]
        if round_no == 1:
            events = np.zeros((len(strata), size))
            for k, stratum in enumerate(strata):
                mask = (site["strata"] == stratum) & site["events"]
                events[k] = np.bincount(site["slots"][mask], minlength=size)
            used = np.isin(site["strata"], strata)
            x = site["x"][used]
            return Release(sums={"events": events, "n": np.array([float(used.sum())]), "x_sum": x.sum(axis=0),
                                 "xx_sum": x.T @ x})
        if "concordance_edges" in broadcast:
            return Release(sums=self._concordance_counts(site, broadcast, size))
        beta = np.asarray(broadcast["beta"], dtype=np.float64)
        sums: dict[str, np.ndarray] = {}
        event_x = np.zeros(len(beta))
        for k, stratum in enumerate(strata):
            slots_needed = np.asarray(broadcast["event_slots"][k], dtype=np.int64)
            rows = site["strata"] == stratum
            x, slots, failed = site["x"][rows], site["slots"][rows], site["events"][rows]
            w = np.exp(x @ beta)
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
            return Finished(replace(state["fit"], concordance=concordance, concordance_error_bound=bound))
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
            names = list(params.covariates)
            fit = CoxResults(
                params=pd.Series(state["beta"], index=names),
                variance_matrix=pd.DataFrame(np.linalg.inv(-hessian), index=names, columns=names),
                log_likelihood=loglik, log_likelihood_null=state["loglik_null"], ties=params.ties,
                iterations=state["iteration"], converged=bool(converged), n_events=state["n_events"],
                nobs=state["nobs"], alpha=params.alpha,
            )
            # One more round: counts on risk-score bins for the concordance index.
            beta = state["beta"]
            centre = float(state["mean_x"] @ beta)
            spread = float(np.sqrt(max(beta @ state["cov_x"] @ beta, 1e-300)))
            all_slots = sorted(set().union(*(set(slots.tolist()) for slots in state["event_slots"])))
            bins = int(np.clip(CONCORDANCE_MAX_CELLS // max(len(all_slots), 1) - 2, 20, CONCORDANCE_MAX_BINS))
            edges = centre + spread * np.linspace(-CONCORDANCE_SPAN_SD, CONCORDANCE_SPAN_SD, bins + 1)
            return NextRound(dict(self._broadcast(state), concordance_edges=edges, concordance_slots=all_slots),
                             dict(state, fit=fit))
        state = dict(state, beta=state["beta"] + step, iteration=state["iteration"] + 1, loglik_history=history)
        return NextRound(self._broadcast(state), state)

    @staticmethod
    def _concordance_counts(site: dict[str, Any], broadcast: dict[str, Any], size: int) -> dict[str, np.ndarray]:
        """Per pooled event time and risk bin: this site's deaths, and its rows comparable with
        them (later times, or censored at that time), as lifelines' concordance_index pairs them."""
        used = np.isin(site["strata"], broadcast["strata"])
        x, slots, died = site["x"][used], site["slots"][used], site["events"][used]
        edges = np.asarray(broadcast["concordance_edges"], dtype=np.float64)
        risk_bin = np.searchsorted(edges, x @ np.asarray(broadcast["beta"]))
        bins = len(edges) + 1
        by_slot = np.zeros((size, bins))
        np.add.at(by_slot, (slots, risk_bin), 1.0)
        later = np.flip(np.cumsum(np.flip(by_slot, axis=0), axis=0), axis=0)
        later = np.vstack([later[1:], np.zeros((1, bins))])
        censored_now = np.zeros((size, bins))
        np.add.at(censored_now, (slots[~died], risk_bin[~died]), 1.0)
        deaths = np.zeros((size, bins))
        np.add.at(deaths, (slots[died], risk_bin[died]), 1.0)
        needed = np.asarray(broadcast["concordance_slots"], dtype=np.int64)
        return {"deaths": deaths[needed], "comparable": (later + censored_now)[needed]}

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


def _concordance(sums: dict[str, np.ndarray]) -> tuple[float, float]:
    """Harrell's C from pooled bin counts, and a bound on its error from pairs sharing a bin.

    A death in a higher risk bin than a comparable row is concordant, in a lower bin discordant;
    pairs within one bin count 1/2 each, so the exact C lies within 1/2 x (their share) of it."""
    deaths, comparable = sums["deaths"], sums["comparable"]
    lower = np.cumsum(comparable, axis=1) - comparable
    concordant = float(np.sum(deaths * lower))
    same_bin = float(np.sum(deaths * comparable))
    pairs = float(np.sum(deaths.sum(axis=1) * comparable.sum(axis=1)))
    if pairs == 0:
        return float("nan"), float("nan")
    return (concordant + 0.5 * same_bin) / pairs, 0.5 * same_bin / pairs


def _symmetric(packed: np.ndarray, p: int, upper: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Rebuild (n, p, p) symmetric matrices from their packed upper triangles (n, p(p+1)/2)."""
    full = np.zeros((packed.shape[0], p, p))
    full[:, upper[0], upper[1]] = packed
    full[:, upper[1], upper[0]] = packed
    return full
