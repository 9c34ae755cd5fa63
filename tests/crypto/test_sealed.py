"""Sealed per-recipient payloads: only the pinned sender can make one, only its recipient can
read it, and any change to what was sealed is refused with its rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medveil.crypto.sealed import (
    SealedPayloadError,
    encryption_public_key,
    generate_encryption_key,
    open_payload,
    parse_encryption_key,
    seal_payload,
)
from medveil.crypto.signing import SigningKey, b64encode

ALICE = SigningKey.generate()
BOB_PRIVATE, BOB_PUBLIC = generate_encryption_key()
CAROL_PRIVATE, CAROL_PUBLIC = generate_encryption_key()
KEYS = {"alice": ALICE.verify_key, "carol": SigningKey.generate().verify_key}
CONTEXT = {"study": "s1", "task": "t1", "step": 3, "round": 1}

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
payloads = st.dictionaries(st.text(max_size=12), values, max_size=6)


def _seal(payload: dict, **changes) -> dict:
    arguments = {"sender": "alice", "recipient": "bob", "context": CONTEXT, "recipient_key": BOB_PUBLIC,
                 "signer": ALICE, **changes}
    return seal_payload(payload, **arguments)


def _open(sealed, **changes):
    arguments = {"recipient": "bob", "private_key": BOB_PRIVATE, "sender_keys": KEYS, "study": "s1", "task": "t1",
                 **changes}
    return open_payload(sealed, **arguments)


def _rule(sealed, **changes) -> str:
    with pytest.raises(SealedPayloadError) as caught:
        _open(sealed, **changes)
    return caught.value.rule


@settings(max_examples=60, deadline=None)
@given(payload=payloads)
def test_round_trip_for_any_payload(payload):
    sender, context, opened = _open(_seal(payload))
    assert (sender, context, opened) == ("alice", CONTEXT, payload)


def test_arrays_keep_their_dtype_and_shape():
    payload = {"ids": np.arange(12, dtype=np.uint64).reshape(3, 4), "flags": np.array([True, False]),
               "x": np.linspace(0, 1, 5)}
    _, _, opened = _open(_seal(payload))
    for name, array in payload.items():
        assert opened[name].dtype == array.dtype and opened[name].shape == array.shape
        np.testing.assert_array_equal(opened[name], array)


def test_ciphertext_does_not_hold_the_plaintext():
    secret = b"patient-identifier-0042" * 4
    sealed = _seal({"secret": secret})
    assert secret not in sealed["ct"] and secret[:16] not in sealed["ct"]
    assert _seal({"secret": secret})["ct"] != sealed["ct"]  # a fresh ephemeral key each time


@settings(max_examples=60, deadline=None)
@given(payload=payloads, field=st.sampled_from(["ct", "sig"]), data=st.data())
def test_any_flipped_bit_of_ct_or_sig_is_forged(payload, field, data):
    sealed = _seal(payload)
    position = data.draw(st.integers(0, len(sealed[field]) * 8 - 1))
    tampered = bytearray(sealed[field])
    tampered[position // 8] ^= 1 << (position % 8)
    assert _rule({**sealed, field: bytes(tampered)}) == "payload_forged"


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["study", "task", "sender"]), data=st.data())
def test_any_flipped_bit_of_a_name_is_refused(field, data):
    sealed = _seal({"v": 1})
    original = sealed["sender"] if field == "sender" else sealed["context"][field]
    raw = bytearray(original.encode())
    position = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[position // 8] ^= 1 << (position % 8)
    changed = raw.decode("latin-1")
    tampered = {**sealed, "sender": changed} if field == "sender" else {
        **sealed, "context": {**sealed["context"], field: changed}}
    # a changed study or task no longer matches the signature; a changed sender has no pinned key or another one
    assert _rule(tampered) == "payload_forged"


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(["step", "round"]), value=st.integers(0, 1_000_000))
def test_a_changed_step_or_round_is_forged(field, value):
    sealed = _seal({"v": 1})
    if value == CONTEXT[field]:
        value += 1
    assert _rule({**sealed, "context": {**sealed["context"], field: value}}) == "payload_forged"


def test_a_payload_signed_by_another_pinned_site_is_forged():
    sealed = _seal({"v": 1}, signer=SigningKey.generate())
    assert _rule(sealed) == "payload_forged"
    # re-labelled as coming from carol, whose key is pinned but did not sign it
    assert _rule({**_seal({"v": 1}), "sender": "carol"}) == "payload_forged"


def test_an_unpinned_sender_is_forged():
    mallory = SigningKey.generate()
    assert _rule(_seal({"v": 1}, sender="mallory", signer=mallory)) == "payload_forged"


def test_wrong_recipient_key_fails():
    sealed = _seal({"v": 1}, recipient_key=CAROL_PUBLIC)  # addressed to bob, encrypted to carol's key
    assert _rule(sealed) == "payload_forged"
    other_private, _ = generate_encryption_key()
    assert _rule(_seal({"v": 1}), private_key=other_private) == "payload_forged"


def test_a_payload_for_another_site_is_misaddressed():
    sealed = _seal({"v": 1}, recipient="carol", recipient_key=CAROL_PUBLIC)
    assert _rule(sealed) == "payload_misaddressed"
    assert _rule({**_seal({"v": 1}), "recipient": "carol"}) == "payload_misaddressed"


def test_a_payload_of_another_study_or_task_is_misaddressed():
    sealed = _seal({"v": 1})
    assert _rule(sealed, study="s2") == "payload_misaddressed"
    assert _rule(sealed, task="t2") == "payload_misaddressed"


@pytest.mark.parametrize("sealed", [
    None, [], "x", b"x", {},
    {"sender": "alice", "recipient": "bob", "context": CONTEXT, "ct": b"x" * 64},
    {"sender": "alice", "recipient": "bob", "context": CONTEXT, "ct": b"x" * 64, "sig": b"s" * 64, "extra": 1},
    {"sender": 7, "recipient": "bob", "context": CONTEXT, "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "a" * 129, "recipient": "bob", "context": CONTEXT, "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "alice", "recipient": ["bob"], "context": CONTEXT, "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": [], "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": {**CONTEXT, "step": True}, "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": {**CONTEXT, "round": 1.0}, "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": {**CONTEXT, "step": -1}, "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": {**CONTEXT, "extra": 1}, "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": {**CONTEXT, "task": None}, "ct": b"x" * 64, "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": CONTEXT, "ct": "text", "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": CONTEXT, "ct": b"short", "sig": b"s" * 64},
    {"sender": "alice", "recipient": "bob", "context": CONTEXT, "ct": b"x" * 64, "sig": b"s" * 63},
])
def test_malformed_payloads_are_refused_by_structure(sealed):
    assert _rule(sealed) == "payload_malformed"


def test_an_oversized_ciphertext_is_malformed_before_any_work():
    sealed = _seal({"blob": b"x" * 4096})
    assert _rule(sealed, max_bytes=1024) == "payload_malformed"


def test_sealing_refuses_bad_arguments():
    with pytest.raises(TypeError):
        _seal(["not", "a", "map"])
    with pytest.raises(ValueError, match="context"):
        _seal({}, context={"study": "s1"})
    with pytest.raises(ValueError, match="encoded"):
        _seal({"frame": object()})
    with pytest.raises(ValueError, match="X25519"):
        _seal({}, recipient_key="not-a-key")


def test_encryption_keys_parse_and_refuse():
    private, public = generate_encryption_key()
    assert len(private) == 32 and encryption_public_key(private) == public
    parse_encryption_key(public)
    for bad in ["", "abc", b64encode(b"\x01" * 31), b64encode(bytes(32)), "%%%%"]:
        with pytest.raises(ValueError):
            parse_encryption_key(bad)
