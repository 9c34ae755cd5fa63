"""Secure aggregation primitives with double masking (Bonawitz et al. 2017), pure and transport-free.

Each site sends its fixed-point-encoded release y = x + PRG(b) + sum over peers of +-PRG(s_pq):
one pairwise mask per other participant, from an X25519 agreement s_pq expanded with
AES-256-CTR (the smaller name adds, the larger subtracts, so they cancel in the sum), and one
self mask from a fresh per-step seed b that the site Shamir-shares among the participants
(each share encrypted pairwise with AES-GCM). Whoever sums the vectors learns the total once
the self masks are removed; removing them needs `threshold` shares of each b, and each masked
vector alone is uniform on the ring to anyone missing one of its seeds. What each party
learns: the summing party, the sum over the sites that submitted; a site, its own shares,
each uniform on its own; nobody, one site's vector, as long as no site reveals both its share
of a site's b and its pairwise seed with that site for the same step (runtime/secure_aggregation.py
enforces that).

Fixed point: a float64 x becomes the integer round(x * 2**52), held in two's complement over
112 bits as two 56-bit limbs in uint64 words. Limb sums of up to 256 sites stay below 2**64,
so sums modulo 2**64 (where masks live) are exact; decoding propagates the carry and the sign.
Encoding refuses |x| > 2**50 and non-finite values instead of wrapping.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

RandomBytes = Callable[[int], bytes]

LIMB_BITS = 56
LIMBS = 2
FRACTION_BITS = 52
MAX_PARTIES = 256
MAX_ABS = 2.0 ** (LIMB_BITS * LIMBS - 1 - FRACTION_BITS - 9)  # 2**50: 256 sites sum below 2**58 < 2**59
_LIMB_MASK = np.uint64((1 << LIMB_BITS) - 1)
_SCALE = 2.0**FRACTION_BITS
# Mersenne prime 2**521 - 1: a field larger than any 32-byte secret, with cheap reduction.
FIELD_PRIME = (1 << 521) - 1
_PROTOCOL = b"medveil-secagg-v1"


class FixedPointOverflow(ValueError):
    """A value is too large (or not finite) for the fixed-point ring."""


# --- fixed-point encoding -------------------------------------------------------------------

def encode_fixed(values: np.ndarray) -> np.ndarray:
    """float64 array -> uint64 array of shape values.shape + (2,) (low limb, high limb)."""
    x = np.asarray(values, dtype=np.float64)
    lowest, highest = (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 0.0)  # NaN if any is NaN
    if not (math.isfinite(lowest) and math.isfinite(highest)):
        raise FixedPointOverflow("cannot encode NaN or infinite values")
    if max(-lowest, highest) > MAX_ABS:
        raise FixedPointOverflow(f"a value exceeds the fixed-point bound {MAX_ABS:.3g}")
    scaled = np.multiply(x, _SCALE, out=np.empty_like(x))
    np.rint(scaled, out=scaled)  # exact integers in float64 (53 significant bits at most)
    # scaled = a * 2**40 + b with a = floor(scaled / 2**40) (|a| < 2**63) and 0 <= b < 2**40, both
    # exact in float64 and then int64; the 112-bit two's complement's limbs follow in integers alone
    # (its low limb: the low 56 bits of a * 2**40 + b; its high limb: a shifted right by 16).
    a = np.floor(scaled * 2.0**-40)
    b = (scaled - a * 2.0**40).astype(np.int64)
    high = a.astype(np.int64)
    low = np.left_shift(high, 40) | b
    high >>= LIMB_BITS - 40
    out = np.empty(x.shape + (LIMBS,), dtype=np.uint64)
    np.bitwise_and(low.view(np.uint64), _LIMB_MASK, out=out[..., 0])
    np.bitwise_and(high.view(np.uint64), _LIMB_MASK, out=out[..., 1])
    return out


def decode_fixed(limb_sums: np.ndarray) -> np.ndarray:
    """Summed limbs (exact, below 2**64) -> float64 sums, carrying between limbs and restoring the sign."""
    limbs = np.asarray(limb_sums, dtype=np.uint64)
    low = limbs[..., 0] & _LIMB_MASK
    high = (limbs[..., 1] + (limbs[..., 0] >> np.uint64(LIMB_BITS))) & _LIMB_MASK
    negative = high >= np.uint64(1 << (LIMB_BITS - 1))
    magnitude_low = np.where(negative, (np.uint64(1 << LIMB_BITS) - low) & _LIMB_MASK, low)
    magnitude_high = np.where(negative, (_LIMB_MASK - high + (low == 0)) & _LIMB_MASK, high)
    magnitude = (magnitude_high.astype(np.float64) * 2.0 ** (LIMB_BITS - FRACTION_BITS)
                 + magnitude_low.astype(np.float64) / _SCALE)
    return np.where(negative, -magnitude, magnitude)


def flatten(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    """Concatenate named arrays (sorted by name) into one float64 vector, with the layout to undo it."""
    layout = [(name, tuple(np.shape(arrays[name]))) for name in sorted(arrays)]
    if not layout:
        return np.zeros(0), layout
    return np.concatenate([np.ravel(np.asarray(arrays[name], dtype=np.float64)) for name, _ in layout]), layout


def unflatten(vector: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape)) if shape else 1
        out[name] = vector[offset:offset + size].reshape(shape)
        offset += size
    return out


# --- keys, pairwise seeds and masks ---------------------------------------------------------

def generate_key(random_bytes: RandomBytes) -> tuple[bytes, bytes]:
    """A fresh X25519 key pair (private, public) as raw 32-byte strings."""
    private_raw = random_bytes(32)
    return private_raw, public_key(private_raw)


def public_key(private_raw: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PROTOCOL + info).derive(secret)


def shared_secret(private_raw: bytes, peer_public_raw: bytes) -> bytes:
    """The X25519 agreement between two sites' per-task keys."""
    return X25519PrivateKey.from_private_bytes(private_raw).exchange(X25519PublicKey.from_public_bytes(peer_public_raw))


def mask_seed(secret: bytes, context: bytes) -> bytes:
    """Pairwise mask seed for one context (task, round): fresh masks every round from one agreement."""
    return _hkdf(secret, b"|mask|" + context)


_BLOCK_WORDS = 1 << 16  # masks are expanded and added 512 KiB at a time, so the block stays in cache
_ZEROS = bytes(_BLOCK_WORDS * 8)


class _Keystream:
    """The AES-256-CTR keystream under one seed, read in consecutive blocks of uint64 words
    (the same words `expand` returns, without holding the whole stream in memory)."""

    def __init__(self, seed: bytes):
        self._encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
        self._buffer = bytearray(_BLOCK_WORDS * 8 + 15)

    def next(self, words: int) -> np.ndarray:
        """The next `words` words (a view into a buffer that the following call overwrites)."""
        written = self._encryptor.update_into(memoryview(_ZEROS)[:words * 8], self._buffer)
        return np.frombuffer(self._buffer, dtype="<u8", count=written // 8)


def expand(seed: bytes, count: int) -> np.ndarray:
    """`count` pseudo-random uint64 words: the AES-256-CTR keystream under `seed`."""
    out = np.zeros(count, dtype=np.uint64)
    _add_streams(out, [(seed, 1)])
    return out


def _add_streams(target: np.ndarray, streams: list[tuple[bytes, int]]) -> None:
    """target += sign * expand(seed) for each (seed, sign), modulo 2**64, in place, block by block:
    each block of the target is read and written once whatever the number of streams."""
    keystreams = [(_Keystream(seed), sign) for seed, sign in streams]
    for start in range(0, target.size, _BLOCK_WORDS):
        block = target[start:start + _BLOCK_WORDS]
        for keystream, sign in keystreams:
            words = keystream.next(block.size)
            if sign > 0:
                np.add(block, words, out=block)
            else:
                np.subtract(block, words, out=block)


def pair_sign(me: str, peer: str) -> int:
    """The lexicographically smaller site adds the pairwise mask, the larger subtracts it."""
    return 1 if me < peer else -1


def apply_masks(encoded: np.ndarray, me: str, seeds: dict[str, bytes], self_seed: bytes | None = None) -> np.ndarray:
    """Add (or subtract) one expanded mask per peer to the flat uint64 encoding, modulo 2**64,
    and the expanded self mask of `self_seed` when given (double masking)."""
    masked = np.array(encoded, dtype=np.uint64, copy=True).ravel()
    streams = [] if self_seed is None else [(self_seed, 1)]
    _add_streams(masked, streams + [(seed, pair_sign(me, peer)) for peer, seed in seeds.items()])
    return masked


def dropped_mask_total(dropped: str, seeds_with_submitters: dict[str, bytes], count: int) -> np.ndarray:
    """The uncancelled masks that submitters added for a site that never submitted, to subtract."""
    total = np.zeros(count, dtype=np.uint64)
    _add_streams(total, [(seed, pair_sign(submitter, dropped)) for submitter, seed in seeds_with_submitters.items()])
    return total


def self_mask_total(self_seeds: list[bytes], count: int) -> np.ndarray:
    """The submitters' self masks, summed, to subtract from the total once their seeds are rebuilt."""
    total = np.zeros(count, dtype=np.uint64)
    _add_streams(total, [(seed, 1) for seed in self_seeds])
    return total


def remove_masks(total: np.ndarray, self_seeds: list[bytes], dropped: dict[str, dict[str, bytes]]) -> None:
    """In place: total -= self_mask_total(self_seeds) + the dropped_mask_total of each dropped site
    ({dropped site: {submitter: seed}}), in one pass over `total`."""
    streams = [(seed, -1) for seed in self_seeds]
    for site, seeds in dropped.items():
        streams += [(seed, -pair_sign(submitter, site)) for submitter, seed in seeds.items()]
    _add_streams(total, streams)


# --- Shamir secret sharing of the self-mask seeds -----------------------------------------

def split_secret(secret: bytes, n: int, threshold: int, random_bytes: RandomBytes) -> list[int]:
    """Shares f(1..n) of a polynomial of degree threshold-1 with f(0) = secret, over GF(2**521-1)."""
    if not 1 <= threshold <= n:
        raise ValueError(f"threshold {threshold} must lie in 1..{n}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [int.from_bytes(random_bytes(66), "big") % FIELD_PRIME for _ in range(threshold - 1)]
    return [_evaluate(coefficients, x) for x in range(1, n + 1)]


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % FIELD_PRIME
    return value


def combine_secret(shares: dict[int, int], threshold: int, length: int = 32) -> bytes:
    """Lagrange interpolation at 0 from at least `threshold` shares {x: f(x)}."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, fewer than the threshold {threshold}")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % FIELD_PRIME
                denominator = denominator * (xi - xj) % FIELD_PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, FIELD_PRIME)) % FIELD_PRIME
    return secret.to_bytes(length, "big")


def encrypt_share(secret: bytes, share: int, context: bytes, random_bytes: RandomBytes) -> bytes:
    """AES-GCM encryption of one share under a key derived from the pairwise agreement."""
    nonce = random_bytes(12)
    return nonce + AESGCM(_hkdf(secret, b"|share|")).encrypt(nonce, share.to_bytes(66, "big"), context)


def decrypt_share(secret: bytes, ciphertext: bytes, context: bytes) -> int:
    """Inverse of encrypt_share; raises cryptography's InvalidTag if altered or misaddressed."""
    return int.from_bytes(AESGCM(_hkdf(secret, b"|share|")).decrypt(ciphertext[:12], ciphertext[12:], context), "big")
