"""DP-SGD in train_local through Opacus: determinism by seed, per-sample clipping checked against
numpy, the noise's scale, the steps and rate Opacus' accountant records, and refusals."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from medveil.models import (
    CNN,
    DPSGD,
    LOGISTIC,
    MLP,
    init_weights,
    model_inputs,
    train_local,
)


def _data(rows: int = 64, features: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = (rng.random(rows) < 1 / (1 + np.exp(-X @ np.linspace(1.0, -0.5, features)))).astype(np.float64)
    return X, y


def _train(X, y, weights, *, recipe=LOGISTIC, hyper=None, dp, seed=0, **change):
    arguments = {"epochs": 2, "batch_size": 8, "lr": 0.3, "algorithm": "fedavg", "mu": 0.0} | change
    return train_local(recipe, hyper, weights, X, y, seed=seed, dp=dp, **arguments)


def test_same_seed_same_weights_and_another_seed_others():
    X, y = _data()
    hyper = {"hidden": [5], "dropout": 0.3}
    weights = init_weights(MLP, 3, hyper, seed=0)
    dp = DPSGD(noise_multiplier=1.1, max_grad_norm=0.5)
    first = _train(X, y, weights, recipe=MLP, hyper=hyper, dp=dp, seed=4)
    np.testing.assert_array_equal(first.weights, _train(X, y, weights, recipe=MLP, hyper=hyper, dp=dp, seed=4).weights)
    assert not np.array_equal(first.weights, _train(X, y, weights, recipe=MLP, hyper=hyper, dp=dp, seed=5).weights)
    assert (first.steps, first.sample_rate) == (2 * 8, 1 / 8)


def test_sites_training_in_threads_stay_deterministic():
    X, y = _data(rows=40)
    weights = init_weights(LOGISTIC, 3, None, seed=1)
    dp = DPSGD(1.0, 1.0)
    expected = [_train(X, y, weights, dp=dp, seed=s).weights for s in range(4)]
    results: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, _train(X, y, weights, dp=dp, seed=s).weights))
               for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    for s in range(4):
        np.testing.assert_array_equal(results[s], expected[s])


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_full_batch_with_negligible_noise_is_clipped_gradient_descent():
    """Sample rate 1 puts every row in the batch; noise 1e-12 * C is negligible: one step must be
    w - lr * mean_i clip(g_i, C), with per-sample logistic gradients g_i computed here."""
    X, y = _data(rows=50, seed=2)
    weights = init_weights(LOGISTIC, 3, None, seed=3)
    for clip in (1e6, 0.3):
        update = _train(X, y, weights, dp=DPSGD(1e-12, clip), epochs=1, batch_size=None, lr=0.5)
        assert (update.steps, update.sample_rate) == (1, 1.0)
        residual = _sigmoid(X.astype(np.float64) @ weights[:-1] + weights[-1]) - y
        per_sample = np.column_stack([residual[:, None] * X, residual])
        norms = np.linalg.norm(per_sample, axis=1)
        clipped = per_sample * np.minimum(1.0, clip / (norms + 1e-6))[:, None]  # Opacus' flat clipping
        np.testing.assert_allclose(update.weights, weights - 0.5 * clipped.mean(axis=0), atol=1e-6)
        if clip < 1:
            assert norms.max() > 2 * clip  # clipping did bite


def test_noise_has_the_dp_sgd_scale():
    """With zero learning signal (lr scales noise too) the step is -lr * N(0, (z C)^2) / batch per
    coordinate: the spread over seeds must match z * C / rows."""
    X = np.zeros((20, 3), dtype=np.float32)
    y = np.zeros(20)
    weights = np.zeros(4)
    z, clip = 2.0, 0.5
    # zero inputs: per-sample weight gradients are 0; the bias gradient is sigmoid(0) - 0 = 0.5, within clip
    steps = np.array([_train(X, y, weights, dp=DPSGD(z, clip), epochs=1, batch_size=None, lr=1.0, seed=s).weights
                      for s in range(200)])
    noise = steps[:, :3]  # weights of the zero features move by noise only
    assert noise.std() == pytest.approx(z * clip / 20, rel=0.15)
    assert abs(noise.mean()) < 3 * z * clip / 20 / np.sqrt(noise.size)
    np.testing.assert_allclose(steps[:, 3].mean(), -0.5, atol=4 * z * clip / 20 / np.sqrt(200))


@pytest.mark.parametrize("recipe, hyper, shape", [(LOGISTIC, None, (3,)), (CNN, {"image_size": 8}, (1, 8, 8))],
                         ids=["logistic", "cnn"])
def test_empty_poisson_batches_are_survived(recipe, hyper, shape):
    """Rate 1/10 on 10 rows leaves about a third of the 30 batches empty."""
    X = np.random.default_rng(0).random((10, *shape)).astype(np.float32)
    n_inputs = model_inputs(recipe, hyper, 3)
    weights = init_weights(recipe, n_inputs, hyper, seed=0)
    update = _train(X, np.arange(10) % 2, weights, recipe=recipe, hyper=hyper, dp=DPSGD(1.0, 1.0), epochs=3,
                    batch_size=1)
    assert (update.steps, update.sample_rate) == (30, 0.1)
    assert np.all(np.isfinite(update.weights))


def test_fedprox_with_dp_is_refused():
    X, y = _data()
    with pytest.raises(ValueError, match="fedprox"):
        _train(X, y, np.zeros(4), dp=DPSGD(1.0, 1.0), algorithm="fedprox", mu=0.1)
    with pytest.raises(TypeError):
        _train(X, y, np.zeros(4), dp={"noise_multiplier": 1.0, "max_grad_norm": 1.0})


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_dpsgd_parameters_are_checked(bad):
    with pytest.raises(ValueError):
        DPSGD(noise_multiplier=bad, max_grad_norm=1.0)
    with pytest.raises(ValueError):
        DPSGD(noise_multiplier=1.0, max_grad_norm=bad)


def test_a_batchnorm_plugin_is_refused_under_dp():
    from pydantic import BaseModel
    from torch import nn

    from medveil.models import ModelRecipe

    class Empty(BaseModel):
        pass

    recipe = ModelRecipe(name="bn-plugin", version="1", Hyper=Empty,
                         build=lambda n, hyper, outputs=1: nn.Sequential(nn.BatchNorm1d(n), nn.Linear(n, 1),
                                                                         nn.Flatten(start_dim=0)))
    X, y = _data()
    weights = init_weights(recipe, 3, None, seed=0)
    with pytest.raises(ValueError, match="DP-SGD"):
        _train(X, y, weights, recipe=recipe, dp=DPSGD(1.0, 1.0))
