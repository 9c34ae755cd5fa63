"""The beacon re-identification model: T = 1 is the Shringarpure-Bustamante test, signs, a known case."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from medveil.privacy.beacon_risk import (
    SEQUENCING_ERROR,
    answer_probabilities,
    lrt,
    lrt_terms,
    null_threshold,
    simulate_lrt,
    simulate_power,
)


def sb_statistic(x: np.ndarray, f: np.ndarray, n: int, delta: float) -> float:
    """Shringarpure and Bustamante's Lambda (AJHG 2015, eq. for known frequencies), written out."""
    d_n, d_n1 = (1 - f) ** (2 * n), (1 - f) ** (2 * (n - 1))
    return float(np.sum(x * np.log((1 - d_n) / (1 - delta * d_n1)) + (1 - x) * np.log(d_n / (delta * d_n1))))


@pytest.mark.parametrize("sizes", [[1000], [65], [300, 200, 500]])
def test_with_no_suppression_it_is_the_shringarpure_bustamante_statistic(sizes):
    rng = np.random.default_rng(3)
    # rare alleles, as a probe asks (a "no" stays representable: (1 - f)^(2N) >= 1e-12)
    f = np.exp(rng.uniform(np.log(1e-5), np.log(5e-3), 300))
    p0, p1 = answer_probabilities(f, sizes, min_count=1, delta=SEQUENCING_ERROR, target_site=len(sizes) - 1)
    n = sum(sizes)  # with T = 1 a multi-site beacon is one beacon of everyone
    # 1 - p is as exact as float64 near 1 allows (an absolute 1e-16)
    np.testing.assert_allclose(1 - p0, (1 - f) ** (2 * n), rtol=1e-6, atol=2e-16)
    np.testing.assert_allclose(1 - p1, SEQUENCING_ERROR * (1 - f) ** (2 * (n - 1)), rtol=1e-6, atol=2e-16)
    x = rng.random(300) < p1
    x[:3] = False  # a few "no" answers, so both terms of the statistic are compared
    assert lrt(x, p0, p1) == pytest.approx(sb_statistic(x.astype(float), f, n, SEQUENCING_ERROR), rel=1e-6)


def test_a_known_case_by_hand():
    # one site of 3, T = 2, carrier probability g = 1/2 (f = 1 - sqrt(1/2))
    f = 1 - math.sqrt(0.5)
    delta = 0.01
    (p0,), (p1,) = answer_probabilities([f], [3], min_count=2, delta=delta)
    assert p0 == pytest.approx(0.5)  # P(Bin(3, 1/2) >= 2)
    assert p1 == pytest.approx((1 - delta) * 0.75 + delta * 0.25)  # the target plus >= 1 of 2, or >= 2 of 2
    yes, no = lrt_terms(np.array([p0]), np.array([p1]))
    assert yes[0] == pytest.approx(math.log(0.5 / p1))
    assert no[0] == pytest.approx(math.log(0.5 / (1 - p1)))
    # two sites of 3 each, the target at the second: the first site's "no" factor multiplies in
    (q0,), (q1,) = answer_probabilities([f], [3, 3], min_count=2, delta=delta, target_site=1)
    assert q0 == pytest.approx(1 - 0.5 * 0.5)
    assert q1 == pytest.approx(1 - 0.5 * (1 - p1))


def test_suppression_matches_a_binomial_written_out():
    f, sizes, t = np.array([1e-3, 5e-3]), [400, 250], 5
    g = 1 - (1 - f) ** 2
    p0, p1 = answer_probabilities(f, sizes, min_count=t, delta=0.0)
    np.testing.assert_allclose(p0, 1 - binom.cdf(t - 1, 400, g) * binom.cdf(t - 1, 250, g), rtol=1e-12)
    np.testing.assert_allclose(p1, 1 - binom.cdf(t - 2, 399, g) * binom.cdf(t - 1, 250, g), rtol=1e-12)


def test_signs_a_yes_speaks_for_membership_a_no_against():
    f = np.full(50, 2e-3)
    p0, p1 = answer_probabilities(f, [400, 400, 400], min_count=5)
    assert np.all(p1 > p0)  # the target's own allele makes a yes likelier
    yes, no = lrt_terms(p0, p1)
    assert np.all(yes < 0) and np.all(no > 0)
    assert lrt(np.ones(50, bool), p0, p1) < 0 < lrt(np.zeros(50, bool), p0, p1)
    members, outsiders = simulate_lrt(True, p0, p1, 2000, 0), simulate_lrt(False, p0, p1, 2000, 1)
    assert members[:, -1].mean() < 0 < outsiders[:, -1].mean()
    t = null_threshold(p0, p1, 50, alpha=0.05, reps=4000, seed=2)
    assert (outsiders[:, -1] < t).mean() <= 0.06


def test_suppression_is_what_stops_rare_alleles():
    f = np.full(30, 1e-4)
    unsuppressed = simulate_power(*answer_probabilities(f, [400, 400, 400], min_count=1), reps=2000, seed=4)
    suppressed = simulate_power(*answer_probabilities(f, [400, 400, 400], min_count=5), reps=2000, seed=4)
    assert unsuppressed.queries_to(0.95) is not None and unsuppressed.queries_to(0.95) <= 5
    assert suppressed.power[-1] < 0.1


def test_bad_inputs_are_refused():
    for sizes, kwargs in (([], {}), ([0], {}), ([10], {"min_count": 0}), ([10], {"target_site": 1}),
                          ([10], {"delta": 1.0})):
        with pytest.raises(ValueError):
            answer_probabilities([0.1], sizes, **kwargs)
    with pytest.raises(ValueError):
        answer_probabilities([1.5], [10])
    with pytest.raises(ValueError):
        lrt([True], np.array([0.1, 0.2]), np.array([0.3, 0.4]))
