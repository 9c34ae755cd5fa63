"""vertical_glm: a logistic or linear model over columns split between two sites (vertical data).

A label holder L holds the response and some columns, a feature holder F other columns of the
same patients, in one agreed row order (a private set intersection's alignment, or tables that
already share one). Each term of the formula lies wholly at one site; the intercept and the
response at L. The fit is exact Newton (for the logit link the same as statsmodels' IRLS): every
iteration the researcher gets the gradient and Hessian of the pooled model, solves for the next
coefficients and broadcasts them (in scaled coordinates, each site only its own).

Cross terms between the sites' columns come from dealer-assisted secret sharing over Z_2^64
(`medveil.crypto.shares`): a third site, the dealer D, hands out correlated randomness and never
sees data. F's matrix U = [X_F (two limbs) | X_Fj * X_Fk (j <= k)] reaches L one-time padded (E = U - A, once,
in parts if large); each iteration L's V = [w * X_L | r (two limbs)] (IRLS weights and residuals) reaches F
padded (V - B_t), the two sites compute additive shares of the needed blocks of U'V (X_F'W X_L,
X_F'r and, from the pair columns against w, X_F'W X_F), F seals its share to L and L releases the
sum. Values are fixed point (f = floor((63 - bit_length(n)) / 2) fractional bits; each column
scaled by a public power of two, a multiple of 4 bits, so |values| <= 1), each in two limbs so
the cross blocks are exact to ~2^-2f (ill-conditioned real designs need it for 1e-6 on bse).

Rounds: 0 designs (row counts, column names, scale exponents) and the dealer's seeds; 1..P E in
parts; then per iteration t four rounds: a) F sends eta_F = X_F beta_F to L; b) L computes mu, w,
r, sends V - B_t to F, releases its deviance and its own blocks (X_L'W X_L, X_L'r); the dealer
sends F its offset C_F,t; c) F sends its share to L; d) L releases the sum of the shares. As in
statsmodels, the fit stops when the deviance changes by at most `tol`, and the covariance comes
from the Hessian of the last step; a gaussian fit is one Newton step (OLS) and the deviance at it.

What each party learns: the researcher learns what a pooled GLM reveals (gradients, Hessians,
deviances at the coefficients it chose, hence the fit), each site's row count, design column
names and column scale exponents (max |x| to within a factor of 16); L learns F's per-row partial
linear predictor eta_F = X_F beta_F at every evaluated beta (the remaining leak: over p_F
evaluations it spans X_F's column space, and a researcher colluding with L who picks beta_F can
read F's columns; hiding it needs a secure sigmoid, which exact Newton here avoids), and the
cross blocks of the Hessian and gradient that the researcher learns; F learns nothing of y,
weights or residuals (it sees only uniformly padded V - B_t and its own share); the dealer learns
n, k and m; the hub sees only sealed payloads. Security needs the dealer to collude with neither
site (it holds both pads); a researcher colluding with F or with the dealer learns only the sum.

Guards: formula by the allow-list grammar (`formula_not_allowed`); indicator isolation, leverage
and saturation at each site on its own design (as glm); at L in every iteration the weight
guards of glm against researcher-chosen coefficients (`weight_dominance`); every broadcast
checked for its keys, shapes and constants (`broadcast_malformed`, `broadcast_changed`).
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

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
    check_collinearity,
    finite_array,
    register,
)
from medveil.analyses.formula import SAFE_TRANSFORMS, Factor, FormulaNotAllowed, ParsedFormula, parse_formula
from medveil.analyses.glm import (
    _check_indicator_isolation,
    _is_number,
    _level_variables,
    _require_unsaturated,
    statsmodels_family,
)
from medveil.analyses.vertical_results import VerticalGLMResults
from medveil.crypto import shares
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    require_min_count,
    require_no_dominant_row,
    require_not_saturated,
    require_spread_weights,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
PART_BYTES = 16 * 1024 * 1024  # E travels in parts of at most this many bytes (a step body is capped)
MAX_COLUMNS = 2000  # variables listed per site
MAX_DESIGN_COLUMNS = 200  # design columns per site (F's pair columns grow with the square)
CONSTANTS = ("n", "p_label", "p_feature")


class VerticalGLMParams(Params):
    formula: str = Field(description="'y ~ x1 + C(x2) + z1': each term wholly at one site; y at the label holder")
    family: Literal["binomial", "gaussian"] = "binomial"
    label_site: str = Field(pattern=NAME_PATTERN)
    feature_site: str = Field(pattern=NAME_PATTERN)
    dealer_site: str = Field(pattern=NAME_PATTERN)
    columns: dict[str, list[str]] = Field(description="variables each of the two sites holds (the study's lists)")
    aligned: str | None = Field(None, max_length=128, description="task id of a PSI alignment; None: tables "
                                                                   "already in one row order")
    max_iter: int = Field(50, ge=1, le=100)
    tol: float = Field(1e-10, gt=0)

    @field_validator("formula")
    @classmethod
    def _formula_in_grammar(cls, formula: str) -> str:
        parsed = parse_formula(formula)
        if parsed.uses_standardize:
            raise FormulaNotAllowed("standardize() is not available in a federated model (each site's own mean "
                                    "and sd are not the pooled ones)")
        if not parsed.intercept:
            raise FormulaNotAllowed("a vertical model needs an intercept (at the label holder)")
        return formula

    @model_validator(mode="after")
    def _sites_and_terms(self) -> "VerticalGLMParams":
        sites = (self.label_site, self.feature_site, self.dealer_site)
        if len(set(sites)) != 3:
            raise ValueError("label_site, feature_site and dealer_site must be three different sites")
        if set(self.columns) != {self.label_site, self.feature_site}:
            raise ValueError("columns must list the variables of exactly the label and the feature site")
        if any(len(names) > MAX_COLUMNS or not all(isinstance(n, str) and len(n) <= 200 for n in names)
               for names in self.columns.values()):
            raise ValueError(f"columns must be at most {MAX_COLUMNS} names per site")
        split_terms(self)
        return self


def split_terms(params: VerticalGLMParams) -> tuple[ParsedFormula, ParsedFormula]:
    """The formula as two: L's (the response, the intercept and L's terms) and F's (its terms),
    each term given to the one site that holds all its variables, or a ValueError."""
    parsed = parse_formula(params.formula)
    label, feature = set(params.columns[params.label_site]), set(params.columns[params.feature_site])
    if not set(parsed.response_variables) <= label:
        raise ValueError("the response must be a variable of the label site")
    at_label, at_feature = [], []
    for term in parsed.terms:
        names = {v for factor in term for v in factor.variables}
        text = ":".join(f.text for f in term)
        if names <= label and names <= feature:
            raise ValueError(f"the term {text!r} uses variables both sites hold; rename one")
        if names <= label:
            at_label.append(term)
        elif names <= feature:
            at_feature.append(term)
        else:
            raise ValueError(f"the term {text!r} mixes variables of the two sites (or names unknown ones); "
                             "each term must lie wholly at one site")
    if not at_feature:
        raise ValueError("no term lies at the feature site: fit this model with glm at the label site")
    no_response = Factor("1", "numeric", ())
    return (ParsedFormula(parsed.response, tuple(at_label), True),
            ParsedFormula(no_response, tuple(at_feature), True))


def _pair_count(p: int) -> int:
    return p * (p + 1) // 2


def layout(n: int, p_label: int, p_feature: int) -> dict[str, Any]:
    """The protocol's public sizes: fraction bits, U's and V's widths, E's parts, the blocks of U'V."""
    p, q, c = p_feature, _pair_count(p_feature), p_label + 1
    k, m = 2 * p + 2 * q, 2 * c
    parts = max(1, math.ceil(n * k * 8 / PART_BYTES))
    # U = [X_F hi | X_F lo | pairs hi | pairs lo], V = [w X_L | r] hi then lo; V's column 0 is w (the
    # intercept's). Blocks: X_F'[W X_L | r] and pairs'w, each as three limb products.
    blocks = (shares.two_limb_blocks((0, p), (p, 2 * p), (0, c), (c, 2 * c))
              + shares.two_limb_blocks((2 * p, 2 * p + q), (2 * p + q, k), (0, 1), (c, c + 1)))
    return {"bits": shares.fraction_bits(n), "k": k, "m": m, "parts": parts, "blocks": blocks,
            "first_iteration_round": parts + 1}


def schedule(round_no: int, parts: int) -> tuple[int, str]:
    """(iteration, phase a/b/c/d) of a round after the set-up rounds 0..parts."""
    offset = round_no - (parts + 1)
    return offset // 4, "abcd"[offset % 4]


@register
class VerticalGLM(Analysis[VerticalGLMParams]):
    name = "vertical_glm"
    Params = VerticalGLMParams
    releases_sums = False

    def variables(self, params: VerticalGLMParams) -> list[str]:
        return sorted(set().union(*(self.variables_at(params, s, None) for s in (params.label_site, params.feature_site))))

    def variables_at(self, params: VerticalGLMParams, site: str, role: str | None) -> list[str]:
        label, feature = split_terms(params)
        if site == params.label_site:
            return sorted(set(label.response_variables) | set(label.rhs_variables))
        if site == params.feature_site:
            return feature.rhs_variables
        return []

    def reads_data_at(self, params: VerticalGLMParams, site: str, role: str | None) -> bool:
        return site in (params.label_site, params.feature_site)

    def parties(self, params: VerticalGLMParams) -> dict[str, str | None]:
        return {params.label_site: "label_holder", params.feature_site: "feature_holder",
                params.dealer_site: "dealer"}

    def alignment(self, params: VerticalGLMParams) -> str | None:
        return params.aligned

    def row_sets(self, params: VerticalGLMParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None) -> list[np.ndarray]:
        """Every row of the (aligned) table, in round 0: a model uses them all (none may be missing)."""
        return [np.ones(len(data), dtype=bool)] if round_no == 0 else []

    def check_broadcast(self, params: VerticalGLMParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Round 0: nothing. Later: the sizes (n, p_label, p_feature) as positive integers, the same in
        every round; beta (a site's own, in its phase) finite; the gaussian residual exponent bounded."""
        if round_no == 0:
            super().check_broadcast(params, round_no, broadcast, memory)
            return
        allowed = set(CONSTANTS) | {"beta", "residual_exponent", "final"}
        if not isinstance(broadcast, dict) or not set(CONSTANTS) <= set(broadcast) <= allowed:
            raise BroadcastRefused("broadcast_malformed", f"vertical_glm expects {list(CONSTANTS)} (and a site's "
                                                          "own beta), got other keys")
        constants = {name: broadcast[name] for name in CONSTANTS}
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10**9 for v in constants.values()) \
                or constants["p_label"] > MAX_DESIGN_COLUMNS or constants["p_feature"] > MAX_DESIGN_COLUMNS:
            raise BroadcastRefused("broadcast_malformed", "n, p_label and p_feature must be positive integers "
                                                          "within bounds")
        if round_no == 1:
            memory["vertical_constants"] = constants
        elif memory.get("vertical_constants") != constants:
            raise BroadcastRefused("broadcast_changed", "the sizes differ from those of round 1 of this task")
        if "residual_exponent" in broadcast and (not isinstance(broadcast["residual_exponent"], int)
                                                 or abs(broadcast["residual_exponent"]) > 1100):
            raise BroadcastRefused("broadcast_malformed", "residual_exponent must be a bounded integer")
        if "final" in broadcast and not isinstance(broadcast["final"], bool):
            raise BroadcastRefused("broadcast_malformed", "final must be true or false")

    # --- the sites' steps ----------------------------------------------------------------------

    def local(self, params: VerticalGLMParams, round_no: int, broadcast: dict[str, Any],
              context: SiteContext) -> Release:
        site = context.site
        if site == params.dealer_site:
            return self._dealer(params, round_no, broadcast, context)
        if site == params.label_site:
            return self._label(params, round_no, broadcast, context)
        if site == params.feature_site:
            return self._feature(params, round_no, broadcast, context)
        return Release()

    def _design(self, params: VerticalGLMParams, context: SiteContext, label: bool) -> dict[str, Any]:
        """This site's scaled design (and, at L, the response), built once and kept in scratch."""
        scratch = context.scratch
        if "design" in scratch:
            return scratch["design"]
        parsed = split_terms(params)[0 if label else 1]
        names = self.variables_at(params, context.site, context.role)
        frame = context.data[names]
        if frame.isna().any().any():
            raise AnalysisError("the model's columns have missing values at this site; rows cannot be dropped at "
                                "one site of a vertical model (impute or filter before aligning)")
        policy = context.policy
        require_min_count(len(frame), policy, "this site's model")
        _level_variables(parsed, frame)
        rhs = "1 + " + " + ".join(":".join(f.text for f in term) for term in parsed.terms) if parsed.terms else "1"
        text = f"{parsed.response.text} ~ {rhs}" if label else rhs
        try:
            from formulaic import model_matrix

            built = model_matrix(text, frame, na_action="raise", context=dict(SAFE_TRANSFORMS))
        except Exception as exc:  # formulaic's messages may quote values, so only the kind is passed on
            raise AnalysisError(f"the formula cannot be evaluated on this site's data ({type(exc).__name__})") from None
        matrices = built if label else SimpleNamespace(rhs=built)
        x = np.asarray(matrices.rhs, dtype=np.float64)
        columns = [str(c) for c in matrices.rhs.columns]
        y = np.asarray(matrices.lhs, dtype=np.float64).reshape(len(frame), -1)[:, 0] if label else np.zeros(len(frame))
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise AnalysisError("a model column has values that are not finite (e.g. a division by zero)")
        non_numeric = {name for name in names if not _is_number(frame[name])}
        _check_indicator_isolation(parsed, frame, y, matrices, non_numeric, policy)
        require_no_dominant_row(x, np.ones(len(x)), policy)
        if not label:
            x, columns = x[:, 1:], columns[1:]  # F's columns are coded as in the pooled model, without its intercept
        if x.shape[1] > MAX_DESIGN_COLUMNS:
            raise AnalysisError(f"more than {MAX_DESIGN_COLUMNS} design columns at one site")
        require_not_saturated(len(x), x.shape[1], policy)
        if label and params.family == "binomial" and not np.all((y == 0) | (y == 1)):
            raise AnalysisError("a binomial response must be 0 or 1")
        exponents = [shares.scale_exponent(column) for column in x.T]
        design = {"x": np.ldexp(x, -np.asarray(exponents, dtype=np.int64)) if x.size else x, "y": y,
                  "columns": columns, "exponents": exponents, "y_exponent": shares.scale_exponent(y)}
        scratch["design"] = design
        return design

    @staticmethod
    def _sizes(broadcast: dict[str, Any]) -> dict[str, Any]:
        return layout(broadcast["n"], broadcast["p_label"], broadcast["p_feature"])

    @staticmethod
    def _check_own(design: dict[str, Any], broadcast: dict[str, Any], width: str) -> None:
        if broadcast["n"] != len(design["x"]) or broadcast[width] != design["x"].shape[1]:
            raise BroadcastRefused("broadcast_not_released", "the sizes broadcast are not those this site released")

    @staticmethod
    def _message(context: SiteContext, sender: str, key: str) -> Any:
        payload = context.messages.get(sender)
        if not isinstance(payload, dict) or key not in payload:
            raise BroadcastRefused("payload_missing", f"this round needs {key!r} from {sender}")
        return payload[key]

    @staticmethod
    def _ring(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
        if not isinstance(value, np.ndarray) or value.dtype != np.uint64 or value.shape != shape:
            raise BroadcastRefused("payload_malformed", f"{what} must be a uint64 array of shape {shape}")
        return value

    @staticmethod
    def _seed(value: Any) -> bytes:
        if not isinstance(value, bytes) or len(value) != shares.SEED_BYTES:
            raise BroadcastRefused("payload_malformed", "a seed must be 32 bytes")
        return value

    def _dealer(self, params: VerticalGLMParams, round_no: int, broadcast: dict[str, Any],
                context: SiteContext) -> Release:
        scratch = context.scratch
        if round_no == 0:
            scratch["seed_a"], scratch["seed_l"] = shares.new_seed(), shares.new_seed()
            return Release(payloads={params.feature_site: {"seed": scratch["seed_a"]},
                                     params.label_site: {"seed": scratch["seed_l"]}})
        if "seed_a" not in scratch or "seed_l" not in scratch:
            raise AnalysisError("the dealer's seeds of this task are lost")
        sizes = self._sizes(broadcast)
        if round_no < sizes["first_iteration_round"]:
            return Release()
        iteration, phase = schedule(round_no, sizes["parts"])
        if phase != "b" or broadcast.get("final"):
            return Release()
        n = broadcast["n"]
        a = shares.random_matrix(scratch["seed_a"], n, sizes["k"])
        b, c_l = _iteration_pads(scratch["seed_l"], iteration, n, sizes)
        c_f = shares.dealer_offset(a, b, c_l, sizes["blocks"])
        return Release(payloads={params.feature_site: {"offset": c_f}})

    def _feature(self, params: VerticalGLMParams, round_no: int, broadcast: dict[str, Any],
                 context: SiteContext) -> Release:
        design, scratch = self._design(params, context, label=False), context.scratch
        x = design["x"]
        if round_no == 0:
            return Release(public={"rows": len(x), "columns": design["columns"], "exponents": design["exponents"]})
        self._check_own(design, broadcast, "p_feature")
        sizes, n = self._sizes(broadcast), len(x)
        if round_no == 1:
            scratch["seed_a"] = self._seed(self._message(context, params.dealer_site, "seed"))
        if "seed_a" not in scratch:
            raise AnalysisError("the pad seed of this task is lost")
        if round_no <= sizes["parts"]:  # set-up: E = U - A, part by part
            part = np.array_split(np.arange(sizes["k"]), sizes["parts"])[round_no - 1]
            u = _encoded_u(x, sizes["bits"])[:, part]
            e = u - shares.random_columns(scratch["seed_a"], n, part)
            return Release(payloads={params.label_site: {"part": round_no - 1, "e": np.ascontiguousarray(e)}})
        iteration, phase = schedule(round_no, sizes["parts"])
        if phase == "a":
            beta = finite_array(broadcast.get("beta"), (x.shape[1],))
            return Release(payloads={params.label_site: {"eta": x @ beta}})
        if phase == "c":
            d = self._ring(self._message(context, params.label_site, "masked"), (n, sizes["m"]), "V - B")
            size = shares.blocks_size(sizes["blocks"])
            c_f = self._ring(self._message(context, params.dealer_site, "offset"), (size,), "the dealer's offset")
            a = shares.random_matrix(scratch["seed_a"], n, sizes["k"])
            share = shares.share_of_pad_holder(a, d, c_f, sizes["blocks"])
            return Release(payloads={params.label_site: {"share": share}})
        return Release()

    def _label(self, params: VerticalGLMParams, round_no: int, broadcast: dict[str, Any],
               context: SiteContext) -> Release:
        design, scratch = self._design(params, context, label=True), context.scratch
        x = design["x"]
        if round_no == 0:
            return Release(public={"rows": len(x), "columns": design["columns"], "exponents": design["exponents"],
                                   "y_exponent": design["y_exponent"]})
        self._check_own(design, broadcast, "p_label")
        sizes, n = self._sizes(broadcast), len(x)
        if round_no == 1:
            scratch["seed_l"] = self._seed(self._message(context, params.dealer_site, "seed"))
        if 2 <= round_no <= sizes["parts"] + 1:
            part = self._message(context, params.feature_site, "part")
            if part != round_no - 2:
                raise BroadcastRefused("payload_malformed", "a part of E came out of order")
            columns = np.array_split(np.arange(sizes["k"]), sizes["parts"])[part]
            scratch[f"e{part}"] = np.asfortranarray(
                self._ring(self._message(context, params.feature_site, "e"), (n, len(columns)), "E"))
        if round_no < sizes["first_iteration_round"]:
            return Release()
        iteration, phase = schedule(round_no, sizes["parts"])
        if phase == "b":
            return self._evaluate(params, iteration, broadcast, context, design, sizes)
        if phase == "d":
            size = shares.blocks_size(sizes["blocks"])
            share_f = self._ring(self._message(context, params.feature_site, "share"), (size,), "F's share")
            if "share" not in scratch:
                raise AnalysisError("this site's share of the round is lost")
            return Release(public={"cross": shares.reconstruct(scratch["share"], share_f)})
        return Release()

    def _evaluate(self, params: VerticalGLMParams, iteration: int, broadcast: dict[str, Any],
                  context: SiteContext, design: dict[str, Any], sizes: dict[str, Any]) -> Release:
        """Phase b at L: the fit at the current beta (deviance, own blocks), V - B_t to F, own share."""
        x, y, scratch, policy = design["x"], design["y"], context.scratch, context.policy
        beta = finite_array(broadcast.get("beta"), (x.shape[1],))
        eta_f = np.asarray(self._message(context, params.feature_site, "eta"))
        if eta_f.shape != (len(x),) or eta_f.dtype.kind != "f" or not np.all(np.isfinite(eta_f)):
            raise BroadcastRefused("payload_malformed", "eta must be n finite numbers")
        family = statsmodels_family(params.family)
        eta = x @ beta + eta_f
        mu = family.fitted(eta)
        _require_unsaturated(mu, params.family)
        w = family.weights(mu)
        require_spread_weights(w, policy)
        r = y - mu  # canonical links: the gradient is X'(y - mu)
        xw = x * w[:, None]
        public = {
            "xtwx": xw.T @ x, "xtr": x.T @ r,
            "deviance": float(family.deviance(y, mu)), "pearson": float(np.sum((y - mu) ** 2 / family.variance(mu))),
            "ssr": float(np.sum((y - mu) ** 2)), "loglike": float(family.loglike(y, mu, scale=1.0)),
        }
        if iteration == 0:
            public["null_deviance"] = float(family.deviance(y, np.full_like(y, y.mean())))
        if broadcast.get("final"):
            return Release(public=public)
        exponent = broadcast.get("residual_exponent", 0)
        bits = sizes["bits"]
        v = np.empty((len(x), sizes["m"]), dtype=np.uint64, order="F")
        c = sizes["m"] // 2
        v[:, :c], v[:, c:] = shares.encode_two_limbs(np.column_stack([xw, np.ldexp(r, -exponent)]), bits)
        if not np.array_equal(x[:, 0], np.ones(len(x))):
            raise AnalysisError("the label site's first design column must be the intercept")
        b, c_l = _iteration_pads(_required(scratch, "seed_l"), iteration, len(x), sizes)
        e = np.concatenate([_required(scratch, f"e{j}") for j in range(sizes["parts"])], axis=1)
        scratch["share"] = shares.share_of_masked_holder(e, v, c_l, sizes["blocks"])
        return Release(public=public, payloads={params.feature_site: {"masked": np.ascontiguousarray(v - b)}})

    # --- the researcher's step ---------------------------------------------------------------

    def global_step(self, params: VerticalGLMParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        label, feature = params.label_site, params.feature_site
        messages = _forward(aggregated)
        if round_no == 0:
            facts_l, facts_f = aggregated.public.get(label, {}), aggregated.public.get(feature, {})
            if facts_l.get("rows") != facts_f.get("rows"):
                raise AnalysisError(f"the two sites' tables have {facts_l.get('rows')} and {facts_f.get('rows')} rows: "
                                    "align them first (fed.psi) or pass tables in one row order")
            n = int(facts_l["rows"])
            names = list(facts_l["columns"]) + list(facts_f["columns"])
            if len(set(names)) != len(names):
                raise AnalysisError("the two sites' design columns share names")
            constants = {"n": n, "p_label": len(facts_l["columns"]), "p_feature": len(facts_f["columns"])}
            sizes = layout(**constants)
            state = {"constants": constants, "columns": names, "owner": [label] * constants["p_label"]
                     + [feature] * constants["p_feature"], "exponents": list(facts_l["exponents"])
                     + list(facts_f["exponents"]), "y_exponent": int(facts_l["y_exponent"]),
                     "parts": sizes["parts"], "beta": np.zeros(len(names)), "deviances": [], "iteration": 0}
            return NextRound(dict(constants), state, messages=messages)
        constants, parts = state["constants"], state["parts"]
        if round_no < parts:
            return NextRound(dict(constants), state, messages=messages)
        if round_no == parts:  # next: iteration 0, phase a
            return self._next_iteration(params, state, messages)
        iteration, phase = schedule(round_no, parts)
        p_label = constants["p_label"]
        if phase == "a":  # next: phase b, L evaluates at its beta
            per_site = {label: {"beta": state["beta"][:p_label], "residual_exponent": state["residual_exponent"]}}
            return NextRound(dict(constants, final=bool(state.get("final", False))), state, per_site=per_site,
                             messages=messages)
        if phase == "b":
            return self._after_evaluation(params, aggregated.public.get(label, {}), state, messages)
        if phase == "c":
            return NextRound(dict(constants), state, messages=messages)
        return self._newton(params, aggregated.public.get(label, {}), state, messages)

    def _next_iteration(self, params: VerticalGLMParams, state: dict[str, Any],
                        messages: dict[str, list[dict]]) -> NextRound:
        p_label = state["constants"]["p_label"]
        # residuals are y - mu: within [-1, 1] for 0/1 responses; a gaussian one is encoded only at
        # beta = 0 (its one Newton step), where it is y, scaled by y's exponent
        state = dict(state, residual_exponent=state["y_exponent"] if params.family == "gaussian" else 0)
        return NextRound(dict(state["constants"]), state, per_site={params.feature_site: {"beta": state["beta"][p_label:]}},
                         messages=messages)

    def _after_evaluation(self, params: VerticalGLMParams, facts: dict[str, Any], state: dict[str, Any],
                          messages: dict[str, list[dict]]) -> NextRound | Finished:
        """Phase b: L's deviance at beta_t. Stop as statsmodels does (deviance change <= tol; a
        gaussian fit after its one step), else wait for the cross blocks."""
        deviances = state["deviances"] + [float(facts["deviance"])]
        state = dict(state, deviances=deviances, local=facts, null_deviance=state.get("null_deviance",
                                                                                     facts.get("null_deviance")))
        iteration = state["iteration"]
        converged = iteration > 0 and (params.family == "gaussian" or abs(deviances[-1] - deviances[-2]) <= params.tol)
        if converged or state.get("final") or iteration >= params.max_iter:
            return Finished(self._result(params, state, facts, converged=converged))
        return NextRound(dict(state["constants"]), state, messages=messages)

    def _newton(self, params: VerticalGLMParams, facts: dict[str, Any], state: dict[str, Any],
                messages: dict[str, list[dict]]) -> NextRound:
        """Phase d: the full gradient and Hessian at beta_t, one Newton step to beta_t+1."""
        constants, local = state["constants"], state["local"]
        p_label, p_feature = constants["p_label"], constants["p_feature"]
        sizes = layout(**constants)
        cross = facts.get("cross")
        if not isinstance(cross, np.ndarray) or cross.dtype != np.uint64:
            raise AnalysisError("the label site released no cross products")
        blocks = shares.split_blocks(cross, sizes["blocks"])
        fl = shares.combine_two_limbs(*blocks[:3], sizes["bits"])  # X_F'[W X_L | r]
        pairs = shares.combine_two_limbs(*blocks[3:], sizes["bits"])[:, 0]  # X_Fj X_Fk w, j <= k
        h_fl, xtr_f = fl[:, :p_label], fl[:, p_label]
        h_ff = np.empty((p_feature, p_feature))
        for value, (j, k) in zip(pairs, [(j, k) for j in range(p_feature) for k in range(j, p_feature)]):
            h_ff[j, k] = h_ff[k, j] = value
        hessian = np.block([[np.asarray(local["xtwx"]), h_fl.T], [h_fl, h_ff]])
        gradient = np.concatenate([np.asarray(local["xtr"]), np.ldexp(xtr_f, state["residual_exponent"])])
        if state["iteration"] == 0:
            check_collinearity(hessian, state["columns"])
        beta = state["beta"] + np.linalg.solve(hessian, gradient)
        final = params.family == "gaussian"  # one Newton step is the least-squares fit; then only its deviance
        state = dict(state, beta=beta, hessian=hessian, iteration=state["iteration"] + 1, final=final)
        return self._next_iteration(params, state, messages)

    def _result(self, params: VerticalGLMParams, state: dict[str, Any], facts: dict[str, Any],
                converged: bool) -> VerticalGLMResults:
        scale = np.ldexp(1.0, -np.asarray(state["exponents"], dtype=np.int64))  # x = x_scaled * 2^e
        if "hessian" not in state:
            raise AnalysisError("the fit stopped before its first Newton step")
        hessian = np.asarray(state["hessian"])
        nobs = float(state["constants"]["n"])
        fit = VerticalGLMResults.from_sums(
            params=params, beta=state["beta"] * scale, xtwx=hessian * np.outer(1 / scale, 1 / scale),
            columns=state["columns"], nobs=nobs, sum_log_weights=0.0, deviance=float(facts["deviance"]),
            null_deviance=float(state["null_deviance"]), pearson=float(facts["pearson"]), ssr=float(facts["ssr"]),
            loglike=float(facts["loglike"]), iterations=state["iteration"], converged=converged,
            family=statsmodels_family(params.family))
        owner = pd.Series(state["owner"], index=state["columns"], name="site")
        return fit.with_owner(owner)


def _encoded_u(x: np.ndarray, bits: int) -> np.ndarray:
    """F's U = [X_F | X_Fj * X_Fk, j <= k], each in two limbs (hi columns, then lo), in the ring
    (Fortran order, for fast column products)."""
    products, _ = shares.pair_columns(x)
    p = x.shape[1]
    q = products.shape[1]
    u = np.empty((len(x), 2 * p + 2 * q), dtype=np.uint64, order="F")
    u[:, :p], u[:, p:2 * p] = shares.encode_two_limbs(x, bits)
    u[:, 2 * p:2 * p + q], u[:, 2 * p + q:] = shares.encode_two_limbs(products, bits)
    return u


def _iteration_pads(seed_l: bytes, iteration: int, n: int, sizes: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """B_t (n x m) and C_L,t of iteration t, fresh every iteration, from the dealer's seed for L."""
    b = shares.random_matrix(shares.derive_seed(seed_l, f"B {iteration}"), n, sizes["m"])
    c_l = shares.random_vector(shares.derive_seed(seed_l, f"C {iteration}"), shares.blocks_size(sizes["blocks"]))
    return b, c_l


def _required(scratch: MutableMapping[str, Any], key: str) -> Any:
    if key not in scratch:
        raise AnalysisError(f"this task's {key} is lost from scratch (over the site's scratch bound)")
    return scratch[key]


def _forward(aggregated: Aggregated) -> dict[str, list[dict]]:
    """Every sealed payload of the round, to its recipient (the researcher cannot open them)."""
    messages: dict[str, list[dict]] = {}
    for sender in sorted(aggregated.payloads):
        for recipient, sealed in aggregated.payloads[sender].items():
            messages.setdefault(recipient, []).append(sealed)
    return messages
