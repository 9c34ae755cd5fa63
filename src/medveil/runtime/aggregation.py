"""Plain cross-site summation, used when a study turns secure aggregation off.

Every cross-site sum goes either through `aggregate` (plain: the researcher and hub see each
site's arrays; the study and every result's provenance record that) or through the secure
protocol of runtime/secure_aggregation.py, where only the total can be decoded. Analyses
never know which. Integer (and boolean) arrays are summed as int64, exactly; anything else as
float64: a sum is never cast to a float it did not need.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class AggregationError(ValueError):
    """Sites' contributions cannot be summed (different names or shapes)."""


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
        arrays = [np.asarray(contributions[site][name]) for site in sites]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise AggregationError(f"array {name!r} has different shapes across sites: {sorted(shapes)}")
        if any(a.dtype.kind not in "biuf" for a in arrays):
            raise AggregationError(f"array {name!r} is not numeric at every site")
        dtype = np.int64 if all(a.dtype.kind in "biu" for a in arrays) else np.float64
        total[name] = np.sum([a.astype(dtype, copy=False) for a in arrays], axis=0, dtype=dtype)
    return total
