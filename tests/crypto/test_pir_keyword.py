"""The keyword layer over SimplePIR: variant keys, buckets and tags, 64-byte records, the
database layout (salt retries and growth on overflow) and the client's scan of a column."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from medveil.crypto import pir
from medveil.crypto.pir_keyword import (
    DEFAULT_SLOTS,
    MAX_GROUPS,
    RECORD_BYTES,
    bucket_and_tag,
    build_keyword_db,
    column_count,
    find_in_column,
    normalise_variant,
    pack_record,
    unpack_record,
)


@pytest.mark.parametrize(("given", "key"), [
    (("chr1", 100, "A", "G"), "1:100:A:G"),
    (("CHR1", "100", "a", "g"), "1:100:A:G"),
    ((" chrX ", 5, "C", "T"), "X:5:C:T"),
    (("23", 5, "C", "T"), "X:5:C:T"),
    (("24", 5, "C", "T"), "Y:5:C:T"),
    (("25", 5, "C", "T"), "XY:5:C:T"),
    (("26", 5, "C", "T"), "MT:5:C:T"),
    (("chrM", 5, "C", "T"), "MT:5:C:T"),
    (("01", 7, "C", "T"), "1:7:C:T"),
    ((1, np.int64(100), "CTT", "CT"), "1:100:CT:C"),  # common last base dropped
    (("1", 100, "ACG", "ATG"), "1:101:C:T"),  # then common first base, position moved on
    (("1", 100, "AT", "A"), "1:100:AT:A"),  # an anchored deletion is already parsimonious
    (("1", 100, "GGA", "GA"), "1:100:GG:G"),
    (("7", 117559590, "ATCT", "A"), "7:117559590:ATCT:A"),
    (("2", 10, "N", "A"), "2:10:N:A"),
])
def test_keys_are_normalised(given, key):
    assert normalise_variant(*given) == key


@pytest.mark.parametrize("given", [
    ("1", 100, "A", "<DEL>"), ("1", 100, "A", "0"), ("1", 100, "A", "."), ("1", 100, "A", "*"),
    ("1", 100, "A", ""), ("1", 100, "A", "A"), ("1", 0, "A", "G"), ("1", -3, "A", "G"), ("1", "1e3", "A", "G"),
    ("1", True, "A", "G"), ("1", 10.5, "A", "G"), ("1:2", 10, "A", "G"), ("", 10, "A", "G"), ("x" * 40, 1, "A", "G"),
])
def test_symbolic_alleles_and_bad_positions_are_not_keyed(given):
    with pytest.raises(ValueError):
        normalise_variant(*given)


def test_bucket_and_tag_are_public_deterministic_and_salted():
    column, tag = bucket_and_tag("1:100:A:G", 0, 1000)
    assert (column, tag) == bucket_and_tag("1:100:A:G", 0, 1000)
    assert 0 <= column < 1000 and len(tag) == 8 and tag != bytes(8)
    assert bucket_and_tag("1:100:A:G", 1, 1000) != (column, tag)
    assert bucket_and_tag("1:100:A:T", 0, 1000)[1] != tag
    assert bucket_and_tag("1:100:A:G", 0, 1)[0] == 0
    for salt, m in ((0, 0), (-1, 10), (2**64, 10)):
        with pytest.raises(ValueError):
            bucket_and_tag("1:100:A:G", salt, m)


def test_records_round_trip_with_suppressed_cells():
    groups = [0, None, 65534] + list(range(3, MAX_GROUPS))
    record = pack_record(b"\x01" * 8, 7, None, 20909, groups)
    assert len(record) == RECORD_BYTES and record[8] == 1 and record[9] == MAX_GROUPS
    assert record[12:14] == b"\xff\xff"
    assert unpack_record(record) == {"tag": b"\x01" * 8, "version": 1, "total": 7, "hom_alt": None,
                                     "genotyped": 20909, "groups": groups}
    assert unpack_record(pack_record(b"\x02" * 8, 5, 0, 5, []))["groups"] == []


@pytest.mark.parametrize("args", [
    (bytes(8), 5, 0, 5, []), (b"short", 5, 0, 5, []), (b"\x01" * 8, 65535, 0, 5, []), (b"\x01" * 8, -1, 0, 5, []),
    (b"\x01" * 8, 5, 0, 5, [1] * (MAX_GROUPS + 1)), (b"\x01" * 8, 5, True, 5, []), (b"\x01" * 8, 5, 0, 5, [2.5]),
])
def test_records_refuse_what_does_not_fit(args):
    with pytest.raises(ValueError):
        pack_record(*args)


def test_unpack_refuses_other_versions_and_sizes():
    record = bytearray(pack_record(b"\x01" * 8, 5, 0, 5, [1]))
    record[8] = 2
    with pytest.raises(ValueError):
        unpack_record(bytes(record))
    with pytest.raises(ValueError):
        unpack_record(bytes(63))


def _records(n: int) -> tuple[list[str], list[bytes]]:
    keys = [f"1:{1000 + i}:A:G" for i in range(n)]
    return keys, [pack_record(b"\x01" * 8, 5 + i % 1000, i % 7, 900 + i % 50, [i % 3, None]) for i in range(n)]


def _expected(i: int) -> dict:
    return {"total": 5 + i % 1000, "hom_alt": i % 7, "genotyped": 900 + i % 50, "groups": [i % 3, None]}


def test_every_key_is_found_in_its_column_and_an_absent_key_is_none():
    keys, records = _records(700)
    db, layout = build_keyword_db(keys, records, slots=16)
    assert db.dtype == np.uint8 and db.shape == (16 * RECORD_BYTES, layout["m"]) and db.flags.c_contiguous
    assert layout["records"] == 700 and layout["slots"] == 16 and layout["record_bytes"] == RECORD_BYTES
    for i, key in enumerate(keys):
        column, tag = bucket_and_tag(key, layout["salt"], layout["m"])
        found = find_in_column(db[:, column], key, layout["salt"])
        assert found is not None and found["tag"] == tag
        assert {k: found[k] for k in _expected(i)} == _expected(i)
    for absent in ("1:999:A:G", "1:1000:A:T", "2:1000:A:G"):
        column, _ = bucket_and_tag(absent, layout["salt"], layout["m"])
        assert find_in_column(db[:, column], absent, layout["salt"]) is None
    # a key looked up under another salt (an old hint) finds nothing either
    column, _ = bucket_and_tag(keys[0], layout["salt"] + 1, layout["m"])
    assert find_in_column(db[:, column], keys[0], layout["salt"] + 1) is None


def test_slots_are_sorted_by_tag_and_the_first_and_last_slot_are_found():
    keys, records = _records(4)
    db, layout = build_keyword_db(keys, records, slots=4, m=1)  # one full column of four
    assert layout == {"m": 1, "salt": 0, "slots": 4, "record_bytes": 64, "records": 4}
    slots = db[:, 0].reshape(4, RECORD_BYTES)
    tags = [bytes(slot[:8]) for slot in slots]
    assert tags == sorted(bucket_and_tag(key, 0, 1)[1] for key in keys)
    first = keys[[bucket_and_tag(k, 0, 1)[1] for k in keys].index(tags[0])]
    last = keys[[bucket_and_tag(k, 0, 1)[1] for k in keys].index(tags[-1])]
    assert find_in_column(db[:, 0], first, 0)["tag"] == tags[0]
    assert find_in_column(db[:, 0], last, 0)["tag"] == tags[-1]
    # a column with free slots keeps them all zero, at the end
    db, _ = build_keyword_db(keys[:2], records[:2], slots=4, m=1)
    assert not db[2 * RECORD_BYTES:, 0].any()
    assert all(find_in_column(db[:, 0], key, 0) is not None for key in keys[:2])


def _overflows(keys: list[str], salt: int, m: int, slots: int) -> bool:
    columns = [bucket_and_tag(key, salt, m)[0] for key in keys]
    return max(np.bincount(columns, minlength=m)) > slots


def test_an_overflowing_column_makes_the_build_try_the_next_salt():
    # key sets of 8 over 2 columns of 4: find one whose salt 0 overflows (most do), computed here
    for offset in range(0, 1000, 8):
        keys = [f"3:{offset + i}:C:T" for i in range(8)]
        if _overflows(keys, 0, 2, 4):
            break
    expected = next(salt for salt in range(8) if not _overflows(keys, salt, 2, 4))
    db, layout = build_keyword_db(keys, [pack_record(b"\x01" * 8, 5, 0, 5, [])] * 8, slots=4, m=2)
    assert layout["salt"] == expected > 0 and layout["m"] == 2
    for key in keys:
        column, _ = bucket_and_tag(key, layout["salt"], 2)
        assert find_in_column(db[:, column], key, layout["salt"]) is not None


def test_when_no_salt_fits_the_column_count_grows():
    keys = [f"4:{i}:G:A" for i in range(5)]  # five records can never fit one column of four
    db, layout = build_keyword_db(keys, [pack_record(b"\x01" * 8, 5, 0, 5, [])] * 5, slots=4, m=1)
    assert layout["m"] >= 2 and layout["salt"] >= 8
    assert not _overflows(keys, layout["salt"], layout["m"], 4)
    for key in keys:
        column, _ = bucket_and_tag(key, layout["salt"], layout["m"])
        assert find_in_column(db[:, column], key, layout["salt"]) is not None


def test_build_refuses_duplicate_keys_and_mismatched_records():
    keys, records = _records(3)
    with pytest.raises(ValueError):
        build_keyword_db([keys[0]] * 3, records)
    with pytest.raises(ValueError):
        build_keyword_db(keys, records[:2])
    with pytest.raises(ValueError):
        build_keyword_db(keys, records, slots=DEFAULT_SLOTS + 1)


def test_the_column_count_meets_the_overflow_target():
    """m is the smallest with E[overflowing columns] <= 0.1, checked with scipy's binomial tail:
    for the issue's 3,152,508 variants about 16,350 columns (a query of ~64 KiB)."""
    for n in (3_152_508, 200_000, 5000):
        m = column_count(n)
        assert m * binom.sf(DEFAULT_SLOTS, n, 1 / m) <= 0.1 < (m - 1) * binom.sf(DEFAULT_SLOTS, n, 1 / (m - 1))
    assert 16_000 < column_count(3_152_508) <= 16_384
    assert column_count(10) == 1


def test_a_record_fetched_by_simplepir_is_found_by_its_key():
    """The whole client path over the real PIR: key -> column -> query -> answer -> scan."""
    keys, records = _records(300)
    db, layout = build_keyword_db(keys, records, slots=4)
    params, hint = pir.setup(db)
    client = pir.PirClient(params, hint)
    for i in (0, 151, 299):
        column, _ = bucket_and_tag(keys[i], layout["salt"], layout["m"])
        state, query = client.query(column)
        recovered = client.recover(state, pir.answer(db, query))
        assert np.array_equal(recovered, db[:, column])
        found = find_in_column(recovered, keys[i], layout["salt"])
        assert {k: found[k] for k in _expected(i)} == _expected(i)
