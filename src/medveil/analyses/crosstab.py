"""crosstab: pooled one- or two-way frequency table of categorical variables.

Round 0 agrees the levels: each site names only the levels it holds at least min_cell_count
times, so a level rare at one site is never revealed by that site; rows with other levels are
counted under "(other)". Round 1 sums the cell counts; each site zeroes its cells of 1 to
min_cell_count-1 rows, and every cell that any site suppressed is reported as missing and
marked in `attrs["suppressed"]` rather than as a misleading partial sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    Finished,
    NextRound,
    Params,
    Release,
    categorical_column,
    register,
    union_of_levels,
)
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    releasable_levels,
    suppress_small_counts,
)
from medveil.privacy.dp import CountNoise

OTHER = "(other)"


class CrosstabParams(Params):
    row: str
    col: str | None = None


def _variables(params: CrosstabParams) -> list[str]:
    return [params.row] + ([params.col] if params.col else [])


@register
class Crosstab(Analysis[CrosstabParams]):
    name = "crosstab"
    Params = CrosstabParams
    supports_dp = True

    def variables(self, params: CrosstabParams) -> list[str]:
        return _variables(params)

    def local(
        self, params: CrosstabParams, round_no: int, broadcast: dict[str, Any], data: pd.DataFrame,
        policy: DisclosurePolicy, noise: CountNoise | None = None,
    ) -> Release:
        names = _variables(params)
        complete = data[names].dropna()
        labels = {name: categorical_column(complete, name) for name in names}
        if round_no == 0:
            common = {name: releasable_levels(series, name, policy) for name, series in labels.items()}
            return Release(public={"rows": len(complete), "levels": common})
        levels = broadcast["levels"]
        codes = [_codes(labels[name], levels[name]) for name in names]
        shape = [len(levels[name]) + 1 for name in names]
        counts = np.zeros(shape, dtype=np.int64)
        np.add.at(counts, tuple(codes), 1)
        released, suppressed = suppress_small_counts(counts, policy, noise)
        return Release(sums={"counts": released.astype(np.float64), "suppressed": suppressed.astype(np.float64)})

    def global_step(
        self, params: CrosstabParams, round_no: int, aggregated: Aggregated, state: dict[str, Any]
    ) -> NextRound | Finished:
        if round_no == 0:
            levels = {name: union_of_levels({s: p["levels"] for s, p in aggregated.public.items()}, name)
                      for name in _variables(params)}
            return NextRound({"levels": levels}, {"levels": levels})
        counts = aggregated.sums["counts"].astype(np.int64)
        suppressed = aggregated.sums["suppressed"] > 0
        axes = [state["levels"][name] + [OTHER] for name in _variables(params)]
        if params.col is None:
            counts, suppressed = counts[:, None], suppressed[:, None]
            axes.append(["count"])
        keep_rows = [i for i, label in enumerate(axes[0]) if label != OTHER or counts[i].any() or suppressed[i].any()]
        keep_cols = [j for j, label in enumerate(axes[1]) if label != OTHER or counts[:, j].any() or suppressed[:, j].any()]
        counts, suppressed = counts[np.ix_(keep_rows, keep_cols)], suppressed[np.ix_(keep_rows, keep_cols)]
        index = pd.Index([axes[0][i] for i in keep_rows], name=params.row)
        columns = pd.Index([axes[1][j] for j in keep_cols], name=params.col)
        table = pd.DataFrame(counts, index=index, columns=columns).astype("Int64").mask(suppressed)
        table.attrs["suppressed"] = pd.DataFrame(suppressed, index=index, columns=columns)
        return Finished(table)


def _codes(series: pd.Series, levels: list[str]) -> np.ndarray:
    """Position of each value among the agreed levels; unknown values map to the "(other)" slot."""
    lookup = {label: i for i, label in enumerate(levels)}
    return series.map(lookup).fillna(len(levels)).to_numpy(dtype=np.int64)
