"""Signed request tokens for reads (long-polls, downloads), so only known parties read the hub.

A token is base64(canonical JSON {who, ts, nonce, method, path}) "." base64(Ed25519 signature).
Writes need no token: their body is a signed envelope.
"""

from __future__ import annotations

import json
import secrets
import time

from medveil.crypto.signing import SigningKey, VerifyKey, b64decode, b64encode
from medveil.runtime.wire import canonical_json

HEADER = "X-Medveil-Auth"
MAX_CLOCK_SKEW_S = 300.0


class AuthError(PermissionError):
    pass


def make_token(party: str, key: SigningKey, method: str, path: str) -> str:
    claims = canonical_json(
        {"who": party, "ts": time.time(), "nonce": secrets.token_hex(8), "method": method, "path": path}
    )
    return f"{b64encode(claims)}.{b64encode(key.sign(claims))}"


def token_party(token: str) -> str:
    try:
        claims = json.loads(b64decode(token.split(".", 1)[0]))
        return str(claims["who"])
    except Exception as exc:
        raise AuthError("malformed auth token") from exc


def check_token(token: str, key: VerifyKey, method: str, path: str, now: float) -> None:
    try:
        claims_text, signature = token.split(".", 1)
        claims_bytes = b64decode(claims_text)
        key.verify(b64decode(signature), claims_bytes)
        claims = json.loads(claims_bytes)
    except Exception as exc:
        raise AuthError("auth token does not verify") from exc
    if claims.get("method") != method or claims.get("path") != path:
        raise AuthError("auth token was made for another request")
    if abs(now - float(claims.get("ts", 0))) > MAX_CLOCK_SKEW_S:
        raise AuthError("auth token expired")
