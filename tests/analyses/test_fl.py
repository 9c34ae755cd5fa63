"""fl_train (FedAvg over secure aggregation) equals centralised training on the pooled rows.

With one full-batch step per round and every site taking part, the row-weighted mean of the
sites' updated weights is one gradient-descent step on the pooled loss: the federated weights
are compared step for step with gradient descent computed in the test (a hand-written numpy
gradient for logistic regression, torch's full-batch SGD on the pooled rows for an MLP). On
scikit-learn's breast cancer data, FedAvg over three uneven sites reaches the test AUC of the
same model trained centrally (roc_auc_score computed here).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv

torch = pytest.importorskip("torch")

FEATURES = ["x1", "x2", "x3", "x4"]
SIZES = {"site_a": 70, "site_b": 110, "site_c": 160}


@pytest.fixture(scope="module")
def sites() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(5)
    frames = {}
    for site, n in SIZES.items():
        x = rng.normal(size=(n, len(FEATURES))) + rng.normal(scale=0.5, size=len(FEATURES))  # sites differ
        logit = 0.4 + x @ np.array([1.0, -0.7, 0.3, 0.0])
        frame = pd.DataFrame(x, columns=FEATURES)
        frame["y"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
        frames[site] = frame
    return frames


@pytest.fixture(scope="module")
def fed(sites):
    with mv.Federation.in_process(sites) as federation:
        yield federation


def _pooled(sites: dict[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    pooled = pd.concat(sites.values(), ignore_index=True)
    return pooled[FEATURES].to_numpy(np.float64), pooled["y"].to_numpy(np.float64)


def test_logistic_fedavg_equals_pooled_gradient_descent_step_for_step(fed, sites):
    from medveil.models import get_model, init_weights

    x, y = _pooled(sites)
    d, lr, rounds = len(FEATURES), 0.5, 6
    weights = init_weights(get_model("logistic", "1"), d, {}, 11)
    expected, losses = [], []
    for _ in range(rounds):
        w, b = weights[:d], weights[d]
        p = 1 / (1 + np.exp(-(x @ w + b)))
        losses.append(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        gradient = np.append(x.T @ (p - y), np.sum(p - y)) / len(y)
        weights = weights - lr * gradient
        expected.append(weights)
    steps = []
    for r in range(1, rounds + 1):
        result = fed.train("logistic", target="y", features=FEATURES, rounds=r, lr=lr, seed=11)
        steps.append(result.weights)
    np.testing.assert_allclose(np.array(steps), np.array(expected), atol=1e-6, rtol=0)
    np.testing.assert_allclose(result.history["train_loss"], losses, atol=1e-6, rtol=0)
    assert list(result.history["round"]) == list(range(1, rounds + 1))
    assert set(result.history["rows"]) == {sum(SIZES.values())}
    assert result.provenance["rows"] == SIZES and result.provenance["secure_aggregation"]


def test_mlp_fedavg_equals_pooled_full_batch_sgd_step_for_step(fed, sites):
    from medveil.models import build_module, flatten, get_model, init_weights, load_flat

    hyper = {"hidden": [8, 4], "activation": "tanh"}
    x, y = _pooled(sites)
    recipe, lr, rounds = get_model("mlp", "1"), 0.3, 4
    module = build_module(recipe, len(FEATURES), hyper).double()
    load_flat(module, init_weights(recipe, len(FEATURES), hyper, 2))
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    expected = []
    for _ in range(rounds):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(module(xt), yt).backward()
        optimizer.step()
        expected.append(flatten(module))
    steps = [fed.train("mlp", target="y", features=FEATURES, rounds=r, lr=lr, hyper=hyper, seed=2).weights
             for r in range(1, rounds + 1)]
    np.testing.assert_allclose(np.array(steps), np.array(expected), atol=1e-6, rtol=0)


def test_fedprox_with_mu_zero_equals_fedavg_and_minibatches_run(fed):
    common = dict(target="y", features=FEATURES, rounds=2, local_epochs=2, batch_size=16, lr=0.1, seed=4)
    fedavg = fed.train("logistic", **common)
    fedprox = fed.train("logistic", algorithm="fedprox", mu=0.0, **common)
    np.testing.assert_array_equal(fedavg.weights, fedprox.weights)
    pulled = fed.train("logistic", algorithm="fedprox", mu=50.0, **common)
    assert not np.array_equal(pulled.weights, fedavg.weights)


def test_result_predicts_plots_and_gives_a_state_dict(fed, sites, tmp_path):
    result = fed.train("mlp", target="y", features=FEATURES, rounds=3, lr=0.5, hyper={"hidden": [6]}, seed=1)
    frame = sites["site_a"]
    probabilities = result.predict_proba(frame)
    assert probabilities.shape == (len(frame),) and np.all((probabilities > 0) & (probabilities < 1))
    state = result.state_dict()
    assert [tuple(v.shape) for v in state.values()] == [(6, 4), (6,), (1, 6), (1,)]
    result.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]


def test_breast_cancer_fedavg_reaches_the_centralised_test_auc(tmp_path):
    from sklearn.datasets import load_breast_cancer
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    from medveil.models import get_model, init_weights, train_local

    frame = load_breast_cancer(as_frame=True).frame
    features = [c for c in frame.columns if c != "target"]
    train, test = train_test_split(frame, test_size=0.3, random_state=0, stratify=frame["target"])
    mean, sd = train[features].mean(), train[features].std()
    train, test = train.copy(), test.copy()
    train[features] = (train[features] - mean) / sd
    test[features] = (test[features] - mean) / sd
    renamed = {c: c.replace(" ", "_") for c in features}
    train, test = train.rename(columns=renamed), test.rename(columns=renamed)
    features = list(renamed.values())
    shuffled = train.sample(frac=1.0, random_state=1).reset_index(drop=True)
    cuts = [0, int(0.55 * len(shuffled)), int(0.85 * len(shuffled)), len(shuffled)]  # uneven: 55%, 30%, 15%
    sites = {f"hospital_{i}": shuffled.iloc[cuts[i]:cuts[i + 1]].reset_index(drop=True) for i in range(3)}

    hyper, rounds, lr, batch = {"hidden": [16]}, 40, 0.1, 32
    with mv.Federation.in_process(sites) as federation:
        federated = federation.train("mlp", target="target", features=features, rounds=rounds, lr=lr,
                                     batch_size=batch, hyper=hyper, seed=7)
    recipe = get_model("mlp", "1")
    central, _, _ = train_local(recipe, hyper, init_weights(recipe, len(features), hyper, 7),
                                train[features].to_numpy(np.float32), train["target"].to_numpy(np.float32),
                                epochs=rounds, batch_size=batch, lr=lr, algorithm="fedavg", mu=0.0, seed=7)
    central_model = type(federated)(model=federated.model, features=features, target="target", weights=central,
                                    history=federated.history)
    federated_auc = roc_auc_score(test["target"], federated.predict_proba(test))
    central_auc = roc_auc_score(test["target"], central_model.predict_proba(test))
    assert central_auc > 0.95
    assert federated_auc >= central_auc - 0.01
