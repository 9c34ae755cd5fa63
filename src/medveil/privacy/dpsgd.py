"""What DP-SGD costs: the zCDP charge against a node's budget, Opacus' (epsilon, delta), and the
conversion between zero-concentrated DP and (epsilon, delta)-DP. Pure: no I/O; Opacus and
OpenDP are imported inside the functions that use them.

The charge. Each DP-SGD step adds Gaussian noise of standard deviation z * C to a sum of
per-sample gradients clipped to L2 norm C; adding or removing one patient moves that sum by at
most C, so one step is the Gaussian mechanism at 1 / (2 z^2)-zCDP, and `steps` steps compose to
rho = steps / (2 z^2) (`dpsgd_rho`). This credits no amplification by subsampling: zCDP has no
tight amplification-by-subsampling theorem to keep the node's budget in, and amplification
assumes the sample stays secret, which a charge should not rely on. It is therefore
conservative, often by far: Opacus' RDP accountant (`opacus_epsilon`), which does credit the
Poisson sampling of rate q, reports a much smaller epsilon for small q; the node charges the
larger, unamplified cost so its zCDP budget is never overdrawn.

Conversions. `rho_epsilon` is OpenDP's zCDP -> approximate-DP conversion
(`opendp.combinators.make_zCDP_to_approxDP`, the optimal conversion of Canonne, Kamath and
Steinke 2020, never looser than Bun and Steinke's rho + 2 sqrt(rho ln(1/delta))), applied to a
Gaussian measurement whose privacy map gives exactly the rho in question; `epsilon_rho` inverts
it by bisection: the largest rho whose conversion stays within epsilon.

What each party learns: these are functions of public parameters only (noise multiplier,
steps, sampling rate, delta); the site publishes the rho it charged, the researcher learns
epsilon, and nothing here touches a patient's row.
"""

from __future__ import annotations

import math

_BISECTION_STEPS = 200


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    return steps


def _delta(delta: float) -> float:
    delta = _positive("delta", delta)
    if not delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    return delta


def dpsgd_rho(noise_multiplier: float, steps: int) -> float:
    """The zCDP rho of `steps` DP-SGD steps at noise multiplier z: steps / (2 z^2), with no
    credit for subsampling (conservative, see the module docstring)."""
    z = _positive("noise_multiplier", noise_multiplier)
    return _steps(steps) / (2.0 * z * z)


def opacus_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at `delta` of `steps` DP-SGD steps with Poisson sampling rate `sample_rate`, by
    Opacus' RDP accountant (which credits amplification by subsampling)."""
    z = _positive("noise_multiplier", noise_multiplier)
    q = _positive("sample_rate", sample_rate)
    if q > 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    steps, delta = _steps(steps), _delta(delta)
    if steps == 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # the ml extra; checked arguments need none

    accountant = RDPAccountant()
    accountant.history = [(z, q, steps)]
    return float(accountant.get_epsilon(delta=delta))


def rho_epsilon(rho: float, delta: float) -> float:
    """Epsilon at `delta` of a rho-zCDP release, by OpenDP's zCDP -> approximate-DP conversion."""
    import opendp.prelude as dp

    delta = _delta(delta)
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a non-negative finite number, got {rho!r}")
    if rho == 0:
        return 0.0
    dp.enable_features("contrib")
    # A unit-scale Gaussian's map is d_in^2 / 2: at d_in = sqrt(2 rho) it charges rho (OpenDP rounds up).
    gaussian = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0)
    profile = dp.c.make_zCDP_to_approxDP(gaussian).map(math.sqrt(2.0 * float(rho)))
    return float(profile.epsilon(delta))


def epsilon_rho(epsilon: float, delta: float) -> float:
    """The largest rho whose (epsilon, delta) by `rho_epsilon` is within `epsilon`: the zCDP budget
    that honours an (epsilon, delta) promise."""
    epsilon, delta = _positive("epsilon", epsilon), _delta(delta)
    # Bun and Steinke's bound is never tighter than OpenDP's, so its inverse is a feasible start.
    log_term = math.log(1.0 / delta)
    low = (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2
    if rho_epsilon(low, delta) > epsilon:  # only through OpenDP's outward rounding
        low = 0.0
    high = max(2.0 * low, epsilon)
    while rho_epsilon(high, delta) <= epsilon:
        low, high = high, 2.0 * high
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        if rho_epsilon(middle, delta) <= epsilon:
            low = middle
        else:
            high = middle
    return low
