"""Local training over flat weights: checked against hand-written numpy gradient descent and
statsmodels' maximum-likelihood logistic regression."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medveil.models import (
    LOGISTIC,
    MAX_ROW_LOSS,
    MLP,
    evaluate,
    flatten,
    init_weights,
    load_flat,
    n_parameters,
    predict_logits,
    shapes,
    train_local,
)


def _data(rows: int = 200, features: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    logits = X @ np.linspace(1.0, -0.5, features) + 0.3
    y = (rng.random(rows) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    return X, y


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _numpy_gd(weights, X, y, lr, steps, mu=0.0):
    """Full-batch gradient descent on the mean logistic loss (+ mu/2 ||w - w0||^2), in float64.
    The weight layout is flatten's: the Linear layer's weight row, then its bias."""
    X = X.astype(np.float64)
    w0 = weights.copy()
    w = weights.copy()
    for _ in range(steps):
        residual = _sigmoid(X @ w[:-1] + w[-1]) - y
        gradient = np.append(X.T @ residual, residual.sum()) / len(y) + mu * (w - w0)
        w = w - lr * gradient
    return w


def _mean_logistic_loss(weights, X, y):
    z = X.astype(np.float64) @ weights[:-1] + weights[-1]
    return float(np.mean(np.logaddexp(0, z) - y * z))


def test_one_full_batch_step_equals_numpy_gradient_step():
    X, y = _data()
    weights = init_weights(LOGISTIC, 3, None, seed=4)
    update = train_local(LOGISTIC, None, weights, X, y, epochs=1, batch_size=None,
                         lr=0.5, algorithm="fedavg", mu=0.0, seed=0)
    new, loss_before = update.weights, update.loss_before
    assert update.rows == len(y)
    assert (update.steps, update.sample_rate) == (1, 1.0)
    assert loss_before == pytest.approx(_mean_logistic_loss(weights, X, y), rel=1e-6)
    np.testing.assert_allclose(new, _numpy_gd(weights, X, y, lr=0.5, steps=1), atol=1e-6)


def test_several_full_batch_epochs_equal_numpy_gradient_descent():
    X, y = _data(seed=1)
    weights = init_weights(LOGISTIC, 3, {}, seed=0)
    new = train_local(LOGISTIC, {}, weights, X, y, epochs=5, batch_size=None, lr=1.0,
                      algorithm="fedavg", mu=0.0, seed=0).weights
    np.testing.assert_allclose(new, _numpy_gd(weights, X, y, lr=1.0, steps=5), atol=1e-5)


def test_fedprox_adds_the_proximal_gradient():
    X, y = _data(seed=2)
    weights = init_weights(LOGISTIC, 3, None, seed=1)
    new = train_local(LOGISTIC, None, weights, X, y, epochs=4, batch_size=None, lr=0.5,
                      algorithm="fedprox", mu=0.7, seed=0).weights
    np.testing.assert_allclose(new, _numpy_gd(weights, X, y, lr=0.5, steps=4, mu=0.7), atol=1e-5)
    plain = _numpy_gd(weights, X, y, lr=0.5, steps=4)
    assert np.abs(new - plain).max() > 1e-3  # the proximal term did pull the weights back


def test_fedprox_with_mu_zero_equals_fedavg():
    X, y = _data(rows=97, features=5, seed=3)
    hyper = {"hidden": [8, 4], "dropout": 0.3, "activation": "tanh"}
    weights = init_weights(MLP, 5, hyper, seed=2)
    kwargs = {"epochs": 3, "batch_size": 16, "lr": 0.2, "mu": 0.0, "seed": 11}
    fedavg = train_local(MLP, hyper, weights, X, y, algorithm="fedavg", **kwargs)
    fedprox = train_local(MLP, hyper, weights, X, y, algorithm="fedprox", **kwargs)
    np.testing.assert_array_equal(fedavg.weights, fedprox.weights)
    assert (fedavg.loss_before, fedavg.rows, fedavg.steps) == (fedprox.loss_before, fedprox.rows, fedprox.steps)
    assert fedavg.steps == 3 * 7 and fedavg.sample_rate == pytest.approx(16 / 97)


def test_minibatch_training_is_deterministic_by_seed():
    X, y = _data(rows=120, features=4, seed=5)
    hyper = {"hidden": [6], "dropout": 0.5}
    weights = init_weights(MLP, 4, hyper, seed=0)
    kwargs = {"epochs": 2, "batch_size": 10, "lr": 0.1, "algorithm": "fedavg", "mu": 0.0}
    first = train_local(MLP, hyper, weights, X, y, seed=1, **kwargs).weights
    again = train_local(MLP, hyper, weights, X, y, seed=1, **kwargs).weights
    other = train_local(MLP, hyper, weights, X, y, seed=2, **kwargs).weights
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_long_full_batch_training_reaches_the_maximum_likelihood_fit():
    sm = pytest.importorskip("statsmodels.api")
    X, y = _data(rows=400, seed=6)
    weights = init_weights(LOGISTIC, 3, None, seed=0)
    new = train_local(LOGISTIC, None, weights, X, y, epochs=1500, batch_size=None, lr=2.0,
                      algorithm="fedavg", mu=0.0, seed=0).weights
    fit = sm.Logit(y, sm.add_constant(X.astype(np.float64))).fit(disp=0)
    np.testing.assert_allclose(new, np.append(fit.params[1:], fit.params[0]), atol=1e-3)


def test_flatten_and_load_flat_round_trip_in_parameter_order():
    hyper = MLP.Hyper(hidden=[5, 3])
    module = MLP.build(4, hyper)
    layout = shapes(module)
    assert [name for name, _ in layout] == [name for name, _ in module.named_parameters()]
    assert sum(int(np.prod(shape)) for _, shape in layout) == n_parameters(module) == 4 * 5 + 5 + 5 * 3 + 3 + 3 + 1
    vector = np.random.default_rng(0).normal(size=n_parameters(module))
    load_flat(module, vector)
    np.testing.assert_allclose(flatten(module), vector, rtol=1e-6)  # float32 storage
    first_name, first_shape = layout[0]
    np.testing.assert_allclose(dict(module.named_parameters())[first_name].detach().numpy(),
                               vector[:int(np.prod(first_shape))].reshape(first_shape), rtol=1e-6)
    assert flatten(module).dtype == np.float64


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros(56), np.zeros((8, 7)), np.full(57, np.nan),
                                 np.full(57, np.inf), np.array(["x"] * 57)])
def test_load_flat_refuses_malformed_vectors(bad):
    module = MLP.build(4, MLP.Hyper(hidden=[5, 3]))
    with pytest.raises(ValueError):
        load_flat(module, bad)


def test_init_is_deterministic_by_seed_and_leaves_global_rng_alone():
    hyper = {"hidden": [16, 8]}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = init_weights(MLP, 10, hyper, seed=7)
    np.testing.assert_array_equal(torch.rand(3), expected_next)
    np.testing.assert_array_equal(first, init_weights(MLP, 10, hyper, seed=7))
    assert not np.array_equal(first, init_weights(MLP, 10, hyper, seed=8))
    assert first.shape == (10 * 16 + 16 + 16 * 8 + 8 + 8 + 1,)


def test_evaluate_and_predict_match_numpy():
    X, y = _data(rows=150, seed=8)
    weights = np.random.default_rng(1).normal(size=4)
    z = X.astype(np.float64) @ weights[:-1] + weights[-1]
    sums = evaluate(LOGISTIC, None, weights, X, y, bins=7)
    assert sums["rows"].tolist() == [150] and sums["rows"].dtype == np.int64
    assert sums["loss"][0] == pytest.approx(float(np.sum(np.logaddexp(0, z) - y * z)), rel=1e-5)
    assert sums["correct"].tolist() == [int(np.sum((z > 0) == (y == 1)))]
    index = np.minimum(np.floor(_sigmoid(z) * 7), 6).astype(int)
    np.testing.assert_array_equal(sums["hist_pos"], [np.bincount(index[y == 1], minlength=7)])
    np.testing.assert_array_equal(sums["hist_neg"], [np.bincount(index[y == 0], minlength=7)])
    np.testing.assert_allclose(sums["prob_sum"], [np.bincount(index, weights=_sigmoid(z), minlength=7)], rtol=1e-5)
    np.testing.assert_allclose(predict_logits(LOGISTIC, None, weights, X), z, atol=1e-5)


def test_evaluate_clips_each_rows_loss():
    X, y = _data(rows=60, seed=9)
    weights = np.array([40.0, 0.0, 0.0, 0.0])  # confident and often wrong: row losses far above the cap
    z = X.astype(np.float64) @ weights[:-1]
    row_losses = np.logaddexp(0, z) - y * z
    assert row_losses.max() > 2 * MAX_ROW_LOSS
    sums = evaluate(LOGISTIC, None, weights, X, y)
    assert sums["loss"][0] == pytest.approx(float(np.minimum(row_losses, MAX_ROW_LOSS).sum()), rel=1e-5)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_multiclass_logistic_step_equals_numpy_softmax_regression():
    rng = np.random.default_rng(12)
    X = rng.normal(size=(90, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=90)
    weights = init_weights(LOGISTIC, 4, None, seed=3, outputs=3)
    assert weights.shape == (4 * 3 + 3,)
    W, b = weights[:12].reshape(3, 4), weights[12:]
    update = train_local(LOGISTIC, None, weights, X, y, epochs=1, batch_size=None, lr=0.5, algorithm="fedavg",
                         mu=0.0, seed=0, classes=3)
    p = _softmax(X.astype(np.float64) @ W.T + b)
    onehot = np.eye(3)[y]
    assert update.loss_before == pytest.approx(float(-np.mean(np.log(p[np.arange(90), y]))), rel=1e-6)
    residual = (p - onehot) / 90
    expected = np.concatenate([(W - 0.5 * residual.T @ X).ravel(), b - 0.5 * residual.sum(axis=0)])
    np.testing.assert_allclose(update.weights, expected, atol=1e-6)
    logits = predict_logits(LOGISTIC, None, update.weights, X, classes=3)
    assert logits.shape == (90, 3)
    sums = evaluate(LOGISTIC, None, update.weights, X, y, classes=3, bins=5)
    assert sums["correct"].tolist() == [int(np.sum(logits.argmax(axis=1) == y))]
    assert sums["hist_pos"].shape == sums["hist_neg"].shape == sums["prob_sum"].shape == (3, 5)
    assert sums["hist_pos"].sum(axis=1).tolist() == np.bincount(y, minlength=3).tolist()
    assert (sums["hist_pos"] + sums["hist_neg"]).sum(axis=1).tolist() == [90, 90, 90]


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0, 2.0]), np.array([0.0, 0.5, 1.0]), np.array([-1.0, 0.0, 1.0])])
def test_binary_training_refuses_labels_other_than_zero_and_one(labels):
    X = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="class labels"):
        train_local(LOGISTIC, None, np.zeros(3), X, labels, epochs=1, batch_size=None, lr=0.1,
                    algorithm="fedavg", mu=0.0, seed=0)
    with pytest.raises(ValueError, match="class labels"):
        evaluate(LOGISTIC, None, np.zeros(9), X, labels + 2, classes=3)  # 3 and 4 are not in 0..2


@pytest.mark.parametrize("change", [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": float("nan")},
                                    {"algorithm": "scaffold"}, {"mu": -1.0}, {"seed": -1}, {"classes": 1},
                                    {"classes": True}])
def test_train_local_refuses_bad_arguments(change):
    X, y = _data(rows=20)
    arguments = {"epochs": 1, "batch_size": None, "lr": 0.1, "algorithm": "fedavg", "mu": 0.0, "seed": 0} | change
    with pytest.raises(ValueError):
        train_local(LOGISTIC, None, np.zeros(4), X, y, **arguments)


def test_train_local_refuses_mismatched_data():
    X, y = _data(rows=20)
    common = {"epochs": 1, "batch_size": None, "lr": 0.1, "algorithm": "fedavg", "mu": 0.0, "seed": 0}
    with pytest.raises(ValueError):
        train_local(LOGISTIC, None, np.zeros(4), X, y[:-1], **common)
    with pytest.raises(ValueError):
        train_local(LOGISTIC, None, np.zeros(4), np.where(X > 1, np.nan, X), y, **common)
    with pytest.raises(ValueError):
        train_local(LOGISTIC, None, np.zeros(5), X, y, **common)  # weights for 4 features
