"""Ed25519 identities: signatures verify only for the signed message under the signer's key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from medveil.crypto.signing import (
    SignatureError,
    SigningKey,
    VerifyKey,
    b64decode,
    b64encode,
)

KEY = SigningKey.generate()
OTHER = SigningKey.generate()


@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=2048))
def test_sign_verify_roundtrip(message):
    KEY.verify_key.verify(KEY.sign(message), message)


@settings(max_examples=50, deadline=None)
@given(message=st.binary(min_size=1, max_size=512), data=st.data())
def test_tampered_message_is_refused(message, data):
    signature = KEY.sign(message)
    position = data.draw(st.integers(0, len(message) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(message)
    tampered[position] ^= flip
    with pytest.raises(SignatureError):
        KEY.verify_key.verify(signature, bytes(tampered))


@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=512), data=st.data())
def test_tampered_signature_is_refused(message, data):
    signature = bytearray(KEY.sign(message))
    position = data.draw(st.integers(0, len(signature) - 1))
    signature[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SignatureError):
        KEY.verify_key.verify(bytes(signature), message)


@pytest.mark.parametrize("length", [0, 63, 65])
def test_signature_of_wrong_length_is_refused(length):
    with pytest.raises(SignatureError):
        KEY.verify_key.verify(b"\x01" * length, b"message")


def test_wrong_key_is_refused():
    message = b"release of site_a"
    with pytest.raises(SignatureError):
        OTHER.verify_key.verify(KEY.sign(message), message)


def test_generated_keys_differ():
    assert KEY.verify_key != OTHER.verify_key
    assert KEY.to_pem() != OTHER.to_pem()


def test_pem_roundtrip_keeps_the_identity():
    pem = KEY.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    restored = SigningKey.from_pem(pem)
    assert restored.verify_key == KEY.verify_key
    message = b"signed by the restored key"
    KEY.verify_key.verify(restored.sign(message), message)
    assert restored.to_pem() == pem


def test_from_pem_refuses_a_non_ed25519_key():
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="not an Ed25519"):
        SigningKey.from_pem(pem)


def test_verify_key_text_roundtrip():
    text = KEY.verify_key.to_text()
    assert isinstance(text, str)
    assert len(b64decode(text)) == 32
    restored = VerifyKey.from_text(text)
    assert restored == KEY.verify_key
    restored.verify(KEY.sign(b"m"), b"m")


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_verify_key_text_of_wrong_length_is_refused(length):
    with pytest.raises(ValueError, match="32 bytes"):
        VerifyKey.from_text(b64encode(b"\x07" * length))


@given(data=st.binary(max_size=256))
def test_b64_roundtrip_is_url_safe(data):
    text = b64encode(data)
    assert not set(text) & set("+/")
    assert b64decode(text) == data


def test_fingerprint_is_sha256_of_the_raw_key_in_groups():
    import hashlib

    fingerprint = KEY.verify_key.fingerprint()
    groups = fingerprint.split(":")
    assert len(groups) == 16 and all(len(group) == 4 for group in groups)
    assert "".join(groups) == hashlib.sha256(KEY.verify_key.raw).hexdigest()
    assert OTHER.verify_key.fingerprint() != fingerprint


@pytest.mark.parametrize("spelling", [str.upper, lambda f: f.replace(":", ""), lambda f: f.replace(":", " "),
                                      lambda f: f.replace(":", "-")])
def test_a_fingerprint_is_recognised_in_any_grouping(spelling):
    from medveil.crypto.signing import normalise_fingerprint

    fingerprint = KEY.verify_key.fingerprint()
    assert normalise_fingerprint(spelling(fingerprint)) == fingerprint.replace(":", "")


@pytest.mark.parametrize("text", [KEY.verify_key.to_text(), "ab12", "zz" * 32, ""])
def test_a_key_or_junk_is_not_taken_for_a_fingerprint(text):
    from medveil.crypto.signing import normalise_fingerprint

    assert normalise_fingerprint(text) is None


def test_encrypted_pem_needs_its_passphrase():
    from medveil.crypto.signing import KeyLocked, is_encrypted_pem

    pem = KEY.to_pem(b"correct horse")
    assert is_encrypted_pem(pem) and pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert b"correct horse" not in pem
    assert SigningKey.from_pem(pem, b"correct horse").verify_key == KEY.verify_key
    with pytest.raises(KeyLocked, match="passphrase is needed"):
        SigningKey.from_pem(pem)
    with pytest.raises(KeyLocked, match="does not unlock"):
        SigningKey.from_pem(pem, b"wrong")


def test_unencrypted_pem_loads_with_or_without_a_passphrase():
    from medveil.crypto.signing import is_encrypted_pem

    pem = KEY.to_pem()
    assert not is_encrypted_pem(pem)
    assert SigningKey.from_pem(pem, b"ignored").verify_key == KEY.verify_key
