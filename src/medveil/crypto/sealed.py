"""Per-recipient payloads, encrypted end to end from one site to another and signed by the sender.

A two-party step (private set intersection, vertical regression) sends a map from one site to
one other site through the researcher and the hub. The sender seals it: the map is encoded
(crypto.encoding, numpy arrays as they are), encrypted with HPKE (RFC 9180, base mode: KEM
X25519, KDF HKDF-SHA256, AEAD ChaCha20-Poly1305, from `cryptography`) to the recipient's
X25519 key pinned in the approved study, with HPKE's `info` binding the sender, the recipient
and the context (study, task, step, round) as canonical JSON; then the sender's Ed25519
identity key signs the canonical encoding of sender, recipient, context and the ciphertext's
SHA-256. The recipient checks, in order: the structure and types (rule `payload_malformed`),
that it is the recipient (`payload_misaddressed`), the signature against the sender's key
pinned in the study (`payload_forged`), that study and task are the current ones
(`payload_misaddressed`), and the decryption (`payload_forged`). Step and round are returned
for the caller to judge (a payload is typically released in one step and forwarded in the next).

What each party learns: the hub and the researcher, who relay a sealed payload, learn its
sender, recipient, context, size and timing, never its plaintext; they cannot alter it,
re-address it, move it to another study or task, or forge one (HPKE alone lets anyone encrypt
to a public key; the signature is what authenticates the sender). The recipient learns the
plaintext and that the pinned sender made it for this study, task, step and round. A sealed
payload is not bound to one delivery: the caller refuses one it has already consumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from medveil.crypto.encoding import EncodingError, canonical_json, pack_map, unpack_map
from medveil.crypto.signing import (
    SignatureError,
    SigningKey,
    VerifyKey,
    b64decode,
    b64encode,
)

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
INFO_LABEL = "medveil/sealed-payload/v1/info"
SIGNATURE_LABEL = "medveil/sealed-payload/v1/signature"
FIELDS = frozenset({"sender", "recipient", "context", "ct", "sig"})
CONTEXT_FIELDS = {"study": str, "task": str, "step": int, "round": int}
MAX_NAME_LENGTH = 128
MAX_COUNTER = 1_000_000
ENCAPSULATED_KEY_BYTES = 32  # X25519 KEM output, prefixed to the AEAD ciphertext
TAG_BYTES = 16
SIGNATURE_BYTES = 64
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024


class SealedPayloadError(ValueError):
    """A sealed payload refused by its recipient; `rule` is payload_malformed, payload_forged or
    payload_misaddressed."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


def generate_encryption_key() -> tuple[bytes, str]:
    """A fresh X25519 key pair: (raw 32-byte private key, public key as URL-safe base64 text)."""
    private = X25519PrivateKey.generate()
    return private.private_bytes_raw(), b64encode(private.public_key().public_bytes_raw())


def encryption_public_key(private_key: bytes) -> str:
    """The public key text of a raw X25519 private key (what the study pins for the site)."""
    return b64encode(_private_key(private_key).public_key().public_bytes_raw())


def parse_encryption_key(text: str) -> X25519PublicKey:
    """An X25519 public key from its text (32 bytes, URL-safe base64); ValueError otherwise, also
    for a low-order point (every key agreement with it gives zero, so nothing could be sealed)."""
    try:
        raw = b64decode(text)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError("an X25519 public key is 32 bytes in URL-safe base64") from exc
    if len(raw) != 32:
        raise ValueError("an X25519 public key is 32 bytes in URL-safe base64")
    key = X25519PublicKey.from_public_bytes(raw)
    try:
        X25519PrivateKey.generate().exchange(key)
    except ValueError as exc:
        raise ValueError("not a usable X25519 public key (a low-order point)") from exc
    return key


def _private_key(raw: bytes) -> X25519PrivateKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValueError("an X25519 private key is 32 raw bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def _context_problem(context: Any) -> str | None:
    """Why `context` is not {study: name, task: name, step: counter, round: counter}; None if it is."""
    if not isinstance(context, dict) or set(context) != set(CONTEXT_FIELDS):
        return f"a payload context has exactly the fields {sorted(CONTEXT_FIELDS)}"
    for name, kind in CONTEXT_FIELDS.items():
        value = context[name]
        if kind is str and not _is_name(value):
            return f"context field {name!r} must be a name of at most {MAX_NAME_LENGTH} characters"
        if kind is int and not (type(value) is int and 0 <= value <= MAX_COUNTER):
            return f"context field {name!r} must be an integer in 0..{MAX_COUNTER}"
    return None


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_LENGTH


def _info(sender: str, recipient: str, context: dict[str, Any]) -> bytes:
    return canonical_json({"label": INFO_LABEL, "sender": sender, "recipient": recipient, "context": context})


def _signed_bytes(sender: str, recipient: str, context: dict[str, Any], ct: bytes) -> bytes:
    return canonical_json({"label": SIGNATURE_LABEL, "sender": sender, "recipient": recipient, "context": context,
                           "ct_sha256": hashlib.sha256(ct).hexdigest()})


def seal_payload(payload: dict[str, Any], *, sender: str, recipient: str, context: dict[str, Any],
                 recipient_key: str, signer: SigningKey) -> dict[str, Any]:
    """Encrypt `payload` to `recipient_key` and sign it as `sender`; the result is wire-encodable:
    {"sender", "recipient", "context", "ct": bytes, "sig": bytes}. TypeError or ValueError for bad arguments."""
    if not isinstance(payload, dict):
        raise TypeError("a payload is a map")
    if not (_is_name(sender) and _is_name(recipient)):
        raise ValueError(f"sender and recipient are names of at most {MAX_NAME_LENGTH} characters")
    problem = _context_problem(context)
    if problem is not None:
        raise ValueError(problem)
    context = dict(context)
    try:
        plaintext = pack_map(payload)
    except EncodingError as exc:
        raise ValueError(f"payload cannot be encoded: {exc}") from exc
    ct = SUITE.encrypt(plaintext, parse_encryption_key(recipient_key), info=_info(sender, recipient, context))
    sig = signer.sign(_signed_bytes(sender, recipient, context, ct))
    return {"sender": sender, "recipient": recipient, "context": context, "ct": ct, "sig": sig}


def open_payload(sealed: Any, *, recipient: str, private_key: bytes, sender_keys: Mapping[str, VerifyKey],
                 study: str, task: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> tuple[str, dict[str, Any],
                                                                                            dict[str, Any]]:
    """Check and decrypt a sealed payload addressed to `recipient` in `study`/`task`, from a sender
    whose identity key is in `sender_keys` (the study's pinned site keys); return (sender,
    context, payload) or raise SealedPayloadError naming the rule."""
    if not isinstance(sealed, dict) or set(sealed) != FIELDS:
        raise SealedPayloadError("payload_malformed", f"a sealed payload is a map of exactly {sorted(FIELDS)}")
    sender, addressee, context, ct, sig = (sealed[k] for k in ("sender", "recipient", "context", "ct", "sig"))
    if not (_is_name(sender) and _is_name(addressee)):
        raise SealedPayloadError("payload_malformed", "a sealed payload's sender and recipient are names")
    problem = _context_problem(context)
    if problem is not None:
        raise SealedPayloadError("payload_malformed", problem)
    if not isinstance(ct, bytes) or not ENCAPSULATED_KEY_BYTES + TAG_BYTES <= len(ct) <= max_bytes:
        raise SealedPayloadError("payload_malformed", f"a sealed payload's ct is bytes, at most {max_bytes}")
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
        raise SealedPayloadError("payload_malformed", "a sealed payload's sig is a 64-byte Ed25519 signature")
    if addressee != recipient:
        raise SealedPayloadError("payload_misaddressed", f"a payload for {addressee[:MAX_NAME_LENGTH]!r} reached "
                                                         f"{recipient!r}")
    key = sender_keys.get(sender)
    if key is None:
        raise SealedPayloadError("payload_forged", f"sender {sender!r} has no identity key pinned in the study")
    try:
        key.verify(sig, _signed_bytes(sender, addressee, context, ct))
    except SignatureError as exc:
        raise SealedPayloadError("payload_forged", f"payload claiming to be from {sender!r} is not signed by "
                                                   "its pinned key") from exc
    if context["study"] != study or context["task"] != task:
        raise SealedPayloadError("payload_misaddressed", f"payload from {sender!r} belongs to study "
                                                         f"{context['study']!r} task {context['task']!r}")
    try:
        plaintext = SUITE.decrypt(ct, _private_key(private_key), info=_info(sender, addressee, context))
    except InvalidTag as exc:
        raise SealedPayloadError("payload_forged", f"payload from {sender!r} does not decrypt with "
                                                   f"{recipient!r}'s key") from exc
    try:
        payload = unpack_map(plaintext, max_bytes)
    except EncodingError as exc:
        raise SealedPayloadError("payload_malformed", f"payload from {sender!r} does not decode: {exc}") from exc
    return sender, dict(context), payload
