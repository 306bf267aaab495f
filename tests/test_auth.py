"""Reading credentials (`api/auth.py`): the one parser of `Authorization: Bearer`, and webhook signatures."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from mendloop.api.auth import bearer_token, signature_accepted, token_accepted


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


def test_signature_accepted() -> None:
    body = b'{"event_type": "a.b"}'
    good = "sha256=" + hmac.new(b"key", body, hashlib.sha256).hexdigest()
    assert signature_accepted(good, "key", body)
    assert not signature_accepted(good, "other", body)
    assert not signature_accepted(good, "key", body + b" ")
    assert not signature_accepted(good, None, body)
    assert not signature_accepted(None, "key", body)
    assert not signature_accepted(good.removeprefix("sha256="), "key", body)
    assert not signature_accepted("sha256=zz", "key", body)
    assert not signature_accepted("sha256=é", "key", body)
