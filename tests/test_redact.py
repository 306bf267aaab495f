"""The redactor on its own: every shape of secret it must know (detect-secrets' plugins and mendloop's own list),
only the secret part masked, idempotent, any nesting without recursion, the prefilter never less thorough than
running every rule, and bad configured patterns refused by name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mendloop.errors import ConfigError
from mendloop.infra.redact import MASK, Redactor


def _j(*parts: str) -> str:
    """Secrets are assembled at run time, so that this file holds no string a secret scanner would flag."""
    return "".join(parts)


ALNUM = "aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xYz"

# (name, text as it appears in a log, the parts that must be gone, what must stay readable)
SHAPES: list[tuple[str, str, list[str], list[str]]] = [
    ("aws_akia", f"using key {_j('AKIA', 'QWERTYUIOPASDFGH')} now", [_j("AKIA", "QWERTYUIOPASDFGH")], ["using key"]),
    ("aws_asia", f"sts {_j('ASIA', 'Y34FZKBOKMUTVV7A')} expired", [_j("ASIA", "Y34FZKBOKMUTVV7A")], ["expired"]),
    (
        "aws_secret",
        _j("aws_secret_access_key = '", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "'"),
        ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
        ["aws_secret_access_key"],
    ),
    ("ghp", f"git {_j('ghp_', ALNUM, 'abc')} push", [_j("ghp_", ALNUM)], ["git", "push"]),
    (
        "github_pat",
        f"pat {_j('github_pat_', '11ABCDEFG0', ALNUM, '_', ALNUM, ALNUM[:20])} used",
        [_j("github_pat_", "11ABCDEFG0", ALNUM)],
        ["used"],
    ),
    ("glpat", f"gitlab {_j('glpat-', 'xY9_zA8-bC7dE6fG5hI4')}", [_j("glpat-", "xY9_zA8-bC7dE6fG5hI4")], ["gitlab"]),
    ("sk_live", f"stripe {_j('sk_', 'live_', ALNUM * 3)} charge", [_j("sk_", "live_", ALNUM[:10])], ["charge"]),
    ("rk_live", f"stripe {_j('rk_', 'live_', ALNUM[:24])}", [_j("rk_", "live_", ALNUM[:24])], ["stripe"]),
    ("google", f"maps {_j('AIza', 'SyA1234567890abcdefghijklmnopqrstu')}", [_j("AIza", "SyA1234567890")], ["maps"]),
    (
        "slack",
        f"slack {_j('xoxb', '-123456789012-1234567890123-', 'AbCdEfGhIjKlMnOpQrStUvWx')}",
        ["AbCdEfGhIjKlMnOpQrStUvWx"],
        ["slack"],
    ),
    (
        "sendgrid",
        f"mail {_j('SG', '.', 'abcdefghijklmnopqrstuv', '.', ALNUM, 'abcdefghij')}",
        ["abcdefghijklmnopqrstuv"],
        ["mail"],
    ),
    (
        "jwt",
        _j(
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9",
            ".eyJzdWIiOiIxMjM0NTY3ODkwIn0",
            ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9",
        ),
        ["eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiIxMjM0NTY3ODkwIn0", "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9"],
        ["Authorization: Bearer"],
    ),
    (
        "dsn",
        _j("connect postgresql://app:", "Tr0ub4dor-3x", "@db.internal:5432/orders failed"),
        ["Tr0ub4dor-3x"],
        ["postgresql://app:", "@db.internal:5432/orders failed"],
    ),
    (
        "dsn_with_at",
        _j("redis://default:", "p@ss:w0rd!x", "@cache:6379/0 refused"),
        ["p@ss", "w0rd!x"],
        ["redis://default:", "@cache:6379/0 refused"],
    ),
    (
        "password_kv",
        "login password=hunter2-correct-horse user=bob",
        ["hunter2-correct-horse"],
        ["user=bob", "password="],
    ),
    ("json_quoted", '{"api_key": "abcd 1234 efgh", "user": "bob"}', ["abcd 1234 efgh"], ['"user": "bob"', "api_key"]),
    (
        "private_key",
        _j(
            "-----BEGIN OPENSSH ",
            "PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5v\n-----END OPENSSH ",
            "PRIVATE KEY----- ok",
        ),
        ["b3BlbnNzaC1rZXktdjEAAAAABG5v"],
        [" ok"],
    ),
    (
        "private_key_truncated",
        _j("key: -----BEGIN RSA ", "PRIVATE KEY-----\nMIIEowIBAAKCAQEAtruncatedbyalog"),
        ["MIIEowIBAAKCAQEAtruncatedbyalog"],
        ["key:"],
    ),
    (
        "basic_auth_header",
        _j("Authorization: Basic ", "dXNlcjpwYXNzd29yZA=="),
        ["dXNlcjpwYXNzd29yZA=="],
        ["Authorization: Basic"],
    ),
    ("npm", f"npmrc {_j('npm_', ALNUM, 'abc')}", [_j("npm_", ALNUM)], ["npmrc"]),
    ("openai", f"llm {_j('sk-', 'proj-', ALNUM)}", [ALNUM], ["llm"]),
]


@pytest.mark.parametrize(("text", "gone", "kept"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_each_shape_is_masked_and_the_rest_stays_readable(text: str, gone: list[str], kept: list[str]) -> None:
    out = Redactor().text(text)
    assert MASK in out
    for part in gone:
        assert part not in out, out
    for part in kept:
        assert part in out, out


def test_clean_text_is_returned_as_it_is() -> None:
    r = Redactor()
    for line in (
        "2026-12-02 03:00:00 ERROR [billing] Pipeline timeout after 300 seconds on db-2.internal:5432",
        "file book_123.pdf failed after 300 seconds",
        "GET /api/v1/users/42 HTTP/1.1 500 from 10.0.0.7",
        "ünïcödé ログ message with ß and İ",
        "invalid token provided by the client; basic authentication failed; Authorization failed for bob",
    ):
        assert r.text(line) is line


def test_masking_is_idempotent_on_every_shape() -> None:
    r = Redactor()
    for _, text, _, _ in SHAPES:
        once = r.text(text)
        assert r.text(once) == once


_FRAGMENTS = st.sampled_from([s[1] for s in SHAPES] + ["password", "=", ":", "@", "://", " ", "\n", '"', "token", "ok"])


@given(st.lists(_FRAGMENTS | st.text(max_size=12), max_size=8).map("".join))
def test_redacting_twice_is_redacting_once(text: str) -> None:
    r = Redactor()
    once = r.text(text)
    assert r.text(once) == once


@given(st.lists(_FRAGMENTS | st.text(max_size=12), max_size=8).map("".join))
def test_the_prefilter_is_never_less_thorough_than_every_rule(text: str) -> None:
    """The Hyperscan prefilter picks the rules to run; running all of them in order gives the same text."""
    r = Redactor()
    assert r.text(text) == r._apply(text, range(len(r.rules)))


def test_non_ascii_text_is_scanned_as_python_reads_it() -> None:
    """Folded to ASCII for the scan, one character for one: Python's Unicode case folding (the long s, U+017F, is
    an s) still finds the key word, and a secret after non-ASCII text is found."""
    r = Redactor()
    long_s = "\u017f"
    assert r.text(f"{long_s}ecret=abc123 ok") == f"{long_s}ecret={MASK} ok"
    key = _j("AKIA", "QWERTYUIOPASDFGH")
    assert r.text(f"clé «{key}» refusée") == f"clé «{MASK}» refusée"


def test_values_are_walked_keys_included_and_secret_keys_lose_their_values() -> None:
    r = Redactor(extra=[r"internal-\d+"])
    token = _j("ghp_", ALNUM)
    value = {
        "line": "id internal-42 failed",
        "db_password": "x",
        "nested": [{"token": "abc"}, ("password=abc123",)],
        token: 1,
        "n": 3,
        "ok": None,
    }
    assert r.value(value) == {
        "line": f"id {MASK} failed",
        "db_password": MASK,
        "nested": [{"token": MASK}, [f"password={MASK}"]],
        MASK: 1,
        "n": 3,
        "ok": None,
    }
    clean = {"a": [1, 2, {"b": "clean"}], "count": 100}
    assert r.value(clean) is clean  # nothing to mask: no copy
    assert r.value({"max_tokens": 100, "tokenizer": ["bpe"]}) == {"max_tokens": 100, "tokenizer": ["bpe"]}


def test_any_depth_is_walked_without_recursion() -> None:
    depth = 100_000
    root: list[object] = []
    cur = root
    for _ in range(depth):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    cur.append("password=abcdef")
    out = Redactor().value(root)
    for _ in range(depth):
        out = out[0]
    assert out == [f"password={MASK}"]


def test_a_configured_pattern_masks_its_v_group_only() -> None:
    r = Redactor(extra=[r"session (?P<v>[a-f0-9]{12})"])
    assert r.text("session 0123456789ab expired") == f"session {MASK} expired"


@pytest.mark.parametrize(("pattern", "why"), [("(unclosed", "not a valid regex"), ("x*", "matches the empty string")])
def test_a_bad_configured_pattern_is_a_config_error_naming_it(pattern: str, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)) as e:
        Redactor(extra=["fine-\\d+", pattern])
    assert e.value.fields["field"] == "secret_patterns.1"


def test_detect_secrets_rules_come_from_the_installed_plugins() -> None:
    """The maintained list is read from detect-secrets itself; the entropy, keyword and public-IP plugins are
    left out."""
    names = {rule.name for rule in Redactor().rules}
    for plugin in ("AWSKeyDetector", "GitHubTokenDetector", "GitLabTokenDetector", "StripeDetector", "SlackDetector"):
        assert f"detect_secrets:{plugin}" in names
    for plugin in ("IPPublicDetector", "Base64HighEntropyString", "HexHighEntropyString", "KeywordDetector"):
        assert f"detect_secrets:{plugin}" not in names


_BUILD = """
from mendloop.infra.redact import MASK, Redactor
r = Redactor()
assert r._prefilter._db is not None
print(r.text("key " + "AKIA" + "QWERTYUIOPASDFGH" + " here"))
"""


def test_the_compiled_prefilter_is_cached_between_processes_and_a_bad_cache_is_rebuilt(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}

    def build() -> str:
        done = subprocess.run([sys.executable, "-c", _BUILD], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert build() == f"key {MASK} here"
    (cached,) = (tmp_path / "mendloop" / "redact").iterdir()
    first = cached.read_bytes()
    assert build() == f"key {MASK} here"  # loaded, not compiled: the file is untouched
    assert cached.read_bytes() == first and cached.stat().st_size > 0
    cached.write_bytes(b"not a hyperscan database")
    assert build() == f"key {MASK} here"  # refused, compiled afresh, and written again
    assert cached.read_bytes() != b"not a hyperscan database" and cached.stat().st_size > 0


def _hostile(n: int) -> dict[str, str]:
    """Strings built to make a regex backtrack, each with a real secret shape at the end so that the prefilter
    lets every rule run over the whole of it."""
    trigger = " ".join(text for _, text, _, _ in SHAPES) + ' clkey = "' + "a" * 24 + '" //r/:_authToken=npm_x'
    shapes = {
        "one long word": "a" * n,
        "dotted word": "a." * (n // 2),
        "spaces after a key word": " clkey" + " " * n + "x",
        "spaces after token=": "token=" + " " * n,
        "eyJ repeated": "eyJ" * (n // 3),
        "eyJ- repeated": "eyJ-" * (n // 4),
        "key word repeated": "password" * (n // 8),
        "scheme and a long user": "x://u:" + "a" * n,
        "schemes repeated": "a://b:c" * (n // 7),
        "slashes on one line": "//" * (n // 2) + "\n",
        "sk- repeated": "sk-" * (n // 3),
        "BEGIN and spaces": "-----BEGIN " + "A " * (n // 2),
        "quotes": '"' * n,
        "at signs": "@" * n,
    }
    return {name: text + " " + trigger for name, text in shapes.items()}


def test_no_text_makes_a_rule_backtrack_for_long() -> None:
    """Linear in the text, whatever it holds: detect-secrets' own keyword, JWT and npm regexes were cubic or
    quadratic under Python's `re` (100 KB of them took from 8 s to minutes) and run rewritten."""
    r = Redactor()
    for name, text in _hostile(100_000).items():
        started = time.perf_counter()
        out = r.text(text)
        took = time.perf_counter() - started
        assert took < 4, f"{name}: {took:.1f} s"
        assert _j("AKIA", "QWERTYUIOPASDFGH") not in out
