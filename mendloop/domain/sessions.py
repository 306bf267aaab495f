"""Dashboard sessions, decided: the cookie's name and attributes, how long a session lasts, and the CSRF token
bound to it. Pure: the store keeps sessions, the access middleware checks them.

A browser sends no bearer header on a page load or an EventSource, so the login page trades a token for a session
secret, kept in an HttpOnly, SameSite=Strict cookie (Secure over https). The CSRF token is the HMAC of a fixed word
under that secret: it is bound to the session, needs no storage, and a page that cannot read the cookie (any other
site) cannot compute it. Every state-changing request made with the cookie must carry it in `X-CSRF-Token`.
"""

from __future__ import annotations

import hashlib
import hmac

COOKIE = "mendloop_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 12 * 3600.0
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def digest(secret: str) -> str:
    """What the store keeps of a session's secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def csrf_token(secret: str) -> str:
    return hmac.new(secret.encode("utf-8", "surrogatepass"), b"mendloop-csrf", hashlib.sha256).hexdigest()


def csrf_matches(secret: str, given: str | None) -> bool:
    """Whether `given` (the request's X-CSRF-Token) is the session's CSRF token; constant time."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), csrf_token(secret).encode())


def cookie_header(value: str, *, path: str, secure: bool, max_age: int) -> str:
    """The Set-Cookie value; `max_age=0` (and an empty value) ends it."""
    parts = [f"{COOKIE}={value}", f"Path={path or '/'}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def cookie_value(header: str | None) -> str | None:
    """The session cookie's value in a Cookie header; None when there is none (or it is empty)."""
    if not header:
        return None
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE and value:
            return value
    return None


__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "SESSION_SECONDS",
    "STATE_CHANGING",
    "cookie_header",
    "cookie_value",
    "csrf_matches",
    "csrf_token",
    "digest",
]
