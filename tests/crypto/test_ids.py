"""ID normalisation: unicode and full-width forms, missing values, resident IDs (GB 11643-1999).

Check digits are computed here with the recursive form of ISO 7064 MOD 11-2 (p = 2(p + d) mod 11),
not the weight table the code uses; the literal IDs are the standard's own examples.
"""

from __future__ import annotations

import math
import unicodedata
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medveil.crypto.ids import InvalidId, normalise_id, normalise_ids, resident_id_valid

STANDARD_EXAMPLES = ["11010519491231002X", "440524188001010014"]


def check_character(first17: str) -> str:
    remainder = 0
    for digit in first17:
        remainder = (remainder + int(digit)) * 2 % 11
    value = (12 - remainder) % 11
    return "X" if value == 10 else str(value)


def full_width(text: str) -> str:
    return "".join("\u3000" if c == " " else chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


birth_dates = st.dates(min_value=date(1800, 1, 1), max_value=date(2099, 12, 31))
resident_ids = st.builds(
    lambda region, born, sequence: (lambda s: s + check_character(s))(f"{region:06d}{born:%Y%m%d}{sequence:03d}"),
    st.integers(100000, 999999), birth_dates, st.integers(0, 999))


def test_full_width_and_case_fold_to_ascii():
    assert normalise_id("ＡＢ１２３") == "ab123"
    assert normalise_id("\u3000 Ab123\t") == "ab123"
    assert normalise_id("Straße") == normalise_id("STRASSE") == "strasse"


def test_composed_and_decomposed_forms_agree():
    composed = "Ré-0042"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert normalise_id(composed) == normalise_id(decomposed)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1))
def test_full_width_typing_matches_ascii(text):
    if not text.strip():
        return
    assert normalise_id(full_width(text)) == normalise_id(text)


@given(st.text(min_size=1))
def test_normalising_is_idempotent(text):
    try:
        once = normalise_id(text)
    except InvalidId:
        return
    assert normalise_id(once) == once


def test_numbers_become_their_digits():
    assert normalise_id(12345) == "12345"
    assert normalise_id(np.int64(12345)) == "12345"
    assert normalise_id(12345.0) == "12345"
    assert normalise_id(np.float64(12345.0)) == "12345"
    assert normalise_id(b"AB-1") == "ab-1"


@pytest.mark.parametrize("value", [None, math.nan, np.nan, pd.NA, pd.NaT, "", "   ", "\u3000", True, 1.5,
                                   2.0**60, b"\xff\xfe", object()])
def test_missing_or_ambiguous_values_are_invalid(value):
    with pytest.raises(InvalidId) as raised:
        normalise_id(value)
    assert raised.value.row == -1


def test_errors_name_the_row_never_the_value():
    secret = "11010519491231002Y"
    with pytest.raises(InvalidId) as raised:
        normalise_ids(["11010519491231002X", secret], kind="cn_resident_id")
    assert raised.value.row == 1
    assert "row 1" in str(raised.value)
    assert secret not in str(raised.value) and secret[:17] not in str(raised.value)


def test_skip_mode_reports_skipped_rows():
    values = ["A1", None, "ａ２", "", "b3"]
    normalised, skipped = normalise_ids(values, invalid="skip")
    assert normalised == ["a1", None, "a2", None, "b3"]
    assert skipped == [1, 3]


def test_unknown_kind_or_mode_is_refused():
    with pytest.raises(ValueError):
        normalise_ids([], kind="ssn")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        normalise_ids([], invalid="drop")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", STANDARD_EXAMPLES)
def test_standard_examples_are_valid(text):
    assert check_character(text[:17]) == text[17]
    assert resident_id_valid(text)
    assert normalise_id(text, "cn_resident_id") == text


def test_resident_ids_written_loosely_normalise_to_one_form():
    expected = "11010519491231002X"
    for written in ["11010519491231002x", " 110105 19491231 002X ", "110105-19491231-002x",
                    "１１０１０５１９４９１２３１００２Ｘ", "110105\u300019491231\uff0d002ｘ"]:
        assert normalise_id(written, "cn_resident_id") == expected


@given(resident_ids)
def test_generated_resident_ids_are_valid(text):
    assert resident_id_valid(text)


@given(resident_ids, st.integers(0, 17), st.integers(1, 10))
def test_any_single_substitution_is_caught(text, position, shift):
    alphabet = "0123456789X" if position == 17 else "0123456789"
    changed = alphabet[(alphabet.index(text[position]) + shift) % len(alphabet)]
    if changed == text[position]:
        return
    assert not resident_id_valid(text[:position] + changed + text[position + 1:])


def test_x_check_digit_occurs_and_is_required_where_due():
    base = next(f"110105{date(1980, 1, 1) + timedelta(days=d):%Y%m%d}001"
                for d in range(4000) if check_character(f"110105{date(1980, 1, 1) + timedelta(days=d):%Y%m%d}001") == "X")
    assert resident_id_valid(base + "X")
    assert not any(resident_id_valid(base + digit) for digit in "0123456789")


@pytest.mark.parametrize("text", [
    "11010519491231002",      # 17 characters
    "1101051949123100200",    # 19 characters
    "11010519490230002" + check_character("11010519490230002"),  # 30 February
    "11010517991231002" + check_character("11010517991231002"),  # born before 1800
    "11010521001231002" + check_character("11010521001231002"),  # born after 2099
    "1101051949123100X2",     # X not last
    "11010519491231002A",
])
def test_malformed_resident_ids_are_invalid(text):
    assert not resident_id_valid(text)
    with pytest.raises(InvalidId):
        normalise_id(text, "cn_resident_id")
