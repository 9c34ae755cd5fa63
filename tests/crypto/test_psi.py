"""ECDH-PSI primitives: RFC 9380 vectors, prime-order outputs, commutativity, hostile peer points.

The literal outputs are RFC 9380 Appendix J.7.1 (curve25519_XMD:SHA-512_ELL2_NU_) and the
small-order curve25519 u-coordinates; everything else is checked against a Montgomery ladder
written here from RFC 7748 with Python integers, or against the code's own other path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medveil.crypto import psi
from medveil.crypto.psi import (
    INLINE_BELOW,
    POINT_BYTES,
    PsiError,
    blind,
    encode_to_curve,
    hash_and_blind,
    hash_to_field,
    hash_to_group,
    new_key,
)

P = 2**255 - 19
A = 486662
ORDER = 2**252 + 27742317777372353535851937790883648493  # prime order of the main subgroup
RFC_DST = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_NU_"
RFC_VECTORS = [  # msg, u[0], P.x
    (b"", 0x608D892B641F0328523802A6603427C26E55E6F27E71A91A478148D45B5093CD,
     0x1BB913F0C9DAEFA0B3375378FFA534BDA5526C97391952A7789EB976EDFE4D08),
    (b"abc", 0x46F5B22494BFEAA7F232CC8D054BE68561AF50230234D7D1D63D1D9ABECA8DA5,
     0x7C22950B7D900FA866334262FCAEA47A441A578DF43B894B4625C9B450F9A026),
    (b"abcdef0123456789", 0x235FE40C443766CE7E18111C33862D66C3B33267EFA50D50F9E8E5D252A40AAA,
     0x31AD08A8B0DEEB2A4D8B0206CA25F567AB4E042746F792F4B7973F3AE2096C52),
    (b"q128_" + b"q" * 128, 0x001E92A544463BDA9BD04DDBE3D6EED248F82DE32F522669EFC5DDCE95F46F5B,
     0x027877759D155B1997D0D84683A313EB78BDB493271D935B622900459D52CEAA),
    (b"a512_" + b"a" * 512, 0x1A68A1AF9F663592291AF987203393F707305C7BAC9C8D63D6A729BDC553DC19,
     0x5FD892C0958D1A75F54C3182A18D286EFAB784E774D1E017BA2FB252998B5DC1),
]
SMALL_ORDER_U = [0, 1, 325606250916557431795983626356110631294008115727848805560023387167927233504,
                 39382357235489614581723060781553021112529911719440698176882885853963445705823]
SALT = bytes(range(32))


def ladder(scalar: int, u: int) -> int:
    """x([scalar] P) from x(P) by the RFC 7748 Montgomery ladder, no clamping; 0 for the identity."""
    x2, z2, x3, z3 = 1, 0, u, 1
    swap = 0
    for t in reversed(range(scalar.bit_length())):
        bit = (scalar >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % P, (x2 - z2) % P
        c, d = (x3 + z3) % P, (x3 - z3) % P
        aa, bb = a * a % P, b * b % P
        e = (aa - bb) % P
        da, cb = d * a % P, c * b % P
        x3, z3 = (da + cb) ** 2 % P, u * (da - cb) ** 2 % P
        x2, z2 = aa * bb % P, e * (aa + 121665 * e) % P
    if swap:
        x2, z2 = x3, z3
    return x2 * pow(z2, P - 2, P) % P


def clamp(key: bytes) -> int:
    k = int.from_bytes(key, "little")
    return (k & ~7 & ~(1 << 255)) | (1 << 254)


def as_int(point) -> int:
    return int.from_bytes(bytes(point), "little")


def as_point(u: int) -> bytes:
    return u.to_bytes(POINT_BYTES, "little")


def on_curve(u: int) -> bool:
    return pow((u**3 + A * u * u + u) % P, (P - 1) // 2, P) != P - 1


@pytest.mark.parametrize("message,u,x", RFC_VECTORS)
def test_rfc9380_vectors(message, u, x):
    assert hash_to_field(message, RFC_DST) == u
    assert as_int(encode_to_curve([message], RFC_DST)[0]) == x


def test_hashed_points_lie_in_the_prime_order_subgroup():
    points = hash_to_group([f"patient-{i}" for i in range(20)], SALT)
    for point in points:
        u = as_int(point)
        assert 0 < u < P and on_curve(u)
        assert ladder(ORDER, u) == 0
        assert ladder(8, u) != 0


def test_blinding_is_x25519_of_the_hashed_point():
    key = new_key()
    hashed = hash_to_group(["a", "b", "c"], SALT)
    blinded = blind(hashed, key)
    assert [as_int(p) for p in blinded] == [ladder(clamp(key), as_int(h)) for h in hashed]
    assert np.array_equal(hash_and_blind(["a", "b", "c"], SALT, key), blinded)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), max_size=12), st.binary(min_size=32, max_size=32),
       st.binary(min_size=32, max_size=32), st.binary(min_size=1, max_size=32))
def test_blinding_commutes(ids, key_a, key_b, salt):
    a_then_b = blind(hash_and_blind(ids, salt, key_a), key_b)
    b_then_a = blind(hash_and_blind(ids, salt, key_b), key_a)
    assert a_then_b.shape == (len(ids), POINT_BYTES) and a_then_b.dtype == np.uint8 and a_then_b.flags.writeable
    assert np.array_equal(a_then_b, b_then_a)


def test_intersection_by_doubly_blinded_points():
    left = ["p1", "p2", "p3", "p4", "张三-001", "p2"]
    right = ["p9", "p3", "张三-001", "p1", "p8"]
    key_left, key_right = new_key(), new_key()
    left_double = blind(hash_and_blind(left, SALT, key_left), key_right)
    right_double = blind(hash_and_blind(right, SALT, key_right), key_left)
    shared = {bytes(p) for p in left_double} & {bytes(p) for p in right_double}
    assert len(shared) == len(set(left) & set(right))
    assert np.array_equal(left_double[1], left_double[5])  # duplicates blind to the same point


def test_distinct_ids_distinct_points_and_salts_separate_studies():
    ids = [f"{i:08d}" for i in range(3000)] + ["ＡＢ", "ab", "Ab", "\u00e9", "e\u0301"]  # raw bytes differ
    points = hash_to_group(ids, SALT)
    assert len({bytes(p) for p in points}) == len(ids)
    other = hash_to_group(ids, bytes(32))
    assert not {bytes(p) for p in points} & {bytes(p) for p in other}


def test_empty_inputs():
    key = new_key()
    assert hash_to_group([], SALT).shape == (0, POINT_BYTES)
    assert hash_and_blind([], SALT, key).shape == (0, POINT_BYTES)
    assert blind(np.zeros((0, POINT_BYTES), np.uint8), key).shape == (0, POINT_BYTES)
    assert blind(b"", key).shape == (0, POINT_BYTES)


def test_pool_result_equals_inline_result():
    ids = [f"id-{i}" for i in range(INLINE_BELOW + 1500)]
    key, other = new_key(), new_key()
    inline = hash_and_blind(ids, SALT, key, workers=1)
    pooled = hash_and_blind(ids, SALT, key, workers=2)
    assert np.array_equal(inline, pooled)
    assert 2 in psi._POOLS, "the pool broke and the work ran inline"
    assert np.array_equal(hash_to_group(ids, SALT, workers=2), hash_to_group(ids, SALT, workers=0))
    assert np.array_equal(blind(pooled, other, workers=2), blind(inline, other, workers=1))


def test_pool_serves_concurrent_callers():
    ids = [f"id-{i}" for i in range(INLINE_BELOW + 500)]
    keys = [new_key() for _ in range(3)]
    with ThreadPoolExecutor(3) as threads:
        pooled = list(threads.map(lambda key: hash_and_blind(ids, SALT, key, workers=2), keys))
    for key, points in zip(keys, pooled):
        assert np.array_equal(points, hash_and_blind(ids, SALT, key, workers=1))


def test_pool_names_the_global_index_of_a_bad_point():
    points = hash_to_group([f"id-{i}" for i in range(INLINE_BELOW + 1500)], SALT, workers=2)
    bad = INLINE_BELOW + 1234
    points[bad] = 0
    with pytest.raises(PsiError) as raised:
        blind(points, new_key(), workers=2)
    assert raised.value.index == bad and f"point {bad}" in str(raised.value)


def twist_point() -> int:
    return next(u for u in range(2, 100) if not on_curve(u))


HOSTILE = {
    **{f"small order u={u}": as_point(u) for u in SMALL_ORDER_U},
    "p - 1 (order 2 on the twist)": as_point(P - 1),
    "non-canonical 0 (u = p)": as_point(P),
    "non-canonical 1 (u = p + 1)": as_point(P + 1),
    "top bit set (base point 9 + 2^255)": as_point(9 + (1 << 255)),
    "all ones": b"\xff" * 32,
    "twist point": as_point(twist_point()),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("form", ["array", "list", "bytes"])
def test_hostile_points_are_refused_naming_the_index(name, form):
    good = hash_to_group(["a", "b", "c", "d"], SALT)
    points = [bytes(p) for p in good]
    points.insert(2, HOSTILE[name])
    value = {"array": np.frombuffer(b"".join(points), np.uint8).reshape(-1, POINT_BYTES),
             "list": points, "bytes": b"".join(points)}[form]
    with pytest.raises(PsiError) as raised:
        blind(value, new_key())
    assert raised.value.index == 2 and "point 2" in str(raised.value)


def test_wrong_lengths_are_refused_naming_the_index():
    good = [bytes(p) for p in hash_to_group(["a", "b", "c"], SALT)]
    with pytest.raises(PsiError) as raised:
        blind(good[:1] + [good[1][:31]] + good[2:], new_key())
    assert raised.value.index == 1
    with pytest.raises(PsiError) as raised:
        blind(b"".join(good) + b"\x01" * 5, new_key())
    assert raised.value.index == 3
    with pytest.raises(PsiError):
        blind(good + ["not bytes"], new_key())  # type: ignore[list-item]
    with pytest.raises(PsiError):
        blind(np.zeros((3, 31), np.uint8), new_key())
    with pytest.raises(PsiError):
        blind(np.zeros((3, 32), np.float64), new_key())


def test_bad_keys_salts_and_ids_are_refused():
    with pytest.raises(ValueError):
        hash_and_blind(["a"], SALT, b"short")
    with pytest.raises(ValueError):
        hash_to_group(["a"], b"")
    with pytest.raises(TypeError):
        hash_to_group(["a", 7], SALT)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        hash_to_group(["a"], SALT, workers=-1)


def test_fresh_keys_differ():
    assert new_key() != new_key()
    assert new_key(lambda n: b"\x07" * n) == b"\x07" * 32
