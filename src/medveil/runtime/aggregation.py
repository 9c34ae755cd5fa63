"""The `aggregate` seam: every cross-site sum in every analysis goes through here.

Plain summation for now: the party that calls `combine` sees each site's arrays. Secure
aggregation replaces what stands behind `mask` (at the node) and `combine` (at the
coordinator) so that only the sum can be learnt; analyses do not change.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class AggregationError(ValueError):
    """Sites' contributions cannot be summed (different names or shapes)."""


class PlainAggregation:
    """Sums contributions in the clear; `secure` is reported in every result's provenance."""

    secure = False

    def mask(self, sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.asarray(value, dtype=np.float64) for name, value in sums.items()}

    def combine(self, contributions: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return aggregate(contributions)


def aggregate(contributions: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise sum of each named array over sites, after checking they line up."""
    if not contributions:
        return {}
    sites = sorted(contributions)
    names = set(contributions[sites[0]])
    for site in sites[1:]:
        if set(contributions[site]) != names:
            raise AggregationError(f"site {site!r} sent arrays {sorted(contributions[site])}, expected {sorted(names)}")
    total: dict[str, np.ndarray] = {}
    for name in sorted(names):
        arrays = [np.asarray(contributions[site][name], dtype=np.float64) for site in sites]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise AggregationError(f"array {name!r} has different shapes across sites: {sorted(shapes)}")
        total[name] = np.sum(arrays, axis=0)
    return total
