"""Simulated-site partitions: every row exactly once, and label skew that grows as alpha shrinks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medveil.models.partition import dirichlet, iid


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = 3000
    return pd.DataFrame({"x": rng.normal(size=rows), "label": rng.integers(0, 3, size=rows)},
                        index=pd.RangeIndex(rows) * 10)


def _assert_exact_cover(frame: pd.DataFrame, parts: list[pd.DataFrame]) -> None:
    joined = pd.concat(parts)
    assert len(joined) == len(frame)
    assert joined.index.is_unique
    pd.testing.assert_frame_equal(joined.sort_index(), frame)


def _label_skew(frame: pd.DataFrame, parts: list[pd.DataFrame], label: str = "label") -> float:
    """Mean total-variation distance between each part's label distribution and the whole's."""
    overall = frame[label].value_counts(normalize=True)
    return float(np.mean([0.5 * (part[label].value_counts(normalize=True).reindex(overall.index, fill_value=0)
                                 - overall).abs().sum() for part in parts]))


@pytest.mark.parametrize("sites", [1, 2, 7])
def test_iid_covers_every_row_once_in_near_equal_parts(frame, sites):
    parts = iid(frame, sites, seed=3)
    assert len(parts) == sites
    _assert_exact_cover(frame, parts)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(part.index.is_monotonic_increasing for part in parts)


def test_iid_is_deterministic_by_seed(frame):
    same = [p.index.tolist() for p in iid(frame, 4, seed=1)]
    assert same == [p.index.tolist() for p in iid(frame, 4, seed=1)]
    assert same != [p.index.tolist() for p in iid(frame, 4, seed=2)]


@pytest.mark.parametrize("alpha", [0.05, 1.0, 100.0])
def test_dirichlet_covers_every_row_once(frame, alpha):
    parts = dirichlet(frame, "label", 5, alpha, seed=4)
    assert len(parts) == 5 and all(len(part) >= 1 for part in parts)
    _assert_exact_cover(frame, parts)


def test_dirichlet_skew_grows_as_alpha_shrinks(frame):
    skews = [np.mean([_label_skew(frame, dirichlet(frame, "label", 4, alpha, seed=seed)) for seed in range(8)])
             for alpha in (1000.0, 10.0, 1.0, 0.1)]
    assert skews == sorted(skews)
    assert skews[0] < 0.05
    assert skews[-1] > 0.3
    iid_skew = np.mean([_label_skew(frame, iid(frame, 4, seed=seed)) for seed in range(8)])
    assert iid_skew < 0.05


def test_dirichlet_is_deterministic_and_honours_min_rows(frame):
    first = [p.index.tolist() for p in dirichlet(frame, "label", 3, 0.5, seed=9)]
    assert first == [p.index.tolist() for p in dirichlet(frame, "label", 3, 0.5, seed=9)]
    parts = dirichlet(frame, "label", 3, 0.5, seed=9, min_rows=200)
    assert min(len(part) for part in parts) >= 200
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(frame, "label", 3, 0.5, seed=9, min_rows=1001)


def test_dirichlet_keeps_missing_labels_as_their_own_value():
    frame = pd.DataFrame({"label": ["a", None, "b", None, "a", "b"] * 20})
    parts = dirichlet(frame, "label", 2, 1.0, seed=0)
    _assert_exact_cover(frame, parts)


@pytest.mark.parametrize("call", [
    lambda f: iid(f, 0, seed=0), lambda f: iid(f, 3001, seed=0), lambda f: iid(f, True, seed=0),
    lambda f: dirichlet(f, "label", 2, 0.0, seed=0), lambda f: dirichlet(f, "label", 2, float("nan"), seed=0),
    lambda f: dirichlet(f, "label", 0, 1.0, seed=0),
])
def test_bad_arguments_are_refused(frame, call):
    with pytest.raises(ValueError):
        call(frame)


def test_unknown_label_column_is_refused(frame):
    with pytest.raises(KeyError):
        dirichlet(frame, "outcome", 2, 1.0, seed=0)
