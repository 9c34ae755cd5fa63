"""The `aggregate` seam: element-wise sums across sites after checking they line up."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medveil.runtime.aggregation import AggregationError, aggregate


@st.composite
def contributions(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4, unique=True))
    shapes = {name: draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)) for name in names}
    sites = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5, unique=True))
    ints = st.integers(-1000, 1000)
    return {site: {name: draw(hnp.arrays(np.int64, shapes[name], elements=ints)) for name in names}
            for site in sites}


@settings(max_examples=100, deadline=None)
@given(contributions())
def test_aggregate_sums_every_named_array(contribs):
    total = aggregate(contribs)
    first = next(iter(contribs.values()))
    assert set(total) == set(first)
    for name, array in first.items():
        expected = np.zeros(array.shape, dtype=np.int64)
        for site_arrays in contribs.values():
            expected = expected + site_arrays[name]
        assert total[name].shape == array.shape
        assert total[name].dtype == np.int64
        np.testing.assert_array_equal(total[name], expected)  # small integers: float sums are exact


def test_aggregate_example():
    total = aggregate({
        "site_a": {"n": np.array([3.0, 4.0]), "sum": np.array([[1.0, 2.0]])},
        "site_b": {"n": np.array([10, 20]), "sum": [[0.5, 0.25]]},
    })
    np.testing.assert_array_equal(total["n"], [13.0, 24.0])
    np.testing.assert_array_equal(total["sum"], [[1.5, 2.25]])


def test_no_contributions_is_empty():
    assert aggregate({}) == {}


@pytest.mark.parametrize(
    "contribs",
    [
        {"a": {"n": np.ones(2)}, "b": {"m": np.ones(2)}},
        {"a": {"n": np.ones(2)}, "b": {"n": np.ones(2), "extra": np.ones(1)}},
        {"a": {"n": np.ones(2), "extra": np.ones(1)}, "b": {"n": np.ones(2)}},
        {"a": {"n": np.ones(2)}, "b": {}},
    ],
    ids=["renamed", "extra-at-b", "missing-at-b", "empty-at-b"],
)
def test_mismatched_names_are_refused(contribs):
    with pytest.raises(AggregationError, match="sent arrays"):
        aggregate(contribs)


@pytest.mark.parametrize(
    "shapes",
    [[(2,), (3,)], [(2, 3), (3, 2)], [(1,), (3,)], [(), (1,)], [(4,), (4,), (4, 1)], [(0,), (1,)]],
)
def test_mismatched_shapes_are_refused_not_broadcast(shapes):
    contribs = {f"site_{i}": {"n": np.ones(shape)} for i, shape in enumerate(shapes)}
    with pytest.raises(AggregationError, match="different shapes"):
        aggregate(contribs)
