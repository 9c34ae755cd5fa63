"""Disclosure rules: small counts suppressed, CDF tails hidden, too-small groups refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from medveil.privacy.disclosure import (
    DisclosurePolicy,
    DisclosureRefused,
    clamp_cumulative_counts,
    require_min_count,
    suppress_small_counts,
)

min_counts = st.integers(1, 12)
count_arrays = hnp.arrays(np.int64, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6), elements=st.integers(0, 40))


def test_default_policy():
    policy = DisclosurePolicy()
    assert policy.min_cell_count == 5 and policy.max_levels == 50


@pytest.mark.parametrize("raw", [{"min_cell_count": 0}, {"max_levels": 1}, {"unknown_rule": 3}])
def test_policy_cannot_be_weakened_below_its_floor_or_misspelt(raw):
    with pytest.raises(ValidationError):
        DisclosurePolicy(**raw)


@settings(max_examples=200, deadline=None)
@given(counts=count_arrays, min_count=min_counts)
def test_suppress_zeroes_exactly_the_small_nonzero_counts(counts, min_count):
    policy = DisclosurePolicy(min_cell_count=min_count)
    released, suppressed = suppress_small_counts(counts, policy)
    assert released.shape == counts.shape == suppressed.shape
    assert suppressed.dtype == bool
    for count, out, hidden in zip(counts.ravel(), released.ravel(), suppressed.ravel()):
        if 1 <= count <= min_count - 1:
            assert hidden and out == 0
        else:
            assert not hidden and out == count  # zeros stay zero, large counts pass unchanged
    assert not np.any((released > 0) & (released < min_count))


def test_suppress_example_with_default_policy():
    counts = np.array([[0, 1, 4], [5, 6, 100]])
    released, suppressed = suppress_small_counts(counts, DisclosurePolicy())
    np.testing.assert_array_equal(released, np.where((counts >= 1) & (counts <= 4), 0, counts))
    np.testing.assert_array_equal(suppressed, (counts >= 1) & (counts <= 4))
    assert suppressed.sum() == 2


def test_suppress_accepts_float_counts_as_released_by_analyses():
    released, suppressed = suppress_small_counts(np.array([0.0, 3.0, 7.0]), DisclosurePolicy())
    np.testing.assert_array_equal(released, [0, 0, 7])
    np.testing.assert_array_equal(suppressed, [False, True, False])


@st.composite
def cumulative_counts(draw):
    min_count = draw(min_counts)
    n = draw(st.integers(min_count, 200))  # callers only clamp sites with at least min_cell_count values
    values = draw(st.lists(st.integers(0, n), min_size=1, max_size=60))
    cumulative = np.sort(np.array(values, dtype=np.int64))  # a CDF on a grid: non-decreasing, within [0, n]
    return cumulative, n, min_count


@settings(max_examples=300, deadline=None)
@given(case=cumulative_counts())
def test_clamp_hides_both_tails(case):
    cumulative, n, min_count = case
    policy = DisclosurePolicy(min_cell_count=min_count)
    released = clamp_cumulative_counts(cumulative, n, policy)
    assert released.shape == cumulative.shape
    assert not np.any((released > 0) & (released < min_count)), "lower tail shows a small count"
    assert not np.any((released > n - min_count) & (released < n)), "upper tail shows a small remainder"
    assert np.all((released >= 0) & (released <= n))
    assert np.all(np.diff(released) >= 0), "a released CDF must stay non-decreasing"
    # Values with at least min_count rows on each side are released exactly.
    interior = (cumulative >= min_count) & (n - cumulative >= min_count)
    np.testing.assert_array_equal(released[interior], cumulative[interior])
    # Everything else is rounded to an end: 0 below the lower cut, n above the upper cut.
    assert np.all(np.isin(released[~interior], [0, n]))
    np.testing.assert_array_equal(released[cumulative > n - min_count], n)


def test_clamp_example():
    n, policy = 20, DisclosurePolicy(min_cell_count=5)
    cumulative = np.arange(0, n + 1)
    released = clamp_cumulative_counts(cumulative, n, policy)
    expected = np.where(cumulative < 5, 0, np.where(n - cumulative < 5, n, cumulative))
    np.testing.assert_array_equal(released, expected)
    assert set(released) == {0, n} | set(range(5, 16))


@pytest.mark.parametrize("min_count", [1, 2, 5, 11])
def test_require_min_count_boundary(min_count):
    policy = DisclosurePolicy(min_cell_count=min_count)
    require_min_count(min_count, policy, "group")
    require_min_count(min_count + 10, policy, "group")
    for n in range(min_count):
        with pytest.raises(DisclosureRefused) as info:
            require_min_count(n, policy, "site_a's group")
        assert info.value.rule == "min_cell_count"
        assert "site_a's group" in info.value.detail and str(n) in info.value.detail
        assert str(info.value).startswith("[min_cell_count]")


def test_saturation_guard_refuses_models_close_to_the_rows():
    from medveil.privacy.disclosure import require_not_saturated

    policy = DisclosurePolicy()
    require_not_saturated(100, 33, policy)
    with pytest.raises(DisclosureRefused) as error:
        require_not_saturated(100, 34, policy)
    assert error.value.rule == "saturation"
    require_not_saturated(100, 50, DisclosurePolicy(max_parameter_ratio=0.5))
