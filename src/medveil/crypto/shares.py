"""Two-party additive secret sharing over the ring Z_2^64 with a dealer's correlation, pure.

Used by the vertical GLM (`medveil.analyses.vertical`) to compute cross products U'V of two
parties' private matrices, where one party (F) holds U (n x k) and the other (L) holds V (n x m),
with the help of a third, non-colluding party, the dealer, who never sees data:

    dealer:  seeds for A (n x k), B (n x m) and C_L, all uniform on the ring (AES-256-CTR);
             C_F = A'B - C_L, sent to F.
    F -> L:  E = U - A                      (uniform to L: A is a one-time pad)
    L -> F:  D = V - B                      (uniform to F: B is a one-time pad)
    L:       share_L = E'V + C_L;     F: share_F = A'D + C_F
    share_L + share_F = E'V + A'V - A'B + A'B = U'V   (mod 2^64)

Each share alone is uniform (C_L pads both). Only the blocks of U'V a protocol needs are
computed (`Block`): the rest would disclose more than the protocol's output.

A share times a value its holder knows is a share of the product (ring multiplication wraps),
so a party holding shares [w] and its own columns x builds shares of w * x locally; the vertical
GLM uses it for three-factor sums (x_L' W x_F = cross(x_F, [w]_L x_L) + cross(x_L, [w]_F x_F)').

Fixed point: a real x with |x| <= 1 becomes round(x * 2^f) in two's complement. A product of
encodings with f1 + f2 (+ f3) fractional bits summed over n rows stays below 2^63 in magnitude
when the bits and bit_length(n) add up to at most 63: `fraction_bits(n)` picks f for two factors,
`fraction_bits_triple(n)` for three (one of them an IRLS weight's limb, at most 1/2), so decoding a sum
of products is exact (no truncation protocol is needed: nothing is multiplied twice). Where a sum
needs more precision than 2^-f per value, a value is sent as two limbs (`encode_two_limbs`): its
encoding and its rounding error encoded again, for ~2^-2f. Callers scale each column by a public
power of two (`scale_exponent`) so that its values lie in [-1, 1]. `permutation` gives two
parties holding one seed the same fresh row order (to hide rows from a third).

Why our own: no maintained Python library offers dealer-assisted matrix products over Z_2^64 on
numpy arrays without a full MPC runtime (MP-SPDZ, CrypTen need their own processes and
networking); the arithmetic is a few lines of numpy, whose uint64 operations wrap mod 2^64.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medveil.crypto.secagg import expand

SEED_BYTES = 32
RING_BITS = 64
EXPONENT_STEP = 4  # column scale exponents are multiples of this many bits (coarse, public)


class ShareError(ValueError):
    """A value that cannot be encoded, or shares of the wrong shape or type."""


@dataclass(frozen=True)
class Block:
    """One block of U'V: the columns `u` of U against the columns `v` of V (start, stop)."""

    u: tuple[int, int]
    v: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u[1] - self.u[0], self.v[1] - self.v[0])

    @property
    def size(self) -> int:
        rows, columns = self.shape
        return rows * columns


def new_seed() -> bytes:
    """A fresh uniformly random seed."""
    return secrets.token_bytes(SEED_BYTES)


def derive_seed(seed: bytes, label: str) -> bytes:
    """An independent seed for `label` from one master seed (HMAC-SHA256 as a PRF)."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ShareError(f"a seed must be {SEED_BYTES} bytes")
    return hmac.new(bytes(seed), label.encode("utf-8"), hashlib.sha256).digest()


def random_columns(seed: bytes, rows: int, columns: Sequence[int]) -> np.ndarray:
    """The listed columns of a uniform rows x K ring matrix defined by `seed`, each column from
    its own derived seed, so any subset of columns is expanded without the rest (Fortran order)."""
    out = np.empty((rows, len(columns)), dtype=np.uint64, order="F")
    for position, column in enumerate(columns):
        out[:, position] = expand(derive_seed(seed, f"column {int(column)}"), rows)
    return out


def random_matrix(seed: bytes, rows: int, columns: int) -> np.ndarray:
    """A uniform rows x columns ring matrix defined by `seed`."""
    return random_columns(seed, rows, range(columns))


def random_vector(seed: bytes, count: int) -> np.ndarray:
    """`count` uniform ring elements defined by `seed`."""
    return expand(derive_seed(seed, "vector"), count)


def fraction_bits_triple(rows: int) -> int:
    """Fractional bits f3 for sums of `rows` products of three values, one of them an IRLS weight
    in [-1/4, 1/4] or its low limb (a rounding error of up to half a unit, so |encoding| <= 2^(f3-1))
    and two in [-1, 1]: 3 f3 - 1 + bit_length(rows) <= 63."""
    if rows < 1:
        raise ShareError("at least one row is needed")
    bits = (RING_BITS - int(rows).bit_length()) // 3
    if bits < 8:
        raise ShareError(f"{rows} rows leave fewer than 8 fractional bits in the ring")
    return bits


def permutation(seed: bytes, label: str, count: int) -> np.ndarray:
    """A uniformly random permutation of range(count) defined by `seed` and `label` (Philox)."""
    key = int.from_bytes(derive_seed(seed, label)[:16], "little")
    return np.random.Generator(np.random.Philox(key=key)).permutation(count)


def fraction_bits(rows: int) -> int:
    """Fractional bits f for sums of `rows` products of values in [-1, 1]: 2f + bit_length(rows) <= 63."""
    if rows < 1:
        raise ShareError("at least one row is needed")
    bits = (RING_BITS - 1 - int(rows).bit_length()) // 2
    if bits < 8:
        raise ShareError(f"{rows} rows leave fewer than 8 fractional bits in the ring")
    return bits


def scale_exponent(values: np.ndarray) -> int:
    """The smallest multiple of EXPONENT_STEP e with max |values| <= 2^e (0 for an all-zero column)."""
    largest = float(np.max(np.abs(values))) if np.size(values) else 0.0
    if not np.isfinite(largest):
        raise ShareError("a value is not finite")
    if largest == 0.0:
        return 0
    _, exponent = np.frexp(largest)  # largest = mantissa * 2^exponent with mantissa in [0.5, 1)
    exponent = int(exponent) - (1 if largest == 2.0 ** (int(exponent) - 1) else 0)
    return -((-exponent) // EXPONENT_STEP) * EXPONENT_STEP


def encode(values: np.ndarray, bits: int) -> np.ndarray:
    """Reals in [-1, 1] as ring elements round(x * 2^bits) (two's complement in uint64)."""
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ShareError("cannot encode values that are not finite")
    if x.size and float(np.max(np.abs(x))) > 1.0:
        raise ShareError("values to encode must lie in [-1, 1] (scale the column first)")
    return np.rint(np.ldexp(x, bits)).astype(np.int64).view(np.uint64)


def encode_two_limbs(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Reals in [-1, 1] as two ring encodings (hi, lo) with x ~ hi * 2^-bits + lo * 2^-2bits: the
    rounding error of one encoding, encoded again, for sums that need twice the precision."""
    x = np.asarray(values, dtype=np.float64)
    hi = encode(x, bits)
    remainder = np.ldexp(x - decode(hi, bits), bits)  # in [-1/2, 1/2]
    return hi, encode(remainder, bits)


def decode(ring: np.ndarray, bits: int) -> np.ndarray:
    """Ring elements as signed fixed-point reals with `bits` fractional bits."""
    return np.ldexp(np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64), -bits)


def cross_blocks(u: np.ndarray, v: np.ndarray, blocks: Sequence[Block],
                 only: Sequence[int] | None = None) -> np.ndarray:
    """The blocks of u'v (mod 2^64), each flattened row-major, concatenated; with `only`, just
    those blocks are computed and the others are zeros (a party's local terms of some blocks)."""
    wanted = set(range(len(blocks)) if only is None else only)
    parts = [u[:, b.u[0]:b.u[1]].T @ v[:, b.v[0]:b.v[1]] if i in wanted else np.zeros(b.shape, dtype=np.uint64)
             for i, b in enumerate(blocks)]
    return np.concatenate([p.ravel() for p in parts]) if parts else np.zeros(0, dtype=np.uint64)


def blocks_size(blocks: Sequence[Block]) -> int:
    return sum(b.size for b in blocks)


def dealer_offset(a: np.ndarray, b: np.ndarray, c_l: np.ndarray, blocks: Sequence[Block]) -> np.ndarray:
    """The dealer's C_F = A'B - C_L over the blocks, so that the two shares add up to U'V."""
    return cross_blocks(a, b, blocks) - c_l


def share_of_masked_holder(e: np.ndarray, v: np.ndarray, c_l: np.ndarray, blocks: Sequence[Block]) -> np.ndarray:
    """L's share: E'V + C_L (L holds V and received E = U - A)."""
    return cross_blocks(e, v, blocks) + c_l


def share_of_pad_holder(a: np.ndarray, d: np.ndarray, c_f: np.ndarray, blocks: Sequence[Block]) -> np.ndarray:
    """F's share: A'D + C_F (F holds A and received D = V - B)."""
    return cross_blocks(a, d, blocks) + c_f


def reconstruct(*shares: np.ndarray) -> np.ndarray:
    """The shared value: the shares' sum mod 2^64."""
    total = np.zeros_like(np.asarray(shares[0], dtype=np.uint64))
    for share in shares:
        total = total + np.asarray(share, dtype=np.uint64)
    return total


def split_blocks(flat: np.ndarray, blocks: Sequence[Block]) -> list[np.ndarray]:
    """The blocks of a flat `cross_blocks` vector, each in its shape."""
    if flat.shape != (blocks_size(blocks),):
        raise ShareError(f"expected {blocks_size(blocks)} ring elements, got shape {flat.shape}")
    out, start = [], 0
    for b in blocks:
        out.append(flat[start:start + b.size].reshape(b.shape))
        start += b.size
    return out


def two_limb_blocks(u_hi: tuple[int, int], u_lo: tuple[int, int], v_hi: tuple[int, int],
                    v_lo: tuple[int, int]) -> list[Block]:
    """The blocks of a product of two-limb columns: hi'hi, hi'lo, lo'hi (lo'lo is below 2^-3f)."""
    return [Block(u_hi, v_hi), Block(u_hi, v_lo), Block(u_lo, v_hi)]


def combine_two_limbs(hi_hi: np.ndarray, hi_lo: np.ndarray, lo_hi: np.ndarray, bits: int,
                      bits_v: int | None = None) -> np.ndarray:
    """The real product from the three ring blocks of `two_limb_blocks`, U's limbs with `bits`
    fractional bits and V's with `bits_v` (default the same)."""
    bits_v = bits if bits_v is None else bits_v
    return (decode(hi_hi, bits + bits_v) + decode(hi_lo, bits + 2 * bits_v)
            + decode(lo_hi, 2 * bits + bits_v))


def pair_columns(x: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The products x_j * x_k for j <= k (row-wise), and the (j, k) of each, for X'WX from U'w."""
    p = x.shape[1]
    pairs = [(j, k) for j in range(p) for k in range(j, p)]
    products = np.empty((x.shape[0], len(pairs)), dtype=np.float64, order="F")
    for position, (j, k) in enumerate(pairs):
        products[:, position] = x[:, j] * x[:, k]
    return products, pairs
