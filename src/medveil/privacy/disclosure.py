"""Statistical disclosure control applied by a node before anything leaves it.

What it protects: small counts (a cell of 1-4 patients can identify them), row values,
minima and maxima. Each rule has a stable name that refusals quote, so a researcher and a
steward can see exactly which rule stopped a query.
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
    max_broadcast_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest broadcast a task step may "
                                                                          "carry to this site")


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


def check_differencing(row_set: np.ndarray, earlier: list[np.ndarray], policy: DisclosurePolicy) -> None:
    """Refuse a row set that differs from an earlier one by 1..min_cell_count-1 rows.

    What it protects: two queries over row sets that differ by a handful of patients let their
    difference reveal those patients' values; sets that are equal or differ by at least
    min_cell_count rows are allowed.
    """
    for previous in earlier:
        if previous.shape != row_set.shape:
            continue
        differing = int(np.count_nonzero(previous != row_set))
        if 0 < differing < policy.min_cell_count:
            raise DisclosureRefused(
                "differencing", f"the rows used differ from an earlier query of this study by {differing} "
                                f"(fewer than {policy.min_cell_count}); their difference would identify them")


def releasable_levels(labels: pd.Series, name: str, policy: DisclosurePolicy) -> list[str]:
    """The levels of a categorical variable a site may name: those it holds at least
    min_cell_count times. A level rare here is never revealed by this site; too many levels
    (an identifier in disguise) are refused under `max_levels`."""
    counts = labels.value_counts()
    if len(counts) > policy.max_levels:
        raise DisclosureRefused("max_levels", f"variable {name!r} has {len(counts)} levels, more than {policy.max_levels}")
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
                          f"{int(n_parameters / policy.max_parameter_ratio) + 1} rows at a site; this site has {n_rows}")


def require_min_count(n: int, policy: DisclosurePolicy, what: str) -> None:
    """Refuse when fewer than min_cell_count rows would stand behind a released statistic."""
    if n < policy.min_cell_count:
        raise DisclosureRefused(
            "min_cell_count", f"{what} has {n} rows, fewer than the minimum of {policy.min_cell_count}"
        )


def clamp_cumulative_counts(cumulative: np.ndarray, n: int, policy: DisclosurePolicy) -> np.ndarray:
    """Hide the tails of an empirical CDF so no minimum or maximum can be read from it.

    Counts of rows at or below a threshold are released only where at least min_cell_count rows
    lie on each side; below that they read 0 (lower tail) or n (upper tail).
    """
    cumulative = np.asarray(cumulative, dtype=np.int64)
    clamped = np.where(cumulative < policy.min_cell_count, 0, cumulative)
    return np.where(n - cumulative < policy.min_cell_count, n, clamped)
