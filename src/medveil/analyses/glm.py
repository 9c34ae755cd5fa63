"""glm: generalized linear models (gaussian, binomial, poisson) by distributed IRLS.

The fit is statsmodels' own IRLS algorithm, run on sums: every round each site returns X'WX,
X'Wz, the deviance and the Pearson chi-square at the current coefficients, all summed across
sites (securely by default); the researcher solves for the next coefficients. Families, links,
deviances and log-likelihoods are statsmodels' objects, so every number matches a pooled
`statsmodels.GLM(...).fit()`: same start (statsmodels' starting mu, which needs the pooled
mean of y), same convergence test (change in deviance <= tol), same covariance (from the last
weighted least-squares step) and scale.

Rounds: 0 agrees categorical levels (each site names only levels it holds at least
min_cell_count times); 1 counts rows and sums y; 2.. IRLS. Rows with missing values are
dropped at each site and counted in the provenance.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

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
from medveil.analyses.glm_results import GLMResults
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    releasable_levels,
    require_not_saturated,
)

CATEGORICAL_CALL = re.compile(r"\bC\(\s*([A-Za-z_][A-Za-z0-9_]*)")


class GLMParams(Params):
    formula: str = Field(min_length=3, max_length=2000)
    family: Literal["gaussian", "binomial", "poisson"] = "gaussian"
    offset: str | None = None
    weights: str | None = Field(None, description="column of prior weights (statsmodels var_weights, R's weights)")
    max_iter: int = Field(100, ge=1, le=1000)
    tol: float = Field(1e-8, gt=0)


def statsmodels_family(name: str):
    try:
        from statsmodels.genmod import families
    except ImportError as exc:
        raise AnalysisError("regression needs statsmodels: pip install 'medveil[stats]'") from exc
    return {"gaussian": families.Gaussian, "binomial": families.Binomial, "poisson": families.Poisson}[name]()


@lru_cache(maxsize=256)
def _formula_variables(formula: str) -> tuple[list[str], list[str]]:
    from formulaic import Formula

    parsed = Formula(formula)
    if not hasattr(parsed, "lhs"):
        raise AnalysisError(f"formula {formula!r} needs a response: 'y ~ x1 + x2'")
    return sorted(parsed.lhs.required_variables), sorted(parsed.rhs.required_variables)


def _categorical_variables(params: GLMParams, data: pd.DataFrame) -> list[str]:
    _, rhs = _formula_variables(params.formula)
    wrapped = set(CATEGORICAL_CALL.findall(params.formula))
    return [v for v in rhs if v in wrapped or not pd.api.types.is_numeric_dtype(data[v])
            or pd.api.types.is_bool_dtype(data[v])]


@register
class GLM(Analysis[GLMParams]):
    name = "glm"
    Params = GLMParams
    uses_scratch = True

    def variables(self, params: GLMParams) -> list[str]:
        lhs, rhs = _formula_variables(params.formula)
        extra = {name for name in (params.offset, params.weights) if name}
        return sorted(set(lhs) | set(rhs) | extra)

    def row_sets(self, params: GLMParams, data: pd.DataFrame) -> list[np.ndarray]:
        return [data[self.variables(params)].notna().all(axis=1).to_numpy()]

    def _design(self, params: GLMParams, data: pd.DataFrame, levels: dict[str, list[str]],
                scratch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str], int]:
        """(y, X, offset, prior weights, column names, rows dropped), built once per task, kept in `scratch`."""
        if "design" in scratch:
            return scratch["design"]
        from formulaic import model_matrix

        frame = data[self.variables(params)]
        if levels:
            frame = frame.copy()
        for name, agreed in levels.items():
            labels = categorical_column(frame, name).reindex(frame.index)
            frame[name] = pd.Categorical(labels.where(labels.isin(agreed)), categories=agreed)
        complete = frame.dropna()
        if complete.empty:
            raise AnalysisError("no complete rows for this model at this site")
        matrices = model_matrix(params.formula, complete, na_action="raise")
        y = np.asarray(matrices.lhs, dtype=np.float64)
        if y.ndim == 2:
            if y.shape[1] != 1:
                raise AnalysisError(f"the response of {params.formula!r} must be a single numeric column")
            y = y[:, 0]
        x = np.asarray(matrices.rhs, dtype=np.float64)
        offset = complete[params.offset].to_numpy(np.float64) if params.offset else np.zeros(len(y))
        prior = complete[params.weights].to_numpy(np.float64) if params.weights else np.ones(len(y))
        if np.any(prior <= 0):
            raise AnalysisError(f"weights {params.weights!r} must be positive")
        scratch["design"] = (y, x, offset, prior, list(matrices.rhs.columns), len(data) - len(complete))
        return scratch["design"]

    def local(self, params: GLMParams, round_no: int, broadcast: dict[str, Any], data: pd.DataFrame,
              policy: DisclosurePolicy, scratch: dict[str, Any] | None = None) -> Release:
        scratch = {} if scratch is None else scratch
        if round_no == 0:
            levels = {name: releasable_levels(categorical_column(data, name), name, policy)
                      for name in _categorical_variables(params, data)}
            return Release(public={"levels": levels})
        family = statsmodels_family(params.family)
        y, x, offset, prior, columns, dropped = self._design(params, data, broadcast["levels"], scratch)
        if round_no == 1:
            require_not_saturated(len(y), x.shape[1], policy)
            if params.family == "binomial" and not np.all((y == 0) | (y == 1)):
                raise AnalysisError("a binomial response must be 0 or 1")
            totals = [len(y), y.sum(), prior.sum(), prior @ y, np.log(prior).sum()]
            return Release(sums={"totals": np.array(totals, dtype=np.float64)},
                           public={"rows": len(y), "rows_dropped": dropped, "columns": columns})
        if "beta" in broadcast:
            linear = x @ np.asarray(broadcast["beta"], dtype=np.float64) + offset
            mu = family.fitted(linear)
        else:
            mu = family.starting_mu(y) if params.family == "binomial" else (y + float(broadcast["ybar"])) / 2
            linear = family.predict(mu)
        weights = prior * family.weights(mu)
        z = linear + family.link.deriv(mu) * (y - mu) - offset
        xw = x * weights[:, None]
        sums = {
            "xtwx": xw.T @ x, "xtwz": xw.T @ z,
            "deviance": np.array([family.deviance(y, mu, var_weights=prior)]),
            "pearson": np.array([np.sum(prior * (y - mu) ** 2 / family.variance(mu))]),
            "ssr": np.array([np.sum(prior * (y - mu) ** 2)]),
            "loglike": np.array([family.loglike(y, mu, var_weights=prior, scale=1.0)]),
            "not_fitted": np.array([float(np.sum(np.abs(mu - y) > 1e-8))]),
        }
        if "ybar_weighted" in broadcast and not params.offset:
            null_mu = np.full_like(y, float(broadcast["ybar_weighted"]))
            sums["null_deviance"] = np.array([family.deviance(y, null_mu, var_weights=prior)])
        return Release(sums=sums)

    def global_step(self, params: GLMParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        sums = aggregated.sums
        if round_no == 0:
            released = {site: p["levels"] for site, p in aggregated.public.items()}
            levels = {n: union_of_levels(released, n) for n in sorted({n for p in released.values() for n in p})}
            return NextRound({"levels": levels}, {"levels": levels})
        if round_no == 1:
            columns = {tuple(p["columns"]) for p in aggregated.public.values()}
            if len(columns) != 1:
                raise AnalysisError(f"sites built different design matrices: {sorted(columns)}")
            names = list(next(iter(columns)))
            n, sum_y, sum_w, sum_wy, sum_log_w = (float(v) for v in sums["totals"])
            # statsmodels starts from the plain mean of y; its null model is the weighted mean.
            ybar, ybar_weighted = sum_y / n, sum_wy / sum_w
            state = dict(state, columns=names, nobs=n, sum_log_weights=sum_log_w, deviances=[np.inf], iteration=0,
                         rows_dropped={site: p["rows_dropped"] for site, p in aggregated.public.items()})
            return NextRound({"levels": state["levels"], "ybar": ybar, "ybar_weighted": ybar_weighted}, state)
        deviance = float(sums["deviance"][0])
        if "null_deviance" in sums:
            state["null_deviance"] = float(sums["null_deviance"][0])
        history = state["deviances"] + [deviance]
        iteration = state["iteration"]
        converged = iteration > 0 and abs(history[-1] - history[-2]) <= params.tol
        perfect = iteration > 0 and sums["not_fitted"][0] == 0
        if converged or perfect or iteration >= params.max_iter:
            if perfect:
                warnings.warn("Perfect fit detected: the model predicts every response exactly; "
                              "parameters may not be identified", RuntimeWarning, stacklevel=2)
            return Finished(GLMResults.from_sums(
                params=params, beta=state["beta"], xtwx=state["xtwx"], columns=state["columns"],
                nobs=state["nobs"], sum_log_weights=state["sum_log_weights"], deviance=deviance, null_deviance=state.get("null_deviance", np.nan),
                pearson=float(sums["pearson"][0]), ssr=float(sums["ssr"][0]), loglike=float(sums["loglike"][0]),
                iterations=iteration, converged=converged or perfect, family=statsmodels_family(params.family),
            ))
        xtwx = sums["xtwx"]
        if iteration == 0:
            check_collinearity(xtwx, state["columns"])  # W > 0: X'WX has the null space of X'X
        beta = np.linalg.pinv(xtwx) @ sums["xtwz"]
        state = dict(state, deviances=history, iteration=iteration + 1, beta=beta, xtwx=xtwx)
        return NextRound({"levels": state["levels"], "beta": beta}, state)
