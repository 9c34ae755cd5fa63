"""Signed request tokens for reads, and the operator's invitations that enrol parties at the hub.

A read token is base64(canonical JSON {who, ts, nonce, method, path}) "." base64(Ed25519
signature), so only known parties read the hub. Writes need no token: their body is a signed
envelope. An invitation is base64(canonical JSON {party, role, expires_at[, public_key]}) "."
base64(the hub operator's signature): a party registers only with one naming it, so nobody can
take a site's name by registering it first (a squatter is refused as `not_enrolled`).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from typing import Any

from medveil.crypto.signing import SigningKey, VerifyKey, b64decode, b64encode
from medveil.runtime.wire import canonical_json

HEADER = "X-Medveil-Auth"
MAX_CLOCK_SKEW_S = 300.0


class AuthError(PermissionError):
    pass


def _signed_claims(text: str, key: VerifyKey) -> dict[str, Any]:
    """The claims of a `claims.signature` token, once the signature verifies under `key`."""
    try:
        claims_text, signature = text.split(".", 1)
        claims_bytes = b64decode(claims_text)
        key.verify(b64decode(signature), claims_bytes)
        claims = json.loads(claims_bytes, parse_constant=_refuse_constant)
    except Exception as exc:
        raise AuthError("token does not verify") from exc
    if not isinstance(claims, dict):
        raise AuthError("token claims must be a map")
    return claims


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def make_token(party: str, key: SigningKey, method: str, path: str) -> str:
    claims = canonical_json(
        {"who": party, "ts": time.time(), "nonce": secrets.token_hex(8), "method": method, "path": path}
    )
    return f"{b64encode(claims)}.{b64encode(key.sign(claims))}"


def token_party(token: str) -> str:
    try:
        claims = json.loads(b64decode(token.split(".", 1)[0]), parse_constant=_refuse_constant)
        who = claims["who"]
    except Exception as exc:
        raise AuthError("malformed auth token") from exc
    if not isinstance(who, str) or not who or len(who) > 128:
        raise AuthError("malformed auth token")
    return who


def check_token(token: str, key: VerifyKey, method: str, path: str, now: float) -> None:
    try:
        claims = _signed_claims(token, key)
    except AuthError as exc:
        raise AuthError("auth token does not verify") from exc
    if claims.get("method") != method or claims.get("path") != path:
        raise AuthError("auth token was made for another request")
    issued = claims.get("ts")
    if not _finite_number(issued) or abs(now - issued) > MAX_CLOCK_SKEW_S:
        raise AuthError("auth token expired")


def make_invitation(operator: SigningKey, party: str, role: str, expires_at: float,
                    public_key: str | None = None) -> str:
    """The operator's signed permission for `party` to register as `role` until `expires_at`,
    optionally only with the identity key `public_key` (VerifyKey.to_text())."""
    claims: dict[str, Any] = {"party": party, "role": role, "expires_at": float(expires_at)}
    if public_key is not None:
        claims["public_key"] = public_key
    text = canonical_json(claims)
    return f"{b64encode(text)}.{b64encode(operator.sign(text))}"


def check_invitation(invitation: Any, operator: VerifyKey, party: str, role: str, public_key: str,
                     now: float) -> None:
    """Raise AuthError unless `invitation` is the operator's, unexpired, for this party, role and key."""
    if not isinstance(invitation, str) or len(invitation) > 4096:
        raise AuthError("registration needs an invitation from the hub's operator")
    try:
        claims = _signed_claims(invitation, operator)
    except AuthError as exc:
        raise AuthError("the invitation is not signed by this hub's operator") from exc
    if claims.get("party") != party or claims.get("role") != role:
        raise AuthError(f"the invitation does not name {party!r} as a {role}")
    expires_at = claims.get("expires_at")
    if not _finite_number(expires_at) or now > expires_at:
        raise AuthError("the invitation has expired")
    if "public_key" in claims and claims["public_key"] != public_key:
        raise AuthError("the invitation is bound to another identity key")
