"""Binary framing of maps of JSON-like values and numpy arrays (msgpack, no pickle).

Shared by the wire format (runtime/wire.py, which wraps it for envelope bodies) and by the
per-recipient sealed payloads (crypto/sealed.py), so both layers encode the same way while
crypto stays free of runtime imports. Numpy arrays travel as msgpack extension type 1:
msgpack [dtype string such as "<f8", shape] followed by the raw little-endian bytes. Only
bool, integer, unsigned and float arrays are accepted, in both directions; the decoder checks
that an array's byte length matches its shape and refuses anything that is not a map.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np

ARRAY_EXT = 1
ALLOWED_KINDS = frozenset("biuf")


class EncodingError(ValueError):
    """A value cannot be encoded, or bytes are not a valid encoded map."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ALLOWED_KINDS:
            raise EncodingError(f"arrays of dtype {obj.dtype} cannot be sent")
        array = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
        meta = msgpack.packb([array.dtype.str, list(obj.shape)])
        return msgpack.ExtType(ARRAY_EXT, meta + array.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise EncodingError(f"cannot encode {type(obj).__name__}")


def _unpack_ext(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise EncodingError(f"unknown extension type {code}")
    unpacker = msgpack.Unpacker(max_buffer_size=len(data))
    unpacker.feed(data[:1024])  # dtype + up to 64 dimensions fit well within this
    dtype_str, shape = unpacker.unpack()
    offset = unpacker.tell()
    dtype = np.dtype(dtype_str)
    if dtype.kind not in ALLOWED_KINDS:
        raise EncodingError(f"arrays of dtype {dtype} are not accepted")
    count = int(np.prod(shape)) if shape else 1
    raw = memoryview(data)[offset:]
    if len(raw) != count * dtype.itemsize:
        raise EncodingError("array length does not match its shape")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def pack_map(value: dict[str, Any]) -> bytes:
    """Encode a map of JSON-like values, bytes and numpy arrays."""
    return msgpack.packb(value, default=_pack_default, use_bin_type=True)


def unpack_map(data: bytes, max_bytes: int) -> dict[str, Any]:
    """Decode what `pack_map` made, refusing input above `max_bytes`, malformed bytes and non-maps."""
    if len(data) > max_bytes:
        raise EncodingError(f"body of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        value = msgpack.unpackb(data, ext_hook=_unpack_ext, raw=False, strict_map_key=True)
    except EncodingError:
        raise
    except Exception as exc:
        raise EncodingError(f"body is not valid msgpack: {exc}") from exc
    if not isinstance(value, dict):
        raise EncodingError("body must be a map")
    return value


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys, no spaces and no NaN: one byte string per value, for signing and hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
