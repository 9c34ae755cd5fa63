"""Image recipes (cnn@1, resnet18@1): learning scikit-learn's digits, ResNet-18's size, lazily
read rows, and Opacus compatibility of every built-in recipe."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medveil.models import (
    BUILTIN_RECIPES,
    CNN,
    DPSGD,
    RESNET18,
    build_module,
    evaluate,
    init_weights,
    model_inputs,
    n_parameters,
    outputs_for,
    pooled_metrics,
    predict_logits,
    train_local,
    training,
)


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]  # (rows, 1 channel, 8, 8) in [0, 1]
    return train_test_split(X, digits.target, test_size=0.25, random_state=0, stratify=digits.target)


class CountingRows:
    """A LazyRows over an array that records every batch read."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        self.reads.append(len(indices))
        return self.images[indices]


def test_cnn_learns_digits_centrally():
    X_train, X_test, y_train, y_test = _digits()
    hyper = {"image_size": 8, "channels": 1, "widths": [16, 32]}
    weights = init_weights(CNN, model_inputs(CNN, hyper, 0), hyper, seed=0, outputs=outputs_for(10))
    update = train_local(CNN, hyper, weights, X_train, y_train, epochs=8, batch_size=32, lr=0.2,
                         algorithm="fedavg", mu=0.0, seed=1, classes=10)
    assert update.steps == 8 * int(np.ceil(len(y_train) / 32))
    metrics = pooled_metrics(evaluate(CNN, hyper, update.weights, X_test, y_test, classes=10))
    accuracy = float(np.mean(predict_logits(CNN, hyper, update.weights, X_test, classes=10).argmax(axis=1) == y_test))
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert metrics["accuracy"] > 0.9
    assert metrics["auc"] > 0.95
    assert update.loss_before > pooled_metrics(evaluate(CNN, hyper, update.weights, X_train, y_train, classes=10))["loss"]


def test_lazy_rows_are_read_in_batches_and_match_an_array():
    X_train, _, y_train, _ = _digits()
    X, y = X_train[:600], y_train[:600]
    hyper = {"image_size": 8, "widths": [4]}
    weights = init_weights(CNN, 1, hyper, seed=0, outputs=10)
    common = {"epochs": 1, "lr": 0.1, "algorithm": "fedavg", "mu": 0.0, "seed": 3, "classes": 10}
    lazy = CountingRows(X)
    full_lazy = train_local(CNN, hyper, weights, lazy, y, batch_size=None, **common)
    assert lazy.reads and max(lazy.reads) <= training.PHYSICAL_BATCH < len(y)
    full_array = train_local(CNN, hyper, weights, X, y, batch_size=None, **common)
    np.testing.assert_allclose(full_lazy.weights, full_array.weights, atol=1e-6)  # chunks add up to the batch
    assert full_lazy.loss_before == pytest.approx(full_array.loss_before, rel=1e-6)
    lazy.reads.clear()
    mini_lazy = train_local(CNN, hyper, weights, lazy, y, batch_size=50, measure_loss=False, **common)
    assert max(lazy.reads) <= 50 and mini_lazy.loss_before is None
    np.testing.assert_array_equal(mini_lazy.weights,
                                  train_local(CNN, hyper, weights, X, y, batch_size=50, **common).weights)
    lazy.reads.clear()
    np.testing.assert_array_equal(evaluate(CNN, hyper, weights, lazy, y, classes=10)["hist_pos"],
                                  evaluate(CNN, hyper, weights, X, y, classes=10)["hist_pos"])
    assert max(lazy.reads) <= training.PHYSICAL_BATCH
    lazy.reads.clear()
    dp = train_local(CNN, hyper, weights, lazy, y, batch_size=400, dp=DPSGD(1.0, 1.0), measure_loss=False, **common)
    assert dp.loss_before is None and max(lazy.reads) <= training.PHYSICAL_BATCH


class BadRows(CountingRows):
    def __init__(self, images: np.ndarray, change) -> None:
        super().__init__(images)
        self.change = change

    def batch(self, indices: np.ndarray) -> np.ndarray:
        return self.change(super().batch(indices))


@pytest.mark.parametrize("change, message", [
    (lambda b: b * 2.0, r"\[0, 1\]"),
    (lambda b: np.where(b > 0.5, np.nan, b), "finite"),
    (lambda b: b[:, :, :4, :4], "shape"),
    (lambda b: b[:-1], "shape"),
    (lambda b: np.repeat(b, 3, axis=1), "shape"),
])
def test_image_rows_are_checked(change, message):
    X = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    y = np.arange(10) % 2
    weights = init_weights(CNN, 1, {"image_size": 8}, seed=0)
    with pytest.raises(ValueError, match=message):
        train_local(CNN, {"image_size": 8}, weights, BadRows(X, change), y, epochs=1, batch_size=None, lr=0.1,
                    algorithm="fedavg", mu=0.0, seed=0)
    with pytest.raises(ValueError, match=message):
        evaluate(CNN, {"image_size": 8}, weights, change(X), y)


@pytest.mark.parametrize("size", [8, 32])
def test_resnet18_builds_and_steps(size):
    hyper = {"image_size": size, "channels": 3, "base_width": 8}
    X = np.random.default_rng(size).random((6, 3, size, size)).astype(np.float32)
    y = np.arange(6) % 3
    weights = init_weights(RESNET18, 3, hyper, seed=0, outputs=3)
    update = train_local(RESNET18, hyper, weights, X, y, epochs=1, batch_size=None, lr=0.05,
                         algorithm="fedavg", mu=0.0, seed=0, classes=3)
    assert update.weights.shape == weights.shape and np.all(np.isfinite(update.weights))
    assert not np.array_equal(update.weights, weights)
    assert predict_logits(RESNET18, hyper, update.weights, X, classes=3).shape == (6, 3)


def test_resnet18_has_resnet18s_parameter_count():
    # torchvision's resnet18() has 11,689,512 parameters (1000 classes); GroupNorm has the same
    # affine parameters as BatchNorm (and no running statistics), so the counts must agree.
    imagenet = build_module(RESNET18, 3, {"image_size": 224, "channels": 3, "base_width": 64}, outputs=1000)
    assert n_parameters(imagenet) == 11_689_512
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in imagenet.modules())
    small = build_module(RESNET18, 3, {"image_size": 32, "channels": 3, "base_width": 64})
    # without the 512 x 1000 head and with the 3x3 stem: about 11.17M
    assert 11_100_000 < n_parameters(small) < 11_200_000


@pytest.mark.parametrize("recipe", BUILTIN_RECIPES, ids=lambda r: r.key)
def test_every_builtin_passes_opacus_validation_and_trains_under_dp(recipe):
    from opacus.validators import ModuleValidator

    if recipe.inputs == "image":
        hyper = recipe.Hyper(image_size=8, channels=1, **({"base_width": 4} if recipe is RESNET18 else {}))
        X = np.random.default_rng(1).random((12, 1, 8, 8)).astype(np.float32)
    else:
        hyper = recipe.Hyper(**({"hidden": [4], "dropout": 0.2} if recipe.key == "mlp@1" else {}))
        X = np.random.default_rng(1).normal(size=(12, 3)).astype(np.float32)
    n_inputs = model_inputs(recipe, hyper, 3)
    for classes in (2, 3):
        module = build_module(recipe, n_inputs, hyper, outputs_for(classes))
        assert ModuleValidator.validate(module.train(), strict=False) == []
        weights = init_weights(recipe, n_inputs, hyper, seed=0, outputs=outputs_for(classes))
        update = train_local(recipe, hyper, weights, X, np.arange(12) % classes, epochs=2, batch_size=4, lr=0.1,
                             algorithm="fedavg", mu=0.0, seed=5, classes=classes, dp=DPSGD(1.0, 1.0))
        assert (update.steps, update.sample_rate) == (2 * 3, pytest.approx(1 / 3))
        assert np.all(np.isfinite(update.weights)) and not np.array_equal(update.weights, weights)
