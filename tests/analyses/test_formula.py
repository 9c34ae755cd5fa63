"""The allow-list formula grammar: what it accepts, what it prints for formulaic, what it refuses."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medveil.analyses.formula import (
    MAX_DEPTH,
    MAX_FORMULA_CHARS,
    FormulaNotAllowed,
    model_matrices,
    parse_formula,
)

COLUMNS = ["a", "b", "c", "d"]
FRAME = pd.DataFrame({
    "y": np.linspace(1.0, 3.0, 40), "a": np.linspace(0.5, 2.0, 40), "b": np.tile([1.0, 2.0, 3.0, 4.0], 10),
    "c": np.linspace(3.0, 1.0, 40) ** 2, "d": np.arange(40) % 7 + 1.0, "g": list("pqrs") * 10,
})


@pytest.mark.parametrize(("formula", "canonical"), [
    ("y ~ a", "y ~ 1 + a"),
    ("y ~ a + b - 1", "y ~ 0 + a + b"),
    ("y ~ -1 + a", "y ~ 0 + a"),
    ("y ~ 0 + a", "y ~ 0 + a"),
    ("y ~ a*b", "y ~ 1 + a + b + a:b"),
    ("y ~ a*b - a:b", "y ~ 1 + a + b"),
    ("y ~ a*b - a", "y ~ 1 + b + a:b"),
    ("y ~ (a + b + c)**2", "y ~ 1 + a + b + c + a:b + a:c + b:c"),
    ("y ~ a:b:c", "y ~ 1 + a:b:c"),
    ("y ~ C(g) + a:C(g)", "y ~ 1 + C(g) + a:C(g)"),
    ("y ~ I(a**2) + I(a*b+1)", "y ~ 1 + I(a ** 2) + I(a * b + 1)"),
    ("y ~ I(-a ** 2) + I((-a) ** 2)", "y ~ 1 + I(-a ** 2) + I((-a) ** 2)"),
    ("y ~ I(a - (b - c)) + I((a - b) - c)", "y ~ 1 + I(a - (b - c)) + I(a - b - c)"),
    ("y ~ I(a / (b * c)) + I(-(a + b))", "y ~ 1 + I(a / (b * c)) + I(-(a + b))"),
    ("y ~ I(a == 97) + I(b >= 2.5) + I(c != 1e3)", "y ~ 1 + I(a == 97) + I(b >= 2.5) + I(c != 1000.0)"),
    ("log(y) ~ sqrt(a) + exp(-b) + log(a + 1)", "log(y) ~ 1 + sqrt(a) + exp(-b) + log(a + 1)"),
    ("y ~ poly(a, 3)", "y ~ 1 + I(a) + I(a ** 2) + I(a ** 3)"),
    ("y ~ polynomial(log(a), 2)", "y ~ 1 + log(a) + I(log(a) ** 2)"),
    ("y ~ I(007 * a)", "y ~ 1 + I(7 * a)"),
    ("I(a == 97) ~ 1", "I(a == 97) ~ 1"),
    ("y ~ a + a", "y ~ 1 + a"),
])
def test_accepted_formulas_print_a_canonical_formula(formula, canonical):
    parsed = parse_formula(formula)
    assert parsed.canonical == canonical
    assert parse_formula(parsed.canonical).canonical == canonical


def test_structured_result_names_variables_and_indicator_terms():
    parsed = parse_formula("I(a == 97) ~ b + C(g) + c:I(d < 3) + log(a) + sex")
    assert parsed.response.kind == "comparison" and parsed.response_variables == ["a"]
    assert parsed.rhs_variables == ["a", "b", "c", "d", "g", "sex"]
    assert parsed.level_variables == ["g"]
    assert parsed.column_variables == ["b", "c", "sex"]
    assert parsed.numeric_variables == ["a", "d"]
    assert {f.text for f in parsed.indicator_factors()} == {"C(g)", "I(d < 3)"}
    assert {f.text for f in parsed.indicator_factors({"sex"})} == {"C(g)", "I(d < 3)", "sex"}
    assert not parsed.uses_standardize and parse_formula("y ~ standardize(a)").uses_standardize


def test_canonical_formula_builds_the_design_formulaic_would_build_from_the_text():
    parsed = parse_formula("log(y) ~ a*C(g) + I(b == 2) + sqrt(c) + I((a + 1) / d)")
    matrices = model_matrices(parsed, FRAME)
    assert list(matrices.rhs.columns) == ["Intercept", "a", "C(g)[T.q]", "C(g)[T.r]", "C(g)[T.s]", "I(b == 2)",
                                          "sqrt(c)", "I((a + 1) / d)", "a:C(g)[T.q]", "a:C(g)[T.r]", "a:C(g)[T.s]"]
    np.testing.assert_allclose(matrices.rhs["I((a + 1) / d)"], (FRAME["a"] + 1) / FRAME["d"])
    np.testing.assert_allclose(matrices.rhs["I(b == 2)"], FRAME["b"] == 2)
    np.testing.assert_allclose(np.asarray(matrices.lhs)[:, 0], np.log(FRAME["y"]))


@pytest.mark.parametrize(("formula", "token", "reason"), [
    ("y ~ I(a.__class__)", ".", "attribute access"),
    ("y ~ a[0]", "[", "subscripts"),
    ("y ~ I('a')", "'", "string literals"),
    ("y ~ open(a)", "open", "calling 'open' is not allowed"),
    ("y ~ I(eval(a))", "eval", "calling 'eval' is not allowed"),
    ("y ~ I(__import__)", "__import__", "'__'"),
    ("y ~ I(lambda)", "lambda", "keyword"),
    ("y ~ I((z := a))", "=", "assignment"),
    ("y ~ C(g, Treatment)", ",", "reference levels are not supported"),
    ("y ~ poly(a, degree=2)", "=", "keyword arguments"),
    ("y ~ \u0430", "\u0430", "non-ASCII"),
    ("y ~ I(a < b < c)", "<", "chained comparisons"),
    ("y ~ I((a < b) * 2)", "<", "only as the whole of I(a < b)"),
    ("y ~ I(a ** b)", "b", "exponent must be a numeric constant"),
    ("y ~ I(a ** 2 ** 2)", "**", "power of a power"),
    ("y ~ I((a ** 2) ** 2)", "**", "power of a power"),
    ("y ~ I(a ** 11)", "11", "exponents are limited"),
    ("y ~ I(1e999 * a)", "1e999", "too large"),
    ("y ~ 2 + a", "2", "must be 0 or 1"),
    ("y ~ (1 + a):b", "1", "intercept"),
    ("y ~ a - 0", "0", "'- 0'"),
    ("y ~ log", "log", "is a transform"),
    ("y ~ True", "True", "keyword"),
    ("y ~ a ~ b", "~", "unexpected token"),
    ("y ~ a b", "b", "unexpected token"),
    ("C(g) ~ a", "C", "response"),
    ("y ~ (a + b)**9", "9", "power of a term group"),
    ("y ~ I(a", "", "expected ')'"),
    ("y ~ {a}", "{", "code blocks"),
    ("y ~ `a`", "`", "quoted names"),
    ("y ~ a; import os", ";", "not allowed"),
])
def test_refusals_name_the_token_and_its_position(formula, token, reason):
    with pytest.raises(FormulaNotAllowed) as error:
        parse_formula(formula)
    assert error.value.rule == "formula_not_allowed"
    assert reason in error.value.detail
    assert error.value.token == token
    if token:
        assert formula[error.value.position:].startswith(token)


@pytest.mark.parametrize(("formula", "reason"), [
    ("y", "needs a response"),
    ("y ~ 0", "no columns"),
    ("y ~ C(a) + I(a + 1)", "both as levels"),
    ("a ~ C(a)", "both as levels"),
    ("y ~ " + "(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1), "nested deeper"),
    ("y ~ I(" + "-" * (MAX_DEPTH + 1) + "a)", "nested deeper"),
    ("y ~ " + " + ".join(f"x{i}" for i in range(600)), "limited to"),
    ("y ~ a + " * (MAX_FORMULA_CHARS // 8) + "a", f"limited to {MAX_FORMULA_CHARS} characters"),
    ("y ~ (" + " + ".join(f"x{i}" for i in range(30)) + ")**4", "more than 200 terms"),
])
def test_malformed_deep_long_or_inconsistent_formulas_are_refused(formula, reason):
    with pytest.raises(FormulaNotAllowed, match=reason):
        parse_formula(formula)


# --- properties ------------------------------------------------------------------------------

_constants = st.sampled_from(["1", "2", "0.5", "3.25", "1e2", "10"])
_positive = st.sampled_from(COLUMNS)


def _arith(depth: int = 2) -> st.SearchStrategy[str]:
    leaf = st.one_of(st.sampled_from(COLUMNS), _constants)
    if depth == 0:
        return leaf
    inner = _arith(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(inner, _positive).map(lambda t: f"{t[0]} / {t[1]}"),
        inner.map(lambda t: f"-{t}"),
        st.tuples(st.sampled_from(COLUMNS), st.sampled_from(["2", "3", "0.5", "-1"])).map(lambda t: f"{t[0]} ** {t[1]}"),
        st.tuples(st.sampled_from(["log", "sqrt"]), _positive).map(lambda t: f"{t[0]}({t[1]})"),
    )


_factors = st.one_of(
    st.sampled_from(COLUMNS), st.just("C(g)"), _arith().map(lambda a: f"I({a})"),
    st.tuples(_arith(1), st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), _arith(1))
      .map(lambda t: f"I({t[0]} {t[1]} {t[2]})"),
    st.sampled_from(["log(a)", "sqrt(c)", "exp(b / 4)"]),
)


def _terms(depth: int = 2) -> st.SearchStrategy[str]:
    if depth == 0:
        return _factors
    inner = _terms(depth - 1)
    return st.one_of(
        _factors,
        st.tuples(inner, st.sampled_from([" + ", " - ", " * ", ":"]), inner).map("".join),
        st.tuples(inner, inner, st.sampled_from(["1", "2"])).map(lambda t: f"({t[0]} + {t[1]})**{t[2]}"),
    )


_formulas = st.tuples(st.sampled_from(["y", "log(y)", "I(y > 2)", "I(a * b)"]), _terms(),
                      st.sampled_from(["", " - 1", " + 0", " + 1"])).map(lambda t: f"{t[0]} ~ {t[1]}{t[2]}")


def _columns_by_values(matrix: pd.DataFrame) -> list[tuple[float, ...]]:
    return sorted(tuple(np.round(matrix[c].to_numpy(np.float64), 9)) for c in matrix.columns)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_formulas)
def test_allowed_formulas_round_trip_to_a_canonical_string_that_builds_the_same_design(formula):
    from formulaic import model_matrix

    try:
        parsed = parse_formula(formula)
    except FormulaNotAllowed as refusal:  # e.g. every term removed, or a C(g) used as a number
        assert refusal.rule == "formula_not_allowed"
        return
    assert parse_formula(parsed.canonical) == parsed
    ours = model_matrices(parsed, FRAME)
    # formulaic evaluating the researcher's own text (safe here: the test wrote it) agrees with ours
    theirs = model_matrix(formula, FRAME, na_action="ignore", context={"log": np.log, "sqrt": np.sqrt, "exp": np.exp})
    assert ours.rhs.shape == theirs.rhs.shape
    assert _columns_by_values(ours.rhs) == _columns_by_values(theirs.rhs)
    np.testing.assert_allclose(np.asarray(ours.lhs, dtype=float), np.asarray(theirs.lhs, dtype=float))


_junk_alphabet = st.sampled_from(list("ab y~+-*/:(),<>=!.'\"[]{}@`\\;_0123456789 ") +
                                 ["__import__", "lambda", "os", "system", "open", "eval", "I(", "C(", "log(",
                                  "**", "\u0430", "\uff41", "\U0001d5ee", "\x00", "\n", ":=", "for", "in", "if"])
_CANONICAL = re.compile(r"^[A-Za-z0-9_ ~+\-*/:().<>=!,]*$")
_NAMES = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@settings(max_examples=400, deadline=None)
@given(st.lists(_junk_alphabet, max_size=40).map("".join))
def test_junk_is_refused_or_parses_into_allowed_tokens_only(text):
    try:
        parsed = parse_formula(text)
    except FormulaNotAllowed as refusal:
        assert refusal.rule == "formula_not_allowed"
        assert 0 <= refusal.position <= len(text)
        return
    canonical = parsed.canonical
    assert _CANONICAL.match(canonical)
    names = set(_NAMES.findall(re.sub(r"\d+(\.\d*)?(e[+-]?\d+)?", " ", canonical)))
    assert names <= set(parsed.rhs_variables) | set(parsed.response_variables) | {"C", "I", "log", "exp", "sqrt"}
    assert not any(name.startswith("__") for name in names)
    assert not any(char in text for char in "'\"[]{}@`\\;\u0430\uff41\U0001d5ee\x00")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_text_never_raises_anything_but_a_refusal(text):
    try:
        parse_formula(text)
    except FormulaNotAllowed:
        pass
