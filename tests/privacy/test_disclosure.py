"""Disclosure rules: small counts suppressed (and secondary suppression), CDF tails hidden and
steps coarsened, too-small groups refused, the differencing guard."""

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
    check_differencing,
    check_differencing_many,
    clamp_cumulative_counts,
    coarsen_cumulative_counts,
    require_min_count,
    secondary_suppression,
    suppress_small_counts,
    suppress_table,
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
        assert "site_a's group" in info.value.detail and str(min_count) in info.value.detail
        assert str(info.value).startswith("[min_cell_count]")


def test_saturation_guard_refuses_models_close_to_the_rows():
    from medveil.privacy.disclosure import require_not_saturated

    policy = DisclosurePolicy()
    require_not_saturated(100, 33, policy)
    with pytest.raises(DisclosureRefused) as error:
        require_not_saturated(100, 34, policy)
    assert error.value.rule == "saturation"
    require_not_saturated(100, 50, DisclosurePolicy(max_parameter_ratio=0.5))


def _lines(array: np.ndarray):
    """Every line (row, column, ...) of two or more cells of an n-way array."""
    for axis in range(array.ndim):
        if array.shape[axis] < 2:
            continue
        moved = np.moveaxis(array, axis, -1)
        for index in np.ndindex(moved.shape[:-1]):
            yield axis, index


table_counts = hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7),
                          elements=st.sampled_from([0, 0, 1, 2, 3, 4, 5, 6, 8, 12, 30]))


@settings(max_examples=300, deadline=None)
@given(counts=table_counts, min_count=st.integers(2, 8))
def test_secondary_suppression_never_leaves_a_line_with_one_hidden_cell(counts, min_count):
    policy = DisclosurePolicy(min_cell_count=min_count)
    released, hidden = suppress_table(counts, policy)
    primary = (counts > 0) & (counts < min_count)
    assert np.all(hidden[primary]), "every small cell stays hidden"
    np.testing.assert_array_equal(released, np.where(hidden, 0, counts))
    for axis, index in _lines(hidden):
        line_hidden = np.moveaxis(hidden, axis, -1)[index]
        line = np.moveaxis(counts, axis, -1)[index]
        assert line_hidden.sum() != 1, "a line total minus the cells shown would be that one cell"
        if line_hidden.any() and np.any(line[~line_hidden] > 0):
            # A line total minus the cells shown is never a small count.
            assert line[line_hidden].sum() >= min_count


def test_secondary_suppression_example_hides_the_smallest_other_cell_of_each_line():
    counts = np.array([[2, 9, 7], [6, 20, 15], [8, 10, 30]])
    hidden = secondary_suppression(counts, (counts > 0) & (counts < 5), DisclosurePolicy())
    # Row 0 hides 7 (its smallest other nonzero cell) and column 0 hides 6; row 1 then has one
    # hidden cell (6) and hides its smallest other, 15, which leaves column 2 with two.
    np.testing.assert_array_equal(hidden, [[True, False, True], [True, False, True], [False, False, False]])


def test_a_suppressed_bin_is_not_the_total_minus_the_bins_shown():
    counts = np.array([0, 12, 3, 40, 7, 0])
    released, hidden = suppress_table(counts, DisclosurePolicy())
    assert hidden.sum() == 2 and hidden[2] and hidden[4]  # the 3 and the smallest other nonzero bin, 7
    assert counts.sum() - released.sum() == 10  # the total minus the bins shown is a sum of two bins


def test_a_line_whose_other_cells_are_zero_gets_a_zero_cell_hidden():
    counts = np.array([[3, 0, 0], [10, 20, 30]])
    hidden = secondary_suppression(counts, counts == 3, DisclosurePolicy())
    assert hidden[0].sum() >= 2 and all(hidden[:, j].sum() != 1 for j in range(3))


def test_under_dp_only_the_noisy_small_counts_are_hidden():
    counts = np.array([0, 3, 40, 50])
    released, hidden = suppress_table(counts, DisclosurePolicy(), noise=lambda c: np.asarray(c, dtype=float))
    np.testing.assert_array_equal(hidden, [False, True, False, False])


@st.composite
def cdf_cases(draw):
    min_count = draw(st.integers(1, 10))
    values = np.sort(np.array(draw(st.lists(st.integers(0, 60), min_size=min_count, max_size=150)), dtype=float))
    grid = np.linspace(-2, 62, draw(st.integers(2, 200)))
    return np.searchsorted(values, grid, side="right"), len(values), min_count


@settings(max_examples=300, deadline=None)
@given(case=cdf_cases())
def test_coarsened_cdf_has_no_exact_count_and_no_small_step(case):
    cumulative, n, min_count = case
    policy = DisclosurePolicy(min_cell_count=min_count)
    released = coarsen_cumulative_counts(cumulative, n, policy)
    assert np.all(np.diff(released) >= 0) and np.all((released >= 0) & (released <= n))
    assert np.all(np.abs(released - cumulative) <= min_count - 1), "within min_cell_count-1 rows of the truth"
    steps = np.diff(released)
    assert np.all((steps == 0) | (steps >= min_count)), "a released step of fewer than min_cell_count rows"
    interior = (cumulative >= min_count) & (n - cumulative >= min_count)
    np.testing.assert_array_equal(released[~interior], clamp_cumulative_counts(cumulative, n, policy)[~interior])
    if n - 2 * min_count + 1 >= min_count:  # room for bins of min_cell_count counts inside
        for count in range(min_count, n - min_count + 1):  # every count shares its released value with m-1 others
            same = coarsen_cumulative_counts(np.arange(n + 1), n, policy) == \
                coarsen_cumulative_counts(np.array([count]), n, policy)[0]
            assert same.sum() >= min_count


def test_coarsened_cdf_hides_a_single_patient_step():
    values = np.concatenate([np.arange(20.0), [20.5], np.arange(21.0, 41.0)])
    grid = np.array([10.0, 20.0, 20.4, 20.6, 21.0, 30.0])
    cumulative = np.searchsorted(values, grid, side="right")  # 11, 21, 21, 22, 23, 32
    released = coarsen_cumulative_counts(cumulative, len(values), DisclosurePolicy())
    assert released[2] == released[3]  # the step of one patient between 20.4 and 20.6 is not shown
    # No count there is exact: the counts 20..24 all read as the same value.
    assert set(coarsen_cumulative_counts(np.arange(20, 25), len(values), DisclosurePolicy())) == {released[1]}


def test_differencing_many_matches_the_pairwise_rule():
    rng = np.random.default_rng(0)
    policy = DisclosurePolicy()
    base = rng.random(500) < 0.5
    near = base.copy()
    near[np.flatnonzero(base)[:3]] = False
    far = base.copy()
    far[np.flatnonzero(base)[:5]] = False
    check_differencing_many([base, far], [base], policy)  # equal, or at least min_cell_count apart
    with pytest.raises(DisclosureRefused) as error:
        check_differencing_many([far, near], [base], policy)
    assert error.value.rule == "differencing" and "3" not in error.value.detail
    with pytest.raises(DisclosureRefused):
        check_differencing(near, [far, base], policy)


def test_differencing_ignores_sets_too_small_to_release_and_other_lengths():
    policy = DisclosurePolicy()
    one, two = np.zeros(50, bool), np.zeros(50, bool)
    one[:2], two[:4] = True, True
    check_differencing_many([two], [one], policy)  # neither holds min_cell_count rows: never released alone
    check_differencing_many([np.ones(51, bool)], [np.ones(50, bool)], policy)


def test_differencing_many_handles_hundreds_of_sets():
    rng = np.random.default_rng(1)
    policy = DisclosurePolicy()
    values = rng.normal(size=20000)
    edges = np.linspace(-1.5, 1.5, 300)  # neighbouring bins hold dozens of rows
    earlier = [values < edge for edge in edges] * 10  # stored sets repeat across queries
    check_differencing_many([values < edge for edge in edges], earlier, policy)
    shifted = values < edges[150]
    shifted[np.flatnonzero(~shifted)[:2]] = True  # two more patients than an earlier set
    with pytest.raises(DisclosureRefused):
        check_differencing_many([values < edge for edge in edges] + [shifted], earlier, policy)
