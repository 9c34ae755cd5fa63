"""Model formulas by an allow-list grammar of our own: parsed here, never evaluated as code.

Why not formulaic's (or patsy's) parser: they evaluate every factor of a formula as Python, so
`y ~ I(__import__('os').system(...))`, or any call, would run on every hospital node. This
module tokenizes and parses the researcher's text with a small hand-written recursive-descent
parser, refuses anything outside the grammar under rule `formula_not_allowed` (naming the token
and its position), and prints a canonical formula from the parsed tree. Only that canonical
string reaches formulaic, so only approved column names, numeric constants, operators and the
named transforms below (given to formulaic as plain numpy functions) can appear in what it
evaluates.

Grammar (Wilkinson/patsy conventions, ASCII only):

    formula     := response '~' rhs
    response    := factor                       one column or expression; not C() or poly()
    rhs         := ['+' | '-'] product (('+' | '-') product)*       0 / 1 / -1: intercept
    product     := interaction ('*' interaction)*                  a*b = a + b + a:b
    interaction := power (':' power)*
    power       := atom ['**' INTEGER]                            (a + b)**2: interactions
    atom        := '(' group ')' | '0' | '1' | factor | poly
    factor      := NAME | 'C(' NAME ')' | 'I(' arith [COMPARE arith] ')'
                 | ('log' | 'exp' | 'sqrt' | 'standardize') '(' arith ')'
    poly        := ('poly' | 'polynomial') '(' arith ',' INTEGER ')'  raw powers 1..degree
    arith       := Python's arithmetic over NAME, NUMBER, + - * /, unary -, '**' with a
                   constant exponent, parentheses and log/exp/sqrt calls
    COMPARE     := '==' | '!=' | '<' | '<=' | '>' | '>='       makes a 0/1 indicator column

`standardize` parses (so a refusal can say why) but a federated fit refuses it: a site's own
mean and sd are not the pooled ones, so the fit would not equal a pooled fit.
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Union

import numpy as np
import pandas as pd

from medveil.privacy.disclosure import DisclosureRefused

MAX_FORMULA_CHARS = 2000
MAX_TOKENS = 500
MAX_DEPTH = 20
MAX_TERMS = 200
MAX_INTERACTION_POWER = 8
MAX_POLY_DEGREE = 10
MAX_EXPONENT = 10.0
MAX_NUMBER_CHARS = 32

ARITHMETIC_CALLS = ("log", "exp", "sqrt")
FACTOR_CALLS = ("C", "I", *ARITHMETIC_CALLS, "standardize", "poly", "polynomial")
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")

_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\n]+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\*\*|==|!=|<=|>=|[~+\-*/:(),<>])
""", re.VERBOSE | re.ASCII)

_CHARACTER_HINTS = {
    "'": "string literals are not allowed", '"': "string literals are not allowed",
    ".": "attribute access is not allowed", "[": "subscripts and lists are not allowed",
    "]": "subscripts and lists are not allowed", "{": "code blocks, sets and dicts are not allowed",
    "}": "code blocks, sets and dicts are not allowed", "=": "assignment and keyword arguments are not allowed",
    "`": "quoted names are not allowed", "\\": "escapes and line continuations are not allowed",
}


class FormulaNotAllowed(DisclosureRefused):
    """A formula outside the allow-list grammar. `position` is the 0-based offset of `token`.

    A DisclosureRefused (not a ValueError), so that a node refuses it under its own rule and
    pydantic passes it through a parameter validator unchanged."""

    def __init__(self, message: str, position: int = 0, token: str = ""):
        shown = token if len(token) <= 24 else token[:24] + "..."
        where = f" at position {position} ({shown!r})" if token else f" at position {position}"
        super().__init__("formula_not_allowed", f"formula not allowed{where}: {message}")
        self.position = position
        self.token = token


@dataclass(frozen=True)
class Factor:
    """One factor of a design term. `text` is canonical (what formulaic sees); `kind` is
    column (a bare name: levels when the site's column is not numeric), level (C()),
    comparison (I(a < b), a 0/1 indicator), numeric (an expression) or standardize."""

    text: str
    kind: str
    variables: tuple[str, ...]


@dataclass(frozen=True)
class ParsedFormula:
    """The structured result of `parse_formula`."""

    response: Factor
    terms: tuple[tuple[Factor, ...], ...]  # design terms, the intercept left out
    intercept: bool

    @property
    def canonical(self) -> str:
        """The formula printed from the parsed tree: the only text formulaic ever sees."""
        parts = ["1" if self.intercept else "0"] + [":".join(f.text for f in term) for term in self.terms]
        return f"{self.response.text} ~ {' + '.join(parts)}"

    @property
    def factors(self) -> tuple[Factor, ...]:
        seen: dict[str, Factor] = {}
        for term in self.terms:
            for factor in term:
                seen.setdefault(factor.text, factor)
        return tuple(seen.values())

    @property
    def response_variables(self) -> list[str]:
        return sorted(set(self.response.variables))

    @property
    def rhs_variables(self) -> list[str]:
        return sorted({v for factor in self.factors for v in factor.variables})

    @property
    def level_variables(self) -> list[str]:
        """Columns wrapped in C(): levels whatever their type."""
        return sorted({factor.variables[0] for factor in self.factors if factor.kind == "level"})

    @property
    def column_variables(self) -> list[str]:
        """Bare column names on the right: levels at a site where the column is not numeric."""
        return sorted({factor.variables[0] for factor in self.factors if factor.kind == "column"})

    @property
    def numeric_variables(self) -> list[str]:
        """Columns used in arithmetic, comparisons or as the response: must be numeric."""
        used = set(self.response.variables)
        used.update(v for factor in self.factors if factor.kind not in ("column", "level") for v in factor.variables)
        return sorted(used)

    @property
    def uses_standardize(self) -> bool:
        return self.response.kind == "standardize" or any(f.kind == "standardize" for f in self.factors)

    def indicator_factors(self, non_numeric: set[str] | frozenset[str] = frozenset()) -> list[Factor]:
        """Factors whose columns are 0/1 indicators: levels, comparisons, and bare columns that
        are not numeric at this site (`non_numeric`)."""
        return [f for f in self.factors if f.kind in ("level", "comparison")
                or (f.kind == "column" and f.variables[0] in non_numeric)]


# --- arithmetic inside I(), log(), ... ------------------------------------------------------

@dataclass(frozen=True)
class _Number:
    text: str
    precedence = 6


@dataclass(frozen=True)
class _Name:
    name: str
    precedence = 6


@dataclass(frozen=True)
class _Call:
    function: str
    argument: "_Arith"
    precedence = 6


@dataclass(frozen=True)
class _Power:
    base: "_Arith"
    exponent: str
    precedence = 5


@dataclass(frozen=True)
class _Negative:
    operand: "_Arith"
    precedence = 4


@dataclass(frozen=True)
class _Binary:
    operator: str
    left: "_Arith"
    right: "_Arith"

    @property
    def precedence(self) -> int:
        return {"+": 2, "-": 2, "*": 3, "/": 3}.get(self.operator, 1)


_Arith = Union[_Number, _Name, _Call, _Power, _Negative, _Binary]


def _print(node: _Arith) -> str:
    """Python source for a node, with the parentheses Python's precedence needs (and no more)."""
    if isinstance(node, _Number):
        return node.text
    if isinstance(node, _Name):
        return node.name
    if isinstance(node, _Call):
        return f"{node.function}({_print(node.argument)})"
    if isinstance(node, _Power):
        base = _print(node.base)
        return f"{f'({base})' if node.base.precedence <= node.precedence else base} ** {node.exponent}"
    if isinstance(node, _Negative):
        operand = _print(node.operand)
        return f"-({operand})" if node.operand.precedence < node.precedence else f"-{operand}"
    left, right = _print(node.left), _print(node.right)
    left = f"({left})" if node.left.precedence < node.precedence else left
    right = f"({right})" if node.right.precedence <= node.precedence else right
    return f"{left} {node.operator} {right}"


def _names(node: _Arith) -> list[str]:
    if isinstance(node, _Name):
        return [node.name]
    if isinstance(node, _Number):
        return []
    if isinstance(node, _Call):
        return _names(node.argument)
    if isinstance(node, _Power):
        return _names(node.base)
    if isinstance(node, _Negative):
        return _names(node.operand)
    return _names(node.left) + _names(node.right)


def _has_power(node: _Arith) -> bool:
    if isinstance(node, _Power):
        return True
    if isinstance(node, _Call):
        return _has_power(node.argument)
    if isinstance(node, _Negative):
        return _has_power(node.operand)
    if isinstance(node, _Binary):
        return _has_power(node.left) or _has_power(node.right)
    return False


# --- tokens and the parser -------------------------------------------------------------------

@dataclass(frozen=True)
class _Token:
    kind: str  # name, number, op, end
    text: str
    position: int


@dataclass(frozen=True)
class _Intercept:
    """A bare 0 or 1 on the right: adds or removes the intercept (top level only)."""

    value: int
    token: _Token


Terms = list[tuple[Factor, ...]]


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            char = text[position]
            if not char.isascii():
                raise FormulaNotAllowed(f"non-ASCII character U+{ord(char):04X} is not allowed "
                                        "(look-alike letters are refused)", position, char)
            raise FormulaNotAllowed(_CHARACTER_HINTS.get(char, "this character is not allowed"), position, char)
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token(kind, match.group(), position))
            if len(tokens) > MAX_TOKENS:
                raise FormulaNotAllowed(f"more than {MAX_TOKENS} tokens", position, match.group())
        position = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0

    # token helpers

    @property
    def peek(self) -> _Token:
        return self.tokens[self.index]

    def _next(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _at(self, *texts: str) -> bool:
        return self.peek.kind == "op" and self.peek.text in texts

    def _expect(self, text: str, what: str) -> _Token:
        if not self._at(text):
            raise self._unexpected(f"expected {what}")
        return self._next()

    def _unexpected(self, message: str, token: _Token | None = None) -> FormulaNotAllowed:
        token = token or self.peek
        if token.kind == "end":
            return FormulaNotAllowed(f"{message}, found the end of the formula", token.position)
        return FormulaNotAllowed(message, token.position, token.text)

    def _enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormulaNotAllowed(f"nested deeper than {MAX_DEPTH} levels", token.position, token.text)

    def _column(self, token: _Token) -> str:
        """A NAME token used as a column name."""
        if token.kind != "name":
            raise self._unexpected("expected a column name", token)
        name = token.text
        if name.startswith("__"):
            raise FormulaNotAllowed("names starting with '__' are not allowed", token.position, name)
        if keyword.iskeyword(name):
            raise FormulaNotAllowed(f"{name!r} is a Python keyword, not a column name", token.position, name)
        if name in FACTOR_CALLS:
            raise FormulaNotAllowed(f"{name!r} is a transform; call it as {name}(...)", token.position, name)
        return name

    def _refuse_call(self, token: _Token, allowed: tuple[str, ...]) -> FormulaNotAllowed:
        if token.text.startswith("__"):
            return FormulaNotAllowed("names starting with '__' are not allowed", token.position, token.text)
        return FormulaNotAllowed(f"calling {token.text!r} is not allowed here; allowed: {', '.join(allowed)}",
                                 token.position, token.text)

    def _integer(self, low: int, high: int, what: str) -> int:
        token = self.peek
        if token.kind != "number" or not token.text.isdigit() or not low <= int(token.text) <= high:
            raise self._unexpected(f"{what} must be a whole number from {low} to {high}")
        self._next()
        return int(token.text)

    # the whole formula

    def formula(self) -> ParsedFormula:
        response = self._response()
        self._expect("~", "'~' after the response (a formula reads 'y ~ x1 + x2')")
        terms, intercept = self._rhs()
        if self.peek.kind != "end":
            raise self._unexpected("unexpected token")
        if not terms and not intercept:
            raise FormulaNotAllowed("the model has no columns (no terms and no intercept)", self.peek.position)
        parsed = ParsedFormula(response, tuple(terms), intercept)
        self._check_consistent_use(parsed)
        return parsed

    def _response(self) -> Factor:
        token = self.peek
        if token.kind == "name" and token.text in ("C", "poly", "polynomial"):
            raise FormulaNotAllowed("the response must be one numeric column or expression", token.position, token.text)
        if token.kind != "name":
            raise self._unexpected("a formula starts with its response (a column name or I(...))")
        return self._factor()

    def _check_consistent_use(self, parsed: ParsedFormula) -> None:
        clash = set(parsed.level_variables) & set(parsed.numeric_variables)
        if clash:
            name = sorted(clash)[0]
            raise FormulaNotAllowed(f"column {name!r} is used both as levels (C()) and as a number")

    # terms

    def _rhs(self) -> tuple[Terms, bool]:
        terms: Terms = []
        intercept = True
        sign = self._next().text if self._at("+", "-") else "+"
        while True:
            operand = self._product()
            if isinstance(operand, _Intercept):
                if sign == "-" and operand.value == 0:
                    raise FormulaNotAllowed("'- 0' is not allowed; write '+ 1' for an intercept",
                                            operand.token.position, operand.token.text)
                intercept = (sign == "+") == (operand.value == 1)
            elif sign == "+":
                terms = _limited(_union(terms, operand), self.peek)
            else:
                removed = {frozenset(f.text for f in term) for term in operand}
                terms = [term for term in terms if frozenset(f.text for f in term) not in removed]
            if not self._at("+", "-"):
                return terms, intercept
            sign = self._next().text

    def _product(self) -> Terms | _Intercept:
        left = self._interaction()
        while self._at("*"):
            operator = self._next()
            right = self._interaction()
            left = _limited(_cross_with_mains(self._terms(left), self._terms(right)), operator)
        return left

    def _interaction(self) -> Terms | _Intercept:
        left = self._power()
        while self._at(":"):
            operator = self._next()
            right = self._power()
            left = _limited(_cross(self._terms(left), self._terms(right)), operator)
        return left

    def _power(self) -> Terms | _Intercept:
        atom = self._atom()
        if not self._at("**"):
            return atom
        operator = self._next()
        power = self._integer(1, MAX_INTERACTION_POWER, "the power of a term group")
        base = self._terms(atom)
        result = base
        for _ in range(power - 1):
            result = _limited(_cross_with_mains(result, base), operator)
        return result

    def _terms(self, operand: Terms | _Intercept) -> Terms:
        if isinstance(operand, _Intercept):
            raise FormulaNotAllowed("0 and 1 (the intercept) can only be added or removed with + and -",
                                    operand.token.position, operand.token.text)
        return operand

    def _atom(self) -> Terms | _Intercept:
        token = self.peek
        if token.kind == "number":
            self._next()
            if token.text in ("0", "1"):
                return _Intercept(int(token.text), token)
            raise FormulaNotAllowed("a number as a term must be 0 or 1 (the intercept); "
                                    "constants go inside I(...)", token.position, token.text)
        if self._at("("):
            self._enter(self._next())
            group = self._group()
            self._expect(")", "')'")
            self.depth -= 1
            return group
        if token.kind == "name" and token.text in ("poly", "polynomial") and self._call_follows():
            return self._poly()
        if token.kind == "name":
            return [(self._factor(),)]
        raise self._unexpected("expected a term (a column name, C(...), I(...) or a transform)")

    def _group(self) -> Terms:
        """Terms inside parentheses: + and - only; the intercept is a top-level matter."""
        sign = self._next().text if self._at("+", "-") else "+"
        terms: Terms = []
        while True:
            operand = self._terms(self._product())
            if sign == "+":
                terms = _limited(_union(terms, operand), self.peek)
            else:
                removed = {frozenset(f.text for f in term) for term in operand}
                terms = [term for term in terms if frozenset(f.text for f in term) not in removed]
            if not self._at("+", "-"):
                return terms
            sign = self._next().text

    def _call_follows(self) -> bool:
        return self.tokens[self.index + 1].kind == "op" and self.tokens[self.index + 1].text == "("

    def _factor(self) -> Factor:
        token = self._next()
        if token.kind != "name":
            raise self._unexpected("expected a column name or a call", token)
        if not (self.peek.kind == "op" and self.peek.text == "("):
            name = self._column(token)
            return Factor(name, "column", (name,))
        if token.text not in FACTOR_CALLS or token.text in ("poly", "polynomial"):
            raise self._refuse_call(token, tuple(f for f in FACTOR_CALLS if f not in ("poly", "polynomial")))
        self._enter(self._next())
        if token.text == "C":
            name = self._column(self._next())
            if self._at(","):
                raise self._unexpected("C() takes one column name; contrasts and reference levels are not "
                                       "supported (the reference is the first level in sorted order)")
            factor = Factor(f"C({name})", "level", (name,))
        elif token.text == "I":
            left = self._arith()
            if self._at(*COMPARISONS):
                operator = self._next().text
                right = self._arith()
                if self._at(*COMPARISONS):
                    raise self._unexpected("chained comparisons are not allowed")
                text = f"I({_print(left)} {operator} {_print(right)})"
                factor = Factor(text, "comparison", tuple(dict.fromkeys(_names(left) + _names(right))))
            else:
                factor = _numeric_factor(left)
        else:
            argument = self._arith()
            kind = "standardize" if token.text == "standardize" else "numeric"
            factor = Factor(f"{token.text}({_print(argument)})", kind, tuple(dict.fromkeys(_names(argument))))
        self._expect(")", "')'")
        self.depth -= 1
        return factor

    def _poly(self) -> Terms:
        token = self._next()
        self._enter(self._next())
        base = self._arith()
        self._expect(",", "',' and the degree: poly(x, 2)")
        degree = self._integer(1, MAX_POLY_DEGREE, "the degree of poly()")
        self._expect(")", "')' (poly() takes a column or expression and a degree; its powers are raw)")
        self.depth -= 1
        if degree > 1 and _has_power(base):
            raise FormulaNotAllowed("a power of a power is not allowed; write the powers out", token.position, token.text)
        return [(_numeric_factor(base),)] + [(_numeric_factor(_Power(base, str(k))),) for k in range(2, degree + 1)]

    # arithmetic, with Python's precedence so the canonical text means the same to Python

    def _arith(self) -> _Arith:
        left = self._term()
        while self._at("+", "-"):
            operator = self._next().text
            left = _Binary(operator, left, self._term())
        return left

    def _term(self) -> _Arith:
        left = self._unary()
        while self._at("*", "/"):
            operator = self._next().text
            left = _Binary(operator, left, self._unary())
        return left

    def _unary(self) -> _Arith:
        if self._at("-", "+"):
            token = self._next()
            self._enter(token)
            operand = self._unary()
            self.depth -= 1
            return _Negative(operand) if token.text == "-" else operand
        return self._arith_power()

    def _arith_power(self) -> _Arith:
        base = self._primary()
        if not self._at("**"):
            return base
        operator = self._next()
        if _has_power(base):
            raise FormulaNotAllowed("a power of a power is not allowed; write x ** 4", operator.position, "**")
        negative = self._at("-")
        if negative:
            self._next()
        token = self.peek
        if token.kind != "number":
            raise self._unexpected("the exponent must be a numeric constant")
        self._next()
        value = _number_value(token)
        if value > MAX_EXPONENT:
            raise FormulaNotAllowed(f"exponents are limited to {MAX_EXPONENT:g}", token.position, token.text)
        if self._at("**"):
            raise FormulaNotAllowed("a power of a power is not allowed; write x ** 4", self.peek.position, "**")
        return _Power(base, ("-" if negative else "") + _number_text(token))

    def _primary(self) -> _Arith:
        token = self._next()
        if token.kind == "number":
            _number_value(token)
            return _Number(_number_text(token))
        if token.kind == "op" and token.text == "(":
            self._enter(token)
            inner = self._arith()
            if self._at(*COMPARISONS):
                raise self._unexpected("comparisons are allowed only as the whole of I(a < b)")
            self._expect(")", "')'")
            self.depth -= 1
            return inner
        if token.kind == "name":
            if self._at("("):
                if token.text not in ARITHMETIC_CALLS:
                    raise self._refuse_call(token, ARITHMETIC_CALLS)
                self._enter(self._next())
                argument = self._arith()
                self._expect(")", "')'")
                self.depth -= 1
                return _Call(token.text, argument)
            return _Name(self._column(token))
        raise self._unexpected("expected a column name, a number or '('", token)


def _number_value(token: _Token) -> float:
    if len(token.text) > MAX_NUMBER_CHARS:
        raise FormulaNotAllowed(f"numbers are limited to {MAX_NUMBER_CHARS} characters", token.position, token.text)
    value = float(token.text)
    if not math.isfinite(value):
        raise FormulaNotAllowed("the number is too large", token.position, token.text)
    return value


def _number_text(token: _Token) -> str:
    """Canonical Python text of a numeric literal (no leading zeros, which Python refuses)."""
    text = token.text
    return str(int(text)) if text.isdigit() else repr(float(text))


def _numeric_factor(node: _Arith) -> Factor:
    """The factor of an arithmetic expression: a call stays as it is, anything else (a bare
    column too: I(x) is a number even where x is text) is wrapped in I()."""
    names = tuple(dict.fromkeys(_names(node)))
    if isinstance(node, _Call):
        return Factor(_print(node), "numeric", names)
    return Factor(f"I({_print(node)})", "numeric", names)


def _key(term: tuple[Factor, ...]) -> frozenset[str]:
    return frozenset(f.text for f in term)


def _union(left: Terms, right: Terms) -> Terms:
    seen = {_key(term) for term in left}
    out = list(left)
    for term in right:
        if _key(term) not in seen:
            seen.add(_key(term))
            out.append(term)
    return out


def _cross(left: Terms, right: Terms) -> Terms:
    """a:b for every pair of terms: the union of their factors, in order of appearance."""
    out: Terms = []
    for a in left:
        for b in right:
            merged = a + tuple(f for f in b if f.text not in {g.text for g in a})
            out = _union(out, [merged])
    return out


def _cross_with_mains(left: Terms, right: Terms) -> Terms:
    """a*b = a + b + a:b."""
    return _union(_union(left, right), _cross(left, right))


def _limited(terms: Terms, token: _Token) -> Terms:
    if len(terms) > MAX_TERMS:
        raise FormulaNotAllowed(f"the formula expands to more than {MAX_TERMS} terms", token.position, token.text)
    return terms


def parse_formula(text: str) -> ParsedFormula:
    """Parse a researcher's formula by the allow-list grammar; refuse anything else with
    `FormulaNotAllowed` (rule `formula_not_allowed`)."""
    if not isinstance(text, str):
        raise FormulaNotAllowed("a formula must be text")
    return _parse(text)


@lru_cache(maxsize=512)
def _parse(text: str) -> ParsedFormula:
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaNotAllowed(f"formulas are limited to {MAX_FORMULA_CHARS} characters", MAX_FORMULA_CHARS)
    if "~" not in text:
        raise FormulaNotAllowed("a formula needs a response and '~': 'y ~ x1 + x2'")
    try:
        return _Parser(text).formula()
    except RecursionError:
        raise FormulaNotAllowed(f"nested deeper than {MAX_DEPTH} levels") from None


def _elementwise(function: Any) -> Any:
    def apply(values: Any) -> Any:
        with np.errstate(all="ignore"):
            return function(np.asarray(values, dtype=np.float64))
    apply.__name__ = function.__name__
    return apply


SAFE_TRANSFORMS = {"log": _elementwise(np.log), "exp": _elementwise(np.exp), "sqrt": _elementwise(np.sqrt)}


def model_matrices(parsed: ParsedFormula, frame: pd.DataFrame) -> Any:
    """formulaic's model matrices (lhs, rhs) of the canonical formula over `frame`; the safe
    transforms are the only functions beside formulaic's C() and I()."""
    return _formulaic(parsed.canonical, frame)


def factor_matrix(factor: Factor, frame: pd.DataFrame) -> Any:
    """One factor's own columns, every level of a categorical included ('0 + factor')."""
    return _formulaic(f"0 + {factor.text}", frame)


def _formulaic(canonical: str, frame: pd.DataFrame) -> Any:
    from formulaic import model_matrix

    return model_matrix(canonical, frame, na_action="raise", context=dict(SAFE_TRANSFORMS))
