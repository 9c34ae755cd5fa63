"""crosstab: pooled one- or two-way frequency table of categorical variables.

Round 0 agrees the levels: each site names only the levels it holds at least min_cell_count
times, so a level rare at one site is never revealed by that site; rows with other levels are
counted under "(other)". The researcher may instead fix the levels in the request (`levels`),
as differential privacy requires: a site's level list is exact, so under DP it never leaves.
Round 1 checks the broadcast levels (this site's variables only, each list sorted, distinct,
bounded, holding every level this site named or exactly the requested ones) and sums the cell
counts; each site hides its cells of 1 to min_cell_count-1 rows and then more cells
(secondary suppression: no row or column with one hidden cell, hidden cells of a line holding
at least min_cell_count rows), so a hidden cell is not any margin or total minus the cells
shown. Every cell that any site hid is reported as missing and marked in
`attrs["suppressed"]` rather than as a misleading partial sum. Each released cell's rows are one
row set of the differencing guard, so shifted levels or recoded variables are caught.
What each party learns: the researcher the pooled cell counts (hidden cells' partial sums
included), each site's named levels and `rows`; under DP noisy counts only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    BroadcastRefused,
    Finished,
    NextRound,
    Params,
    Release,
    SiteContext,
    categorical_column,
    register,
    released_in,
    union_of_levels,
)
from medveil.privacy.disclosure import (
    DisclosurePolicy,
    DisclosureRefused,
    releasable_levels,
    require_min_count,
    suppress_table,
)

OTHER = "(other)"
MAX_LEVELS = 1000  # most levels of one variable a request or broadcast may name
MAX_LABEL_LENGTH = 256


class CrosstabParams(Params):
    row: str
    col: str | None = None
    levels: dict[str, list[str]] | None = Field(None, description="fixed levels per variable instead of agreeing "
                                                                  "them from the data (required under DP)")

    @model_validator(mode="after")
    def _levels_of_these_variables(self) -> "CrosstabParams":
        if self.col is not None and self.col == self.row:
            raise ValueError("row and col must differ")
        if self.levels is not None:
            if set(self.levels) != set(_variables(self)):
                raise ValueError("levels must name exactly the table's variables")
            for labels in self.levels.values():
                _check_labels(labels, ValueError)
        return self


def _variables(params: CrosstabParams) -> list[str]:
    return [params.row] + ([params.col] if params.col else [])


def _check_labels(labels: Any, error: Any) -> None:
    """Sorted, distinct, bounded strings: what a level list must be on the wire."""
    if not isinstance(labels, list) or len(labels) > MAX_LEVELS:
        raise error(f"a level list must be a list of at most {MAX_LEVELS} labels")
    if not all(isinstance(label, str) and 0 < len(label) <= MAX_LABEL_LENGTH and label != OTHER for label in labels):
        raise error(f"levels must be non-empty strings of at most {MAX_LABEL_LENGTH} characters, not {OTHER!r}")
    if any(b <= a for a, b in zip(labels, labels[1:])):
        raise error("levels must be sorted and distinct")


@register
class Crosstab(Analysis[CrosstabParams]):
    name = "crosstab"
    Params = CrosstabParams
    supports_dp = True

    def variables(self, params: CrosstabParams) -> list[str]:
        return _variables(params)

    def check_broadcast(self, params: CrosstabParams, round_no: int, broadcast: dict[str, Any],
                        memory: dict[str, Any]) -> None:
        """Round 1 carries the agreed levels of exactly this table's variables, holding every level
        this site named in round 0 (or exactly the requested levels); nothing else is accepted."""
        if round_no == 0:
            return super().check_broadcast(params, round_no, broadcast, memory)
        if round_no > 1:
            raise BroadcastRefused("round_order", "crosstab has two rounds")
        if set(broadcast) != {"levels"}:
            raise BroadcastRefused("unexpected_broadcast", "round 1 of crosstab carries `levels` only")
        levels = broadcast["levels"]
        if not isinstance(levels, dict) or set(levels) != set(_variables(params)):
            raise BroadcastRefused("broadcast_malformed", "the levels must name exactly the table's variables")
        for labels in levels.values():
            _check_labels(labels, lambda message: BroadcastRefused("broadcast_malformed", message))
        if params.levels is not None:
            if levels != params.levels:
                raise BroadcastRefused("broadcast_not_released", "the levels differ from those requested")
            return
        named = released_in(memory, 0).get("levels")
        if not isinstance(named, dict):
            raise BroadcastRefused("broadcast_not_released", "this site named no levels in round 0 of this task")
        for name, labels in levels.items():
            if not set(named.get(name, [])) <= set(labels):
                raise BroadcastRefused("broadcast_not_released", f"the levels of {name!r} leave out levels this "
                                                                 "site named")

    def row_sets(self, params: CrosstabParams, data: pd.DataFrame, round_no: int = 0,
                 broadcast: dict[str, Any] | None = None, policy: DisclosurePolicy | None = None
                 ) -> list[np.ndarray]:
        """Round 0: the complete rows (the site's `rows`); round 1: the rows of each cell released
        nonzero under the site's `policy` (the default policy where the caller passes none)."""
        names = _variables(params)
        complete = data[names].notna().all(axis=1).to_numpy()
        if round_no == 0:
            return [complete]
        if round_no != 1 or not broadcast:
            return []
        cell, counts = _cells(data, names, broadcast["levels"])
        shown = (counts > 0) & ~suppress_table(counts, policy or DisclosurePolicy())[1]
        flat = np.ravel_multi_index(np.nonzero(shown), counts.shape) if shown.any() else np.array([], np.int64)
        return [cell == index for index in flat]

    def local(self, params: CrosstabParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        data, policy, noise = context.data, context.policy, context.noise
        names = _variables(params)
        if round_no == 0:
            if params.levels is not None and any(len(labels) > policy.max_levels for labels in params.levels.values()):
                raise DisclosureRefused("max_levels", f"the request names more than {policy.max_levels} levels "
                                                      "of a variable")
            if noise is not None:
                if params.levels is None:
                    raise DisclosureRefused("dp_exact_release", "under differential privacy a crosstab's levels "
                                                                "must be given in the request: a site's level list "
                                                                "is exact")
                return Release()
            complete = data[names].dropna()
            labels = {name: categorical_column(complete, name) for name in names}
            named = {name: releasable_levels(series, name, policy) for name, series in labels.items()}
            if len(complete):
                require_min_count(len(complete), policy, "this site's table")
            public: dict[str, Any] = {"rows": len(complete)}
            if params.levels is None:
                public["levels"] = named
            return Release(public=public)
        _, counts = _cells(data, names, broadcast["levels"])
        released, suppressed = suppress_table(counts, policy, noise)
        return Release(sums={"counts": released.astype(np.float64), "suppressed": suppressed.astype(np.float64)})

    def global_step(
        self, params: CrosstabParams, round_no: int, aggregated: Aggregated, state: dict[str, Any]
    ) -> NextRound | Finished:
        if round_no == 0:
            levels = params.levels or {
                name: union_of_levels({s: p["levels"] for s, p in aggregated.public.items()}, name)
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


def _cells(data: pd.DataFrame, names: list[str], levels: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cell (flat index; -1 where a variable is missing) and the table of cell counts."""
    complete = data[names].notna().all(axis=1).to_numpy()
    shape = tuple(len(levels[name]) + 1 for name in names)
    codes = [_codes(categorical_column(data.loc[complete], name), levels[name]) for name in names]
    cell = np.full(len(data), -1, dtype=np.int64)
    if complete.any():
        cell[complete] = np.ravel_multi_index(tuple(codes), shape)
    counts = np.bincount(cell[complete], minlength=int(np.prod(shape))).reshape(shape)
    return cell, counts


def _codes(series: pd.Series, levels: list[str]) -> np.ndarray:
    """Position of each value among the agreed levels; unknown values map to the "(other)" slot."""
    lookup = {label: i for i, label in enumerate(levels)}
    return series.map(lookup).fillna(len(levels)).to_numpy(dtype=np.int64)
