"""Keyword look-up over SimplePIR: a public, keyless map from a normalised variant key to one
column of the PIR database, fixed-size tagged records, and the client's scan of a recovered
column.

A key ("chrom:pos:REF:ALT", `normalise_variant`) hashes with SHA-256 under a public salt to a
column and a 64-bit tag (`bucket_and_tag`). Each column holds up to `slots` records of 64 bytes
(`pack_record`), sorted by tag, stacked in consecutive rows of the column; empty slots are all
zero (tag 0 marks an empty slot, so no real tag is 0). The client fetches its key's column with
one PIR query and scans it for its tag (`find_in_column`): a key the site has no record for is
simply not in the column, so a hit and a miss cost the server the same query, the same answer
size and the same code path.

What each party learns: the server learns nothing of the key (the PIR query hides the column).
The client learns every record of its column, not only its own: about N/m records, at most
`slots`. Tags are a public hash of enumerable keys (hashing the ~10^9 known variants takes
minutes), so assume the client learns those variants' keys and counts too. Every record must
therefore be a disclosure-checked aggregate that one count query could reveal on its own. The
salt is the first one with no overflowing column, so it depends on the key set only through
that event (about zero bits).

Left-alignment of indels needs the reference sequence, which neither party has here: the site's
genotypes must have been normalised with `bcftools norm -f <ref.fa> -m -any` before conversion
to PLINK (a documented build precondition), and the client must left-align its query the same
way; a non-left-aligned repeat indel simply misses.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
from scipy.stats import binom

RECORD_BYTES = 64
RECORD_VERSION = 1
MAX_GROUPS = 24
MAX_COUNT = 0xFFFE
SUPPRESSED = 0xFFFF
DEFAULT_SLOTS = 256
MAX_COLUMNS = 1 << 20  # the last row of SimplePIR's parameter table that holds 8-bit entries
SALTS_PER_SIZE = 8  # failed salts before the column count grows
GROWTH = 1.05
TARGET_OVERFLOWS = 0.1  # expected overflowing columns the initial column count aims at
DOMAIN = b"medveil-pir\0"
EMPTY_TAG = bytes(8)
_ALLELE = re.compile(r"[ACGTN]+")
_CHROM = re.compile(r"[0-9A-Z_.]{1,32}")
_PLINK_CODES = {"23": "X", "24": "Y", "25": "XY", "26": "MT", "M": "MT"}
_HEADER = struct.Struct("<8sBBHHH")  # tag, version, groups, carriers, hom-alt carriers, genotyped


def normalise_variant(chrom: Any, pos: Any, ref: Any, alt: Any) -> str:
    """The key "chrom:pos:REF:ALT" both parties compute: "chr" stripped, upper case, PLINK codes
    23-26 and M as X, Y, XY, MT; alleles of A, C, G, T, N only (symbolic, "0" and "." alleles are
    not keyed); the alleles trimmed to their parsimonious form without a reference (common last
    bases dropped, then common first bases dropped with pos moved on). Raises ValueError."""
    name = str(chrom).strip().upper().removeprefix("CHR")
    if name.isdigit():
        name = str(int(name))
    name = _PLINK_CODES.get(name, name)
    if not _CHROM.fullmatch(name):
        raise ValueError(f"chromosome {str(chrom)[:40]!r} is not a chromosome name")
    if isinstance(pos, bool) or not (isinstance(pos, Integral) or (isinstance(pos, str) and pos.strip().isdigit())):
        raise ValueError(f"position {str(pos)[:40]!r} is not a whole number")
    position = int(pos)
    if position < 1:
        raise ValueError("a position is 1-based")
    ref_allele, alt_allele = str(ref).strip().upper(), str(alt).strip().upper()
    for allele in (ref_allele, alt_allele):
        if not _ALLELE.fullmatch(allele):
            raise ValueError(f"allele {allele[:40]!r} is not a sequence of A, C, G, T, N")
    if ref_allele == alt_allele:
        raise ValueError("the reference and alternate alleles are the same")
    while len(ref_allele) > 1 and len(alt_allele) > 1 and ref_allele[-1] == alt_allele[-1]:
        ref_allele, alt_allele = ref_allele[:-1], alt_allele[:-1]
    while len(ref_allele) > 1 and len(alt_allele) > 1 and ref_allele[0] == alt_allele[0]:
        ref_allele, alt_allele, position = ref_allele[1:], alt_allele[1:], position + 1
    return f"{name}:{position}:{ref_allele}:{alt_allele}"


def _digest(key: str, salt: int) -> bytes:
    if not isinstance(salt, Integral) or not 0 <= salt < 1 << 64:
        raise ValueError("the salt is an integer in [0, 2^64)")
    return hashlib.sha256(DOMAIN + int(salt).to_bytes(8, "little") + key.encode()).digest()


def _tag(digest: bytes) -> bytes:
    tag = digest[8:16]
    return tag if tag != EMPTY_TAG else bytes(7) + b"\x01"


def bucket_and_tag(key: str, salt: int, m: int) -> tuple[int, bytes]:
    """The column (of `m`) and the 8-byte tag of `key` under `salt`: public and keyless, so the
    client computes them itself. The tag is never all zeros (that marks an empty slot)."""
    if not isinstance(m, Integral) or m < 1:
        raise ValueError("the column count is a positive integer")
    digest = _digest(key, salt)
    return int.from_bytes(digest[:8], "little") % int(m), _tag(digest)


def _count(value: int | None, what: str) -> int:
    if value is None:
        return SUPPRESSED
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{what} is a count in 0..{MAX_COUNT} or None (suppressed)")
    return int(value)


def pack_record(tag: bytes, total: int, hom: int | None, genotyped: int, groups: Sequence[int | None]) -> bytes:
    """One 64-byte record, little-endian: [0:8] tag, [8] format version (1), [9] number of groups,
    [10:12] carriers, [12:14] homozygous-ALT carriers, [14:16] genotyped samples, [16:64] carriers
    per group (24 slots of uint16, unused ones zero). 0xFFFF marks a suppressed count (None)."""
    if not isinstance(tag, bytes) or len(tag) != 8 or tag == EMPTY_TAG:
        raise ValueError("a tag is 8 bytes, not all zero")
    if len(groups) > MAX_GROUPS:
        raise ValueError(f"a record holds at most {MAX_GROUPS} groups")
    cells = [_count(g, "a group count") for g in groups] + [0] * (MAX_GROUPS - len(groups))
    header = _HEADER.pack(tag, RECORD_VERSION, len(groups), _count(total, "the carrier count"),
                          _count(hom, "the hom-alt count"), _count(genotyped, "the genotyped count"))
    return header + struct.pack(f"<{MAX_GROUPS}H", *cells)


def unpack_record(record: bytes) -> dict[str, Any]:
    """A record's fields (None for a suppressed count); ValueError for anything but a version-1 record."""
    record = bytes(record)
    if len(record) != RECORD_BYTES:
        raise ValueError(f"a record has {RECORD_BYTES} bytes")
    tag, version, n_groups, total, hom, genotyped = _HEADER.unpack_from(record)
    if version != RECORD_VERSION or n_groups > MAX_GROUPS:
        raise ValueError(f"not a version-{RECORD_VERSION} record")
    cells = struct.unpack_from(f"<{MAX_GROUPS}H", record, _HEADER.size)

    def value(v: int) -> int | None:
        return None if v == SUPPRESSED else v

    return {"tag": tag, "version": version, "total": value(total), "hom_alt": value(hom),
            "genotyped": value(genotyped), "groups": [value(v) for v in cells[:n_groups]]}


def column_count(n_records: int, slots: int = DEFAULT_SLOTS) -> int:
    """The smallest column count whose expected number of overflowing columns (more than `slots`
    of `n_records` keys hashed uniformly) is at most 0.1, capped at 2^20 (binomial tail)."""
    if n_records <= slots:
        return 1
    lo, hi = max(1, math.ceil(n_records / slots)), MAX_COLUMNS
    while lo < hi:
        mid = (lo + hi) // 2
        if mid * binom.sf(slots, n_records, 1.0 / mid) <= TARGET_OVERFLOWS:
            hi = mid
        else:
            lo = mid + 1
    return lo


def build_keyword_db(keys: Sequence[str], records: Any, slots: int = DEFAULT_SLOTS,
                     m: int | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """The uint8 PIR database (64*slots rows, m columns) holding each key's record in its column,
    sorted by tag, and its public layout {"m", "salt", "slots", "record_bytes", "records"}.

    `records` are 64-byte records (`pack_record`, any tag: the first 8 bytes are overwritten with
    the key's tag under the chosen salt), one per distinct key. The salt is the first from 0 with
    no column over `slots` records and no two tags alike in a column; after 8 failed salts the
    column count grows by 5% (never past 2^20). `m` overrides the starting column count."""
    if not 1 <= slots <= DEFAULT_SLOTS:
        raise ValueError(f"a column holds 1 to {DEFAULT_SLOTS} records")
    table = np.array([np.frombuffer(bytes(r), np.uint8) for r in records], dtype=np.uint8).reshape(-1, RECORD_BYTES)
    if len(table) != len(keys):
        raise ValueError("one record per key")
    if len(set(keys)) != len(keys):
        raise ValueError("the keys must be distinct")
    columns = column_count(len(keys), slots) if m is None else int(m)
    if columns < 1:
        raise ValueError("the column count is a positive integer")
    salt = 0
    while columns <= MAX_COLUMNS:
        for _ in range(SALTS_PER_SIZE):
            placed = _place(keys, salt, columns, slots)
            if placed is not None:
                column, tags, rank = placed
                table[:, :8] = tags
                db = np.zeros((slots, RECORD_BYTES, columns), dtype=np.uint8)
                db[rank, :, column] = table
                return db.reshape(slots * RECORD_BYTES, columns), {
                    "m": columns, "salt": salt, "slots": slots, "record_bytes": RECORD_BYTES, "records": len(keys)}
            salt += 1
        columns = math.ceil(columns * GROWTH)
    raise ValueError(f"{len(keys)} records do not fit {MAX_COLUMNS} columns of {slots}")


def _place(keys: Sequence[str], salt: int, m: int, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Each key's column, tag (as bytes, (n, 8)) and slot under `salt`, or None when a column
    overflows or holds one tag twice."""
    digests = np.frombuffer(b"".join(_digest(key, salt) for key in keys), np.uint8).reshape(-1, 32)
    column = (digests[:, :8].copy().view("<u8").ravel() % np.uint64(m)).astype(np.int64)
    if np.bincount(column, minlength=m).max() > slots:
        return None
    tags = digests[:, 8:16].copy()
    tags[~tags.any(axis=1), 7] = 1
    value = tags.view(">u8").ravel()  # big-endian: numeric order is the tags' byte order
    order = np.lexsort((value, column))
    sorted_column, sorted_value = column[order], value[order]
    same = (sorted_column[1:] == sorted_column[:-1])
    if np.any(same & (sorted_value[1:] == sorted_value[:-1])):
        return None
    starts = np.searchsorted(sorted_column, sorted_column, side="left")
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - starts
    return column, tags, rank


def find_in_column(column: np.ndarray, key: str, salt: int) -> dict[str, Any] | None:
    """The client's side: the record of `key` in a recovered column (uint8, 64*slots entries), or
    None when the column holds no record with its tag (the site has none, or suppressed it)."""
    data = np.asarray(column, dtype=np.uint8)
    if data.ndim != 1 or len(data) % RECORD_BYTES:
        raise ValueError(f"a column is a whole number of {RECORD_BYTES}-byte records")
    tag = np.frombuffer(_tag(_digest(key, salt)), np.uint8)
    slots = data.reshape(-1, RECORD_BYTES)
    hits = np.flatnonzero((slots[:, :8] == tag).all(axis=1))
    if not len(hits):
        return None
    return unpack_record(slots[hits[0]].tobytes())


__all__ = [
    "DEFAULT_SLOTS",
    "MAX_GROUPS",
    "RECORD_BYTES",
    "SUPPRESSED",
    "bucket_and_tag",
    "build_keyword_db",
    "column_count",
    "find_in_column",
    "normalise_variant",
    "pack_record",
    "unpack_record",
]
