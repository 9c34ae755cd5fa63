"""Patient-ID normalisation before private set intersection, so both sites hash the same text.

Two sites must spell an ID identically for PSI to match it: "ＡＢ１２３ " typed on a Chinese
keyboard and "ab123" from a lab system are the same patient. `plain` IDs lose invisible format
characters (Unicode category Cf: a zero-width space, byte-order mark or soft hyphen pasted in
with the ID), are NFKC-normalised (full-width digits and letters become ASCII), stripped and
case-folded. `cn_resident_id` IDs (居民身份证号码, GB 11643-1999) also lose inner spaces and
hyphens and must pass the format, birth-date and ISO 7064 MOD 11-2 check-digit rules; the check
letter is kept as upper-case X.

Errors name the row, never the value: an ID is personal data and messages end up in logs.
Pure: no clocks, so a birth date is plausible when it is a real calendar date in 1800-2099
(the standard's own example was born in 1880).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from datetime import date
from typing import Literal

IdKind = Literal["plain", "cn_resident_id"]
ID_KINDS: tuple[str, ...] = ("plain", "cn_resident_id")

_RESIDENT_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
_RESIDENT_CHECK = "10X98765432"  # check character for (weighted sum mod 11) = 0..10
_RESIDENT_FORMAT = re.compile(r"[0-9]{17}[0-9X]")
_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015\u2212]+")


class InvalidId(ValueError):
    """An ID that cannot be normalised; `row` is its 0-based position (-1 for a single value)."""

    def __init__(self, reason: str, row: int = -1):
        self.row = row
        self.reason = reason
        where = "id" if row < 0 else f"id at row {row}"
        super().__init__(f"{where}: {reason}")


def resident_id_valid(text: str) -> bool:
    """Whether `text` is a well-formed 18-character resident ID with a valid check digit."""
    if not _RESIDENT_FORMAT.fullmatch(text):
        return False
    try:
        born = date(int(text[6:10]), int(text[10:12]), int(text[12:14]))
    except ValueError:
        return False
    if not 1800 <= born.year <= 2099:
        return False
    total = sum(int(digit) * weight for digit, weight in zip(text[:17], _RESIDENT_WEIGHTS))
    return _RESIDENT_CHECK[total % 11] == text[17]


def _as_text(value: object) -> str:
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        raise InvalidId("id is missing")
    if isinstance(value, bool):
        raise InvalidId("a boolean is not an id")
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidId("bytes are not UTF-8") from None
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return str(int(value))  # type: ignore[call-overload]
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f"):
        number = float(value)  # type: ignore[arg-type]
        if math.isnan(number):
            raise InvalidId("id is missing")
        if not number.is_integer() or abs(number) >= 2**53:
            raise InvalidId("a non-integral or imprecise number is not an id")
        return str(int(number))
    raise InvalidId(f"a {type(value).__name__} is not an id")


def _plain(text: str) -> str:
    if text.isascii():
        return text.strip().lower()
    text = "".join(char for char in text if unicodedata.category(char) != "Cf")
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold()).strip()


def normalise_id(value: object, kind: IdKind = "plain") -> str:
    """The canonical text of one ID; raises InvalidId (row -1) when it is missing or malformed."""
    if kind not in ID_KINDS:
        raise ValueError(f"unknown id kind {kind!r}; expected one of {ID_KINDS}")
    text = _plain(_as_text(value))
    if not text:
        raise InvalidId("id is empty")
    if kind == "cn_resident_id":
        text = _SEPARATORS.sub("", text).upper()
        if not resident_id_valid(text):
            raise InvalidId("not a valid resident id (format, birth date or check digit)")
    return text


def normalise_ids(values: Sequence[object], kind: IdKind = "plain",
                  invalid: Literal["error", "skip"] = "error") -> tuple[list[str | None], list[int]]:
    """Canonical text per row (None where skipped) and the skipped rows.

    invalid="error" raises InvalidId naming the first bad row; "skip" drops bad rows instead.
    """
    if kind not in ID_KINDS:
        raise ValueError(f"unknown id kind {kind!r}; expected one of {ID_KINDS}")
    if invalid not in ("error", "skip"):
        raise ValueError(f"invalid must be 'error' or 'skip', not {invalid!r}")
    normalised: list[str | None] = []
    skipped: list[int] = []
    for row, value in enumerate(values):
        try:
            normalised.append(normalise_id(value, kind))
        except InvalidId as error:
            if invalid == "error":
                raise InvalidId(error.reason, row) from None
            normalised.append(None)
            skipped.append(row)
    return normalised, skipped
