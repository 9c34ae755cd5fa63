"""Wire format: signed envelopes with a JSON header and a binary body.

An envelope is a msgpack map {"h": header, "s": signature, "b": body}:
- "h" is canonical JSON (sorted keys, no spaces) of the control fields: protocol version,
  kind, sender, study, task, round, nonce, issue time and the SHA-256 of the body;
- "s" is the sender's Ed25519 signature over those header bytes, so the body is covered
  through its digest and the hub can check authorship without decoding the body;
- "b" is msgpack of a map whose numpy arrays travel as extension type 1:
  msgpack [dtype string such as "<f8", shape, raw little-endian bytes]. No pickle anywhere.
Sizes are checked before parsing: `decode` refuses input above `max_bytes`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from medveil.crypto.signing import SignatureError, SigningKey, VerifyKey

PROTOCOL_VERSION = 1
ARRAY_EXT = 1
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_ALLOWED_KINDS = set("biuf")


class WireError(ValueError):
    """A message is malformed, oversized or fails its integrity check."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise WireError(f"arrays of dtype {obj.dtype} cannot be sent")
        array = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
        meta = msgpack.packb([array.dtype.str, list(obj.shape)])
        return msgpack.ExtType(ARRAY_EXT, meta + array.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise WireError(f"cannot encode {type(obj).__name__}")


def _unpack_ext(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise WireError(f"unknown extension type {code}")
    unpacker = msgpack.Unpacker(max_buffer_size=len(data))
    unpacker.feed(data[:1024])  # dtype + up to 64 dimensions fit well within this
    dtype_str, shape = unpacker.unpack()
    offset = unpacker.tell()
    dtype = np.dtype(dtype_str)
    if dtype.kind not in _ALLOWED_KINDS:
        raise WireError(f"arrays of dtype {dtype} are not accepted")
    count = int(np.prod(shape)) if shape else 1
    raw = memoryview(data)[offset:]
    if len(raw) != count * dtype.itemsize:
        raise WireError("array length does not match its shape")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def pack_body(body: dict[str, Any]) -> bytes:
    """Encode a map of JSON-like values and numpy arrays into binary framing."""
    return msgpack.packb(body, default=_pack_default, use_bin_type=True)


def unpack_body(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise WireError(f"body of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        body = msgpack.unpackb(data, ext_hook=_unpack_ext, raw=False, strict_map_key=True)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"body is not valid msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise WireError("body must be a map")
    return body


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


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

    def verify(self, key: VerifyKey) -> "Envelope":
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
        header = json.loads(header_bytes)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"malformed envelope: {exc}") from exc
    if not isinstance(header, dict) or header.get("v") != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {header.get('v') if isinstance(header, dict) else None!r}")
    for field in ("kind", "sender", "nonce", "issued_at", "body_sha256"):
        if field not in header:
            raise WireError(f"envelope header lacks {field!r}")
    return Envelope(header, header_bytes, signature, body_bytes, raw=data)
