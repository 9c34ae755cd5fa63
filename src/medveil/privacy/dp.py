"""Differential privacy for released counts: OpenDP's Gaussian mechanism under zero-concentrated DP.

What it protects: with rho-zCDP per release, the presence or absence of any one patient changes
the distribution of a site's noisy counts by at most rho (in zCDP terms). Noise is drawn by
OpenDP (no hand-rolled floating-point sampling); rounding, clipping at zero and small-cell
suppression of the noisy counts are post-processing and keep the guarantee. The sensitivity
is 1 in L2 because each row falls in exactly one cell.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from medveil.privacy.disclosure import DisclosureRefused

CountNoise = Callable[[np.ndarray], np.ndarray]
COUNT_SENSITIVITY = 1.0


class BudgetExhausted(DisclosureRefused):
    def __init__(self, study: str, spent: float, asked: float, budget: float):
        super().__init__("dp_budget_exhausted",
                         f"study {study!r} has spent rho={spent:g} of its budget {budget:g}; "
                         f"a release of rho={asked:g} would exceed it")


def _gaussian(scale: float):
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float)
    return dp.m.make_gaussian(*space, scale=scale)


def gaussian_scale(rho: float, sensitivity: float = COUNT_SENSITIVITY) -> float:
    """The noise scale that spends exactly `rho` (zCDP: rho = sensitivity**2 / (2 scale**2)),
    checked against OpenDP's own privacy map."""
    if not rho > 0:
        raise ValueError("rho must be positive")
    scale = sensitivity / math.sqrt(2.0 * rho)
    spent = _gaussian(scale).map(sensitivity)
    if spent > rho * (1 + 1e-9):
        raise ValueError(f"OpenDP charges rho={spent} for scale {scale}, more than {rho}")
    return scale


def gaussian_count_noise(rho: float) -> CountNoise:
    """A function adding OpenDP Gaussian noise to a vector of counts, spending `rho` per call."""
    measurement = _gaussian(gaussian_scale(rho))

    def add_noise(counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.float64)
        noisy = np.asarray(measurement(counts.ravel().tolist()), dtype=np.float64).reshape(counts.shape)
        return np.clip(np.rint(noisy), 0, None)

    return add_noise
