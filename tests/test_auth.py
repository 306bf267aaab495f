"""Reading credentials (`api/auth.py`): the one parser of `Authorization: Bearer`, and webhook signatures."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from mendloop.api.auth import Signature, bearer_token, sign, token_accepted, verify_signature
from mendloop.errors import AuthError


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        ("  Bearer abc", "abc"),
        ("Bearer a.b-c_d~e+f/g=", "a.b-c_d~e+f/g="),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer    ", None),
        ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", None),
        ("Bearerabc", None),
        ("Token abc", None),
        ("abc", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_token_accepted_compares_whole_tokens() -> None:
    accepted = ["first-token", "second-token"]
    assert token_accepted("Bearer first-token", accepted)
    assert token_accepted("bearer second-token", accepted)
    for header in (None, "", "Bearer", "Bearer first", "Bearer first-token2", "Basic first-token", "first-token"):
        assert not token_accepted(header, accepted), header
    assert not token_accepted("Bearer x", [])
    assert not token_accepted("Bearer ", [""])  # an empty configured token never matches
    assert not token_accepted("Bearer tökén", accepted)  # non-ASCII compares (and fails) instead of raising


def _accepted(header: str | None, secret: str | None, body: bytes, *, now: float = 1_000_000) -> bool:
    try:
        verify_signature(header, secret, body, now=now, tolerance=300)
    except AuthError:
        return False
    return True


def test_signature_accepted() -> None:
    # The scheme is `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>` (the body-only `sha256=` form could be
    # replayed forever and is refused); the cases of the old test, on the new header.
    body = b'{"event_type": "a.b"}'
    digest = hmac.new(b"key", b"1000000." + body, hashlib.sha256).hexdigest()
    good = f"t=1000000,v1={digest}"
    assert sign("key", 1_000_000, body) == good
    assert verify_signature(good, "key", body, now=1_000_000, tolerance=300) == Signature(1_000_000, digest)
    assert _accepted(good, "key", body)
    assert _accepted(f"v1=00,t=1000000, v1={digest}", "key", body)  # any one v1 matching (secret rotation)
    assert not _accepted(good, "other", body)
    assert not _accepted(good, "key", body + b" ")
    assert not _accepted(good, None, body)
    assert not _accepted(None, "key", body)
    assert not _accepted(digest, "key", body)
    assert not _accepted("sha256=" + hmac.new(b"key", body, hashlib.sha256).hexdigest(), "key", body)
    assert not _accepted("t=1000000,v1=zz", "key", body)
    assert not _accepted("t=1000000,v1=é", "key", body)
    assert not _accepted(f"t=1000001,v1={digest}", "key", body)  # the timestamp is signed
    assert not _accepted(f"t=x,v1={digest}", "key", body)
    assert not _accepted(f"t=1000000,t=1000000,v1={digest}", "key", body)
    assert _accepted(good, "key", body, now=1_000_300) and not _accepted(good, "key", body, now=1_000_301)
    assert _accepted(good, "key", body, now=999_700) and not _accepted(good, "key", body, now=999_699)
