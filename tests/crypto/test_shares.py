"""Dealer-assisted cross products over Z_2^64: encodings, shares and the dealer's correlation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medveil.crypto import shares

unit = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)


@given(arrays(np.float64, st.integers(1, 50), elements=unit), st.integers(8, 31))
def test_encode_then_decode_is_within_half_a_unit(values, bits):
    decoded = shares.decode(shares.encode(values, bits), bits)
    assert np.all(np.abs(decoded - values) <= 2.0 ** (-bits - 1))


@given(st.integers(1, 10**9))
def test_fraction_bits_leave_room_for_every_sum_of_products(rows):
    bits = shares.fraction_bits(rows)
    assert rows * 2 ** (2 * bits) < 2**63


@given(st.floats(1e-30, 1e30, allow_nan=False))
def test_scale_exponent_bounds_the_column_by_a_coarse_power_of_two(largest):
    exponent = shares.scale_exponent(np.array([largest, -largest / 3]))
    assert exponent % shares.EXPONENT_STEP == 0
    assert largest <= 2.0**exponent < largest * 2**shares.EXPONENT_STEP


def test_scale_exponent_of_an_exact_power_and_of_zero():
    assert shares.scale_exponent(np.array([16.0])) == 4
    assert shares.scale_exponent(np.array([17.0])) == 8
    assert shares.scale_exponent(np.zeros(3)) == 0


def test_encode_refuses_values_outside_the_unit_interval_and_not_finite():
    with pytest.raises(shares.ShareError):
        shares.encode(np.array([1.5]), 20)
    with pytest.raises(shares.ShareError):
        shares.encode(np.array([np.nan]), 20)


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20), st.integers(1, 4), st.data())
def test_shares_reconstruct_and_each_alone_is_a_pad(values, parties, data):
    secret = np.array(values, dtype=np.uint64)
    seeds = [bytes(data.draw(st.binary(min_size=32, max_size=32))) for _ in range(parties)]
    pads = [shares.random_vector(seed, len(values)) for seed in seeds]
    last = secret - shares.reconstruct(*pads)
    np.testing.assert_array_equal(shares.reconstruct(*pads, last), secret)


def _protocol(u: np.ndarray, v: np.ndarray, blocks: list[shares.Block], seed_a: bytes, seed_l: bytes
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The three parties' steps: (share_L, share_F, E that L saw, D that F saw)."""
    n, k = u.shape
    a = shares.random_matrix(seed_a, n, k)
    b = shares.random_matrix(shares.derive_seed(seed_l, "B"), n, v.shape[1])
    c_l = shares.random_vector(shares.derive_seed(seed_l, "C"), shares.blocks_size(blocks))
    c_f = shares.dealer_offset(a, b, c_l, blocks)  # dealer
    e = u - a  # F -> L
    d = v - b  # L -> F
    share_l = shares.share_of_masked_holder(e, v, c_l, blocks)
    share_f = shares.share_of_pad_holder(a, d, c_f, blocks)
    return share_l, share_f, e, d


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**32), st.data())
def test_the_shares_add_up_to_the_cross_product_blocks(n, k, m, seed, data):
    rng = np.random.default_rng(seed)
    x_f, x_l = rng.uniform(-1, 1, (n, k)), rng.uniform(-1, 1, (n, m))
    bits = shares.fraction_bits(n)
    u, v = shares.encode(x_f, bits), shares.encode(x_l, bits)
    cut = data.draw(st.integers(0, k))
    blocks = [shares.Block((0, cut), (0, m)), shares.Block((cut, k), (m - 1, m))]
    share_l, share_f, _, _ = _protocol(u, v, blocks, rng.bytes(32), rng.bytes(32))
    top, bottom = shares.split_blocks(shares.reconstruct(share_l, share_f), blocks)
    # exact in the ring: the cross product of the encodings
    np.testing.assert_array_equal(top, u[:, :cut].T @ v)
    np.testing.assert_array_equal(bottom, u[:, cut:].T @ v[:, m - 1:])
    # and, decoded, the float cross product to the fixed-point precision
    expected = x_f.T @ x_l
    tolerance = n * 2.0 ** (1 - bits)
    np.testing.assert_allclose(shares.decode(top, 2 * bits), expected[:cut], atol=tolerance, rtol=0)
    np.testing.assert_allclose(shares.decode(bottom, 2 * bits), expected[cut:, m - 1:], atol=tolerance, rtol=0)


def test_a_sum_at_the_bound_of_the_ring_decodes_with_its_sign():
    n = 2**17 - 1
    bits = shares.fraction_bits(n)
    ones = shares.encode(np.ones((n, 1)), bits)
    minus_ones = shares.encode(-np.ones((n, 1)), bits)
    total = shares.decode(ones.T @ minus_ones, 2 * bits)
    assert total[0, 0] == -n


def test_what_each_party_sees_is_uniform_and_independent_of_the_data():
    """Over constant inputs (all zeros, all one half), what L sees (E, its share) and what F sees
    (D, its share) still look uniform: about half of their bits are ones."""
    rng = np.random.default_rng(3)
    n, k, m = 4000, 3, 2
    bits = shares.fraction_bits(n)
    blocks = [shares.Block((0, k), (0, m))]
    seed_a, seed_l = rng.bytes(32), rng.bytes(32)
    u = shares.encode(np.zeros((n, k)), bits)
    v = shares.encode(np.full((n, m), 0.5), bits)
    share_l, share_f, e, d = _protocol(u, v, blocks, seed_a, seed_l)
    for seen in (e, d, share_l, share_f):
        ones = np.unpackbits(np.ascontiguousarray(seen).view(np.uint8)).mean()
        assert 0.45 < ones < 0.55


def test_parts_of_the_random_matrix_equal_the_whole():
    seed = bytes(range(32))
    whole = shares.random_matrix(seed, 100, 6)
    np.testing.assert_array_equal(shares.random_columns(seed, 100, [4, 1]), whole[:, [4, 1]])


def test_pair_columns_give_the_gram_matrix():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    products, pairs = shares.pair_columns(x)
    gram = x.T @ x
    for position, (j, k) in enumerate(pairs):
        assert np.isclose(products[:, position].sum(), gram[j, k])
    assert len(pairs) == 4 * 5 // 2


def test_a_seed_of_the_wrong_length_is_refused():
    with pytest.raises(shares.ShareError):
        shares.derive_seed(b"short", "x")


@given(st.integers(1, 2**20))
def test_fraction_bits_triple_leave_room_for_sums_of_weighted_products(rows):
    bits = shares.fraction_bits_triple(rows)
    assert rows * 2 ** (3 * bits - 2) < 2**63


def test_a_permutation_is_one_and_the_same_for_one_seed_and_label():
    seed = bytes(range(32))
    order = shares.permutation(seed, "rows 0", 1000)
    np.testing.assert_array_equal(np.sort(order), np.arange(1000))
    np.testing.assert_array_equal(order, shares.permutation(seed, "rows 0", 1000))
    assert not np.array_equal(order, shares.permutation(seed, "rows 1", 1000))


def test_cross_blocks_computes_only_the_blocks_asked_for():
    rng = np.random.default_rng(1)
    u, v = rng.integers(0, 2**63, (30, 4), dtype=np.uint64), rng.integers(0, 2**63, (30, 3), dtype=np.uint64)
    blocks = [shares.Block((0, 2), (0, 3)), shares.Block((2, 4), (1, 2))]
    first, second = shares.split_blocks(shares.cross_blocks(u, v, blocks, only=[1]), blocks)
    assert not first.any()
    np.testing.assert_array_equal(second, u[:, 2:4].T @ v[:, 1:2])


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 80), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32))
def test_a_weighted_cross_product_from_shared_weights_in_both_directions(n, p_l, p_f, seed):
    """x_F' W x_L with w shared between L and F: each site multiplies its share of w by its own
    columns, and the two cross products (one per direction, transposed) add up in the ring to
    the product of the encodings; decoded, to the float product within the fixed-point error."""
    rng = np.random.default_rng(seed)
    x_l, x_f, w = rng.uniform(-1, 1, (n, p_l)), rng.uniform(-1, 1, (n, p_f)), rng.uniform(0, 0.25, n)
    bits = shares.fraction_bits_triple(n)
    e_l, e_f, e_w = shares.encode(x_l, bits), shares.encode(x_f, bits), shares.encode(w, bits)
    w_l = shares.random_vector(rng.bytes(32), n)  # L's share: a pad; F's: the rest
    w_f = e_w - w_l
    blocks = [shares.Block((0, p_f), (0, p_l))]
    mirror = [shares.Block((0, p_l), (0, p_f))]
    one = _protocol(e_f, np.asfortranarray(w_l[:, None] * e_l), blocks, rng.bytes(32), rng.bytes(32))
    other = _protocol(e_l, np.asfortranarray(w_f[:, None] * e_f), mirror, rng.bytes(32), rng.bytes(32))
    total = (shares.split_blocks(shares.reconstruct(one[0], one[1]), blocks)[0]
             + shares.split_blocks(shares.reconstruct(other[0], other[1]), mirror)[0].T)
    np.testing.assert_array_equal(total, (e_f * e_w[:, None]).T @ e_l)
    expected = (x_f * w[:, None]).T @ x_l
    np.testing.assert_allclose(shares.decode(total, 3 * bits), expected, atol=n * 3 * 2.0 ** (-bits), rtol=0)


def test_two_limb_products_with_different_bits_per_side():
    rng = np.random.default_rng(2)
    n = 500
    x, y = rng.uniform(-1, 1, (n, 3)), rng.uniform(-1, 1, (n, 1))
    bits_x = shares.fraction_bits_triple(n)
    bits_y = shares.RING_BITS - 1 - n.bit_length() - bits_x
    xh, xl = shares.encode_two_limbs(x, bits_x)
    yh, yl = shares.encode_two_limbs(y, bits_y)
    product = shares.combine_two_limbs(xh.T @ yh, xh.T @ yl, xl.T @ yh, bits_x, bits_y)
    np.testing.assert_allclose(product, x.T @ y, rtol=0, atol=n * 2.0 ** (-2 * bits_x))
