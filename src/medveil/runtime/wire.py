"""Wire format: signed envelopes with a JSON header and a binary body.

An envelope is a msgpack map {"h": header, "s": signature, "b": body}:
- "h" is canonical JSON (sorted keys, no spaces) of the control fields: protocol version,
  kind, sender, study, task, round, nonce, issue time and the SHA-256 of the body;
- "s" is the sender's Ed25519 signature over those header bytes, so the body is covered
  through its digest and the hub can check authorship without decoding the body;
- "b" is msgpack of a map whose numpy arrays travel as extension type 1:
  msgpack [dtype string such as "<f8", shape, raw little-endian bytes]. No pickle anywhere.
Sizes are checked before parsing: `decode` refuses input above `max_bytes`.
Header fields are typed and checked in one place (`check_header`, run by `open_envelope`), so
the hub and the node refuse a hostile header (a NaN, a list where an id belongs, a huge step)
as a WireError before any of it is used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from medveil.crypto.encoding import (
    ARRAY_EXT,  # noqa: F401 - re-exported: the array extension code
    EncodingError,
    canonical_json,
    pack_map,
    unpack_map,
)
from medveil.crypto.signing import SignatureError, SigningKey, VerifyKey

PROTOCOL_VERSION = 1
BINARY = "application/x-medveil"  # the media type of envelopes over HTTP
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 128 * 1024
MAX_ID_LENGTH = 128
MAX_LIST_LENGTH = 1024
MAX_ENDED_PER_STEP = 64  # finished tasks one step may announce to a node (its body's "ended")
MAX_STEP = 1_000_000
MAX_ISSUED_AT = 1e11  # seconds since 1970: year 5138; anything later is not a timestamp
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
REQUIRED_FIELDS = ("kind", "sender", "nonce", "issued_at", "body_sha256")
ID_FIELDS = ("kind", "sender", "nonce", "study", "task", "dataset", "analysis", "phase", "status", "service")
COUNTER_FIELDS = ("step", "round")
ID_LIST_FIELDS = ("recipients", "audit_ids")


class WireError(EncodingError):
    """A message is malformed, oversized or fails its integrity check."""


def pack_body(body: dict[str, Any]) -> bytes:
    """Encode a map of JSON-like values and numpy arrays into binary framing (crypto.encoding)."""
    try:
        return pack_map(body)
    except EncodingError as exc:
        raise WireError(str(exc)) from exc


def unpack_body(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """Decode a body, refusing one above `max_bytes`, malformed bytes, unknown types and non-maps."""
    try:
        return unpack_map(data, max_bytes)
    except EncodingError as exc:
        raise WireError(str(exc)) from exc


def _refuse_constant(name: str) -> Any:
    raise WireError(f"header holds {name}, which is not a number")


def is_id(value: Any) -> bool:
    """A bounded identifier of safe characters (names, task ids, nonces, audit ids)."""
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH and ID_PATTERN.fullmatch(value) is not None


def is_counter(value: Any) -> bool:
    """A step or round number: a plain int (not a bool or a float) in 0..MAX_STEP."""
    return type(value) is int and 0 <= value <= MAX_STEP


def is_timestamp(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= MAX_ISSUED_AT


def check_header(header: Any) -> None:
    """Raise WireError unless every known header field has its type and bounds.

    Required: v (= PROTOCOL_VERSION), kind, sender, nonce (ids), issued_at (finite seconds),
    body_sha256 (64 lowercase hex). Optional, None meaning absent: study, task, dataset,
    analysis, phase, status (ids), step and round (ints in 0..MAX_STEP), recipients and
    audit_ids (lists of at most MAX_LIST_LENGTH ids). Other fields pass, bounded by the size
    of the header and free of NaN or infinity (the parser refuses those)."""
    if not isinstance(header, dict) or type(header.get("v")) is not int or header["v"] != PROTOCOL_VERSION:
        version = header.get("v") if isinstance(header, dict) else None
        raise WireError(f"unsupported protocol version {str(version)[:16]!r}")
    for field in REQUIRED_FIELDS:
        if header.get(field) is None:
            raise WireError(f"envelope header lacks {field!r}")
    for field in ID_FIELDS:
        if header.get(field) is not None and not is_id(header[field]):
            raise WireError(f"header field {field!r} must be an id of at most {MAX_ID_LENGTH} safe characters")
    for field in COUNTER_FIELDS:
        if header.get(field) is not None and not is_counter(header[field]):
            raise WireError(f"header field {field!r} must be an integer in 0..{MAX_STEP}")
    if not is_timestamp(header["issued_at"]):
        raise WireError("header field 'issued_at' must be a finite time in seconds")
    if not isinstance(header["body_sha256"], str) or SHA256_PATTERN.fullmatch(header["body_sha256"]) is None:
        raise WireError("header field 'body_sha256' must be 64 lowercase hex digits")
    for field in ID_LIST_FIELDS:
        value = header.get(field)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) > MAX_LIST_LENGTH or not all(is_id(item) for item in value):
            raise WireError(f"header field {field!r} must be a list of at most {MAX_LIST_LENGTH} ids")


@dataclass(frozen=True)
class Envelope:
    """A verified-or-not signed message; `header` holds the control fields."""

    header: dict[str, Any]
    header_bytes: bytes
    signature: bytes
    body_bytes: bytes
    raw: bytes | None = None

    @property
    def sender(self) -> str:
        return self.header["sender"]

    @property
    def kind(self) -> str:
        return self.header["kind"]

    def body(self, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
        return unpack_body(self.body_bytes, max_bytes)

    def verify(self, key: VerifyKey) -> Envelope:
        """Check the signature and the body digest; return self for chaining."""
        try:
            key.verify(self.signature, self.header_bytes)
        except SignatureError as exc:
            raise SignatureError(f"forged or altered {self.kind} message claiming to be from {self.sender!r}") from exc
        if hashlib.sha256(self.body_bytes).hexdigest() != self.header.get("body_sha256"):
            raise SignatureError(f"body of {self.kind} message from {self.sender!r} does not match its signed digest")
        return self

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return msgpack.packb({"h": self.header_bytes, "s": self.signature, "b": self.body_bytes}, use_bin_type=True)


def seal(key: SigningKey, header: dict[str, Any], body: dict[str, Any] | None = None) -> Envelope:
    """Sign a header (which gains the body digest and protocol version) over a packed body."""
    body_bytes = pack_body(body or {})
    full = dict(header, v=PROTOCOL_VERSION, body_sha256=hashlib.sha256(body_bytes).hexdigest())
    header_bytes = canonical_json(full)
    return Envelope(full, header_bytes, key.sign(header_bytes), body_bytes)


def open_envelope(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Parse (not verify) an encoded envelope, refusing oversized or malformed input."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        outer = msgpack.unpackb(data, raw=False, max_bin_len=max_bytes, max_map_len=8)
        header_bytes, signature, body_bytes = outer["h"], outer["s"], outer["b"]
        if not all(isinstance(part, bytes) for part in (header_bytes, signature, body_bytes)):
            raise WireError("envelope fields h, s and b must be binary")
        if len(header_bytes) > MAX_HEADER_BYTES:
            raise WireError(f"envelope header exceeds {MAX_HEADER_BYTES} bytes")
        header = json.loads(header_bytes, parse_constant=_refuse_constant)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"malformed envelope: {str(exc)[:200]}") from exc
    check_header(header)
    return Envelope(header, header_bytes, signature, body_bytes, raw=data)
