"""Wire format: binary body framing with numpy arrays, and signed envelopes."""

from __future__ import annotations

import hashlib
import json
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medveil.crypto.signing import SignatureError, SigningKey
from medveil.runtime import wire
from medveil.runtime.wire import (
    ARRAY_EXT,
    PROTOCOL_VERSION,
    Envelope,
    WireError,
    canonical_json,
    open_envelope,
    pack_body,
    seal,
    unpack_body,
)

KEY = SigningKey.generate()
OTHER = SigningKey.generate()
HEADER = {"kind": "task", "sender": "researcher", "nonce": "0123abcd", "issued_at": 1700000000.25,
          "study": "s1", "task": "t1", "round": 0}

DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "bool"]


# --- body framing ------------------------------------------------------------------------


def dtypes_any_byteorder():
    return st.tuples(st.sampled_from(DTYPES), st.sampled_from("<>=")).map(
        lambda pair: np.dtype(pair[0]).newbyteorder(pair[1])
    )


@st.composite
def arrays(draw):
    dtype = draw(dtypes_any_byteorder())
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    array = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["c", "transposed", "strided", "fortran"]))
    if layout == "transposed":
        array = array.T
    elif layout == "strided" and array.ndim:
        array = array[::2]
    elif layout == "fortran":
        array = np.asfortranarray(array)
    return array


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars | arrays(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.text(max_size=8), values, max_size=5)


def assert_same(expected, actual, path="body"):
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), path
        assert actual.shape == expected.shape, path
        assert actual.dtype == expected.dtype.newbyteorder("<"), path
        assert actual.dtype.byteorder in "<|" or (actual.dtype.byteorder == "=" and np.little_endian), path
        # Bit-exact: NaN payloads, -0.0 and every integer survive.
        assert actual.tobytes() == expected.astype(actual.dtype).tobytes(), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert list(actual) == list(expected), path
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{path}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), path
    else:
        assert type(actual) is type(expected) and actual == expected, path


@settings(max_examples=150, deadline=None)
@given(body=bodies)
def test_body_roundtrip(body):
    assert_same(body, unpack_body(pack_body(body)))


@settings(max_examples=100, deadline=None)
@given(array=arrays())
def test_array_roundtrip_every_dtype_shape_and_layout(array):
    back = unpack_body(pack_body({"a": array}))["a"]
    assert_same(array, back)
    if array.dtype.kind == "f":
        np.testing.assert_array_equal(back, array)  # value equality as well, NaN == NaN here


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 4, 2), (1,), (2, 3)])
def test_zero_dimensional_and_empty_arrays(dtype, shape):
    array = (np.arange(int(np.prod(shape))) % 2 == 1 if dtype == "bool"
             else np.arange(int(np.prod(shape))).astype(dtype)).reshape(shape)
    back = unpack_body(pack_body({"a": array}))["a"]
    assert isinstance(back, np.ndarray)
    assert back.shape == shape and back.ndim == len(shape)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if np.dtype(d).itemsize > 1])
def test_big_endian_arrays_come_back_equal(dtype):
    native = np.array([0, 1, 2, 100, 127], dtype=dtype).reshape(5, 1)
    big = native.astype(np.dtype(dtype).newbyteorder(">"))
    assert big.dtype.byteorder == ">"
    back = unpack_body(pack_body({"a": big}))["a"]
    np.testing.assert_array_equal(back, native)
    assert back.dtype == np.dtype(dtype).newbyteorder("<")


def test_float_extremes_survive_bit_exactly():
    array = np.array([np.nan, -np.inf, np.inf, -0.0, 5e-324, np.finfo(np.float64).max], dtype=">f8")
    back = unpack_body(pack_body({"a": array}))["a"]
    assert back.astype(">f8").tobytes() == array.tobytes()


def test_every_array_numpy_can_build_roundtrips():
    """The largest ndim numpy allows (32 in numpy 1, 64 in numpy 2) still travels."""
    ndim = 32
    while True:
        try:
            np.zeros((1,) * (ndim + 1))
        except ValueError:
            break
        ndim += 1
    array = np.full((1,) * ndim, 7.5)
    back = unpack_body(pack_body({"a": array}))["a"]
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_numpy_scalars_travel_as_plain_values():
    body = {"i": np.int64(-3), "u": np.uint8(200), "f": np.float32(1.5), "b": np.bool_(True)}
    back = unpack_body(pack_body(body))
    assert back == {"i": -3, "u": 200, "f": 1.5, "b": True}
    assert type(back["b"]) is bool and type(back["i"]) is int


@pytest.mark.parametrize(
    "array",
    [
        np.array(["a", "bc"]),
        np.array([b"x"]),
        np.array([1, None], dtype=object),
        np.array([{"a": 1}], dtype=object),
        np.array([1 + 2j]),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
    ],
    ids=["str", "bytes", "object", "object-dict", "complex", "datetime", "structured"],
)
def test_unsafe_arrays_are_refused_when_packing(array):
    with pytest.raises(WireError, match="cannot be sent"):
        pack_body({"nested": {"a": [1, array]}})


def test_arbitrary_objects_are_refused_when_packing():
    with pytest.raises(WireError):
        pack_body({"a": object()})


def _ext(dtype: str, shape: list[int], payload: bytes, code: int = ARRAY_EXT) -> bytes:
    return msgpack.packb({"a": msgpack.ExtType(code, msgpack.packb([dtype, shape]) + payload)}, use_bin_type=True)


@pytest.mark.parametrize("dtype", ["|O", "<U1", "|S1", "<c16", "<M8[D]", "|V8"])
def test_unsafe_dtypes_are_refused_when_unpacking(dtype):
    with pytest.raises(WireError):
        unpack_body(_ext(dtype, [1], b"\x00" * np.dtype(dtype).itemsize))


@pytest.mark.parametrize(
    "dtype, shape, payload",
    [("<f8", [2], b"\x00" * 8), ("<f8", [2], b"\x00" * 24), ("<i4", [-1], b""), ("<i4", [-1, -1], b"\x00" * 4),
     ("<f8", [2**62, 4], b""), ("nonsense", [1], b"\x00")],
)
def test_arrays_inconsistent_with_their_shape_are_refused(dtype, shape, payload):
    with pytest.raises(WireError):
        unpack_body(_ext(dtype, shape, payload))


def test_unknown_extension_type_is_refused():
    with pytest.raises(WireError, match="unknown extension"):
        unpack_body(_ext("<f8", [1], b"\x00" * 8, code=42))


@pytest.mark.parametrize("data", [msgpack.packb([1, 2]), msgpack.packb(3), msgpack.packb("x"), msgpack.packb(None)])
def test_body_must_be_a_map(data):
    with pytest.raises(WireError, match="must be a map"):
        unpack_body(data)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_body_gives_wire_error_or_a_map(data):
    try:
        body = unpack_body(data)
    except WireError:
        return
    assert isinstance(body, dict)


def test_non_string_map_keys_are_refused():
    with pytest.raises(WireError):
        unpack_body(msgpack.packb({1: 2}))


@pytest.fixture
def no_parsing(monkeypatch):
    """Make any msgpack parse fail the test, to show a refusal happens before parsing."""

    def parsed(*args, **kwargs):
        raise AssertionError("input was parsed before its size was checked")

    monkeypatch.setattr(wire.msgpack, "unpackb", parsed)
    monkeypatch.setattr(wire.msgpack, "Unpacker", parsed)


def test_oversized_body_is_refused_before_parsing(no_parsing):
    data = pack_body({"a": np.zeros(100)})
    with pytest.raises(WireError, match="exceeds the limit"):
        unpack_body(data, max_bytes=len(data) - 1)


def test_body_at_the_limit_is_accepted():
    data = pack_body({"a": np.arange(10.0)})
    np.testing.assert_array_equal(unpack_body(data, max_bytes=len(data))["a"], np.arange(10.0))


# --- envelopes ---------------------------------------------------------------------------


def sealed(body=None, header=HEADER, key=KEY) -> Envelope:
    if body is None:
        body = {"x": np.arange(6, dtype=np.float64).reshape(2, 3), "k": "v"}
    return seal(key, dict(header), body)


def encode_parts(header_bytes, signature, body_bytes) -> bytes:
    return msgpack.packb({"h": header_bytes, "s": signature, "b": body_bytes}, use_bin_type=True)


def test_seal_open_verify_roundtrip():
    envelope = sealed()
    opened = open_envelope(envelope.encode())
    assert opened.verify(KEY.verify_key) is opened
    assert opened.header == envelope.header
    assert opened.header_bytes == canonical_json(envelope.header)
    assert opened.header["v"] == PROTOCOL_VERSION
    assert opened.header["body_sha256"] == hashlib.sha256(opened.body_bytes).hexdigest()
    assert opened.sender == "researcher" and opened.kind == "task"
    for field, value in HEADER.items():
        assert opened.header[field] == value
    body = opened.body()
    np.testing.assert_array_equal(body["x"], np.arange(6.0).reshape(2, 3))
    assert body["k"] == "v"


def test_seal_without_body_is_an_empty_map():
    opened = open_envelope(seal(KEY, dict(HEADER)).encode()).verify(KEY.verify_key)
    assert opened.body() == {}


def test_caller_cannot_override_version_or_digest():
    envelope = seal(KEY, dict(HEADER, v=99, body_sha256="0" * 64), {"a": 1})
    assert envelope.header["v"] == PROTOCOL_VERSION
    assert envelope.header["body_sha256"] == hashlib.sha256(envelope.body_bytes).hexdigest()
    open_envelope(envelope.encode()).verify(KEY.verify_key)


def test_wrong_key_is_detected():
    with pytest.raises(SignatureError):
        open_envelope(sealed().encode()).verify(OTHER.verify_key)


@pytest.mark.parametrize("field, value", [("sender", "site_a"), ("round", 1), ("task", "t2"), ("kind", "reply"),
                                          ("issued_at", 1700000001.25)])
def test_altered_header_field_is_detected(field, value):
    envelope = sealed()
    forged = canonical_json(dict(envelope.header, **{field: value}))
    opened = open_envelope(encode_parts(forged, envelope.signature, envelope.body_bytes))
    with pytest.raises(SignatureError):
        opened.verify(KEY.verify_key)


def test_header_re_signed_by_another_key_is_detected():
    envelope = sealed()
    forged = canonical_json(dict(envelope.header, round=5))
    opened = open_envelope(encode_parts(forged, OTHER.sign(forged), envelope.body_bytes))
    with pytest.raises(SignatureError):
        opened.verify(KEY.verify_key)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_flipped_header_byte_is_detected(data):
    envelope = sealed()
    position = data.draw(st.integers(0, len(envelope.header_bytes) - 1))
    flip = data.draw(st.integers(1, 255))
    header = bytearray(envelope.header_bytes)
    header[position] ^= flip
    raw = encode_parts(bytes(header), envelope.signature, envelope.body_bytes)
    with pytest.raises((WireError, SignatureError)):
        open_envelope(raw).verify(KEY.verify_key)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_flipped_body_byte_is_detected(data):
    envelope = sealed()
    position = data.draw(st.integers(0, len(envelope.body_bytes) - 1))
    body = bytearray(envelope.body_bytes)
    body[position] ^= data.draw(st.integers(1, 255))
    opened = open_envelope(encode_parts(envelope.header_bytes, envelope.signature, bytes(body)))
    with pytest.raises(SignatureError, match="does not match its signed digest"):
        opened.verify(KEY.verify_key)


def test_swapped_body_from_another_message_is_detected():
    first, second = sealed({"a": np.array([1.0])}), sealed({"a": np.array([2.0])})
    opened = open_envelope(encode_parts(first.header_bytes, first.signature, second.body_bytes))
    with pytest.raises(SignatureError):
        opened.verify(KEY.verify_key)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_flipped_signature_byte_is_detected(data):
    envelope = sealed()
    position = data.draw(st.integers(0, len(envelope.signature) - 1))
    signature = bytearray(envelope.signature)
    signature[position] ^= data.draw(st.integers(1, 255))
    opened = open_envelope(encode_parts(envelope.header_bytes, bytes(signature), envelope.body_bytes))
    with pytest.raises(SignatureError):
        opened.verify(KEY.verify_key)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_of_the_encoded_envelope_is_detected(data):
    raw = bytearray(sealed().encode())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises((WireError, SignatureError)):
        open_envelope(bytes(raw)).verify(KEY.verify_key)


def test_every_truncation_of_an_envelope_gives_wire_error():
    raw = sealed().encode()
    for cut in range(len(raw)):
        with pytest.raises(WireError):
            open_envelope(raw[:cut])


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_garbage_envelope_gives_wire_error(data):
    with pytest.raises(WireError):
        open_envelope(data)


def _signed_header(header: dict) -> tuple[bytes, bytes]:
    header_bytes = json.dumps(header).encode()
    return header_bytes, KEY.sign(header_bytes)


@pytest.mark.parametrize(
    "raw",
    [
        msgpack.packb([b"h", b"s", b"b"]),
        msgpack.packb(7),
        msgpack.packb({"h": b"{}", "s": b""}),
        msgpack.packb({"h": b"not json", "s": b"", "b": b""}),
        msgpack.packb({"h": b"[1]", "s": b"", "b": b""}),
        msgpack.packb({str(i): i for i in range(9)}),
    ],
    ids=["list", "int", "no-body", "header-not-json", "header-not-object", "too-many-keys"],
)
def test_structurally_wrong_envelopes_give_wire_error(raw):
    with pytest.raises(WireError):
        open_envelope(raw)


@pytest.mark.parametrize("field", ["kind", "sender", "nonce", "issued_at", "body_sha256"])
def test_header_missing_a_control_field_is_refused(field):
    body_bytes = pack_body({})
    header = dict(HEADER, v=PROTOCOL_VERSION, body_sha256=hashlib.sha256(body_bytes).hexdigest())
    del header[field]
    header_bytes, signature = _signed_header(header)
    with pytest.raises(WireError, match=field):
        open_envelope(encode_parts(header_bytes, signature, body_bytes))


@pytest.mark.parametrize("version", [0, 2, "1", 1.5, None, "missing"])
def test_wrong_protocol_version_is_refused(version):
    """Even correctly signed by the right key, another protocol version is not parsed."""
    body_bytes = pack_body({})
    header = dict(HEADER, body_sha256=hashlib.sha256(body_bytes).hexdigest())
    if version != "missing":
        header["v"] = version
    header_bytes, signature = _signed_header(header)
    with pytest.raises(WireError, match="protocol version"):
        open_envelope(encode_parts(header_bytes, signature, body_bytes))


@pytest.mark.parametrize(
    "field, value",
    [("h", "text"), ("s", "text"), ("s", 5), ("b", "text"), ("b", None)],
    ids=["header-as-str", "signature-as-str", "signature-as-int", "body-as-str", "body-as-nil"],
)
def test_envelope_fields_of_the_wrong_type_give_wire_error(field, value):
    """A msgpack str/int where bytes belong is malformed input: refused as WireError at parse
    time, not a TypeError escaping later from verify() (which callers only guard for
    SignatureError)."""
    envelope = sealed()
    parts = {"h": envelope.header_bytes, "s": envelope.signature, "b": envelope.body_bytes}
    parts[field] = envelope.header_bytes.decode() if (field == "h" and value == "text") else value
    with pytest.raises(WireError):
        open_envelope(msgpack.packb(parts, use_bin_type=True)).verify(KEY.verify_key)


def test_oversized_envelope_is_refused_before_parsing(no_parsing):
    raw = sealed({"a": np.zeros(1000)}).encode()
    with pytest.raises(WireError, match="exceeds the limit"):
        open_envelope(raw, max_bytes=len(raw) - 1)


def test_envelope_at_the_limit_is_accepted_and_body_limit_applies():
    envelope = sealed({"a": np.zeros(1000)})
    raw = envelope.encode()
    opened = open_envelope(raw, max_bytes=len(raw)).verify(KEY.verify_key)
    with pytest.raises(WireError, match="exceeds the limit"):
        opened.body(max_bytes=len(envelope.body_bytes) - 1)
    assert opened.body(max_bytes=len(envelope.body_bytes))["a"].shape == (1000,)


# --- header types (hostile headers are refused in one place) -------------------------------


def _raw_with_header(fields: dict, remove: tuple[str, ...] = ()) -> bytes:
    """An envelope whose header is `HEADER` changed by `fields`, signed, written with json.dumps
    (which, unlike canonical_json, writes NaN and Infinity as a hostile sender could)."""
    body_bytes = pack_body({})
    header = dict(HEADER, v=PROTOCOL_VERSION, body_sha256=hashlib.sha256(body_bytes).hexdigest())
    header.update(fields)
    for name in remove:
        header.pop(name)
    header_bytes, signature = _signed_header(header)
    return encode_parts(header_bytes, signature, body_bytes)


HOSTILE_FIELDS = [
    ("step", math.nan), ("step", math.inf), ("step", -1), ("step", 2**63), ("step", "3"), ("step", 1.0),
    ("step", True), ("step", [1]), ("round", math.nan), ("round", -math.inf), ("round", 10**7), ("round", "0"),
    ("round", False), ("issued_at", math.nan), ("issued_at", math.inf), ("issued_at", -math.inf),
    ("issued_at", "1700000000"), ("issued_at", True), ("issued_at", 1e300), ("issued_at", -5.0),
    ("issued_at", [1.0]), ("sender", ["researcher"]), ("sender", {"a": 1}), ("sender", 7), ("sender", ""),
    ("sender", "x" * 129), ("sender", "../etc"), ("sender", "a b"), ("sender", "a\nb"), ("study", ["s1"]),
    ("task", 5), ("task", "t\u00e9"), ("nonce", None), ("nonce", 1.5), ("kind", ["task"]), ("dataset", {}),
    ("analysis", ["glm"]), ("phase", 0), ("status", ["ok"]), ("recipients", "site_a"),
    ("recipients", ["site_a", 5]), ("recipients", [["site_a"]]), ("recipients", ["s"] * 1025),
    ("recipients", {"site_a": 1}), ("audit_ids", "a:1"), ("audit_ids", [1]), ("body_sha256", "0" * 63),
    ("body_sha256", "G" * 64), ("body_sha256", 5), ("v", True), ("v", 1.0),
]


@pytest.mark.parametrize("field, value", HOSTILE_FIELDS, ids=[f"{f}={str(v)[:12]}" for f, v in HOSTILE_FIELDS])
def test_hostile_header_field_is_refused_as_wire_error(field, value):
    with pytest.raises(WireError):
        open_envelope(_raw_with_header({field: value}))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal_anywhere_in_the_header_is_refused(literal):
    body_bytes = pack_body({})
    header = dict(HEADER, v=PROTOCOL_VERSION, body_sha256=hashlib.sha256(body_bytes).hexdigest())
    header_bytes = json.dumps(header).replace('"t1"', '"t1", "extra": ' + literal).encode()
    with pytest.raises(WireError, match="not a number"):
        open_envelope(encode_parts(header_bytes, KEY.sign(header_bytes), body_bytes))


def test_oversized_header_is_refused():
    with pytest.raises(WireError, match="header exceeds"):
        open_envelope(_raw_with_header({"padding": "x" * wire.MAX_HEADER_BYTES}))


def test_absent_or_null_optional_fields_are_accepted():
    opened = open_envelope(_raw_with_header({"step": None, "recipients": None}, remove=("round", "study")))
    assert opened.header["step"] is None and "round" not in opened.header


@pytest.mark.parametrize("field, value", [("step", 0), ("step", wire.MAX_STEP), ("round", 3),
                                          ("issued_at", 1700000000), ("recipients", []),
                                          ("recipients", ["site_a", "hospital-b.2"]), ("audit_ids", ["site_a:12"]),
                                          ("task", "0f" * 16), ("extra", {"nested": [1, "x"]})])
def test_well_typed_header_fields_are_accepted(field, value):
    assert open_envelope(_raw_with_header({field: value})).header[field] == value
