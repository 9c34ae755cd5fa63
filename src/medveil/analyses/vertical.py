"""vertical_glm: a logistic or linear model over columns split between two sites (vertical data).

A label holder L holds the response and some columns, a feature holder F other columns of the
same patients, in one agreed row order (a private set intersection's alignment, or tables that
already share one). Each term of the formula lies wholly at one site; the intercept and the
response at L. The fit is exact Newton (for the logit link the same as statsmodels' IRLS), and
no site ever sees a per-row value derived from the other's columns.

A third site, the dealer D, holds no data. It hands out correlated randomness for
dealer-assisted secret sharing over Z_2^64 (`medveil.crypto.shares`) and evaluates the link:
each iteration t, L sends D its partial linear predictor eta_L and F its eta_F, both in a row
order pi_t and under ring masks m_t (+m_t at L, -m_t at F) that only L and F know (from a seed L
seals to F); D adds them, so it holds the linear predictor in an order it does not know, computes
the fitted means mu, the IRLS weights w and (for the Pearson statistic) e^-eta - e^eta exactly
in float64, and splits them into additive ring shares: L's from a seed, F's as the values minus
them. L and F un-permute their shares; every block of the gradient and Hessian is a local ring
term plus dealer-assisted cross products in both directions (U fixed at one site and one-time
padded to the other once, V per iteration padded by the dealer's B_t):
    X_L'mu = X_L'[mu]_L + cross(X_L | [mu]_F),  X_F'mu = X_F'[mu]_F + cross(X_F | [mu]_L),
    X_L'W X_L, X_F'W X_F from the pair columns x_j x_k against the shares of w,
    X_F'W X_L = cross(X_F | [w]_L * X_L) + cross(X_L | [w]_F * X_F)',  X_F'y = cross(X_F | y).
F seals its shares to L (each three-factor limb term of one direction under a fresh mask that
its partner term in the other carries negated: alone, sum x_F [w]_L x_L is a linear equation in
F's column with coefficients L knows); L adds them, releases the gradient and Hessian (in scaled
coordinates, as the researcher's Newton step needs them), computes the Newton step itself and seals F its
next coefficients: F never takes coefficients from the researcher, and L refuses a broadcast
beta_L that is not its own step (`broadcast_not_newton`), so nobody can steer the fit. The
deviance is 2 (sum log(1 + e^eta) - y'eta), D's sum and L's y'eta = y'X_L beta_L + (X_F'y)'beta_F.

Fixed point: each site scales its columns by public powers of two (multiples of 4 bits) so that
|x| <= 1; values are two limbs (an encoding and its rounding error encoded again). With b =
bit_length(n): three-factor products (w x_L x_F) use f3 = floor((64 - b) / 3) bits per factor
(w's low limb, a rounding error, reaches half a unit), x against mu, y or z uses f3 and
63 - b - f3 bits, pairs against w f2 = floor((63 - b) / 2); every sum stays below 2^63, so
nothing needs truncating. Each site takes its design as the two f3-bit limbs hold it (every
value within 2^-2 f3 of its column's bound: 2^-30 at n = 100,000), so the blocks, the linear predictor and the deviance are exact for one
and the same design, and the fit is statsmodels' on the data to that resolution. The gaussian family needs no link: its one
Newton step (OLS) is at beta = 0 (mu = 0, w = 1, no dealer evaluation), and its residual sum of
squares at the fit is sum (y - eta_L)^2 (L) - 2 (y'eta_F - beta_L'X_L'eta_F) (a cross product
of L's [X_L | y] and F's eta_F) + sum eta_F^2 (F).

Rounds: 0 designs (row counts, column names, scale exponents), the dealer's seeds and L's seed
to F (each with a digest of the sender's parameters), L's and F's sizes to D; 1..P the one-time
padded U_F and U_L in parts (<= 16 MiB each); then per iteration five: a) L and F send D their
masked, permuted linear predictors (L releases y'eta); b) D releases its sums,
sends F its shares and both their offsets; c) L and F exchange V - B_t; d) F seals its shares to
L; e) L releases the gradient and Hessian and seals F its next coefficients. The fit stops as
statsmodels' does (deviance change <= `tol`, covariance from the last step's Hessian), after a
last c-e at the final beta for the Pearson statistic; a gaussian fit is one step, then a) F sends
its eta_F cross term, b) L releases the residual sum of squares.

What each party learns: the researcher what a pooled GLM reveals (gradients, Hessians and
deviances along the Newton path, hence the fit; the deviance and Pearson statistic as their
parts, sums over all rows), each site's row count, design column names and column scale exponents; L the same gradient and Hessian blocks, and otherwise only uniformly padded
or shared values; F its own coefficients along the path, and otherwise only padded or shared
values (nothing of y, mu, w or residuals); D, at each iterate, the multiset of the linear
predictor (unordered: pi_t is fresh every iteration and unknown to it), n and the column counts;
the hub only sealed payloads and the public releases. Assumption: D colludes with neither L nor
F (with L it would learn pi_t and so eta per row; with either it holds both pads of a product). A
researcher colluding with D learns the linear predictor's distribution along the honest Newton
path only, since L checks every step.

Guards: formula by the allow-list grammar (`formula_not_allowed`); indicator isolation, leverage
and saturation at each site on its own design (as glm); at D every iteration the weight guards
of glm (`weight_dominance`: fitted values at their bounds, weights on too few rows); at L the
Newton check (`broadcast_not_newton`); at every party the others' parameters (a digest with the
round-0 seeds, `vertical_params_mismatch`); at D the sizes L and F sealed to it
(`broadcast_not_released`); every broadcast checked for its keys, shapes and constants
(`broadcast_malformed`, `broadcast_changed`), every payload for its type and shape
(`payload_malformed`).
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
    NAME_PATTERN,
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
    params_digest,
    register,
)
from medveil.analyses.formula import (
    SAFE_TRANSFORMS,
    Factor,
    FormulaNotAllowed,
    ParsedFormula,
    parse_formula,
)
from medveil.analyses.glm import (
    _check_indicator_isolation,
    _is_number,
    _level_variables,
    _require_unsaturated,
    statsmodels_family,
)
from medveil.analyses.vertical_results import VerticalGLMResults
from medveil.crypto import shares
from medveil.crypto.shares import Block
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    require_min_count,
    require_no_dominant_row,
    require_not_saturated,
    require_spread_weights,
)

PART_BYTES = 16 * 1024 * 1024  # E travels in parts of at most this many bytes (a step body is capped)
MAX_COLUMNS = 2000  # variables listed per site
MAX_DESIGN_COLUMNS = 200  # design columns per site (F's pair columns grow with the square)
CONSTANTS = ("n", "p_label", "p_feature")
ETA_BITS = 40  # fractional bits of the masked linear predictors sent to the dealer
ETA_RANGE_BITS = 21  # |eta_L|, |eta_F| < 2^21 (their sum then fits the ring with ETA_BITS)
Z_EXPONENT = 20  # |e^-eta - e^eta| <= 1e6 < 2^20 where fitted values keep off their bounds (glm.SATURATED)
NEWTON_RTOL = 1e-9  # L's tolerance between its own Newton step and the researcher's (BLAS differences)
PHASES = "abcde"
SHARED = ("mu_hi", "mu_lo", "w_hi", "w_lo", "w3_hi", "w3_lo", "z_hi", "z_lo")  # the dealer's shares, by column


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
    def _sites_and_terms(self) -> VerticalGLMParams:
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


def _direction_blocks(p_u: int, p_x: int, q: int, p_v: int, extra_rows: tuple[tuple[int, int], tuple[int, int]]
                      ) -> list[Block]:
    """The blocks of one direction's cross product U'V, split by the column groups needed.

    U (fixed, at one site) = [x hi | x lo | pairs hi | pairs lo]: x its p_x design columns (at L
    followed by y: p_u columns), pairs its q products x_j x_k. V (per iteration, at the other
    site) = [mu hi, mu lo, w hi, w lo | w3 hi * x hi, w3 lo * x hi, w3 hi * x lo (p_v each) |
    extra hi, extra lo]. Blocks: 0-2 x'mu, 3-5 pairs'w (limb products hi hi, hi lo, lo hi), 6-7
    the three-factor x'W x (terms 111, 121, 112 and 211 of the limbs), 8-10 `extra_rows` of U
    (hi, lo) against the extra column (y at L against F's x, z against L's y)."""
    xh, xl = (0, p_u), (p_u, 2 * p_u)
    ph, pl = (2 * p_u, 2 * p_u + q), (2 * p_u + q, 2 * p_u + 2 * q)
    extra = 4 + 3 * p_v
    rows_hi, rows_lo = extra_rows
    return [Block(xh, (0, 1)), Block(xh, (1, 2)), Block(xl, (0, 1)),
            Block(ph, (2, 3)), Block(ph, (3, 4)), Block(pl, (2, 3)),
            Block((0, p_x), (4, 4 + 3 * p_v)), Block((p_u, p_u + p_x), (4, 4 + p_v)),
            Block(rows_hi, (extra, extra + 1)), Block(rows_hi, (extra + 1, extra + 2)),
            Block(rows_lo, (extra, extra + 1))]


def _local_blocks(blocks: list[Block], with_extra: bool) -> list[Block]:
    """The blocks of a site's local ring terms: its own U against its own shares, laid out as
    [mu hi, mu lo, w hi, w lo, extra hi, extra lo] (blocks 0-5, and 8-10 when `with_extra`)."""
    local = list(blocks[:6])
    if with_extra:
        local += [Block(blocks[8].u, (4, 5)), Block(blocks[9].u, (5, 6)), Block(blocks[10].u, (4, 5))]
    return local


def layout(n: int, p_label: int, p_feature: int) -> dict[str, Any]:
    """The protocol's public sizes: fraction bits, the widths of U and V in both directions, the
    parts U travels in, and the blocks. Direction "f": U_F at F, V at L; direction "l": U_L =
    [X_L, y] at L, V at F."""
    f3 = shares.fraction_bits_triple(n)
    p_l, p_f = p_label, p_feature
    q_l, q_f = _pair_count(p_l), _pair_count(p_f)
    k_f, k_l = 2 * p_f + 2 * q_f, 2 * (p_l + 1) + 2 * q_l
    blocks_f = _direction_blocks(p_f, p_f, q_f, p_l, ((0, p_f), (p_f, 2 * p_f)))
    blocks_l = _direction_blocks(p_l + 1, p_l, q_l, p_f, ((p_l, p_l + 1), (2 * p_l + 1, 2 * p_l + 2)))
    final_l = [Block((0, p_l + 1), (0, 1)), Block((0, p_l + 1), (1, 2)), Block((p_l + 1, 2 * p_l + 2), (0, 1))]
    parts = max(1, math.ceil(n * max(k_f, k_l) * 8 / PART_BYTES))
    return {"f2": shares.fraction_bits(n), "f3": f3, "fm": shares.RING_BITS - 1 - int(n).bit_length() - f3,
            "k_f": k_f, "k_l": k_l, "m_l": 3 * p_l + 6, "m_f": 3 * p_f + 6, "parts": parts,
            "blocks_f": blocks_f, "blocks_l": blocks_l, "local_f": _local_blocks(blocks_f, False),
            "local_l": _local_blocks(blocks_l, True), "final_l": final_l, "first_iteration_round": parts + 1}


def schedule(round_no: int, parts: int) -> tuple[int, str]:
    """(iteration, phase a-e) of a round after the set-up rounds 0..parts."""
    offset = round_no - (parts + 1)
    return offset // len(PHASES), PHASES[offset % len(PHASES)]


@register
class VerticalGLM(Analysis[VerticalGLMParams]):
    name = "vertical_glm"
    Params = VerticalGLMParams
    releases_sums = False

    def variables(self, params: VerticalGLMParams) -> list[str]:
        sites = (params.label_site, params.feature_site)
        return sorted(set().union(*(self.variables_at(params, site, None) for site in sites)))

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
        every round; `final` a bool (beta is checked by the label holder against its own step)."""
        if round_no == 0:
            super().check_broadcast(params, round_no, broadcast, memory)
            return
        allowed = set(CONSTANTS) | {"beta", "final"}
        if not isinstance(broadcast, dict) or not set(CONSTANTS) <= set(broadcast) <= allowed:
            raise BroadcastRefused("broadcast_malformed", f"vertical_glm expects {list(CONSTANTS)} (and the label "
                                                          "holder's beta), got other keys")
        constants = {name: broadcast[name] for name in CONSTANTS}
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10**9 for v in constants.values()) \
                or constants["p_label"] > MAX_DESIGN_COLUMNS or constants["p_feature"] > MAX_DESIGN_COLUMNS:
            raise BroadcastRefused("broadcast_malformed", "n, p_label and p_feature must be positive integers "
                                                          "within bounds")
        if round_no == 1:
            memory["vertical_constants"] = constants
        elif memory.get("vertical_constants") != constants:
            raise BroadcastRefused("broadcast_changed", "the sizes differ from those of round 1 of this task")
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
        scaled = np.ldexp(x, -np.asarray(exponents, dtype=np.int64)) if x.size else x
        # the design as the ring's two limbs hold it (2^-2 f3 of each column's bound), so that every
        # block, the linear predictor and the deviance are of one and the same design
        design = {"x": _quantised(scaled, shares.fraction_bits_triple(len(x))), "y": y,
                  "columns": columns, "exponents": exponents, "y_exponent": shares.scale_exponent(y)}
        scratch["design"] = design
        return design

    @staticmethod
    def _sizes(broadcast: dict[str, Any]) -> dict[str, Any]:
        constants = {name: broadcast[name] for name in CONSTANTS}
        return dict(layout(**constants), **constants)

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

    def _columns_in(self, context: SiteContext, sender: str, key: str, n: int, width: int, what: str) -> np.ndarray:
        """An n x width ring matrix sent transposed (width x n, C order): as n x width, Fortran order."""
        return self._ring(self._message(context, sender, key), (width, n), what).T

    def _same_params(self, context: SiteContext, params: VerticalGLMParams, sender: str) -> None:
        """The sender's round-0 seed came with a digest of its parameters: they must be this site's
        (`vertical_params_mismatch`). The researcher signs each site's steps separately, so it could
        give L and F different alignments (a join of rows neither agreed), formulas or families."""
        if self._message(context, sender, "params") != params_digest(params):
            raise BroadcastRefused("vertical_params_mismatch", f"{sender} runs this task with other parameters "
                                                               "than this site (the researcher sent them different steps)")

    def _check_released(self, context: SiteContext, params: VerticalGLMParams, broadcast: dict[str, Any]) -> None:
        """Round 1 at D: the broadcast sizes are those L and F sealed to it in round 0. D holds no
        data and builds n x k pads from these sizes: a researcher inflating them would make it
        allocate without bound (`broadcast_not_released`)."""
        released = {"n": {self._message(context, site, "rows") for site in (params.label_site, params.feature_site)},
                    "p_label": {self._message(context, params.label_site, "columns")},
                    "p_feature": {self._message(context, params.feature_site, "columns")}}
        if any(values != {broadcast[name]} for name, values in released.items()):
            raise BroadcastRefused("broadcast_not_released", "the sizes broadcast are not those the two sites sent "
                                                             "the dealer")

    @staticmethod
    def _seed(value: Any) -> bytes:
        if not isinstance(value, bytes) or len(value) != shares.SEED_BYTES:
            raise BroadcastRefused("payload_malformed", "a seed must be 32 bytes")
        return value

    def _set_up(self, round_no: int, context: SiteContext, sizes: dict[str, Any],
                u: Any, peer: str, own_width: int, peer_width: int) -> dict[str, Any]:
        """Rounds 1..parts+1 at L or F: send this site's E = U - A part by part (`u(columns)` builds
        those columns of U, of `own_width`), keep the peer's parts (of its `peer_width` columns)."""
        scratch, n = context.scratch, int(sizes["n"])
        if 2 <= round_no <= sizes["parts"] + 1:
            part = self._message(context, peer, "part")
            if part != round_no - 2:
                raise BroadcastRefused("payload_malformed", "a part of E came out of order")
            columns = np.array_split(np.arange(peer_width), sizes["parts"])[part]
            scratch[f"e{part}"] = self._columns_in(context, peer, "e", n, len(columns), "E")
        if round_no > sizes["parts"]:
            return {}
        columns = np.array_split(np.arange(own_width), sizes["parts"])[round_no - 1]
        pad = shares.random_columns(shares.derive_seed(_required(scratch, "seed_d"), "A"), n, columns)
        e = u(columns) - pad
        return {peer: {"part": round_no - 1, "e": np.ascontiguousarray(e.T)}}

    def _dealer(self, params: VerticalGLMParams, round_no: int, broadcast: dict[str, Any],
                context: SiteContext) -> Release:
        scratch = context.scratch
        if round_no == 0:
            scratch["seed_l"], scratch["seed_f"] = shares.new_seed(), shares.new_seed()
            digest = params_digest(params)
            return Release(payloads={params.feature_site: {"seed": scratch["seed_f"], "params": digest},
                                     params.label_site: {"seed": scratch["seed_l"], "params": digest}})
        seed_l, seed_f = _required(scratch, "seed_l"), _required(scratch, "seed_f")
        if round_no == 1:  # the sizes of round 1 hold for the task (`broadcast_changed`)
            self._check_released(context, params, broadcast)
        sizes = self._sizes(broadcast)
        if round_no < sizes["first_iteration_round"]:
            return Release()
        iteration, phase = schedule(round_no, sizes["parts"])
        n, gaussian = broadcast["n"], params.family == "gaussian"
        if gaussian and iteration == 1:  # the residual sum of squares: one cross product at the final beta
            if phase != "a":
                return Release()
            a_l = _pad(scratch, "a_l", seed_l, n, sizes["k_l"])
            b_f = shares.random_matrix(shares.derive_seed(seed_f, "B final"), n, 2)
            c_f = shares.random_vector(shares.derive_seed(seed_f, "C final"), shares.blocks_size(sizes["final_l"]))
            offset = shares.dealer_offset(a_l, b_f, c_f, sizes["final_l"])
            return Release(payloads={params.label_site: {"offset": offset}})
        if phase != "b" or iteration > (0 if gaussian else params.max_iter):
            return Release()
        public: dict[str, Any] = {}
        to_feature: dict[str, Any] = {}
        if not gaussian:
            to_feature["shares"], public = self._evaluate_link(params, iteration, context, sizes, seed_l)
        # the correlation offsets of both cross products (no data in them)
        a_f = _pad(scratch, "a_f", seed_f, n, sizes["k_f"])
        b_l, c_l = _iteration_pads(seed_l, iteration, n, sizes["m_l"], sizes["blocks_f"])
        to_feature["offset"] = shares.dealer_offset(a_f, b_l, c_l, sizes["blocks_f"])
        del b_l
        a_l = _pad(scratch, "a_l", seed_l, n, sizes["k_l"])
        b_f, c_f = _iteration_pads(seed_f, iteration, n, sizes["m_f"], sizes["blocks_l"])
        offset_l = shares.dealer_offset(a_l, b_f, c_f, sizes["blocks_l"])
        return Release(public=public, payloads={params.feature_site: to_feature,
                                                params.label_site: {"offset": offset_l}})

    def _evaluate_link(self, params: VerticalGLMParams, iteration: int, context: SiteContext, sizes: dict[str, Any],
                       seed_l: bytes) -> tuple[np.ndarray, dict[str, float]]:
        """Phase b at D: the linear predictor (in an order D does not know) from L's and F's masked
        parts; mu, w and z = e^-eta - e^eta, refused at their bounds or on too few rows in effect;
        F's shares of them (L's are a pad from L's seed), and D's public sums."""
        n = int(sizes["n"])
        parts = [self._ring(self._message(context, site, "eta"), (n,), "a masked linear predictor")
                 for site in (params.label_site, params.feature_site)]
        eta = shares.decode(parts[0] + parts[1], ETA_BITS)
        family = statsmodels_family(params.family)
        mu = family.fitted(eta)
        _require_unsaturated(mu, params.family)
        w = family.weights(mu)
        require_spread_weights(w, context.policy)
        z = np.ldexp(np.exp(-eta) - np.exp(eta), -Z_EXPONENT)
        values = np.empty((n, len(SHARED)), dtype=np.uint64, order="F")
        values[:, 0:2] = _limbs(mu, sizes["fm"])
        values[:, 2:4] = _limbs(w, sizes["f2"])
        values[:, 4:6] = _limbs(w, sizes["f3"])
        values[:, 6:8] = _limbs(z, sizes["fm"])
        masked = values - _label_shares(seed_l, iteration, n)
        public = {"softplus": float(np.sum(np.logaddexp(0.0, eta))), "exp_sum": float(np.sum(np.exp(eta)))}
        return np.ascontiguousarray(masked.T), public

    def _feature(self, params: VerticalGLMParams, round_no: int, broadcast: dict[str, Any],
                 context: SiteContext) -> Release:
        design, scratch = self._design(params, context, label=False), context.scratch
        x = design["x"]
        if round_no == 0:
            return Release(public={"rows": len(x), "columns": design["columns"], "exponents": design["exponents"]},
                           payloads={params.dealer_site: {"rows": len(x), "columns": x.shape[1]}})
        self._check_own(design, broadcast, "p_feature")
        if "beta" in broadcast:
            raise BroadcastRefused("broadcast_not_newton", "the feature holder takes its coefficients from the label "
                                                           "holder's Newton step, never from the researcher")
        n = len(x)
        sizes = self._sizes(broadcast)
        if round_no == 1:
            self._same_params(context, params, params.dealer_site)
            self._same_params(context, params, params.label_site)
            scratch["seed_d"] = self._seed(self._message(context, params.dealer_site, "seed"))
            scratch["seed_s"] = self._seed(self._message(context, params.label_site, "seed"))
        seed_d, seed_s = _required(scratch, "seed_d"), _required(scratch, "seed_s")
        payloads = self._set_up(round_no, context, sizes, lambda columns: _encoded_u(x, None, sizes, columns),
                                params.label_site, sizes["k_f"], sizes["k_l"])
        if round_no < sizes["first_iteration_round"]:
            return Release(payloads=payloads)
        iteration, phase = schedule(round_no, sizes["parts"])
        gaussian = params.family == "gaussian"
        label = params.label_site
        if phase == "a":
            beta = (np.zeros(x.shape[1]) if iteration == 0
                    else finite_array(self._message(context, label, "beta"), (x.shape[1],)))
            eta = x @ beta
            if gaussian:
                if iteration == 0:
                    return Release()
                return Release(payloads={label: self._residual_cross(eta, beta, sizes, seed_d, scratch)})
            masked = _encode_eta(eta) - shares.random_vector(shares.derive_seed(seed_s, f"mask {iteration}"), n)
            order = shares.permutation(seed_s, f"rows {iteration}", n)
            return Release(payloads={params.dealer_site: {"eta": masked[order]}})
        if phase == "c":
            u = _cached(scratch, "u", lambda: _encoded_u(x, None, sizes))
            if gaussian:  # beta = 0: mu = 0, w = 1 (w3 = 1/4), no link to evaluate
                own = np.zeros((n, len(SHARED)), dtype=np.uint64, order="F")
                own[:, 2:4] = _limbs(np.ones(n), sizes["f2"])
                own[:, 4:6] = _limbs(np.full(n, 0.25), sizes["f3"])
            else:
                permuted = self._columns_in(context, params.dealer_site, "shares", n, len(SHARED),
                                            "the dealer's shares")
                own = _unpermute(permuted, shares.permutation(seed_s, f"rows {iteration}", n))
            scratch["offset"] = self._ring(self._message(context, params.dealer_site, "offset"),
                                           (shares.blocks_size(sizes["blocks_f"]),), "the dealer's offset")
            p = x.shape[1]
            v = _v_matrix(own, u[:, :p], u[:, p:2 * p], own[:, 6:8])
            b, c = _iteration_pads(seed_d, iteration, n, sizes["m_f"], sizes["blocks_l"])
            scratch["share_l"] = shares.share_of_masked_holder(_joined(scratch, n, sizes["k_l"], sizes["parts"]), v, c,
                                                               sizes["blocks_l"])
            scratch["local"] = shares.cross_blocks(u, own[:, :4], sizes["local_f"])
            return Release(payloads={label: {"masked": np.ascontiguousarray((v - b).T)}})
        if phase == "d":
            masked = self._columns_in(context, label, "masked", n, sizes["m_l"], "V - B")
            a = _pad(scratch, "a", seed_d, n, sizes["k_f"])
            share_f = shares.share_of_pad_holder(a, masked, _required(scratch, "offset"), sizes["blocks_f"])
            share_f = _with_local(share_f, sizes["blocks_f"], _required(scratch, "local"), sizes["local_f"], range(6))
            share_f, share_l = _mask_three_factor(share_f, _required(scratch, "share_l"), sizes, int(sizes["p_label"]),
                                                  x.shape[1])
            return Release(payloads={label: {"f": share_f, "l": share_l}})
        return Release()

    def _residual_cross(self, eta: np.ndarray, beta: np.ndarray, sizes: dict[str, Any], seed_d: bytes,
                        scratch: MutableMapping[str, Any]) -> dict[str, Any]:
        """Gaussian, at the final beta: F's part of (y - eta_L)'eta_F (V = eta_F scaled by a power of
        two bounding it, from beta alone) and sum eta_F^2."""
        n = len(eta)
        exponent = _eta_exponent(beta)
        v = np.asfortranarray(_limbs(np.ldexp(eta, -exponent), sizes["fm"]))
        b = shares.random_matrix(shares.derive_seed(seed_d, "B final"), n, 2)
        c = shares.random_vector(shares.derive_seed(seed_d, "C final"), shares.blocks_size(sizes["final_l"]))
        e = _joined(scratch, n, sizes["k_l"], sizes["parts"])
        return {"masked": np.ascontiguousarray((v - b).T), "squares": float(eta @ eta),
                "share": shares.share_of_masked_holder(e, v, c, sizes["final_l"])}

    def _label(self, params: VerticalGLMParams, round_no: int, broadcast: dict[str, Any],
               context: SiteContext) -> Release:
        design, scratch = self._design(params, context, label=True), context.scratch
        x, y = design["x"], design["y"]
        if round_no == 0:
            scratch["seed_s"] = shares.new_seed()
            return Release(public={"rows": len(x), "columns": design["columns"], "exponents": design["exponents"],
                                   "y_exponent": design["y_exponent"]},
                           payloads={params.feature_site: {"seed": scratch["seed_s"], "params": params_digest(params)},
                                     params.dealer_site: {"rows": len(x), "columns": x.shape[1]}})
        self._check_own(design, broadcast, "p_label")
        n, p = x.shape
        sizes = self._sizes(broadcast)
        if round_no == 1:
            self._same_params(context, params, params.dealer_site)
            scratch["seed_d"] = self._seed(self._message(context, params.dealer_site, "seed"))
        seed_d, seed_s = _required(scratch, "seed_d"), _required(scratch, "seed_s")
        y_scaled = np.ldexp(y, -design["y_exponent"])
        payloads = self._set_up(round_no, context, sizes, lambda columns: _encoded_u(x, y_scaled, sizes, columns),
                                params.feature_site, sizes["k_l"], sizes["k_f"])
        if round_no < sizes["first_iteration_round"]:
            return Release(payloads=payloads)
        iteration, phase = schedule(round_no, sizes["parts"])
        gaussian, feature = params.family == "gaussian", params.feature_site
        if phase == "a":
            return self._check_and_send(params, iteration, broadcast, context, design, sizes)
        if phase == "b" and gaussian and iteration == 1:
            return Release(public=self._residual_sum(params, context, design, sizes, seed_d))
        if phase == "c":
            u = _cached(scratch, "u", lambda: _encoded_u(x, y_scaled, sizes))
            if gaussian:
                own = np.zeros((n, len(SHARED)), dtype=np.uint64, order="F")
            else:
                order = shares.permutation(seed_s, f"rows {iteration}", n)
                own = _unpermute(_label_shares(seed_d, iteration, n), order)
            scratch["offset"] = self._ring(self._message(context, params.dealer_site, "offset"),
                                           (shares.blocks_size(sizes["blocks_l"]),), "the dealer's offset")
            v = _v_matrix(own, u[:, :p], u[:, p + 1:2 * p + 1], _limbs(y_scaled, sizes["fm"]))
            b, c = _iteration_pads(seed_d, iteration, n, sizes["m_l"], sizes["blocks_f"])
            scratch["share_f"] = shares.share_of_masked_holder(_joined(scratch, n, sizes["k_f"], sizes["parts"]), v, c,
                                                               sizes["blocks_f"])
            local_v = np.asfortranarray(np.concatenate([own[:, :4], own[:, 6:8]], axis=1))
            scratch["local"] = shares.cross_blocks(u, local_v, sizes["local_l"])
            return Release(payloads={feature: {"masked": np.ascontiguousarray((v - b).T)}})
        if phase == "d":
            masked = self._columns_in(context, feature, "masked", n, sizes["m_f"], "V - B")
            a = _pad(scratch, "a", seed_d, n, sizes["k_l"])
            scratch["share_l"] = shares.share_of_pad_holder(a, masked, _required(scratch, "offset"), sizes["blocks_l"])
            return Release()
        if phase == "e":
            return self._newton_at_label(params, iteration, broadcast, context, design, sizes)
        return Release()

    def _check_and_send(self, params: VerticalGLMParams, iteration: int, broadcast: dict[str, Any],
                        context: SiteContext, design: dict[str, Any], sizes: dict[str, Any]) -> Release:
        """Phase a at L: the researcher's beta_L must be L's own Newton step (zero at the start);
        L's masked, permuted eta_L to D (binomial) and y'eta in the clear (for the deviance)."""
        x, y, scratch = design["x"], design["y"], context.scratch
        n, p = x.shape
        own = np.asarray(_required(scratch, "beta")) if iteration > 0 else np.zeros(p + int(sizes["p_feature"]))
        claimed = finite_array(broadcast.get("beta"), (p,))
        if not np.allclose(claimed, own[:p], rtol=NEWTON_RTOL, atol=NEWTON_RTOL * max(1.0, float(np.max(np.abs(own))))):
            raise BroadcastRefused("broadcast_not_newton", "the coefficients broadcast are not this site's own Newton "
                                                           "step from the released gradient and Hessian")
        eta = x @ own[:p]
        y_eta = float(y @ eta) + (float(np.asarray(_required(scratch, "xf_y")) @ own[p:]) if iteration > 0 else 0.0)
        family = statsmodels_family(params.family)
        public: dict[str, Any] = {"y_eta": y_eta}
        if iteration == 0:
            public["null_deviance"] = float(family.deviance(y, np.full_like(y, y.mean())))
        if params.family == "gaussian":
            return Release(public=public)
        seed_s = _required(scratch, "seed_s")
        masked = _encode_eta(eta) + shares.random_vector(shares.derive_seed(seed_s, f"mask {iteration}"), n)
        return Release(public=public, payloads={
            params.dealer_site: {"eta": masked[shares.permutation(seed_s, f"rows {iteration}", n)]}})

    def _newton_at_label(self, params: VerticalGLMParams, iteration: int, broadcast: dict[str, Any],
                         context: SiteContext, design: dict[str, Any], sizes: dict[str, Any]) -> Release:
        """Phase e at L: the shares added up and decoded into the gradient and Hessian (released),
        L's own Newton step, and F's next coefficients sealed to F."""
        x, y, scratch = design["x"], design["y"], context.scratch
        p = x.shape[1]
        total_f = shares.reconstruct(_required(scratch, "share_f"), self._ring(
            self._message(context, params.feature_site, "f"), (shares.blocks_size(sizes["blocks_f"]),), "F's share"))
        total_l = shares.reconstruct(_required(scratch, "share_l"), self._ring(
            self._message(context, params.feature_site, "l"), (shares.blocks_size(sizes["blocks_l"]),), "F's share"))
        total_l = _with_local(total_l, sizes["blocks_l"], _required(scratch, "local"), sizes["local_l"],
                              [0, 1, 2, 3, 4, 5, 8, 9, 10])
        gaussian = params.family == "gaussian"
        blocks = decode_blocks(total_f, total_l, sizes, p, int(sizes["p_feature"]), design["y_exponent"],
                               w3_factor=0.25 if gaussian else 1.0)
        gradient = np.concatenate([x.T @ y - blocks["xl_mu"], blocks["xf_y"] - blocks["xf_mu"]])
        hessian = blocks["hessian"]
        public: dict[str, Any] = {"gradient": gradient, "hessian": hessian}
        if not gaussian:
            public["y_z"] = blocks["y_z"]  # Pearson = D's sum e^eta + y'(e^-eta - e^eta)
        if iteration == 0:
            scratch["xf_y"] = blocks["xf_y"]
        if broadcast.get("final"):
            return Release(public=public)
        own = np.asarray(_required(scratch, "beta")) if iteration > 0 else np.zeros(len(gradient))
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            raise AnalysisError("the Hessian is singular: the design columns are collinear") from None
        beta = own + step
        scratch["beta"] = beta
        return Release(public=public, payloads={params.feature_site: {"beta": beta[p:]}})

    def _residual_sum(self, params: VerticalGLMParams, context: SiteContext, design: dict[str, Any],
                      sizes: dict[str, Any], seed_d: bytes) -> dict[str, Any]:
        """Gaussian phase b at the final beta: RSS = sum (y - eta_L)^2 - 2 (y - eta_L)'eta_F + sum eta_F^2,
        the cross term from one product of [X_L | y] (L) and eta_F (F)."""
        x, y, scratch = design["x"], design["y"], context.scratch
        n, p = x.shape
        beta = np.asarray(_required(scratch, "beta"))
        feature = params.feature_site
        size = shares.blocks_size(sizes["final_l"])
        masked = self._columns_in(context, feature, "masked", n, 2, "V - B")
        share_f = self._ring(self._message(context, feature, "share"), (size,), "F's share")
        offset = self._ring(self._message(context, params.dealer_site, "offset"), (size,), "the dealer's offset")
        squares = self._message(context, feature, "squares")
        if not isinstance(squares, float) or not math.isfinite(squares):
            raise BroadcastRefused("payload_malformed", "sum eta_F^2 must be a finite number")
        a = _pad(scratch, "a", seed_d, n, sizes["k_l"])
        total = shares.reconstruct(shares.share_of_pad_holder(a, masked, offset, sizes["final_l"]), share_f)
        hi_hi, hi_lo, lo_hi = shares.split_blocks(total, sizes["final_l"])
        products = np.ldexp(shares.combine_two_limbs(hi_hi, hi_lo, lo_hi, sizes["f3"], sizes["fm"])[:, 0],
                            _eta_exponent(beta[p:]))  # [X_L | y_scaled]' eta_F
        y_eta_f = products[p] * 2.0 ** design["y_exponent"]
        residual_l = y - x @ beta[:p]
        rss = float(residual_l @ residual_l - 2 * (y_eta_f - beta[:p] @ products[:p]) + squares)
        return {"rss": rss}

    # --- the researcher's step ---------------------------------------------------------------

    def global_step(self, params: VerticalGLMParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        label = params.label_site
        messages = _forward(aggregated)
        if round_no == 0:
            facts_l, facts_f = aggregated.public.get(label, {}), aggregated.public.get(params.feature_site, {})
            if facts_l.get("rows") != facts_f.get("rows"):
                raise AnalysisError(f"the two sites' tables have {facts_l.get('rows')} and {facts_f.get('rows')} rows: "
                                    "align them first (fed.psi) or pass tables in one row order")
            n = int(facts_l["rows"])
            names = list(facts_l["columns"]) + list(facts_f["columns"])
            if len(set(names)) != len(names):
                raise AnalysisError("the two sites' design columns share names")
            constants = {"n": n, "p_label": len(facts_l["columns"]), "p_feature": len(facts_f["columns"])}
            state = {"constants": constants, "columns": names, "owner": [label] * constants["p_label"]
                     + [params.feature_site] * constants["p_feature"], "exponents": list(facts_l["exponents"])
                     + list(facts_f["exponents"]), "parts": layout(**constants)["parts"],
                     "beta": np.zeros(len(names)), "deviances": [], "iteration": 0, "final": False, "converged": False}
            return NextRound(dict(constants), state, messages=messages)
        constants, parts = state["constants"], state["parts"]
        if round_no < parts:
            return NextRound(dict(constants), state, messages=messages)
        if round_no == parts:
            return self._next_iteration(params, state, messages)
        iteration, phase = schedule(round_no, parts)
        facts = aggregated.public.get(label, {})
        broadcast = dict(constants, final=bool(state["final"]))
        if phase == "a":
            state = dict(state, y_eta=float(facts["y_eta"]))
            if iteration == 0:
                state["null_deviance"] = float(facts["null_deviance"])
        elif phase == "b":
            if params.family == "gaussian":
                if iteration == 1:
                    rss = float(facts["rss"])
                    return Finished(self._result(params, state, deviance=rss, pearson=rss, ssr=rss, loglike=math.nan))
            else:
                state = self._after_link(params, aggregated.public.get(params.dealer_site, {}), state)
                broadcast["final"] = bool(state["final"])
        elif phase == "e":
            if state["final"]:
                pearson = state["exp_sum"] + float(facts["y_z"])
                return Finished(self._result(params, state, deviance=state["deviances"][-1], pearson=pearson,
                                             ssr=math.nan, loglike=state["loglike"]))
            return self._newton(params, facts, state, messages)
        return NextRound(broadcast, state, messages=messages)

    def _next_iteration(self, params: VerticalGLMParams, state: dict[str, Any],
                        messages: dict[str, list[dict]]) -> NextRound:
        """Phase a next: the label holder is sent its beta (which it checks against its own step)."""
        p_label = state["constants"]["p_label"]
        return NextRound(dict(state["constants"], final=bool(state["final"])), state,
                         per_site={params.label_site: {"beta": state["beta"][:p_label]}}, messages=messages)

    @staticmethod
    def _after_link(params: VerticalGLMParams, facts: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """Binomial phase b: the deviance at beta_t from D's sum and L's y'eta. Stop as statsmodels
        does (deviance change <= tol), after one more c-e pass for the Pearson statistic."""
        softplus = float(facts["softplus"])
        deviance = 2.0 * (softplus - state["y_eta"])
        deviances = state["deviances"] + [deviance]
        iteration = state["iteration"]
        converged = iteration > 0 and abs(deviances[-1] - deviances[-2]) <= params.tol
        final = converged or iteration >= params.max_iter
        return dict(state, deviances=deviances, loglike=state["y_eta"] - softplus, exp_sum=float(facts["exp_sum"]),
                    final=final, converged=converged)

    def _newton(self, params: VerticalGLMParams, facts: dict[str, Any], state: dict[str, Any],
                messages: dict[str, list[dict]]) -> NextRound:
        """Phase e: the gradient and Hessian at beta_t (from L), one Newton step to beta_t+1 (which L
        takes too, and checks next round)."""
        hessian = np.asarray(facts.get("hessian"), dtype=np.float64)
        gradient = np.asarray(facts.get("gradient"), dtype=np.float64)
        size = len(state["columns"])
        if hessian.shape != (size, size) or gradient.shape != (size,):
            raise AnalysisError("the label site released no gradient and Hessian")
        if state["iteration"] == 0:
            check_collinearity(hessian, state["columns"])
        beta = state["beta"] + np.linalg.solve(hessian, gradient)
        final = params.family == "gaussian"  # one Newton step is the least-squares fit; then only its RSS
        state = dict(state, beta=beta, hessian=hessian, iteration=state["iteration"] + 1, final=final,
                     converged=final)
        return self._next_iteration(params, state, messages)

    def _result(self, params: VerticalGLMParams, state: dict[str, Any], deviance: float, pearson: float,
                ssr: float, loglike: float) -> VerticalGLMResults:
        scale = np.ldexp(1.0, -np.asarray(state["exponents"], dtype=np.int64))  # x = x_scaled * 2^e
        if "hessian" not in state:
            raise AnalysisError("the fit stopped before its first Newton step")
        hessian = np.asarray(state["hessian"])
        fit = VerticalGLMResults.from_sums(
            params=params, beta=state["beta"] * scale, xtwx=hessian * np.outer(1 / scale, 1 / scale),
            columns=state["columns"], nobs=float(state["constants"]["n"]), sum_log_weights=0.0, deviance=deviance,
            null_deviance=float(state["null_deviance"]), pearson=pearson, ssr=ssr, loglike=loglike,
            iterations=state["iteration"], converged=bool(state["converged"]), family=statsmodels_family(params.family))
        owner = pd.Series(state["owner"], index=state["columns"], name="site")
        return fit.with_owner(owner)


def _limbs(values: np.ndarray, bits: int) -> np.ndarray:
    """Reals in [-1, 1] as ring columns [hi | lo] (a column's two limbs side by side), Fortran order."""
    x = np.asarray(values, dtype=np.float64)
    x2 = x.reshape(len(x), -1)
    try:
        hi, lo = shares.encode_two_limbs(x2, bits)
    except shares.ShareError as exc:
        raise AnalysisError(f"a value cannot be encoded: {exc}") from None
    return np.asfortranarray(np.concatenate([hi, lo], axis=1))


def _encoded_u(x: np.ndarray, y: np.ndarray | None, sizes: dict[str, Any], columns: Any = None) -> np.ndarray:
    """A site's fixed U = [x̄ hi | x̄ lo | pairs hi | pairs lo]: x̄ its design (at L with y after
    it) in f3-bit limbs, the pair products x_j x_k (j <= k) in f2-bit limbs (Fortran order); with
    `columns`, only those columns of U (a part of E), computing only the pairs they need."""
    limbs = _limbs(x if y is None else np.column_stack([x, y]), sizes["f3"])
    p = x.shape[1]
    pairs = [(j, k) for j in range(p) for k in range(j, p)]
    wanted = np.arange(limbs.shape[1] + 2 * len(pairs)) if columns is None else np.asarray(columns)
    out = np.empty((len(x), len(wanted)), dtype=np.uint64, order="F")
    needed = sorted({(c - limbs.shape[1]) % len(pairs) for c in wanted if c >= limbs.shape[1]})
    encoded = {}
    if needed:
        products = np.column_stack([x[:, pairs[i][0]] * x[:, pairs[i][1]] for i in needed])
        hi, lo = shares.encode_two_limbs(products, sizes["f2"])
        encoded = {i: (hi[:, position], lo[:, position]) for position, i in enumerate(needed)}
    for position, column in enumerate(wanted):
        if column < limbs.shape[1]:
            out[:, position] = limbs[:, column]
        else:
            index = column - limbs.shape[1]
            out[:, position] = encoded[index % len(pairs)][index // len(pairs)]
    return out


def _quantised(x: np.ndarray, bits: int) -> np.ndarray:
    """x as its two f3-bit limbs represent it (what the ring's products of x use)."""
    hi, lo = shares.encode_two_limbs(x, bits)
    return shares.decode(hi, bits) + shares.decode(lo, 2 * bits)


def _v_matrix(own: np.ndarray, x_hi: np.ndarray, x_lo: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """A site's per-iteration V = [mu hi, mu lo, w hi, w lo | w3 hi x hi, w3 lo x hi, w3 hi x lo |
    extra hi, extra lo] from its shares (`SHARED` columns, row order) and its own x limbs: a share
    times a value the site holds is a share of the product (ring multiplication wraps)."""
    n, p = x_hi.shape
    v = np.empty((n, 3 * p + 6), dtype=np.uint64, order="F")
    v[:, :4] = own[:, :4]
    v[:, 4:4 + p] = own[:, 4:5] * x_hi
    v[:, 4 + p:4 + 2 * p] = own[:, 5:6] * x_hi
    v[:, 4 + 2 * p:4 + 3 * p] = own[:, 4:5] * x_lo
    v[:, 4 + 3 * p:] = extra
    return v


def _unpermute(permuted: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows given in the order `order` (row order[j] at position j) back in row order."""
    rows = np.empty_like(permuted, order="F")
    rows[order] = permuted
    return rows


def _label_shares(seed_l: bytes, iteration: int, n: int) -> np.ndarray:
    """L's shares of the dealer's values at iteration t (in the permuted order): a pad from L's seed."""
    return shares.random_matrix(shares.derive_seed(seed_l, f"shares {iteration}"), n, len(SHARED))


def _iteration_pads(seed: bytes, iteration: int, n: int, width: int, blocks: list[Block]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The pads of the V-holder of one direction at iteration t: B_t (n x width) and its C_t,
    from the dealer's seed for that site."""
    b = shares.random_matrix(shares.derive_seed(seed, f"B {iteration}"), n, width)
    c = shares.random_vector(shares.derive_seed(seed, f"C {iteration}"), shares.blocks_size(blocks))
    return b, c


def _encode_eta(eta: np.ndarray) -> np.ndarray:
    """A partial linear predictor with ETA_BITS fractional bits (|eta| < 2^ETA_RANGE_BITS)."""
    if not np.all(np.isfinite(eta)) or (eta.size and float(np.max(np.abs(eta))) >= 2.0**ETA_RANGE_BITS):
        raise AnalysisError("the linear predictor is not finite or too large for the ring")
    return shares.encode(np.ldexp(eta, -ETA_RANGE_BITS), ETA_BITS + ETA_RANGE_BITS)


def _eta_exponent(beta: np.ndarray) -> int:
    """A public power of two bounding |x'beta| for |x| <= 1 (from beta alone): sum |beta|."""
    return shares.scale_exponent(np.array([float(np.sum(np.abs(beta)))]))


def _joined(scratch: MutableMapping[str, Any], n: int, width: int, parts: int) -> np.ndarray:
    """The peer's E (n x width), from its parts in scratch, in Fortran order."""
    out = np.empty((n, width), dtype=np.uint64, order="F")
    for part, columns in enumerate(np.array_split(np.arange(width), parts)):
        if len(columns):
            out[:, columns[0]:columns[-1] + 1] = _required(scratch, f"e{part}")
    return out


def _mask_three_factor(share_f: np.ndarray, share_l: np.ndarray, sizes: dict[str, Any], p_l: int, p_f: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """F's shares of both directions with a fresh mask R added to each three-factor limb term of one
    and subtracted from its partner in the other, so that L, adding the two, learns only their sum
    X_F'W X_L. Alone, the direction-f term is sum_i x_F,i [w]_L,i x_L,i with every [w]_L,i x_L,i
    known to L: linear equations in F's column that L could solve for it, given enough of them."""
    flat_f, flat_l = np.array(share_f, dtype=np.uint64), np.array(share_l, dtype=np.uint64)
    bf, bl = shares.split_blocks(flat_f, sizes["blocks_f"]), shares.split_blocks(flat_l, sizes["blocks_l"])
    masks = shares.random_vector(shares.new_seed(), 4 * p_f * p_l).reshape(4, p_f, p_l)
    pairs = [(bf[6][:, :p_l], bl[6][:, :p_f]), (bf[6][:, p_l:2 * p_l], bl[6][:, p_f:2 * p_f]),
             (bf[6][:, 2 * p_l:], bl[7]), (bf[7], bl[6][:, 2 * p_f:])]  # the terms decode_blocks adds up
    for mask, (term_f, term_l) in zip(masks, pairs):
        term_f += mask
        term_l -= mask.T
    return flat_f, flat_l


def _with_local(flat: np.ndarray, blocks: list[Block], local: np.ndarray, local_blocks: list[Block],
                positions: Any) -> np.ndarray:
    """A direction's flat blocks with a site's local ring terms added at `positions`."""
    parts = shares.split_blocks(np.asarray(flat, dtype=np.uint64), blocks)
    for position, term in zip(positions, shares.split_blocks(np.asarray(local, dtype=np.uint64), local_blocks)):
        parts[position] = parts[position] + term
    return np.concatenate([part.ravel() for part in parts])


def decode_blocks(total_f: np.ndarray, total_l: np.ndarray, sizes: dict[str, Any], p_l: int, p_f: int,
                  y_exponent: int, w3_factor: float) -> dict[str, Any]:
    """The real blocks from the reconstructed ring sums of both directions: X_F'mu, X_L'mu, X_F'y,
    y'z, and the Hessian [[X_L'W X_L, .], [X_F'W X_L, X_F'W X_F]] (scaled coordinates)."""
    f2, f3, fm = sizes["f2"], sizes["f3"], sizes["fm"]
    bf = shares.split_blocks(total_f, sizes["blocks_f"])
    bl = shares.split_blocks(total_l, sizes["blocks_l"])
    # X_F'W X_L: the limb terms (x_F, w3, x_L) 111, 121 (w's low limb), 112 (x_L's), 211 (x_F's), each the
    # sum of its two cross products (F's direction as it is, L's transposed), added in the ring
    t111 = bf[6][:, :p_l] + bl[6][:, :p_f].T
    t121 = bf[6][:, p_l:2 * p_l] + bl[6][:, p_f:2 * p_f].T
    t112 = bf[6][:, 2 * p_l:] + bl[7].T
    t211 = bf[7] + bl[6][:, 2 * p_f:].T
    h_fl = (shares.decode(t111, 3 * f3) + shares.decode(t121, 4 * f3) + shares.decode(t112, 4 * f3)
            + shares.decode(t211, 4 * f3)) / w3_factor
    h_ll, h_ff = _from_pairs(shares.combine_two_limbs(*bl[3:6], f2)[:, 0], p_l), \
        _from_pairs(shares.combine_two_limbs(*bf[3:6], f2)[:, 0], p_f)
    hessian = np.block([[h_ll, h_fl.T], [h_fl, h_ff]])
    return {"hessian": hessian,
            "xf_mu": shares.combine_two_limbs(*bf[0:3], f3, fm)[:, 0],
            "xl_mu": shares.combine_two_limbs(*bl[0:3], f3, fm)[:p_l, 0],
            "xf_y": np.ldexp(shares.combine_two_limbs(*bf[8:11], f3, fm)[:, 0], y_exponent),
            "y_z": float(np.ldexp(shares.combine_two_limbs(*bl[8:11], f3, fm)[0, 0], Z_EXPONENT + y_exponent))}


def _from_pairs(values: np.ndarray, p: int) -> np.ndarray:
    """The symmetric p x p matrix from its entries (j, k), j <= k, in `pair_columns` order."""
    out = np.empty((p, p))
    rows, columns = np.triu_indices(p)  # row-major j <= k, the order of pair_columns
    out[rows, columns] = values
    out[columns, rows] = values
    return out


def _cached(scratch: MutableMapping[str, Any], key: str, build: Any) -> Any:
    """A fixed matrix kept in scratch after it is first built (rebuilt whenever the scratch bound
    dropped it): U, and the pads A, are the same every iteration."""
    if key in scratch:  # Fortran order for the column products (a value read back from disk is in C order)
        return np.asfortranarray(scratch[key])
    value = build()
    scratch[key] = value
    return value


def _pad(scratch: MutableMapping[str, Any], key: str, seed: bytes, n: int, width: int) -> np.ndarray:
    """The fixed pad A (n x width) of one direction, from the dealer's seed for its U-holder."""
    return _cached(scratch, key, lambda: shares.random_matrix(shares.derive_seed(seed, "A"), n, width))


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
