"""DP-SGD accounting: the zCDP charge against OpenDP's Gaussian map, epsilon against Opacus'
own accountant (stepped here, and after a real make_private training), and the zCDP <->
(epsilon, delta) conversion against the Gaussian mechanism's exact profile and Bun-Steinke."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from medveil.privacy.dpsgd import dpsgd_rho, epsilon_rho, opacus_epsilon, rho_epsilon


def test_dpsgd_rho_is_the_composed_gaussian_mechanism():
    import opendp.prelude as dp

    dp.enable_features("contrib")
    for z, steps in ((0.8, 1), (1.1, 250), (4.0, 10_000)):
        gaussian = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=z)
        per_step = gaussian.map(1.0)  # sensitivity C = 1 with noise z * C
        assert dpsgd_rho(z, steps) == pytest.approx(steps * per_step, rel=1e-12)
    assert dpsgd_rho(2.0, 0) == 0.0


@pytest.mark.parametrize("z, q, steps, delta", [(1.0, 0.01, 1000, 1e-5), (0.7, 0.1, 37, 1e-6), (2.5, 1.0, 5, 1e-3)])
def test_opacus_epsilon_equals_the_rdp_accountant_stepped(z, q, steps, delta):
    RDPAccountant = pytest.importorskip("opacus.accountants").RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=z, sample_rate=q)
    assert opacus_epsilon(z, q, steps, delta) == accountant.get_epsilon(delta=delta)


def test_opacus_epsilon_matches_a_real_private_training():
    torch = pytest.importorskip("torch")
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    X = torch.randn(120, 4)
    y = (X[:, 0] > 0).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(start_dim=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=1.3, max_grad_norm=1.0, poisson_sampling=True)
    steps = 0
    for _ in range(3):
        for X_batch, y_batch in loader:
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(X_batch), y_batch).backward()
            optimizer.step()
            steps += 1
    sample_rate = 1 / len(loader)
    assert engine.get_epsilon(1e-5) == pytest.approx(opacus_epsilon(1.3, sample_rate, steps, 1e-5), rel=1e-12)


def test_train_local_reports_what_opacus_accounted():
    pytest.importorskip("torch")
    from medveil.models import DPSGD, LOGISTIC, init_weights, train_local

    X = np.random.default_rng(0).normal(size=(57, 2)).astype(np.float32)
    y = (X[:, 0] > 0).astype(float)
    update = train_local(LOGISTIC, None, init_weights(LOGISTIC, 2, None, 0), X, y, epochs=3, batch_size=10, lr=0.1,
                         algorithm="fedavg", mu=0.0, seed=1, dp=DPSGD(1.3, 1.0))
    assert (update.steps, update.sample_rate) == (3 * 6, 1 / 6)  # 6 = ceil(57 / 10) Poisson batches per epoch
    assert opacus_epsilon(1.3, update.sample_rate, update.steps, 1e-5) < rho_epsilon(dpsgd_rho(1.3, update.steps), 1e-5)


def _gaussian_exact_epsilon(rho: float, delta: float) -> float:
    """The Gaussian mechanism's exact (epsilon, delta) curve (Balle and Wang 2018) at mu = sqrt(2 rho):
    a lower bound for any conversion valid for all rho-zCDP mechanisms."""
    from scipy.stats import norm

    mu = math.sqrt(2 * rho)

    def delta_of(epsilon: float) -> float:
        return norm.cdf(mu / 2 - epsilon / mu) - math.exp(epsilon) * norm.cdf(-mu / 2 - epsilon / mu)

    if delta_of(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_of(middle) > delta else (low, middle)
    return high


@pytest.mark.parametrize("rho", [1e-4, 0.01, 0.5, 2.0, 40.0])
@pytest.mark.parametrize("delta", [1e-9, 1e-5, 1e-2])
def test_rho_epsilon_lies_between_the_gaussian_curve_and_bun_steinke(rho, delta):
    epsilon = rho_epsilon(rho, delta)
    assert _gaussian_exact_epsilon(rho, delta) <= epsilon * (1 + 1e-9)
    assert epsilon <= rho + 2 * math.sqrt(rho * math.log(1 / delta))


@settings(max_examples=25, deadline=None)
@given(epsilon=st.floats(1e-3, 50.0), delta=st.floats(1e-12, 0.1))
def test_epsilon_rho_is_the_largest_rho_within_epsilon(epsilon, delta):
    rho = epsilon_rho(epsilon, delta)
    assert rho > 0
    assert rho_epsilon(rho, delta) <= epsilon
    assert rho_epsilon(rho * (1 + 1e-6), delta) > epsilon * (1 - 1e-6)  # and no room is left


@settings(max_examples=25, deadline=None)
@given(rho=st.floats(1e-6, 1e3), delta=st.floats(1e-12, 0.1))
def test_rho_round_trips(rho, delta):
    epsilon = rho_epsilon(rho, delta)
    assume(epsilon > 1e-4)  # below, a large delta covers small rho at epsilon 0: no unique inverse
    assert epsilon_rho(epsilon, delta) == pytest.approx(rho, rel=1e-6)


@pytest.mark.parametrize("call", [
    lambda: dpsgd_rho(0.0, 1), lambda: dpsgd_rho(1.0, -1), lambda: dpsgd_rho(1.0, 1.5), lambda: dpsgd_rho(True, 1),
    lambda: opacus_epsilon(1.0, 0.0, 1, 1e-5), lambda: opacus_epsilon(1.0, 1.5, 1, 1e-5),
    lambda: opacus_epsilon(1.0, 0.1, 1, 1.0), lambda: rho_epsilon(-1.0, 1e-5), lambda: rho_epsilon(1.0, 0.0),
    lambda: rho_epsilon(float("nan"), 1e-5), lambda: epsilon_rho(0.0, 1e-5), lambda: epsilon_rho(1.0, 2.0),
])
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()


def test_zero_cost_cases():
    assert rho_epsilon(0.0, 1e-5) == 0.0
    assert opacus_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
