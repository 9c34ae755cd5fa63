"""Ed25519 identities and signatures.

Threat model: every message between researcher, hub and nodes is signed by its author, so a
hub (or anyone on the path) can relay but cannot forge or alter a task or a release. Keys are
raw 32-byte Ed25519 keys from `cryptography`; public keys travel as URL-safe base64 and are
compared by people as fingerprints (SHA-256 of the raw key in hex groups), which a site's
steward reads out to researchers so that nobody takes a site's key from the hub on trust.
Private keys are PKCS#8 PEM, encrypted with a passphrase when one is given.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)


class SignatureError(ValueError):
    """A signature did not verify against the expected public key."""


class KeyLocked(ValueError):
    """A private key is encrypted and no (or a wrong) passphrase was given."""


ENCRYPTED_PEM_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_NOT_HEX = re.compile(r"[^0-9a-f]")


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii"))


@dataclass(frozen=True)
class VerifyKey:
    """A public Ed25519 key: checks signatures of one party."""

    raw: bytes

    @classmethod
    def from_text(cls, text: str) -> "VerifyKey":
        raw = b64decode(text)
        if len(raw) != 32:
            raise ValueError("an Ed25519 public key has 32 bytes")
        return cls(raw)

    def to_text(self) -> str:
        return b64encode(self.raw)

    def fingerprint(self) -> str:
        """SHA-256 of the raw key as 16 colon-separated groups of 4 hex digits, to read out."""
        digest = hashlib.sha256(self.raw).hexdigest()
        return ":".join(digest[i:i + 4] for i in range(0, len(digest), 4))

    def verify(self, signature: bytes, message: bytes) -> None:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature as exc:
            raise SignatureError("signature does not verify") from exc


class SigningKey:
    """A private Ed25519 key: signs as one party (a site, its steward or a researcher)."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.verify_key = VerifyKey(raw)

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, passphrase: bytes | None = None) -> "SigningKey":
        """Load a PKCS#8 PEM key; an encrypted one needs its passphrase (KeyLocked otherwise)."""
        encrypted = is_encrypted_pem(pem)
        if encrypted and not passphrase:
            raise KeyLocked("the private key is encrypted: a passphrase is needed")
        try:
            key = serialization.load_pem_private_key(pem, password=passphrase if encrypted else None)
        except ValueError as exc:
            if encrypted:
                raise KeyLocked("the passphrase does not unlock the private key") from exc
            raise
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 private key")
        return cls(key)

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        """PKCS#8 PEM, encrypted with the best scheme `cryptography` offers when a passphrase is given."""
        encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                      else serialization.NoEncryption())
        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


def is_encrypted_pem(pem: bytes) -> bool:
    """Whether a PEM private key is passphrase-encrypted (PKCS#8 EncryptedPrivateKeyInfo)."""
    return pem.lstrip().startswith(ENCRYPTED_PEM_HEADER)


def normalise_fingerprint(text: str) -> str | None:
    """The 64 hex digits of a fingerprint written in any grouping or case; None if it is not one."""
    digits = _NOT_HEX.sub("", text.lower())
    looks_like_one = re.fullmatch(r"[0-9a-fA-F:\s-]+", text.strip()) is not None
    return digits if looks_like_one and len(digits) == 64 else None
