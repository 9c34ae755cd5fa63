"""histogram: pooled counts of a numeric variable over bin edges agreed up front.

The researcher fixes the edges in the request (data-derived edges would leak the range).
Bins are half-open [left, right) except the last, which is closed, as numpy.histogram; values
outside the edges are counted in open-ended bins. Each site hides bins of 1 to
min_cell_count-1 rows and then, since the researcher may know its total (the `rows` it used,
or a coarser histogram), more bins (secondary suppression: never one hidden bin, and the
hidden bins together hold at least min_cell_count rows), so no hidden bin is the total minus
the bins shown; a bin any site hid is reported missing and marked. A site with 1 to
min_cell_count-1 values refuses. Each released bin's rows are one row set of the differencing
guard, so two histograms whose edges differ by a few patients' values are refused.
What each party learns: the researcher the pooled bin counts (hidden bins' partial sums
included) and each site's `rows`; under differential privacy noisy counts only, no `rows`.
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
    SiteContext,
    numeric_column,
    register,
)
from medveil.privacy.disclosure import DisclosurePolicy, require_min_count, suppress_table


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

    def row_sets(self, params: HistogramParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """All the site's rows (its `rows`) and the rows of each bin it releases nonzero under the
        site's `policy` (the default policy where the caller passes none)."""
        if round_no != 0:
            return []
        codes = _bin_codes(data, params)
        counts = np.bincount(codes[codes >= 0], minlength=len(params.edges) + 1)
        shown = (counts > 0) & ~suppress_table(counts, policy or DisclosurePolicy())[1]
        return [codes >= 0, *(codes == b for b in np.flatnonzero(shown))]

    def local(self, params: HistogramParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        data, policy, noise = context.data, context.policy, context.noise
        codes = _bin_codes(data, params)
        n = int(np.count_nonzero(codes >= 0))
        counts = np.bincount(codes[codes >= 0], minlength=len(params.edges) + 1)
        if noise is None and n:
            require_min_count(n, policy, "this site's histogram")
        released, suppressed = suppress_table(counts, policy, noise)
        return Release(
            sums={"counts": released.astype(np.float64), "suppressed": suppressed.astype(np.float64)},
            public={} if noise is not None else {"rows": n},
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


def _bin_codes(data: pd.DataFrame, params: HistogramParams) -> np.ndarray:
    """Each row's bin: 0 below the first edge, 1..len(edges)-1 inside (the last bin closed, as
    numpy.histogram), len(edges) above the last edge; -1 where the value is missing."""
    series = data[params.variable]
    present = series.notna().to_numpy()
    values = numeric_column(data, params.variable).to_numpy()
    edges = np.asarray(params.edges, dtype=np.float64)
    inside = np.searchsorted(edges, values, side="right")
    inside[values == edges[-1]] = len(edges) - 1
    codes = np.full(len(series), -1, dtype=np.int64)
    codes[present] = inside
    return codes
