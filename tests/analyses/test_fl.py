"""fl_train (FedAvg over secure aggregation) equals centralised training on the pooled rows.

With one full-batch step per round and every site taking part, the row-weighted mean of the
sites' updated weights is one gradient-descent step on the pooled loss: the federated weights
are compared step for step with gradient descent computed in the test (a hand-written numpy
gradient for logistic regression, torch's full-batch SGD on the pooled rows for an MLP, binary
and with three classes); with sample_fraction (DP only), only the drawn sites train. On
scikit-learn's breast cancer data, FedAvg over three uneven sites reaches the test AUC of the
same model trained centrally (roc_auc_score computed here). The pooled validation metrics equal
pooled_metrics of the union of the sites' validation rows computed here; under DP-SGD the
reported epsilon equals Opacus' RDP accountant run here on the same history, and a training is
refused once the budget is spent.
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
        result = fed.train("logistic", target="y", features=FEATURES, rounds=r, lr=lr, seed=11,
                           validation_fraction=0.0)
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
    steps = [fed.train("mlp", target="y", features=FEATURES, rounds=r, lr=lr, hyper=hyper, seed=2,
                       validation_fraction=0.0).weights for r in range(1, rounds + 1)]
    np.testing.assert_allclose(np.array(steps), np.array(expected), atol=1e-6, rtol=0)


def test_fedprox_with_mu_zero_equals_fedavg_and_minibatches_run(fed):
    common = dict(target="y", features=FEATURES, rounds=2, local_epochs=2, batch_size=16, lr=0.1, seed=4)
    fedavg = fed.train("logistic", **common)
    fedprox = fed.train("logistic", algorithm="fedprox", mu=0.0, **common)
    np.testing.assert_array_equal(fedavg.weights, fedprox.weights)
    pulled = fed.train("logistic", algorithm="fedprox", mu=5.0, **common)  # lr * mu < 2: pulled, not diverging
    assert not np.array_equal(pulled.weights, fedavg.weights)


def test_result_predicts_plots_and_gives_a_state_dict(fed, sites, tmp_path):
    result = fed.train("mlp", target="y", features=FEATURES, rounds=3, lr=0.5, hyper={"hidden": [6]}, seed=1)
    frame = sites["site_a"]
    probabilities = result.predict_proba(frame)
    assert probabilities.shape == (len(frame),) and np.all((probabilities > 0) & (probabilities < 1))
    state = result.state_dict()
    assert [tuple(v.shape) for v in state.values()] == [(6, 4), (6,), (1, 6), (1,)]
    figure = result.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0 and len(figure.axes) == 2
    history = result.history
    assert list(history["round"]) == [1, 2, 3, 4]  # round 4 evaluates the final weights
    assert np.isnan(history["train_loss"].iloc[-1]) and history["rows"].iloc[-1] == 0
    assert history["train_loss"].iloc[2] < history["train_loss"].iloc[0]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    assert history["val_auc"].between(0, 1).all() and history["val_ece"].between(0, 1).all()
    assert set(history["val_rows"]) == {sum(round(0.2 * n) for n in SIZES.values())}
    assert list(result.calibration.columns) == ["class", "bin_low", "bin_high", "rows", "mean_predicted", "observed"]
    assert result.calibration["rows"].sum() == history["val_rows"].iloc[-1]
    assert result.privacy is None


def _validation_union(sites: dict[str, pd.DataFrame], fraction: float, seed: int, features: list[str],
                      target: str) -> tuple[np.ndarray, np.ndarray]:
    from medveil.analyses.fl import split_rows

    xs, ys = [], []
    for site, frame in sites.items():
        _, held = split_rows(len(frame), fraction, seed)
        xs.append(frame[features].to_numpy(np.float32)[held])
        ys.append(frame[target].to_numpy(np.float32)[held])
    return np.concatenate(xs), np.concatenate(ys)


def test_pooled_validation_metrics_equal_those_of_the_union_of_the_validation_rows(fed, sites):
    from medveil.models import evaluate, get_model, init_weights, pooled_metrics

    hyper, seed, fraction = {"hidden": [5]}, 9, 0.3
    result = fed.train("mlp", target="y", features=FEATURES, rounds=2, lr=0.5, hyper=hyper, seed=seed,
                       validation_fraction=fraction)
    recipe = get_model("mlp", "1")
    x, y = _validation_union(sites, fraction, seed, FEATURES, "y")
    for row, weights in ((0, init_weights(recipe, len(FEATURES), hyper, seed)), (-1, result.weights)):
        expected = pooled_metrics(evaluate(recipe, hyper, weights, x, y, bins=20))
        got = result.history.iloc[row]
        assert got["val_rows"] == len(y) == expected["rows"]
        for key in ("loss", "accuracy", "auc", "ece"):
            assert got[f"val_{key}"] == pytest.approx(expected[key], abs=1e-9), key
    expected = pd.DataFrame(pooled_metrics(evaluate(recipe, hyper, result.weights, x, y, bins=20))["calibration"])
    pd.testing.assert_frame_equal(result.calibration, expected)


def test_sampled_dp_rounds_train_and_charge_only_the_drawn_sites(sites):
    """sample_fraction (only with dp) 1/3 of three sites draws two per round (never one site
    alone): each round's rows are the drawn sites' training rows, and a site takes DP-SGD steps,
    and is charged for them, only in the rounds that draw it. Without dp it is refused."""
    from medveil.analyses.fl import drawn_sites
    from medveil.privacy.disclosure import DisclosureRefused

    rounds, seed, batch, z = 4, 21, 32, 5.0
    dp = {"noise_multiplier": z, "max_grad_norm": 1.0, "delta": 1e-4}
    drawn = [drawn_sites(list(sites), 1 / 3, seed, r) for r in range(1, rounds + 1)]
    assert all(len(pair) == 2 for pair in drawn) and len({tuple(pair) for pair in drawn}) > 1  # the draw changes
    common = dict(target="y", features=FEATURES, rounds=rounds, lr=0.5, seed=seed, validation_fraction=0.0,
                  sample_fraction=1 / 3)
    with mv.Federation.in_process(sites) as federation:
        with pytest.raises(DisclosureRefused) as refused:
            federation.train("logistic", **common)
        assert refused.value.rule == "sample_fraction_needs_dp"
        result = federation.train("logistic", dp=dp, batch_size=batch, **common)
    assert list(result.history["rows"]) == [sum(SIZES[site] for site in pair) for pair in drawn]
    for site, n in SIZES.items():
        steps = sum(site in pair for pair in drawn) * -(-n // batch)
        assert result.privacy.loc[site, "steps"] == steps
        assert result.privacy.loc[site, "rho"] == pytest.approx(steps / (2 * z * z), rel=1e-9)


@pytest.fixture(scope="module")
def multiclass_sites() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(8)
    centres = np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    frames = {}
    for site, n in SIZES.items():
        label = rng.integers(0, 3, n)
        frame = pd.DataFrame(centres[label] + rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
        frame["y"] = label
        frames[site] = frame
    return frames


def test_multiclass_fedavg_equals_pooled_softmax_gradient_descent_and_predicts_k_columns(multiclass_sites):
    from medveil.models import build_module, flatten, get_model, init_weights, load_flat

    x, y = _pooled(multiclass_sites)
    recipe, hyper, lr, rounds, seed = get_model("mlp", "1"), {"hidden": [6], "activation": "tanh"}, 0.4, 3, 5
    module = build_module(recipe, len(FEATURES), hyper, outputs=3).double()
    load_flat(module, init_weights(recipe, len(FEATURES), hyper, seed, outputs=3))
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    expected = []
    for _ in range(rounds):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(xt), yt).backward()
        optimizer.step()
        expected.append(flatten(module))
    with mv.Federation.in_process(multiclass_sites) as federation:
        steps = [federation.train("mlp", target="y", features=FEATURES, classes=3, rounds=r, lr=lr, hyper=hyper,
                                  seed=seed, validation_fraction=0.0).weights for r in range(1, rounds + 1)]
        trained = federation.train("mlp", target="y", features=FEATURES, classes=3, rounds=15, lr=0.5,
                                   hyper=hyper, seed=seed)
    np.testing.assert_allclose(np.array(steps), np.array(expected), atol=1e-6, rtol=0)
    probabilities = trained.predict_proba(multiclass_sites["site_c"])
    assert probabilities.shape == (SIZES["site_c"], 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    assert trained.history["val_accuracy"].iloc[-1] > 0.7 and trained.history["val_auc"].iloc[-1] > 0.85
    assert set(trained.calibration["class"]) == {0, 1, 2}


def test_progress_bar_and_callable_follow_the_rounds(fed, capsys):
    seen = []
    fed.train("logistic", target="y", features=FEATURES, rounds=2, seed=3, progress=lambda done, total: seen.append(
        (done, total)))
    assert seen[-1] == (3, 3) and [done for done, _ in seen] == sorted(done for done, _ in seen)
    result = fed.train("logistic", target="y", features=FEATURES, rounds=2, seed=3, progress=True)
    shown = capsys.readouterr()
    assert "fl_train" in shown.out + shown.err and "val AUC" in shown.out + shown.err
    assert len(result.history) == 3


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
                                     batch_size=batch, hyper=hyper, seed=7, validation_fraction=0.0)
    recipe = get_model("mlp", "1")
    central = train_local(recipe, hyper, init_weights(recipe, len(features), hyper, 7),
                          train[features].to_numpy(np.float32), train["target"].to_numpy(np.float32),
                          epochs=rounds, batch_size=batch, lr=lr, algorithm="fedavg", mu=0.0, seed=7).weights
    central_model = type(federated)(model=federated.model, features=features, target="target", weights=central,
                                    history=federated.history)
    federated_auc = roc_auc_score(test["target"], federated.predict_proba(test))
    central_auc = roc_auc_score(test["target"], central_model.predict_proba(test))
    assert central_auc > 0.95
    assert federated_auc >= central_auc - 0.01


@pytest.mark.parametrize("classes", [2, 3])
def test_one_row_moves_each_group_of_validation_sums_by_at_most_its_sensitivity(classes):
    """The L2 sensitivities noised_validation assumes: removing any one row moves rows, loss /
    MAX_ROW_LOSS, correct, the two histograms together / sqrt(C') and prob_sum by at most 1 each."""
    from medveil.analyses.fl import noised_validation
    from medveil.models import MAX_ROW_LOSS, evaluate, get_model, init_weights

    rng = np.random.default_rng(classes)
    x = rng.normal(scale=3.0, size=(60, 4)).astype(np.float32)
    y = rng.integers(0, classes, 60).astype(np.float32)
    recipe, outputs = get_model("logistic", "1"), 1 if classes == 2 else classes
    weights = init_weights(recipe, 4, {}, 1, outputs=outputs) * 8  # confident, some rows' losses clipped
    full = evaluate(recipe, {}, weights, x, y, classes=classes)
    columns = full["hist_pos"].shape[0]
    worst = np.zeros(5)
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        part = evaluate(recipe, {}, weights, x[keep], y[keep], classes=classes)
        moved = {key: np.asarray(full[key], dtype=np.float64) - part[key] for key in full}
        groups = [moved["rows"], moved["loss"] / MAX_ROW_LOSS, moved["correct"],
                  np.concatenate([moved["hist_pos"].ravel(), moved["hist_neg"].ravel()]) / np.sqrt(columns),
                  moved["prob_sum"].ravel()]
        worst = np.maximum(worst, [np.linalg.norm(g) for g in groups])
    assert np.all(worst <= 1 + 1e-12), worst
    assert worst[3] == pytest.approx(1.0)  # the histograms' bound is tight
    noisy, rho = noised_validation(full, noise_multiplier=2.0)
    assert rho == pytest.approx(1 / (2 * 2.0**2), rel=1e-9)
    assert set(noisy) == set(full) and all(noisy[key].shape == np.shape(full[key]) for key in full)
    assert not np.array_equal(noisy["hist_pos"], full["hist_pos"])


def _dp_expected(sizes: dict[str, int], *, rounds: int, batch: int, z: float, delta: float, fraction: float = 0.2):
    """Per site, as computed here: DP-SGD steps (Opacus' Poisson batches: ceil(rows / batch) per
    epoch, rate 1 / that), noisy evaluations, rho (unamplified zCDP) and Opacus' epsilon."""
    from opacus.accountants import RDPAccountant

    expected = {}
    for site, n in sizes.items():
        rows = n - round(fraction * n)
        per_epoch = -(-rows // batch)
        steps, evaluations = rounds * per_epoch, rounds + 1
        accountant = RDPAccountant()
        accountant.history = [(z, 1 / per_epoch, steps), (z, 1.0, evaluations)]
        expected[site] = {"steps": steps, "sample_rate": 1 / per_epoch, "evaluations": evaluations,
                          "rho": (steps + evaluations) / (2 * z * z), "epsilon": accountant.get_epsilon(delta)}
    return expected


def test_dp_training_reports_opacus_epsilon_and_is_refused_once_the_budget_is_spent(sites):
    from medveil.privacy.disclosure import DisclosurePolicy

    z, delta, rounds, batch = 1.0, 1e-3, 3, 32
    dp = {"noise_multiplier": z, "max_grad_norm": 1.0, "delta": delta}
    expected = _dp_expected(SIZES, rounds=rounds, batch=batch, z=z, delta=delta)
    budget = max(e["rho"] for e in expected.values()) * 1.2  # one training fits, a second does not
    common = dict(target="y", features=FEATURES, rounds=rounds, batch_size=batch, lr=0.5, seed=6)
    with mv.Federation.in_process(sites, policy=DisclosurePolicy(dp_budget_rho=budget)) as federation:
        with pytest.raises(mv.RefusedError) as refused:  # planned beyond the whole budget: refused in round 0
            federation.train("logistic", dp=dp, **dict(common, rounds=20))
        assert refused.value.rule == "dp_budget_exhausted"
        result = federation.train("logistic", dp=dp, **common)
        with pytest.raises(mv.RefusedError) as refused:
            federation.train("logistic", dp=dp, **common)
        assert refused.value.rule == "dp_budget_exhausted"
    privacy = result.privacy
    assert sorted(privacy.index) == sorted(SIZES)
    for site, want in expected.items():
        got = privacy.loc[site]
        assert got["steps"] == want["steps"] and got["evaluations"] == want["evaluations"]
        assert got["sample_rate"] == pytest.approx(want["sample_rate"], rel=1e-12)
        assert got["rho"] == pytest.approx(want["rho"], rel=1e-9)
        assert result.provenance["dp_rho_spent"][site] == pytest.approx(got["rho"], rel=1e-12)
        assert got["epsilon"] == pytest.approx(want["epsilon"], rel=1e-9)
        bun_steinke = got["rho"] + 2 * np.sqrt(got["rho"] * np.log(1 / delta))
        assert got["epsilon"] < got["epsilon_zcdp"] <= bun_steinke  # the charge is the conservative one
    assert result.history["train_loss"].isna().all()  # no training loss leaves under DP
    assert result.history["val_auc"].notna().all() and np.all(np.isfinite(result.weights))
