"""Statistical disclosure control applied by a node before anything leaves it.

What it protects: small counts (a cell of 1-4 patients can identify them), row values,
minima and maxima, against a researcher who chooses the query: a hidden cell cannot be
recovered from the table's margins or total (secondary suppression), and statistics over row
sets that differ by a few patients are refused (the differencing guard, one row set per
released statistic). Each rule has a stable name that refusals quote, so a researcher and a
steward can see exactly which rule stopped a query; no message carries a value computed from
the data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field


class DisclosurePolicy(BaseModel):
    """A site's disclosure rules, set in its YAML config; never weakened silently."""

    model_config = ConfigDict(extra="forbid")

    min_cell_count: int = Field(5, ge=1, description="smallest count released for any cell, bin or group")
    max_levels: int = Field(50, ge=2, description="most distinct levels a categorical variable may have")
    differencing_guard: bool = Field(True, description="refuse row sets differing from an earlier query's "
                                                       "by fewer than min_cell_count rows")
    max_parameter_ratio: float = Field(0.33, gt=0, le=1, description="a model may have at most this many "
                                                                     "parameters per row at a site (saturation)")
    min_time_unit: float = Field(0.0, ge=0, description="coarsest-needed time grid: survival analyses on a "
                                                         "finer grid are refused (e.g. 7 for weeks)")
    dp_budget_rho: float = Field(1.0, gt=0, description="zCDP budget (rho) each researcher may spend at this "
                                                         "site, across all of their studies")
    variant_query_budget: int = Field(20, ge=0, description="beacon queries one researcher may ever send this "
                                                             "site, across all of their studies (docs/pir.md: "
                                                             "why 20)")
    max_leverage: float = Field(0.9, gt=0, le=1, description="largest hat value one row may have in a model's "
                                                              "design at this site (one row determining a "
                                                              "coefficient reads its response)")
    secagg_dropouts: bool = Field(True, description="reveal a dropped peer's pairwise masks of one step so a "
                                                    "secure sum survives its dropout (off: a missing site fails "
                                                    "the round)")
    max_broadcast_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest broadcast a task step may "
                                                                          "carry to this site")
    max_scratch_bytes: int = Field(1024**3, gt=0, description="most bytes of working memory one task may keep "
                                                              "on disk at this site (a value beyond it is "
                                                              "recomputed each round instead)")


class DisclosureRefused(Exception):
    """A release would break a named disclosure rule."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"[{rule}] {message}")
        self.rule = rule
        self.detail = message


def suppress_small_counts(counts: np.ndarray, policy: DisclosurePolicy,
                          noise: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Zero every count in 1..min_cell_count-1; return (released counts, suppressed mask).

    Zero cells are released as zero: an empty cell identifies nobody. With `noise` (differential
    privacy), the noisy counts are what is suppressed and released.
    """
    counts = np.asarray(noise(counts) if noise is not None else counts, dtype=np.int64)
    suppressed = (counts > 0) & (counts < policy.min_cell_count)
    return np.where(suppressed, 0, counts), suppressed


def secondary_suppression(counts: np.ndarray, hidden: np.ndarray, policy: DisclosurePolicy) -> np.ndarray:
    """Hide more cells so no hidden cell can be recovered from a line total; return the new mask.

    A line is a row or column of a table (any axis of an n-way table; a one-way table is one
    line, its total). A researcher may know every line's total (from a coarser query, or the
    rows a site used), so in every line of two or more cells that holds a hidden cell, the
    hidden cells must be at least two and together hold at least min_cell_count rows: the
    classic rule (hide the smallest other nonzero cell of such a line) applied until no line
    needs more, then a line total minus the cells shown is a sum of several cells, never a
    small count. A line whose other cells are all zero gets a zero cell hidden beside its one
    hidden cell. Terminates: every pass hides a new cell.
    """
    counts = np.asarray(counts, dtype=np.int64)
    hidden = np.array(hidden, dtype=bool, copy=True)
    if counts.shape != hidden.shape:
        raise ValueError("counts and the hidden mask must have the same shape")
    changed = True
    while changed:
        changed = False
        for axis in range(counts.ndim):
            if counts.shape[axis] < 2:
                continue
            lines_counts = np.moveaxis(counts, axis, -1)
            lines_hidden = np.moveaxis(hidden, axis, -1)  # a view: writing to it writes to `hidden`
            for index in np.ndindex(lines_counts.shape[:-1]):
                line, mask = lines_counts[index], lines_hidden[index]
                while _line_needs_more(line, mask, policy.min_cell_count):
                    mask[_next_cell_to_hide(line, mask)] = True
                    changed = True
    return hidden


def _line_needs_more(line: np.ndarray, mask: np.ndarray, min_count: int) -> bool:
    n_hidden = int(mask.sum())
    if n_hidden == 0 or n_hidden == len(line):
        return False
    if n_hidden == 1:
        return True
    return int(line[mask].sum()) < min_count and bool(np.any(line[~mask] > 0))


def _next_cell_to_hide(line: np.ndarray, mask: np.ndarray) -> int:
    """The smallest shown nonzero cell of a line, else its first shown (zero) cell."""
    candidates = np.flatnonzero(~mask & (line > 0))
    if len(candidates):
        return int(candidates[np.argmin(line[candidates])])
    return int(np.flatnonzero(~mask)[0])


def suppress_table(counts: np.ndarray, policy: DisclosurePolicy,
                   noise: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Small cells suppressed and then, for exact counts, secondary suppression; returns
    (released counts, hidden mask), hidden cells released as zero.

    Under differential privacy (`noise`) the released counts are noisy, so no hidden cell can be
    recovered exactly by subtraction: only the noisy small cells are hidden (post-processing)."""
    released, hidden = suppress_small_counts(counts, policy, noise)
    if noise is not None:
        return released, hidden
    exact = np.asarray(counts, dtype=np.int64)
    hidden = secondary_suppression(exact, hidden, policy)
    return np.where(hidden, 0, exact), hidden


def check_differencing(row_set: np.ndarray, earlier: list[np.ndarray], policy: DisclosurePolicy) -> None:
    """Refuse a row set that differs from an earlier one by 1..min_cell_count-1 rows.

    What it protects: two queries over row sets that differ by a handful of patients let their
    difference reveal those patients' values; sets that are equal or differ by at least
    min_cell_count rows are allowed. For many sets at once use `check_differencing_many`.
    """
    check_differencing_many([row_set], earlier, policy)


def check_differencing_many(row_sets: list[np.ndarray], earlier: list[np.ndarray], policy: DisclosurePolicy) -> None:
    """`check_differencing` for every new row set against every earlier one, vectorised.

    Sets of fewer than min_cell_count rows are left out: no statistic resting on so few rows is
    ever released (it is hidden or refused), so a difference with one reveals nothing. Two sets
    of sizes a and b differ by at least |a - b| rows, so only earlier sets whose size is within
    min_cell_count-1 of a new one's are compared, bit-packed, with popcounts."""
    if not row_sets or not earlier:
        return
    near = policy.min_cell_count - 1
    by_length: dict[int, list[np.ndarray]] = {}
    for previous in earlier:
        previous = np.asarray(previous, dtype=bool)
        if previous.ndim == 1 and np.count_nonzero(previous) >= policy.min_cell_count:
            by_length.setdefault(len(previous), []).append(previous)
    stacks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for row_set in row_sets:
        row_set = np.asarray(row_set, dtype=bool)
        if row_set.ndim != 1 or len(row_set) not in by_length or np.count_nonzero(row_set) < policy.min_cell_count:
            continue
        if len(row_set) not in stacks:
            stacked = np.stack(by_length[len(row_set)])
            sizes = np.count_nonzero(stacked, axis=1)
            order = np.argsort(sizes, kind="stable")
            stacks[len(row_set)] = (sizes[order], np.packbits(stacked[order], axis=1))
        sizes, packed = stacks[len(row_set)]
        size = int(np.count_nonzero(row_set))
        lo, hi = np.searchsorted(sizes, size - near, "left"), np.searchsorted(sizes, size + near, "right")
        if lo == hi:
            continue
        differing = np.bitwise_count(packed[lo:hi] ^ np.packbits(row_set)[None, :]).sum(axis=1, dtype=np.int64)
        if np.any((differing > 0) & (differing < policy.min_cell_count)):
            raise DisclosureRefused(
                "differencing", f"the rows behind a statistic differ from those of an earlier query of this study "
                                f"by fewer than {policy.min_cell_count}; their difference would identify them")


def releasable_levels(labels: pd.Series, name: str, policy: DisclosurePolicy) -> list[str]:
    """The levels of a categorical variable a site may name: those it holds at least
    min_cell_count times. A level rare here is never revealed by this site; too many levels
    (an identifier in disguise) are refused under `max_levels`."""
    counts = labels.value_counts()
    if len(counts) > policy.max_levels:
        raise DisclosureRefused("max_levels", f"variable {name!r} has more than {policy.max_levels} levels")
    return sorted(str(level) for level in counts[counts >= policy.min_cell_count].index)


def require_time_unit(time_unit: float, policy: DisclosurePolicy) -> None:
    """Refuse a survival time grid finer than the site allows (its policy may coarsen time)."""
    if time_unit < policy.min_time_unit:
        raise DisclosureRefused("time_resolution", f"this site releases times no finer than "
                                                   f"{policy.min_time_unit:g}; asked {time_unit:g}")


def require_not_saturated(n_rows: int, n_parameters: int, policy: DisclosurePolicy) -> None:
    """Refuse a model fit whose parameters approach the site's rows.

    What it protects: a saturated model reproduces its rows (with as many parameters as rows the
    fitted values are the data); DataSHIELD's nfilter.glm guards the same way.
    """
    if n_parameters > policy.max_parameter_ratio * n_rows:
        raise DisclosureRefused(
            "saturation", f"a model with {n_parameters} parameters needs at least "
                          f"{int(n_parameters / policy.max_parameter_ratio) + 1} rows at a site; this site has fewer")


def public_count(n: int, policy: DisclosurePolicy) -> int | None:
    """A per-site count released as a public fact (e.g. rows dropped for missing values): as it is
    when 0 or at least min_cell_count, else withheld (None), like any small cell."""
    return int(n) if n == 0 or n >= policy.min_cell_count else None


def require_no_dominant_row(design: np.ndarray, weights: np.ndarray, policy: DisclosurePolicy) -> None:
    """Refuse a model design in which one row has leverage above `max_leverage`.

    What it protects: a column that is (nearly) zero but for one row (a smooth spike such as
    exp(-100 (age - 97)^2), or 1/((age - 97)^2 + eps)) makes that row's fitted value its own
    response; no comparison or level is needed, so indicator isolation cannot see it. A row's
    hat value h_i = x_i' (X'WX)^+ x_i w_i is near 1 then; it is taken from the eigenvectors of
    the small Gram matrix (six times faster than an SVD of the design, and precise enough for a
    threshold), over its range, so a column that is zero at this site does no harm."""
    scaled = design * np.sqrt(weights)[:, None]
    if scaled.size == 0:
        return
    values, vectors = np.linalg.eigh(scaled.T @ scaled)
    kept = values > values.max() * 1e-10
    whitened = scaled @ (vectors[:, kept] / np.sqrt(values[kept]))
    leverage = np.einsum("ij,ij->i", whitened, whitened)
    if leverage.max() > policy.max_leverage:
        raise DisclosureRefused("leverage", f"one row would determine part of the model on its own (leverage "
                                            f"above {policy.max_leverage:g}): a term singles out a patient")


def require_spread_weights(weights: np.ndarray, policy: DisclosurePolicy) -> None:
    """Refuse a fit round whose working weights rest on fewer than min_cell_count rows in effect
    ((sum w)^2 / sum w^2), as chosen coefficients can make them (a steep slope puts all weight
    on the rows at one age)."""
    total, squares = float(np.sum(weights)), float(np.sum(np.square(weights)))
    if squares > 0 and total * total < policy.min_cell_count * squares:
        raise DisclosureRefused("weight_dominance", f"the coefficients of this round put the model's weight on "
                                                    f"fewer than {policy.min_cell_count} rows at this site")


def require_min_count(n: int, policy: DisclosurePolicy, what: str) -> None:
    """Refuse when fewer than min_cell_count rows would stand behind a released statistic."""
    if n < policy.min_cell_count:
        raise DisclosureRefused(
            "min_cell_count", f"{what} has fewer than the minimum of {policy.min_cell_count} rows"
        )


def clamp_cumulative_counts(cumulative: np.ndarray, n: int, policy: DisclosurePolicy) -> np.ndarray:
    """Hide the tails of an empirical CDF so no minimum or maximum can be read from it.

    Counts of rows at or below a threshold are released only where at least min_cell_count rows
    lie on each side; below that they read 0 (lower tail) or n (upper tail).
    """
    cumulative = np.asarray(cumulative, dtype=np.int64)
    clamped = np.where(cumulative < policy.min_cell_count, 0, cumulative)
    return np.where(n - cumulative < policy.min_cell_count, n, clamped)


def coarsen_cumulative_counts(cumulative: np.ndarray, n: int, policy: DisclosurePolicy) -> np.ndarray:
    """An empirical CDF on a grid that shows no exact count and no step of fewer than
    min_cell_count rows.

    What it protects: on a grid fine enough, a step of one count between two grid points would
    place one patient's value there, and an exact count could be differenced against a histogram
    bin edge near it. Tails are clamped (`clamp_cumulative_counts`); inside, a count is rounded
    to a bin of min_cell_count consecutive counts [j*m, j*m + m - 1] (the last bin runs on to
    n - m, so none is shorter) and released as that bin's midpoint. A released value tells only
    which bin the count lies in, as a hidden cell tells only that it holds 1 to m-1 rows; every
    released step is 0 or at least min_cell_count; every value is within min_cell_count-1 of the
    true one (about half that on average, unbiased), so pooled quantiles stay close.
    """
    cumulative = np.asarray(cumulative, dtype=np.int64)
    m = policy.min_cell_count
    released = clamp_cumulative_counts(cumulative, n, policy).astype(np.float64)
    interior = (cumulative >= m) & (n - cumulative >= m)
    if not interior.any():
        return released
    top = n - m  # the largest interior count
    last_bin = max(1, (top - m + 1) // m)  # bins j = 1..last_bin; the last one absorbs a short remainder
    j = np.minimum(cumulative[interior] // m, last_bin)
    low = j * m
    high = np.where(j == last_bin, top, low + m - 1)
    released[interior] = (low + high) / 2
    return released
