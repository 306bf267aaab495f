"""The one place where the API reads credentials: bearer tokens and webhook signatures.

Everything that checks a caller goes through `bearer_token` and `token_accepted` (the API-wide middleware, the
intake endpoints), so every door parses `Authorization` the same way and compares in constant time.

A signed webhook carries `X-Mendloop-Signature: t=<unix seconds>,v1=<hex>` (Stripe's scheme): `v1` is the
HMAC-SHA256, under the shared secret, of the timestamp, a dot and the raw body (`f"{t}." + body`). The timestamp
is signed with the body, so an old request cannot be replayed with a new timestamp; `verify_signature` refuses a
timestamp outside the tolerance (either way). Several `v1=` entries may be given (a sender rotating its secret);
one matching is enough. The unsigned-timestamp form `sha256=<hex of the body>` is no longer accepted: it could be
replayed forever.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from mendloop.errors import AuthError

__all__ = [
    "SIGNATURE_HEADER",
    "SIGNATURE_VERSION",
    "Signature",
    "bearer_token",
    "fingerprint_trusted",
    "sign",
    "token_accepted",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Mendloop-Signature"
SIGNATURE_VERSION = "v1"
_LEGACY_PREFIX = "sha256="
_MAX_HEADER = 2048


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


def fingerprint_trusted(authorization: str | None, forwarder_tokens: Iterable[str], *, trust_everyone: bool) -> bool:
    """Whether a caller's own `fingerprint` may decide its incident. A fingerprint picks the incident an event
    counts on, and so whether it starts a run: a caller choosing it could hide errors in one old incident or
    defeat the per-fingerprint throttle with a fresh one per event. Only forwarders (`mendloop watch`, which
    computes it from the parsed traceback the server never sees) are trusted with it, unless the operator says
    every caller is (`trust_caller_fingerprint`)."""
    return trust_everyone or token_accepted(authorization, forwarder_tokens)


@dataclass(frozen=True, slots=True)
class Signature:
    """A verified signature: its timestamp and the (lower-case hex) HMAC that matched, the key for replays."""

    timestamp: int
    digest: str


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-Mendloop-Signature` value a sender puts on `body` sent at `timestamp` (Unix seconds)."""
    return f"t={timestamp},{SIGNATURE_VERSION}={_digest(secret, timestamp, body)}"


def _refuse(message: str, part: str | None = None) -> AuthError:
    return AuthError(message, field=f"{SIGNATURE_HEADER}.{part}" if part else SIGNATURE_HEADER)


def verify_signature(header: str | None, secret: str | None, body: bytes, *, now: float, tolerance: float) -> Signature:
    """The verified signature of `body`, or AuthError naming what is wrong (`field`: the header, or its `t` or
    `v1` part). The HMAC is checked first (in constant time), then the signed timestamp against `now`."""
    if not secret:
        raise _refuse("signed webhooks are not enabled on this server (webhook_hmac_secret)")
    if not header or not header.strip():
        raise _refuse(f"{SIGNATURE_HEADER} is required: t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.' + body>")
    if len(header) > _MAX_HEADER:
        raise _refuse(f"{SIGNATURE_HEADER} is longer than {_MAX_HEADER} characters")
    if header.strip().startswith(_LEGACY_PREFIX):
        raise _refuse(
            f"{SIGNATURE_HEADER}: the sha256=<hex> form (no timestamp) is no longer accepted; "
            "send t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.' + body>"
        )
    stamps: list[str] = []
    given: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            stamps.append(value.strip())
        elif name == SIGNATURE_VERSION:
            given.append(value.strip())
    if len(stamps) != 1:
        raise _refuse(f"{SIGNATURE_HEADER}: exactly one t=<unix seconds> is required", "t")
    stamp = stamps[0]
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        raise _refuse(f"{SIGNATURE_HEADER}: t must be whole Unix seconds", "t")
    timestamp = int(stamp)
    if not given:
        raise _refuse(f"{SIGNATURE_HEADER}: a {SIGNATURE_VERSION}=<hex> signature is required", SIGNATURE_VERSION)
    expected = _digest(secret, timestamp, body)
    matched = False
    for candidate in given:
        # Constant time for every candidate (no early exit); a non-ASCII value compares (and fails).
        matched |= hmac.compare_digest(candidate.encode("utf-8", "replace"), expected.encode())
    if not matched:
        raise _refuse(
            f"{SIGNATURE_HEADER}: {SIGNATURE_VERSION} is not the HMAC-SHA256 of this timestamp and body",
            SIGNATURE_VERSION,
        )
    age = now - timestamp
    if age > tolerance:
        raise _refuse(f"{SIGNATURE_HEADER}: t is {age:.0f} s old; at most {tolerance:.0f} s is accepted", "t")
    if -age > tolerance:
        raise _refuse(
            f"{SIGNATURE_HEADER}: t is {-age:.0f} s in the future; at most {tolerance:.0f} s of clock skew is accepted",
            "t",
        )
    return Signature(timestamp=timestamp, digest=expected)
