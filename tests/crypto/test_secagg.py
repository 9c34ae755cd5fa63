"""Secure-aggregation primitives: fixed-point ring, pairwise masks, Shamir shares, share encryption.

References are computed here with Python integers, fractions and numpy, never copied from the
code under test; the only literal outputs are the RFC 7748 X25519 test vector.
"""

from __future__ import annotations

import math
import os
import random
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import chisquare

from medveil.crypto.secagg import (
    FIELD_PRIME,
    LIMB_BITS,
    LIMBS,
    MAX_ABS,
    MAX_PARTIES,
    FixedPointOverflow,
    apply_masks,
    combine_secret,
    decode_fixed,
    decrypt_share,
    dropped_mask_total,
    encode_fixed,
    encrypt_share,
    expand,
    flatten,
    generate_key,
    mask_seed,
    pair_sign,
    public_key,
    self_mask_total,
    shared_secret,
    split_secret,
    unflatten,
)

GRID = Fraction(1, 2**52)  # one step of the fixed-point grid
HALF_GRID = GRID / 2  # 2**-53: the rounding error of one encoded value
LIMB = 1 << LIMB_BITS
RING = 1 << (LIMB_BITS * LIMBS)


# --- references ----------------------------------------------------------------------------

def ideal_limbs(x: float) -> tuple[int, int]:
    """round(x * 2**52) (half to even, like np.rint) in two's complement over 112 bits, as (low, high)."""
    t = round(Fraction(x) * 2**52) % RING
    return t % LIMB, t // LIMB


def limbs_of(t: int) -> tuple[int, int]:
    t %= RING
    return t % LIMB, t // LIMB


def exact_total(values) -> Fraction:
    return sum((Fraction(float(v)) for v in values), Fraction(0))


def ulp(q: Fraction) -> Fraction:
    return Fraction(math.ulp(float(abs(q))))


def encoded_sum(parts: list[np.ndarray]) -> np.ndarray:
    """Limb-wise sum of the encodings, modulo 2**64 as the masked ring computes it."""
    total = np.zeros_like(encode_fixed(parts[0]))
    for part in parts:
        total += encode_fixed(part)
    return total


def seeded_bytes(seed: int):
    return random.Random(seed).randbytes


near_max = st.floats(MAX_ABS * (1 - 2**-20), MAX_ABS)
in_range = st.one_of(
    st.floats(-MAX_ABS, MAX_ABS),
    st.floats(-16, 16),  # small magnitudes, where the sub-integer limb bits matter
    st.integers(-(2**53), 2**53).map(lambda k: k * 2.0**-52),  # values on the grid
    near_max,
    near_max.map(lambda v: -v),
)


# --- 1. fixed point -------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(x=in_range)
@example(x=-3 * 2.0**-52)
def test_encoding_is_the_rounded_value_in_twos_complement(x):
    encoded = encode_fixed(np.array(x))
    assert encoded.shape == (LIMBS,) and encoded.dtype == np.uint64
    assert (int(encoded[0]), int(encoded[1])) == ideal_limbs(x)


@settings(max_examples=300, deadline=None)
@given(x=in_range)
@example(x=-3 * 2.0**-52)
def test_roundtrip_is_within_half_a_grid_step(x):
    decoded = decode_fixed(encode_fixed(np.array(x)))
    assert decoded.shape == ()
    assert abs(Fraction(float(decoded)) - Fraction(x)) <= HALF_GRID


@pytest.mark.parametrize("x", [
    0.0, -0.0, 1.0, -1.0, 2.0**-53, -(2.0**-53), 3 * 2.0**-53, -3 * 2.0**-53, 2.0**-52, -(2.0**-52),
    -3 * 2.0**-52, -7.3, -1 - 2.0**-52, 5e-324, -5e-324, 1e-300, -1e-300, 0.1, -0.1,
    MAX_ABS, -MAX_ABS, np.nextafter(MAX_ABS, 0), -np.nextafter(MAX_ABS, 0),
])
def test_roundtrip_of_edge_values(x):
    decoded = float(decode_fixed(encode_fixed(np.array(x))))
    assert abs(Fraction(decoded) - Fraction(x)) <= HALF_GRID
    assert all(int(limb) < LIMB for limb in encode_fixed(np.array(x)))  # 56-bit limbs


def test_negative_zero_decodes_to_zero():
    encoded = encode_fixed(np.array(-0.0))
    assert encoded.tolist() == [0, 0]
    assert decode_fixed(encoded) == 0.0


@settings(max_examples=300, deadline=None)
@given(t=st.integers(-(2**111), 2**111 - 1), carry=st.integers(0, MAX_PARTIES - 1),
       spare=st.integers(0, MAX_PARTIES - 1))
@example(t=3 - 2**53, carry=0, spare=0)
def test_decode_of_any_ring_element(t, carry, spare):
    """Limb sums (unreduced, with carries still in the low limb) decode to t * 2**-52."""
    low, high = limbs_of(t)
    if low + carry * LIMB < 2**64:
        low, high = low + carry * LIMB, (high - carry) % LIMB
    high += spare * LIMB  # bits above the limb width are ignored
    decoded = Fraction(float(decode_fixed(np.array([low, high], dtype=np.uint64))))
    target = Fraction(t, 2**52)
    if abs(t) < 2**53:  # representable: must come back exactly
        assert decoded == target
    else:
        assert abs(decoded - target) <= ulp(target)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_sum_of_parties_decodes_to_the_sum(data):
    parties = data.draw(st.integers(2, 20))
    size = data.draw(st.integers(1, 6))
    parts = [data.draw(hnp.arrays(np.float64, size, elements=in_range)) for _ in range(parties)]
    decoded = decode_fixed(encoded_sum(parts))
    assert decoded.shape == (size,)
    for i in range(size):
        exact = exact_total(part[i] for part in parts)
        # each encoding is off by at most half a step; decoding rounds once more to float64
        assert abs(Fraction(float(decoded[i])) - exact) <= parties * HALF_GRID + ulp(exact)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_small_sums_of_grid_values_are_exact(data):
    """Values on the grid encode exactly; a total below 2 in magnitude is a float64, so no error at all."""
    parties = data.draw(st.integers(2, 20))
    bound = 2**53 // parties - 1
    units = data.draw(st.lists(st.integers(-bound, bound), min_size=parties, max_size=parties))
    parts = [np.array([k * 2.0**-52]) for k in units]
    assert float(decode_fixed(encoded_sum(parts))[0]) == sum(units) * 2.0**-52


@pytest.mark.parametrize("small, big", [(3 * 2.0**-52, -2.0), (2.0**-52, -1.0), (5 * 2.0**-52, -4.0)])
def test_small_negative_total_is_exact(small, big):
    """Both inputs encode exactly and their sum is a float64, so the decoded sum must equal it."""
    assert float(decode_fixed(encoded_sum([np.array(small), np.array(big)]))) == small + big


def test_256_parties_random():
    rng = np.random.default_rng(256)
    parts = [rng.uniform(-MAX_ABS, MAX_ABS, 8) * rng.choice([1.0, 1e-9, 1e-20], 8) for _ in range(MAX_PARTIES)]
    decoded = decode_fixed(encoded_sum(parts))
    for i in range(8):
        exact = exact_total(part[i] for part in parts)
        assert abs(Fraction(float(decoded[i])) - exact) <= MAX_PARTIES * HALF_GRID + ulp(exact)


def test_limb_sums_of_256_parties_do_not_wrap():
    rng = np.random.default_rng(7)
    parts = [rng.uniform(-MAX_ABS, MAX_ABS, 64) for _ in range(MAX_PARTIES)]
    exact_limbs = sum(encode_fixed(p).astype(object) for p in parts)  # Python ints: no wraparound
    assert max(int(v) for v in np.ravel(exact_limbs)) < 2**64
    assert np.array_equal(encoded_sum(parts), exact_limbs.astype(np.uint64))


@pytest.mark.parametrize("value", [MAX_ABS, -MAX_ABS, np.nextafter(MAX_ABS, 0), -np.nextafter(MAX_ABS, 0)])
def test_256_parties_at_the_bound_still_fit(value):
    """The module promises that the sum of 256 sites at |x| <= MAX_ABS fits the ring."""
    decoded = decode_fixed(encoded_sum([np.array([value])] * MAX_PARTIES))
    assert decoded[0] == MAX_PARTIES * value  # a power-of-two multiple: exact in float64


bad_values = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300]),
    st.floats(min_value=np.nextafter(MAX_ABS, math.inf), allow_infinity=False),
    st.floats(max_value=-np.nextafter(MAX_ABS, math.inf), allow_infinity=False),
)


@settings(max_examples=100, deadline=None)
@given(bad=bad_values, good=hnp.arrays(np.float64, st.integers(1, 10), elements=st.floats(-1e6, 1e6)),
       data=st.data())
def test_unencodable_values_raise(bad, good, data):
    position = data.draw(st.integers(0, good.size - 1))
    values = good.copy()
    values[position] = bad
    with pytest.raises(FixedPointOverflow):
        encode_fixed(values)
    with pytest.raises(FixedPointOverflow):
        encode_fixed(np.array(bad))
    assert issubclass(FixedPointOverflow, ValueError)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 3), (4, 1, 2)])
def test_shape_is_preserved(shape):
    rng = np.random.default_rng(len(shape))
    values = rng.normal(scale=1e3, size=shape)
    encoded = encode_fixed(values)
    assert encoded.shape == shape + (LIMBS,) and encoded.dtype == np.uint64
    decoded = decode_fixed(encoded)
    assert decoded.shape == shape
    assert np.all(np.abs(decoded - values) <= 2.0**-53 + np.spacing(np.abs(values)))


# --- 2. GLM-sized sums ----------------------------------------------------------------------

@pytest.mark.parametrize("sites, seed", [(3, 0), (5, 1), (10, 2)])
def test_glm_sized_sums(sites, seed):
    rng = np.random.default_rng(seed)
    scales = np.logspace(-6, 0, 20)  # entries of X'WX then span fifteen orders of magnitude
    parts = []
    for _ in range(sites):
        x = rng.normal(size=(200, 20)) * scales
        w = rng.uniform(0.05, 1.0, 200)
        xtwx = x.T @ (w[:, None] * x)
        parts.append(xtwx * (1e9 / np.abs(xtwx).max()))
    decoded = decode_fixed(encoded_sum(parts))
    reference = np.array([math.fsum(p.flat[i] for p in parts) for i in range(400)]).reshape(20, 20)
    large = np.abs(reference) >= 1e-3
    assert large.sum() > 300 and (np.abs(reference) < 1.0).any()  # the check covers small entries too
    relative = np.abs(decoded - reference)[large] / np.abs(reference)[large]
    assert relative.max() <= 1e-12
    assert np.all(np.abs(decoded - reference) <= sites * 2.0**-53 + 2 * np.spacing(np.abs(reference)))


# --- 3. keys, seeds and masks ---------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]
CONTEXT = b"task-1|step|0"


def make_keys(random_bytes=os.urandom) -> dict[str, tuple[bytes, bytes]]:
    return {name: generate_key(random_bytes) for name in NAMES}


def make_seeds(keys, context=CONTEXT) -> dict[str, dict[str, bytes]]:
    return {me: {peer: mask_seed(shared_secret(keys[me][0], keys[peer][1]), context)
                 for peer in NAMES if peer != me} for me in NAMES}


def test_generated_keys_are_valid_and_distinct():
    keys = make_keys()
    for private, public in keys.values():
        assert len(private) == 32 and len(public) == 32
        assert public_key(private) == public
    assert len({public for _, public in keys.values()}) == len(NAMES)


def test_shared_secret_is_symmetric():
    keys = make_keys()
    for me, peer in combinations(NAMES, 2):
        secret = shared_secret(keys[me][0], keys[peer][1])
        assert secret == shared_secret(keys[peer][0], keys[me][1])
        assert len(secret) == 32
    assert shared_secret(keys["a"][0], keys["b"][1]) != shared_secret(keys["a"][0], keys["c"][1])


def test_seeds_depend_on_context():
    keys = make_keys()
    secret = shared_secret(keys["a"][0], keys["b"][1])
    assert mask_seed(secret, CONTEXT) == mask_seed(secret, CONTEXT)
    seeds = {mask_seed(secret, f"task-1|step|{step}".encode()) for step in range(5)}
    seeds.add(mask_seed(secret, b"task-2|step|0"))
    assert len(seeds) == 6
    assert all(len(seed) == 32 for seed in seeds)
    assert mask_seed(secret, CONTEXT) != secret


def test_expand_is_the_aes_ctr_keystream():
    seed = os.urandom(32)
    words = expand(seed, 1000)
    assert words.shape == (1000,) and words.dtype == np.uint64
    assert np.array_equal(words, expand(seed, 1000))  # deterministic per seed
    assert np.array_equal(words[:37], expand(seed, 37))
    assert expand(seed, 0).shape == (0,)
    # Independent reference: AES-256 of the 128-bit big-endian counter 0, 1, 2, ... (CTR, zero IV)
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    stream = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(500))) + ecb.finalize()
    assert [int.from_bytes(stream[8 * i:8 * i + 8], "little") for i in range(1000)] == words.tolist()
    other = expand(os.urandom(32), 1000)
    assert not np.any(words == other)


def test_pair_sign_is_antisymmetric():
    for me, peer in combinations(NAMES, 2):
        assert pair_sign(me, peer) == -pair_sign(peer, me)
        assert {pair_sign(me, peer), pair_sign(peer, me)} == {1, -1}


def reference_masked(encoded: np.ndarray, me: str, seeds: dict[str, bytes]) -> list[int]:
    """The documented masking in Python integers: the AES-CTR stream of each pairwise seed is added
    by the site whose name sorts first and subtracted by the other, modulo 2**64."""
    words = [int(w) for w in encoded]
    for peer, seed in seeds.items():
        sign = 1 if me < peer else -1
        words = [(w + sign * int(m)) % 2**64 for w, m in zip(words, expand(seed, len(words)))]
    return words


def test_masks_cancel_in_the_sum():
    keys = make_keys()
    seeds = make_seeds(keys)
    rng = np.random.default_rng(5)
    values = {name: rng.normal(scale=1e4, size=(10, 5)) for name in NAMES}
    encoded = {name: encode_fixed(values[name]).ravel() for name in NAMES}
    before = {name: encoded[name].copy() for name in NAMES}
    masked = {name: apply_masks(encoded[name], name, seeds[name]) for name in NAMES}
    for name in NAMES:
        assert masked[name].shape == (100,) and masked[name].dtype == np.uint64
        assert np.array_equal(encoded[name], before[name])  # the input is not modified
        assert not np.any(masked[name] == encoded[name])
        assert masked[name].tolist() == reference_masked(encoded[name], name, seeds[name])
    total = np.zeros(100, dtype=np.uint64)
    plain = np.zeros(100, dtype=np.uint64)
    for name in NAMES:
        total += masked[name]
        plain += encoded[name]
    assert np.array_equal(total, plain)
    decoded = decode_fixed(total.reshape(10, 5, LIMBS))
    reference = np.array([math.fsum(values[n].flat[i] for n in NAMES) for i in range(50)]).reshape(10, 5)
    assert np.all(np.abs(decoded - reference) <= 5 * 2.0**-53 + np.spacing(np.abs(reference)))


def test_masks_from_another_context_do_not_cancel():
    keys = make_keys()
    seeds, other = make_seeds(keys), make_seeds(keys, b"task-1|step|1")
    encoded = {name: encode_fixed(np.arange(20.0)).ravel() for name in NAMES}
    total = np.zeros(40, dtype=np.uint64)
    for name in NAMES:
        total += apply_masks(encoded[name], name, other[name] if name == "c" else seeds[name])
    assert not np.array_equal(total, sum(encoded.values()))


def byte_pvalue(words: np.ndarray) -> float:
    counts = np.bincount(np.frombuffer(words.astype("<u8").tobytes(), dtype=np.uint8), minlength=256)
    return chisquare(counts).pvalue


def test_masked_vector_bytes_look_uniform():
    keys = make_keys(seeded_bytes(2017))  # fixed keys: the outcome is reproducible
    seeds = make_seeds(keys)
    plain = encode_fixed(np.random.default_rng(0).integers(0, 10, 50_000).astype(float)).ravel()
    assert plain.size == 100_000
    assert byte_pvalue(plain) < 1e-4
    masked = apply_masks(plain, "c", seeds["c"])
    assert byte_pvalue(masked) > 1e-4
    assert byte_pvalue(apply_masks(plain, "a", {"b": seeds["a"]["b"]})) > 1e-4  # one mask suffices


def test_self_masks_stay_in_the_sum_until_their_seeds_are_removed():
    """Double masking: pairwise masks cancel, self masks do not; subtracting the rebuilt seeds' masks
    gives the plain sum, and a vector stripped of its pairwise masks is still uniform."""
    keys = make_keys()
    seeds = make_seeds(keys)
    self_seeds = {name: os.urandom(32) for name in NAMES}
    values = {name: np.random.default_rng(i).integers(-(2**30), 2**30, 64) / 1024.0 for i, name in enumerate(NAMES)}
    encoded = {name: encode_fixed(values[name]).ravel() for name in NAMES}
    masked = {name: apply_masks(encoded[name], name, seeds[name], self_seeds[name]) for name in NAMES}
    total = np.sum(np.stack(list(masked.values())), axis=0, dtype=np.uint64)
    plain = np.sum(np.stack(list(encoded.values())), axis=0, dtype=np.uint64)
    assert not np.array_equal(total, plain)
    recovered = total - self_mask_total(list(self_seeds.values()), total.size)
    assert np.array_equal(recovered, plain)
    assert np.array_equal(decode_fixed(recovered.reshape(-1, LIMBS)), sum(values.values()))
    stripped = masked["c"] - apply_masks(np.zeros(128, dtype=np.uint64), "c", seeds["c"])
    assert np.array_equal(stripped, encoded["c"] + expand(self_seeds["c"], 128))
    assert not np.any(stripped == encoded["c"])
    big = apply_masks(encode_fixed(np.zeros(50_000)).ravel(), "c", {}, os.urandom(32))
    assert byte_pvalue(big) > 1e-4  # the self mask alone makes a vector uniform


# --- 4. dropout recovery --------------------------------------------------------------------

@pytest.mark.parametrize("dropped", [["c"], ["a"], ["e"], ["b", "d"]])
def test_dropped_masks_are_removed_with_the_reconstructed_key(dropped):
    keys = make_keys()
    seeds = make_seeds(keys)
    threshold = 3
    order = sorted(NAMES)
    shares = {name: split_secret(keys[name][0], len(NAMES), threshold, os.urandom) for name in dropped}
    survivors = [name for name in NAMES if name not in dropped]
    rng = np.random.default_rng(len(dropped))
    # multiples of 2**-10: encodings and the float64 sum are exact, so recovery must be exact
    values = {name: rng.integers(-(2**30), 2**30, 64) / 1024.0 for name in NAMES}
    masked = {name: apply_masks(encode_fixed(values[name]).ravel(), name, seeds[name]) for name in survivors}
    total = np.zeros(128, dtype=np.uint64)
    for name in survivors:
        total += masked[name]
    expected = sum(values[name] for name in survivors)
    assert not np.array_equal(decode_fixed(total.reshape(-1, LIMBS)), expected)  # masks of the dropped remain
    for gone in dropped:
        helpers = survivors[:threshold]
        recovered = combine_secret({order.index(h) + 1: shares[gone][order.index(h)] for h in helpers}, threshold)
        assert recovered == keys[gone][0]
        with_submitters = {s: mask_seed(shared_secret(recovered, keys[s][1]), CONTEXT) for s in survivors}
        total -= dropped_mask_total(gone, with_submitters, total.size)
    assert np.array_equal(decode_fixed(total.reshape(-1, LIMBS)), expected)


# --- 5. Shamir ------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(data=st.data(), secret=st.binary(min_size=32, max_size=32))
def test_any_threshold_shares_reconstruct(data, secret):
    n = data.draw(st.integers(1, 12))
    threshold = data.draw(st.integers(1, n))
    shares = split_secret(secret, n, threshold, os.urandom)
    assert len(shares) == n and all(0 <= s < FIELD_PRIME for s in shares)
    xs = data.draw(st.permutations(range(1, n + 1)))
    chosen = {x: shares[x - 1] for x in xs[:threshold]}
    assert combine_secret(chosen, threshold) == secret
    more = {x: shares[x - 1] for x in xs[:data.draw(st.integers(threshold, n))]}
    assert combine_secret(more, threshold) == secret
    with pytest.raises(ValueError):
        combine_secret({x: shares[x - 1] for x in xs[:threshold - 1]}, threshold)


def test_all_subsets_reconstruct():
    secret = os.urandom(32)
    shares = split_secret(secret, 7, 4, os.urandom)
    for subset in combinations(range(1, 8), 4):
        assert combine_secret({x: shares[x - 1] for x in subset}, 4) == secret
    for subset in combinations(range(1, 8), 3):
        with pytest.raises(ValueError):
            combine_secret({x: shares[x - 1] for x in subset}, 4)


@settings(max_examples=50, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 12), data=st.data())
def test_shares_are_the_polynomial_values(secret, n, data):
    threshold = data.draw(st.integers(1, n))
    source = seeded_bytes(data.draw(st.integers(0, 2**32)))
    randomness = source(66 * (threshold - 1))
    chunks = iter([randomness[66 * i:66 * i + 66] for i in range(threshold - 1)])
    shares = split_secret(secret, n, threshold, lambda size: next(chunks))
    coefficients = [int.from_bytes(secret, "big")] + [
        int.from_bytes(randomness[66 * i:66 * i + 66], "big") % FIELD_PRIME for i in range(threshold - 1)]
    assert shares == [sum(c * x**k for k, c in enumerate(coefficients)) % FIELD_PRIME for x in range(1, n + 1)]


@pytest.mark.parametrize("n, threshold", [(3, 0), (3, 4), (0, 1), (1, -1)])
def test_invalid_threshold_is_refused(n, threshold):
    with pytest.raises(ValueError):
        split_secret(os.urandom(32), n, threshold, os.urandom)


@settings(max_examples=50, deadline=None)
@given(first=st.binary(min_size=32, max_size=32), second=st.binary(min_size=32, max_size=32),
       n=st.integers(2, 12), data=st.data())
def test_one_share_fits_either_secret_at_threshold_two(first, second, n, data):
    """f(x) = s + a*x: for x != 0, a -> s + a*x is a bijection of GF(p), so with a uniform the share
    is uniform whatever s is, and every value y is reached from any secret s' by a' = (y - s') / x."""
    x = data.draw(st.integers(1, n))
    y = split_secret(first, n, 2, os.urandom)[x - 1]
    a_second = (y - int.from_bytes(second, "big")) * pow(x, -1, FIELD_PRIME) % FIELD_PRIME
    shares_second = split_secret(second, n, 2, lambda size: a_second.to_bytes(size, "big"))
    assert shares_second[x - 1] == y
    other = x % n + 1  # a second share completes the other secret
    assert combine_secret({x: y, other: shares_second[other - 1]}, 2) == second


# --- 6. share encryption --------------------------------------------------------------------

ALICE, BOB, CAROL = (generate_key(os.urandom) for _ in range(3))
PAIR = shared_secret(ALICE[0], BOB[1])
SHARE_CONTEXT = b"task-1|share|alice|bob"


@settings(max_examples=50, deadline=None)
@given(share=st.integers(0, FIELD_PRIME - 1))
def test_share_encryption_roundtrip(share):
    ciphertext = encrypt_share(PAIR, share, SHARE_CONTEXT, os.urandom)
    assert len(ciphertext) == 12 + 66 + 16
    assert decrypt_share(shared_secret(BOB[0], ALICE[1]), ciphertext, SHARE_CONTEXT) == share
    assert encrypt_share(PAIR, share, SHARE_CONTEXT, os.urandom) != ciphertext  # fresh nonce


def test_wrong_context_is_refused():
    ciphertext = encrypt_share(PAIR, 12345, SHARE_CONTEXT, os.urandom)
    for context in [b"task-1|share|bob|alice", b"task-2|share|alice|bob", b""]:
        with pytest.raises(InvalidTag):
            decrypt_share(PAIR, ciphertext, context)


def test_wrong_key_is_refused():
    ciphertext = encrypt_share(PAIR, 12345, SHARE_CONTEXT, os.urandom)
    for secret in [shared_secret(ALICE[0], CAROL[1]), shared_secret(CAROL[0], BOB[1]), os.urandom(32)]:
        with pytest.raises(InvalidTag):
            decrypt_share(secret, ciphertext, SHARE_CONTEXT)


@settings(max_examples=100, deadline=None)
@given(share=st.integers(0, FIELD_PRIME - 1), data=st.data())
def test_flipped_bit_is_refused(share, data):
    ciphertext = bytearray(encrypt_share(PAIR, share, SHARE_CONTEXT, os.urandom))
    position = data.draw(st.integers(0, len(ciphertext) * 8 - 1))
    ciphertext[position // 8] ^= 1 << (position % 8)
    with pytest.raises(InvalidTag):
        decrypt_share(PAIR, bytes(ciphertext), SHARE_CONTEXT)


# --- 7. RFC 7748 test vector ----------------------------------------------------------------

# RFC 7748 "Elliptic Curves for Security", section 6.1 (Curve25519 Diffie-Hellman test vector).
RFC_ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC_ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
RFC_BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
RFC_BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
RFC_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_rfc7748_x25519_vector():
    assert public_key(RFC_ALICE_PRIVATE) == RFC_ALICE_PUBLIC
    assert public_key(RFC_BOB_PRIVATE) == RFC_BOB_PUBLIC
    assert shared_secret(RFC_ALICE_PRIVATE, RFC_BOB_PUBLIC) == RFC_SHARED
    assert shared_secret(RFC_BOB_PRIVATE, RFC_ALICE_PUBLIC) == RFC_SHARED
    keys = iter([RFC_ALICE_PRIVATE])
    assert generate_key(lambda size: next(keys)) == (RFC_ALICE_PRIVATE, RFC_ALICE_PUBLIC)


# --- 8. flatten / unflatten -----------------------------------------------------------------

@st.composite
def named_arrays(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=6), max_size=5, unique=True))
    return {name: draw(hnp.arrays(draw(st.sampled_from([np.float64, np.int64])),
                                  hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
                                  elements=st.integers(-10**6, 10**6)))
            for name in names}


@settings(max_examples=100, deadline=None)
@given(arrays=named_arrays())
def test_flatten_unflatten_roundtrip(arrays):
    vector, layout = flatten(arrays)
    assert vector.dtype == np.float64 and vector.ndim == 1
    assert vector.size == sum(a.size for a in arrays.values())
    assert [name for name, _ in layout] == sorted(arrays)
    restored = unflatten(vector, layout)
    assert set(restored) == set(arrays)
    for name, array in arrays.items():
        assert restored[name].shape == array.shape
        assert np.array_equal(restored[name], array.astype(np.float64))
    through_ring = unflatten(decode_fixed(encode_fixed(vector)), layout)
    for name, array in arrays.items():
        assert np.array_equal(through_ring[name], array.astype(np.float64))


def test_flatten_orders_by_name():
    vector, layout = flatten({"b": np.array([3.0, 4.0]), "a": np.array(1.0), "c": np.zeros((0, 2))})
    assert layout == [("a", ()), ("b", (2,)), ("c", (0, 2))]
    assert vector.tolist() == [1.0, 3.0, 4.0]
    empty, empty_layout = flatten({})
    assert empty.shape == (0,) and empty_layout == []
    assert unflatten(empty, empty_layout) == {}
