"""histogram: pooled counts of a numeric variable over bin edges agreed up front.

The researcher fixes the edges in the request (data-derived edges would leak the range).
Bins are half-open [left, right) except the last, which is closed, as numpy.histogram; values
outside the edges are counted in open-ended bins. Each site zeroes bins of 1 to
min_cell_count-1 rows; a bin any site suppressed is reported missing and marked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    Finished,
    NextRound,
    Params,
    Release,
    numeric_column,
    register,
)
from medveil.privacy.disclosure import DisclosurePolicy, suppress_small_counts
from medveil.privacy.dp import CountNoise


class HistogramParams(Params):
    variable: str
    edges: list[float] = Field(min_length=2, max_length=1001)

    @field_validator("edges")
    @classmethod
    def _increasing(cls, edges: list[float]) -> list[float]:
        if not all(np.isfinite(edges)) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError("edges must be finite and strictly increasing")
        return edges


@register
class Histogram(Analysis[HistogramParams]):
    name = "histogram"
    Params = HistogramParams
    supports_dp = True

    def variables(self, params: HistogramParams) -> list[str]:
        return [params.variable]

    def local(
        self, params: HistogramParams, round_no: int, broadcast: dict[str, Any], data: pd.DataFrame,
        policy: DisclosurePolicy, noise: CountNoise | None = None,
    ) -> Release:
        values = numeric_column(data, params.variable).to_numpy()
        edges = np.asarray(params.edges)
        inner, _ = np.histogram(values, bins=edges)
        counts = np.concatenate([[np.sum(values < edges[0])], inner, [np.sum(values > edges[-1])]])
        released, suppressed = suppress_small_counts(counts, policy, noise)
        return Release(
            sums={"counts": released.astype(np.float64), "suppressed": suppressed.astype(np.float64)},
            public={"rows": len(values)},
        )

    def global_step(
        self, params: HistogramParams, round_no: int, aggregated: Aggregated, state: dict[str, Any]
    ) -> NextRound | Finished:
        edges = [-np.inf, *params.edges, np.inf]
        suppressed = aggregated.sums["suppressed"] > 0
        table = pd.DataFrame(
            {
                "left": edges[:-1],
                "right": edges[1:],
                "count": pd.array(aggregated.sums["counts"].astype(np.int64), dtype="Int64"),
            }
        )
        table["count"] = table["count"].mask(suppressed)
        table["suppressed"] = suppressed
        return Finished(table)
