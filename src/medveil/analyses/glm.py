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

What each party learns: the researcher learns the cross-site sums of every round (hence the
coefficients and fit statistics) and, per site, its rows used and dropped, the levels it holds
at least min_cell_count times and its design's column names; a site learns the formula, the
agreed levels and each round's coefficients; the hub learns nothing beyond masked vectors.

Against a researcher who chooses the formula: the formula is parsed by the allow-list grammar
of `medveil.analyses.formula`, never evaluated as Python (`formula_not_allowed`); every model
column built from a comparison or a level needs none or at least min_cell_count rows on each
side at the site, and the rows of every combination of comparisons too (`indicator_isolation`);
the saturation guard runs in every fit round; and each round's broadcast must match what this
site released earlier in the task (`check_broadcast`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import MutableMapping
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

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
    finite_array,
    register,
    released_in,
    union_of_levels,
)
from medveil.analyses.formula import (
    FormulaNotAllowed,
    ParsedFormula,
    factor_matrix,
    model_matrices,
    parse_formula,
)
from medveil.analyses.glm_results import GLMResults
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    DisclosureRefused,
    public_count,
    releasable_levels,
    require_min_count,
    require_no_dominant_row,
    require_not_saturated,
    require_spread_weights,
)

SATURATED = 1e-6  # a fitted mean this close to its bound carries (almost) no weight
MAX_BROADCAST_LEVELS = 1000  # levels of one variable in a broadcast (the union over sites)
MAX_LEVEL_CHARS = 200
BROADCAST_KEYS = {1: {"levels"}, 2: {"levels", "ybar", "ybar_weighted"}}  # later rounds: levels and beta


class GLMParams(Params):
    formula: str = Field(description="'y ~ x1 + C(x2) + I(x3 > 1)': the allow-list grammar of medveil.analyses.formula")
    family: Literal["gaussian", "binomial", "poisson"] = "gaussian"
    offset: str | None = None
    weights: str | None = Field(None, description="column of prior weights (statsmodels var_weights, R's weights)")
    max_iter: int = Field(100, ge=1, le=1000)
    tol: float = Field(1e-8, gt=0)

    @field_validator("formula")
    @classmethod
    def _formula_in_grammar(cls, formula: str) -> str:
        """Refuse early (the researcher before sending, the node before anything else) a formula
        outside the grammar; FormulaNotAllowed passes through pydantic as it is."""
        if parse_formula(formula).uses_standardize:
            raise FormulaNotAllowed(
                "standardize() is not available in a federated GLM: each site would use its own mean and "
                "sd, not the pooled ones, so the fit would not equal a pooled fit; use I((x - m) / s) with "
                "the pooled mean and sd from describe()")
        return formula


def statsmodels_family(name: str):
    try:
        from statsmodels.genmod import families
    except ImportError as exc:
        raise AnalysisError("regression needs statsmodels: pip install 'medveil[stats]'") from exc
    return {"gaussian": families.Gaussian, "binomial": families.Binomial, "poisson": families.Poisson}[name]()


def _is_number(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _level_variables(parsed: ParsedFormula, data: pd.DataFrame) -> list[str]:
    """Columns treated as levels here: C() ones, and bare columns that are not numbers (text, bool).
    A column used as levels may not also be used as a number."""
    levels = set(parsed.level_variables) | {v for v in parsed.column_variables if not _is_number(data[v])}
    for name in parsed.numeric_variables:
        if name in levels:
            raise AnalysisError(f"column {name!r} holds levels here; it cannot also be used as a number")
        if not pd.api.types.is_numeric_dtype(data[name]):
            raise AnalysisError(f"column {name!r} is not numeric (dtype {data[name].dtype}); it cannot be used "
                                "in arithmetic, a comparison or as the response")
    return sorted(levels)


def _checked_levels(levels: Any) -> dict[str, list[str]]:
    """A levels broadcast's shape: variable -> sorted list of distinct short strings."""
    if not isinstance(levels, dict):
        raise BroadcastRefused("broadcast_malformed", "levels must map variables to lists of levels")
    for name, labels in levels.items():
        if not isinstance(name, str) or not isinstance(labels, list) or len(labels) > MAX_BROADCAST_LEVELS:
            raise BroadcastRefused("broadcast_malformed", f"levels must be lists of at most {MAX_BROADCAST_LEVELS} "
                                                          "levels per variable")
        if not all(isinstance(label, str) and len(label) <= MAX_LEVEL_CHARS for label in labels):
            raise BroadcastRefused("broadcast_malformed", f"levels must be strings of at most {MAX_LEVEL_CHARS} characters")
        if labels != sorted(set(labels)):
            raise BroadcastRefused("broadcast_malformed", "levels must be sorted and distinct")
    return levels


def _finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise BroadcastRefused("broadcast_malformed", f"{name} must be a finite number")
    return float(value)


def _released(memory: dict[str, Any], round_no: int) -> dict[str, Any]:
    """What this site released publicly in an earlier round of the task (the node keeps it)."""
    facts = released_in(memory, round_no)
    if not facts:
        raise BroadcastRefused("broadcast_not_released", f"this site released nothing in round {round_no} of this task")
    return facts


def _require_isolated(values: np.ndarray, term: str, policy: DisclosurePolicy) -> None:
    """Both sides of a 0/1-like column (rows where it is nonzero, rows where it is zero) hold
    none or at least min_cell_count rows. The side is not named: that would say which it is."""
    nonzero = int(np.count_nonzero(values))
    zero = len(values) - nonzero
    if 0 < nonzero < policy.min_cell_count or 0 < zero < policy.min_cell_count:
        raise DisclosureRefused(
            "indicator_isolation", f"the term {term!r} is built from a comparison or a level and would single "
                                   f"out fewer than {policy.min_cell_count} rows at this site")


def _require_combinations_isolated(columns: list[np.ndarray], policy: DisclosurePolicy) -> None:
    """Every combination of the comparison columns holds none or at least min_cell_count rows:
    I(age >= 97) + I(age > 97) pass one by one, yet their difference is the 97-year-olds."""
    if len(columns) < 2:
        return
    _, counts = np.unique(np.column_stack(columns) != 0, axis=0, return_counts=True)
    if np.any(counts < policy.min_cell_count):
        raise DisclosureRefused(
            "indicator_isolation", f"the comparisons of this formula together single out fewer than "
                                   f"{policy.min_cell_count} rows at this site (e.g. nested thresholds)")


def _require_unsaturated(mu: np.ndarray, family: str) -> None:
    """Refuse a round whose coefficients push fitted values to their bounds.

    What it protects: the researcher chooses the coefficients of every round. A steep slope
    K * (age - a) gives mu = 0 below age a and 1 above, and the round's deviance then counts the
    patients on each side of that cut by response: a table with edges of the researcher's
    choosing, and, moving the cut between tasks, the patients of one age. A fit whose fitted
    values reach their bounds (perfect separation) is refused too: its coefficients diverge."""
    if family == "gaussian":
        return
    saturated = mu < SATURATED
    if family == "binomial":
        saturated |= mu > 1 - SATURATED
    if saturated.any():
        raise DisclosureRefused("weight_dominance", "the coefficients of this round push fitted values to their "
                                                    "bounds at this site (a cut through the data, or perfect "
                                                    "separation)")


def _check_indicator_isolation(parsed: ParsedFormula, frame: pd.DataFrame, y: np.ndarray, matrices: Any,
                               non_numeric: set[str], policy: DisclosurePolicy) -> None:
    """Indicator isolation: every model column built from a comparison or a level (C() dummies,
    I(a < b), text and bool columns, and interactions with any of them), each such factor's own
    columns (every level, the reference included), and a response that is a comparison."""
    if parsed.response.kind == "comparison":
        _require_isolated(y, parsed.response.text, policy)
    spec = matrices.rhs.model_spec
    categorical = {expr for expr, (kind, _) in spec.encoder_state.items() if getattr(kind, "value", kind) == "categorical"}
    indicators = {f.text for f in parsed.indicator_factors(non_numeric)} | categorical
    comparison_columns = []
    for factor in parsed.factors:
        if factor.text in indicators or any(v in non_numeric for v in factor.variables):
            own = np.asarray(factor_matrix(factor, frame), dtype=np.float64)
            for column in own.T:
                _require_isolated(column, factor.text, policy)
            if factor.kind == "comparison":
                comparison_columns.append(own[:, 0])
    x = np.asarray(matrices.rhs, dtype=np.float64)
    for term, indices in spec.term_indices.items():
        if any(f.expr in indicators or any(v in non_numeric for v in _factor_variables(parsed, f.expr))
               for f in term.factors):
            for index in indices:
                _require_isolated(x[:, index], str(term), policy)
    _require_combinations_isolated(comparison_columns, policy)


def _factor_variables(parsed: ParsedFormula, text: str) -> tuple[str, ...]:
    return next((f.variables for f in parsed.factors if f.text == text), ())


@register
class GLM(Analysis[GLMParams]):
    name = "glm"
    Params = GLMParams

    def variables(self, params: GLMParams) -> list[str]:
        parsed = parse_formula(params.formula)
        extra = {name for name in (params.offset, params.weights) if name}
        return sorted(set(parsed.response_variables) | set(parsed.rhs_variables) | extra)

    def row_sets(self, params: GLMParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """Round 1 releases the row count and sums over the rows used (complete, with agreed
        levels); later rounds rest on the same rows, and round 0 releases only level names."""
        if round_no != 1:
            return []
        levels = _checked_levels((broadcast or {}).get("levels", {}))
        return [self._frame(params, data, levels).notna().all(axis=1).to_numpy()]

    def check_broadcast(self, params: GLMParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Round 0: nothing. Later: the levels of exactly the variables this site named in round 0,
        every level it named among them, the same in every round of the task; `ybar` and
        `ybar_weighted` (round 2) finite numbers; `beta` (rounds 3..) one finite number per design
        column this site released in round 1."""
        if round_no == 0:
            super().check_broadcast(params, round_no, broadcast, memory)
            return
        expected = BROADCAST_KEYS.get(round_no, {"levels", "beta"})
        if not isinstance(broadcast, dict) or set(broadcast) != expected:
            keys = sorted(map(str, broadcast))[:10] if isinstance(broadcast, dict) else type(broadcast).__name__
            raise BroadcastRefused("broadcast_malformed", f"round {round_no} of glm expects {sorted(expected)}, got {keys}")
        levels = _checked_levels(broadcast["levels"])
        named = _released(memory, 0).get("levels", {})
        if set(levels) != set(named):
            raise BroadcastRefused("broadcast_not_released", "the levels broadcast name other variables than "
                                                             "this site named in round 0")
        if any(not set(named[name]) <= set(levels[name]) for name in named):
            raise BroadcastRefused("broadcast_not_released", "the levels broadcast leave out levels this site named")
        if round_no == 1:
            memory["glm_levels"] = levels
        elif memory.get("glm_levels") != levels:
            raise BroadcastRefused("broadcast_changed", "the levels differ from those of round 1 of this task")
        if round_no == 2:
            _finite_number(broadcast["ybar"], "ybar")
            _finite_number(broadcast["ybar_weighted"], "ybar_weighted")
        if "beta" in broadcast:
            finite_array(broadcast["beta"], (len(_released(memory, 1).get("columns", [])),))

    def _frame(self, params: GLMParams, data: pd.DataFrame, levels: dict[str, list[str]]) -> pd.DataFrame:
        """The model's columns with agreed levels as categoricals (a level not agreed is missing)."""
        parsed = parse_formula(params.formula)
        if set(levels) != set(_level_variables(parsed, data)):
            raise BroadcastRefused("broadcast_not_released", "the levels broadcast name other variables than "
                                                             "this site's categorical ones")
        frame = data[self.variables(params)]
        if levels:
            frame = frame.copy()
        for name, agreed in levels.items():
            labels = categorical_column(frame, name).reindex(frame.index)
            frame[name] = pd.Categorical(labels.where(labels.isin(agreed)), categories=agreed)
        return frame

    def _design(self, params: GLMParams, data: pd.DataFrame, levels: dict[str, list[str]], policy: DisclosurePolicy,
                scratch: MutableMapping[str, Any]) -> list[Any]:
        """[y, X, offset, prior weights, column names, rows dropped], built from the canonical
        formula once per task and kept in `scratch` (written once) only once indicator isolation passed."""
        if "design" in scratch:
            return scratch["design"]
        parsed = parse_formula(params.formula)
        complete = self._frame(params, data, levels).dropna()
        if complete.empty:
            raise AnalysisError("no complete rows for this model at this site")
        try:
            matrices = model_matrices(parsed, complete)
        except Exception as exc:  # formulaic's messages may quote values, so only the kind is passed on
            raise AnalysisError(f"the formula cannot be evaluated on this site's data ({type(exc).__name__}; "
                                "e.g. log of a value <= 0, or a division by zero)") from None
        y = np.asarray(matrices.lhs, dtype=np.float64)
        if y.ndim == 2:
            if y.shape[1] != 1:
                raise AnalysisError(f"the response of {params.formula!r} must be a single numeric column")
            y = y[:, 0]
        x = np.asarray(matrices.rhs, dtype=np.float64)
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise AnalysisError("a model column has values that are not finite (e.g. a division by zero)")
        non_numeric = {name for name in self.variables(params) if not _is_number(complete[name])}
        _check_indicator_isolation(parsed, complete, y, matrices, non_numeric, policy)
        offset = complete[params.offset].to_numpy(np.float64) if params.offset else np.zeros(len(y))
        prior = complete[params.weights].to_numpy(np.float64) if params.weights else np.ones(len(y))
        if np.any(prior <= 0):
            raise AnalysisError(f"weights {params.weights!r} must be positive")
        require_no_dominant_row(x, prior, policy)
        design = [y, x, offset, prior, [str(c) for c in matrices.rhs.columns], len(data) - len(complete)]
        scratch["design"] = design
        return design

    def local(self, params: GLMParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        data, policy, scratch = context.data, context.policy, context.scratch
        if round_no == 0:
            parsed = parse_formula(params.formula)
            levels = {name: releasable_levels(categorical_column(data, name), name, policy)
                      for name in _level_variables(parsed, data)}
            return Release(public={"levels": levels})
        family = statsmodels_family(params.family)
        levels = _checked_levels(broadcast.get("levels"))
        y, x, offset, prior, columns, dropped = self._design(params, data, levels, policy, scratch)
        require_min_count(len(y), policy, "this site's model")
        require_not_saturated(len(y), x.shape[1], policy)
        if round_no == 1:
            if params.family == "binomial" and not np.all((y == 0) | (y == 1)):
                raise AnalysisError("a binomial response must be 0 or 1")
            totals = [len(y), y.sum(), prior.sum(), prior @ y, np.log(prior).sum()]
            return Release(sums={"totals": np.array(totals, dtype=np.float64)},
                           public={"rows": len(y), "rows_dropped": public_count(dropped, policy), "columns": columns})
        if "beta" in broadcast:
            linear = x @ finite_array(broadcast["beta"], (x.shape[1],)) + offset
            mu = family.fitted(linear)
        else:
            mu = family.starting_mu(y) if params.family == "binomial" else (y + float(broadcast["ybar"])) / 2
            linear = family.predict(mu)
        weights = prior * family.weights(mu)
        _require_unsaturated(mu, params.family)
        require_spread_weights(weights, policy)
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
