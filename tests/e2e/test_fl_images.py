"""A small CNN learns scikit-learn's digits across three label-skewed sites of PNG folders.

The 8x8 digit images are split into a test set and three sites by a Dirichlet label skew
(`medveil.models.partition.dirichlet`); each site is a folder of PNG files with a labels.csv
(tests/image_fixtures.py), which its node opens as an image dataset and reads lazily. The
federated model (cnn@1, ten classes, FedAvg over secure aggregation) must classify the held-out
test images with accuracy above 0.9; its pooled validation metrics must say it learned too.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import medveil as mv
from image_fixtures import as_uint8, write_digits_folder

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

pytestmark = pytest.mark.e2e

MIN_CLASS_ROWS = 15  # rows of one digit a site keeps at least (else they go to its largest holder)


def _label_skewed_sites(train: pd.DataFrame, sites: int, seed: int) -> list[pd.DataFrame]:
    """Dirichlet(0.5) label skew; a digit a site would hold only a handful of rows of is moved to
    the site holding most of it, as a site refuses to train on a class of fewer than
    min_cell_count rows (indicator_isolation)."""
    from medveil.models.partition import dirichlet

    parts = dirichlet(train, "label", sites, alpha=0.5, seed=seed, min_rows=100)
    owner = pd.Series(np.concatenate([[i] * len(part) for i, part in enumerate(parts)]),
                      index=np.concatenate([part.index for part in parts]))
    for digit in range(10):
        rows = train.index[train["label"] == digit]
        counts = owner[rows].value_counts()
        largest = counts.idxmax()
        for site, count in counts.items():
            if count < MIN_CLASS_ROWS:
                owner[rows[owner[rows] == site]] = largest
    return [train.loc[owner.index[owner == site]] for site in range(sites)]


def test_a_cnn_learns_label_skewed_digits_across_three_image_sites(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    frame = pd.DataFrame({"label": digits.target})
    train, test = train_test_split(frame, test_size=0.2, random_state=0, stratify=frame["label"])
    parts = _label_skewed_sites(train, 3, seed=4)
    shares = np.array([np.bincount(part["label"], minlength=10) / len(part) for part in parts])
    assert shares.max() > 0.2 and (shares == 0).any()  # skewed: some digits dominate, some are absent
    folders = {f"hospital_{i}": write_digits_folder(tmp_path / f"hospital_{i}", digits.images[part.index],
                                                    part["label"].tolist())
               for i, part in enumerate(parts)}
    hyper = {"image_size": 8, "channels": 1, "widths": [16, 32]}
    with mv.Federation.in_process(folders) as fed:
        result = fed.train("cnn", image="file", target="label", classes=10, hyper=hyper, rounds=12, local_epochs=2,
                           batch_size=32, lr=0.1, validation_fraction=0.1, seed=3)
    assert result.provenance["rows"] == {site: len(part) - round(0.1 * len(part))
                                         for site, part in zip(folders, parts)}
    images = as_uint8(digits.images[test.index]).astype(np.float32)[:, None] / 255.0
    probabilities = result.predict_proba(images)
    assert probabilities.shape == (len(test), 10)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == test["label"].to_numpy()))
    assert accuracy > 0.9, accuracy
    assert result.history["val_accuracy"].iloc[-1] > 0.85
    assert result.history["val_loss"].iloc[-1] < result.history["val_loss"].iloc[0]
