"""Splitting one table into simulated sites for federated-learning experiments: uniformly at random
(IID) or label-skewed by a Dirichlet draw, the usual non-IID benchmark (Hsu et al. 2019). Every
row lands in exactly one part; parts keep the frame's index and row order. Pure numpy/pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd

MAX_DRAWS = 1000


def _check(frame: pd.DataFrame, sites: int) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError("frame must be a pandas DataFrame")
    if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= len(frame):
        raise ValueError(f"sites must be an int in 1..{len(frame)} (the rows), got {sites!r}")


def iid(frame: pd.DataFrame, sites: int, seed: int) -> list[pd.DataFrame]:
    """`sites` parts of near-equal size (differing by at most one row), rows drawn at random."""
    _check(frame, sites)
    order = np.random.default_rng(seed).permutation(len(frame))
    return [frame.iloc[np.sort(part)] for part in np.array_split(order, sites)]


def dirichlet(frame: pd.DataFrame, label: str, sites: int, alpha: float, seed: int,
              *, min_rows: int = 1) -> list[pd.DataFrame]:
    """`sites` label-skewed parts: each label value's rows are shared out in proportions drawn
    from Dirichlet(alpha, ..., alpha); small alpha gives each site few labels, large alpha nears IID.

    Draws again (up to 1000 times) until every part has at least `min_rows` rows, else ValueError.
    """
    _check(frame, sites)
    if label not in frame.columns:
        raise KeyError(f"no column {label!r}")
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    codes, _ = pd.factorize(frame[label], use_na_sentinel=False)
    by_label = [np.flatnonzero(codes == code) for code in range(codes.max() + 1)]
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        assignment = np.empty(len(frame), dtype=np.int64)
        for rows in by_label:
            shares = rng.dirichlet(np.full(sites, float(alpha)))
            cuts = np.round(np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            for site, part in enumerate(np.split(rng.permutation(rows), cuts)):
                assignment[part] = site
        sizes = np.bincount(assignment, minlength=sites)
        if sizes.min() >= min_rows:
            return [frame.iloc[np.flatnonzero(assignment == site)] for site in range(sites)]
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {MAX_DRAWS} gave every one of {sites} sites "
                     f"{min_rows} rows; raise alpha or lower sites")
