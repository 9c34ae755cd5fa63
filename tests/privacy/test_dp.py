"""The Gaussian mechanism: scale as OpenDP computes it for rho, noise really drawn at that scale."""

from __future__ import annotations

import math

import numpy as np
import pytest

dp = pytest.importorskip("opendp.prelude")

from medveil.privacy.disclosure import DisclosurePolicy, suppress_small_counts  # noqa: E402
from medveil.privacy.dp import gaussian_count_noise, gaussian_scale  # noqa: E402


@pytest.mark.parametrize("rho", [0.01, 0.125, 0.5, 2.0])
def test_scale_equals_what_opendp_finds_for_rho(rho):
    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float)
    reference = dp.binary_search_param(lambda s: dp.m.make_gaussian(*space, scale=s), d_in=1.0, d_out=rho)
    assert gaussian_scale(rho) == pytest.approx(reference, rel=1e-6)
    assert gaussian_scale(rho) == pytest.approx(1 / math.sqrt(2 * rho), rel=1e-12)


def test_noise_has_the_configured_spread_and_is_fresh_each_call():
    rho = 0.02
    noise = gaussian_count_noise(rho)
    counts = np.full(20000, 1000.0)
    first, second = noise(counts), noise(counts)
    assert not np.array_equal(first, second)
    assert abs(np.std(first - counts) - gaussian_scale(rho)) < 0.05 * gaussian_scale(rho)
    assert abs(np.mean(first - counts)) < 5 * gaussian_scale(rho) / np.sqrt(counts.size)  # 5 standard errors


def test_noisy_counts_are_rounded_clipped_and_then_suppressed():
    released, suppressed = suppress_small_counts(np.array([0, 2, 50, 100]), DisclosurePolicy(),
                                                 gaussian_count_noise(1e6))
    assert released.dtype == np.int64 and (released >= 0).all()
    assert suppressed[1] and not suppressed[2]


def test_rho_must_be_positive():
    with pytest.raises(ValueError):
        gaussian_scale(0.0)
