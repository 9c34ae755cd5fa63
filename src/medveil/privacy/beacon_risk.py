"""Re-identification risk of a genomic beacon: the Shringarpure-Bustamante likelihood-ratio test.

Shringarpure and Bustamante (AJHG 97:631, 2015) showed that an attacker who holds a person's
genome can tell whether that person is in a beacon by asking it about alleles the person
carries: a beacon of N people answers "yes" for allele i more often when the target is among
them. With allele frequency f_i, D_N = (1 - f_i)^(2N) is the chance that none of N people
carries it; under H0 (target absent) P(no) = D_N, under H1 (target present, their allele missed
only by a sequencing error of rate delta) P(no) = delta * D_(N-1). The statistic is

    Lambda = sum_i [ x_i log((1 - D_N) / (1 - delta D_(N-1))) + (1 - x_i) log(D_N / (delta D_(N-1))) ]

(x_i = 1 for "yes"): log L(H0) - log L(H1), so small (negative) values speak for membership,
and membership is declared when Lambda < t_alpha, the alpha-quantile of Lambda under H0.

The beacon of this project (analyses/beacon.py) suppresses small counts at each site: a site
reports its carriers only when they are at least T (its min_cell_count), and answers "yes" when
some site does. With g = 1 - (1 - f)^2 the chance that one person carries the allele,

    P0(yes) = 1 - prod_sites P(Bin(n_s, g) < T),

and under H1 the target's site factor P(Bin(n_s, g) >= T) becomes
(1 - delta) P(Bin(n_s - 1, g) >= T - 1) + delta P(Bin(n_s - 1, g) >= T). Each answer adds
log(P0/P1) for a "yes" and log((1 - P0)/(1 - P1)) for a "no". With T = 1 and one site this is
exactly the Shringarpure-Bustamante statistic. Thresholds and power are found by simulation,
as the paper does. The module is pure: it computes on frequencies the attacker knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

SEQUENCING_ERROR = 1e-6  # the paper's delta
_TINY = 1e-300  # keeps log() finite for an answer a hypothesis makes (numerically) impossible


def answer_probabilities(f: np.ndarray | Sequence[float], site_sizes: Sequence[int], min_count: int = 1,
                         delta: float = SEQUENCING_ERROR, target_site: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """P("yes") for each allele frequency in `f` when the target is absent (p0) and when the
    target, who carries the allele, is one of the `site_sizes[target_site]` people of that site
    (p1). Every site reports only counts of at least `min_count` carriers."""
    f = np.asarray(f, dtype=np.float64)
    sizes = [int(n) for n in site_sizes]
    if not sizes or min(sizes) < 1 or not 0 <= target_site < len(sizes):
        raise ValueError("site_sizes must list at least one site of at least one person, target_site among them")
    if min_count < 1 or not 0.0 <= delta < 1.0 or np.any((f < 0) | (f > 1)):
        raise ValueError("min_count >= 1, 0 <= delta < 1 and frequencies in [0, 1] are required")
    g = 1.0 - (1.0 - f) ** 2
    n_t = sizes[target_site]
    with np.errstate(divide="ignore"):  # log(0) = -inf: a site that surely says "yes"
        # log P(a site says "no"), per site; log1p(-sf) keeps tiny yes-probabilities exact
        site_no = [np.log1p(-binom.sf(min_count - 1, n, g)) for n in sizes]
        others = sum((site_no[s] for s in range(len(sizes)) if s != target_site), np.zeros_like(g))
        target_yes = (1.0 - delta) * binom.sf(min_count - 2, n_t - 1, g) + delta * binom.sf(min_count - 1, n_t - 1, g)
        log_none_present = others + np.log1p(-np.minimum(target_yes, 1.0))
    return 0.0 - np.expm1(others + site_no[target_site]), 0.0 - np.expm1(log_none_present)


def lrt_terms(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What one answer adds to Lambda: (log(p0/p1) for a yes, log((1-p0)/(1-p1)) for a no).
    An answer a hypothesis gives with probability below float64 resolution counts as 1e-300."""
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    yes = np.log(np.maximum(p0, _TINY)) - np.log(np.maximum(p1, _TINY))
    no = np.log(np.maximum(1.0 - p0, _TINY)) - np.log(np.maximum(1.0 - p1, _TINY))
    return yes, no


def lrt(x: np.ndarray | Sequence[bool], p0: np.ndarray, p1: np.ndarray) -> float:
    """Lambda = log L(H0) - log L(H1) of the answers `x` (True: yes) to queries with
    yes-probabilities p0 (target absent) and p1 (target present); negative favours membership."""
    x = np.asarray(x, dtype=bool)
    yes, no = lrt_terms(p0, p1)
    if x.shape != yes.shape:
        raise ValueError("one answer per query is needed")
    return float(np.where(x, yes, no).sum())


def simulate_lrt(present: bool, p0: np.ndarray, p1: np.ndarray, reps: int = 4000, seed: int = 0) -> np.ndarray:
    """Lambda after each of the queries, (reps, k): answers drawn under H1 (`present`) or H0."""
    yes, no = lrt_terms(p0, p1)
    rng = np.random.default_rng(seed)  # a simulation, not a secret: a seeded PRNG is right here
    answers = rng.random((reps, len(yes))) < np.asarray(p1 if present else p0)
    return np.cumsum(np.where(answers, yes, no), axis=1)


def null_thresholds(p0: np.ndarray, p1: np.ndarray, alpha: float = 0.05, reps: int = 4000,
                    seed: int = 0) -> np.ndarray:
    """t_alpha after each of k = 1..len(p0) queries: the alpha-quantile of Lambda_k under H0."""
    return np.quantile(simulate_lrt(False, p0, p1, reps, seed), alpha, axis=0)


def null_threshold(p0: np.ndarray, p1: np.ndarray, k: int, alpha: float = 0.05, reps: int = 4000,
                   seed: int = 0) -> float:
    """t_alpha after the first `k` queries (membership is declared when Lambda_k < t_alpha)."""
    if not 1 <= k <= len(p0):
        raise ValueError(f"k must be in 1..{len(p0)}")
    return float(null_thresholds(p0[:k], p1[:k], alpha, reps, seed)[-1])


@dataclass(frozen=True)
class PowerCurve:
    """The probe after each query k = 1..K: the H0 threshold, the share of members detected
    (power), the share of non-members wrongly flagged, and the median Lambda of a member."""

    threshold: np.ndarray
    power: np.ndarray
    false_positive: np.ndarray
    median_present: np.ndarray

    def queries_to(self, power: float) -> int | None:
        """The fewest queries after which the probe reaches `power`; None if it never does."""
        reached = np.flatnonzero(self.power >= power)
        return int(reached[0]) + 1 if len(reached) else None

    def significant_at(self) -> int | None:
        """The fewest queries after which a member's median Lambda is below the threshold."""
        reached = np.flatnonzero(self.median_present < self.threshold)
        return int(reached[0]) + 1 if len(reached) else None


def simulate_power(p0: np.ndarray, p1: np.ndarray, alpha: float = 0.05, reps: int = 4000,
                   seed: int = 0) -> PowerCurve:
    """The power of the likelihood-ratio probe after each query, by simulation under both hypotheses
    (independent draws: the threshold's own samples do not judge it)."""
    null = simulate_lrt(False, p0, p1, reps, seed)
    threshold = np.quantile(null, alpha, axis=0)
    fresh_null = simulate_lrt(False, p0, p1, reps, seed + 1)
    present = simulate_lrt(True, p0, p1, reps, seed + 2)
    return PowerCurve(threshold=threshold, power=(present < threshold).mean(axis=0),
                      false_positive=(fresh_null < threshold).mean(axis=0),
                      median_present=np.median(present, axis=0))
