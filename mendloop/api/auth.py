"""The one place where the API reads credentials: bearer tokens and webhook signatures.

Everything that checks a caller goes through `bearer_token` and `token_accepted` (the API-wide middleware, the
intake endpoints), so every door parses `Authorization` the same way and compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

__all__ = ["SIGNATURE_PREFIX", "bearer_token", "signature_accepted", "token_accepted"]

SIGNATURE_PREFIX = "sha256="


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value; None when there is none.

    The scheme is case-insensitive (RFC 7235) and may be followed by more than one space; another scheme
    (`Basic ...`), or a bare `Bearer`, carries no token."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    token = rest.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def token_accepted(authorization: str | None, accepted: Iterable[str]) -> bool:
    """Whether the header carries one of the `accepted` tokens; each comparison takes constant time."""
    token = bearer_token(authorization)
    if token is None:
        return False
    given = token.encode()
    return any(hmac.compare_digest(given, t.encode()) for t in accepted if t)


def signature_accepted(signature: str | None, secret: str | None, body: bytes) -> bool:
    """Whether `X-Mendloop-Signature: sha256=<hex>` is the HMAC-SHA256 of `body` under `secret`."""
    if not secret or not signature or not signature.startswith(SIGNATURE_PREFIX):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature[len(SIGNATURE_PREFIX) :].encode(), expected.encode())
