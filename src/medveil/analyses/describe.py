"""describe: pooled n, mean, standard deviation and protected quantiles of numeric variables.

Round 0 sums n and the sum; round 1 sums squared deviations from the pooled mean (two-pass,
as pandas, so sd matches to rounding); round 2 sums empirical-CDF counts on a grid around the
mean and quantiles are interpolated on that grid. No minimum, maximum or row value is
released. A site with fewer than min_cell_count values of a variable sits that variable out
and says so (which tells only that it holds fewer than min_cell_count values, as a hidden cell
does). A site releases its `rows` only when no variable lacks 1 to min_cell_count-1 of them.

The node checks the broadcasts: round 1's `mean` (finite, one per variable) is pinned, and
round 2's grid must be GRID_POINTS evenly spaced points centred on it. The researcher chooses
the spacing, so the CDF is coarsened at each site: tails clamped, and inside each count is
rounded to a bin of min_cell_count counts (`coarsen_cumulative_counts`), so no released step is
one patient and no count is exact (nothing to difference against a histogram edge); each
site's released CDF is within min_cell_count-1 rows of its true one. Each variable's rows are
a row set of the differencing guard, so a describe on a subset a few rows smaller is refused.
What each party learns: the researcher pooled n, sums, squared deviations and the coarsened
pooled CDF, and each site's `rows` and excluded variables.
"""

from __future__ import annotations

from typing import Any

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
    finite_array,
    numeric_column,
    register,
)
from medveil.privacy.disclosure import DisclosurePolicy, coarsen_cumulative_counts

GRID_POINTS = 401
GRID_HALF_WIDTH_SD = 4.0


class DescribeParams(Params):
    variables: list[str] = Field(min_length=1, max_length=1000)
    quantiles: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 0.75, 0.95], max_length=1000)

    @field_validator("variables")
    @classmethod
    def _distinct(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("variables must be distinct")
        return values

    @field_validator("quantiles")
    @classmethod
    def _in_unit_interval(cls, values: list[float]) -> list[float]:
        if any(not 0 < q < 1 for q in values):
            raise ValueError("quantiles must lie strictly between 0 and 1")
        return values


def quantile_label(q: float) -> str:
    return f"{q * 100:g}%"


@register
class Describe(Analysis[DescribeParams]):
    name = "describe"
    Params = DescribeParams

    def variables(self, params: DescribeParams) -> list[str]:
        return list(params.variables)

    def check_broadcast(self, params: DescribeParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Round 1: `mean` only, finite, one per variable, pinned for round 2. Round 2: `grid` only,
        GRID_POINTS evenly spaced increasing points per variable centred on the pinned mean."""
        k = len(params.variables)
        if round_no == 0:
            return super().check_broadcast(params, round_no, broadcast, memory)
        if round_no > 2:
            raise BroadcastRefused("round_order", "describe has three rounds")
        key = "mean" if round_no == 1 else "grid"
        if set(broadcast) != {key}:
            raise BroadcastRefused("unexpected_broadcast", f"round {round_no} of describe carries `{key}` only")
        value = finite_array(broadcast[key], (k,) if round_no == 1 else (k, GRID_POINTS))
        if round_no == 1:
            memory["describe_mean"] = value
            return
        mean = memory.get("describe_mean")
        if mean is None:
            raise BroadcastRefused("broadcast_not_released", "no mean was pinned in round 1 of this task")
        mean = np.asarray(mean, dtype=np.float64)
        spacing = (value[:, -1] - value[:, 0]) / (GRID_POINTS - 1)
        expected = mean[:, None] + spacing[:, None] * (np.arange(GRID_POINTS) - (GRID_POINTS - 1) / 2)[None, :]
        tolerance = 1e-9 * (np.abs(mean) + spacing * GRID_POINTS)[:, None]
        if not (np.all(spacing > 0) and np.all(np.abs(value - expected) <= tolerance)):
            raise BroadcastRefused("broadcast_not_released", f"the grid must be {GRID_POINTS} evenly spaced "
                                                             "increasing points centred on round 1's mean")

    def row_sets(self, params: DescribeParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """Round 0: each variable's rows, and all rows (behind `rows`). Round 1's sums rest on the
        same rows; round 2's CDF holds no exact count (`coarsen_cumulative_counts`)."""
        if round_no != 0:
            return []
        return [np.ones(len(data), dtype=bool), *(data[name].notna().to_numpy() for name in params.variables)]

    def local(self, params: DescribeParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        data, policy = context.data, context.policy
        columns = {name: numeric_column(data, name).to_numpy() for name in params.variables}
        included = {name: len(values) >= policy.min_cell_count for name, values in columns.items()}
        k = len(params.variables)
        if round_no == 0:
            n = np.array([len(v) if included[c] else 0 for c, v in columns.items()], dtype=np.float64)
            total = np.array([v.sum() if included[c] else 0.0 for c, v in columns.items()])
            public: dict[str, Any] = {"min_cell_count": policy.min_cell_count,
                                      "excluded_variables": [c for c, ok in included.items() if not ok]}
            missing = [len(data) - len(v) for c, v in columns.items() if included[c]]
            if len(data) >= policy.min_cell_count and all(d == 0 or d >= policy.min_cell_count for d in missing):
                public["rows"] = len(data)
            return Release(sums={"n": n, "sum": total}, public=public)
        if round_no == 1:
            mean = np.asarray(broadcast["mean"], dtype=np.float64)
            ss = np.zeros(k)
            for i, (c, v) in enumerate(columns.items()):
                if included[c]:
                    ss[i] = np.sum((v - mean[i]) ** 2)
            return Release(sums={"ssd": ss})
        grid = np.asarray(broadcast["grid"], dtype=np.float64)
        cumulative = np.zeros((k, grid.shape[1]))
        for i, (c, v) in enumerate(columns.items()):
            if included[c]:
                counts = np.searchsorted(np.sort(v), grid[i], side="right")
                cumulative[i] = coarsen_cumulative_counts(counts, len(v), policy)
        return Release(sums={"cdf": cumulative})

    def global_step(
        self, params: DescribeParams, round_no: int, aggregated: Aggregated, state: dict[str, Any]
    ) -> NextRound | Finished:
        sums = aggregated.sums
        if round_no == 0:
            n = sums["n"]
            if np.any(n < 2):
                missing = [v for v, count in zip(params.variables, n) if count < 2]
                raise AnalysisError(f"too few values across sites for {missing}")
            mean = sums["sum"] / n
            min_count = max(p["min_cell_count"] for p in aggregated.public.values())
            return NextRound({"mean": mean}, {"n": n, "mean": mean, "min_count": min_count})
        if round_no == 1:
            sd = np.sqrt(sums["ssd"] / (state["n"] - 1))
            offsets = np.linspace(-GRID_HALF_WIDTH_SD, GRID_HALF_WIDTH_SD, GRID_POINTS)
            grid = state["mean"][:, None] + np.outer(np.where(sd > 0, sd, 1.0), offsets)
            return NextRound({"grid": grid}, dict(state, sd=sd, grid=grid))
        return Finished(self._table(params, state, sums["cdf"]))

    def _table(self, params: DescribeParams, state: dict[str, Any], cdf: np.ndarray) -> pd.DataFrame:
        n, mean, sd, grid, min_count = state["n"], state["mean"], state["sd"], state["grid"], state["min_count"]
        table = pd.DataFrame(
            {"n": n.astype(np.int64), "mean": mean, "sd": sd}, index=pd.Index(params.variables, name="variable")
        )
        for q in params.quantiles:
            table[quantile_label(q)] = [
                _grid_quantile(grid[i], cdf[i], n[i], q, min_count) for i in range(len(params.variables))
            ]
        return table


def _grid_quantile(grid: np.ndarray, cdf: np.ndarray, n: float, q: float, min_count: int) -> float:
    """Quantile read off a pooled empirical CDF on a grid; NaN where a tail is too thin."""
    target = q * n
    if target < min_count or n - target < min_count:
        return float("nan")
    j = int(np.searchsorted(cdf, target, side="left"))
    if j == 0 or j >= len(grid):
        return float("nan")
    lo, hi = cdf[j - 1], cdf[j]
    return float(grid[j - 1] + (grid[j] - grid[j - 1]) * (target - lo) / (hi - lo))
