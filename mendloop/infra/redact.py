"""Secrets out of everything mendloop stores, answers or hands to an agent: tokens, keys, passwords, connection
strings. One `Redactor`, built once from settings (`app.py`) and applied where data enters (intake, triggers, step
outputs, what agents post), so nothing downstream ever holds a secret.

The rules, in the order they run:

1. mendloop's own shapes, for what the maintained list misses or only half-masks: private key blocks (the whole
   block, not just the header), `github_pat_`, Google `AIza`, Stripe keys of any length (`sk_live_`, `rk_test_`),
   `glpat-` of any length, `npm_`, Hugging Face, Slack app tokens, `sk-` (OpenAI, Anthropic), JWTs (all three
   parts), `Bearer`/`Basic` credentials, passwords in URLs and DSNs (`scheme://user:pass@host`, `@` included).
2. every non-entropy plugin of detect-secrets (AWS, GitHub, GitLab, Stripe, Slack, Twilio, JWT, basic auth,
   npm, SendGrid, PyPI, Azure, Discord, Telegram, Mailchimp, IBM, Cloudant, SoftLayer, Square, OpenAI, ...):
   their `denylist` regexes, taken from the installed version, so an upgrade brings its new shapes. Left out:
   the entropy plugins (they flag nearly any identifier), the keyword plugin (rule 3 does that job with spans),
   the public-IP plugin (an address is not a secret) and the private-key plugin (its regexes are the header line
   only; rule 1 masks the block).
3. `key=value`, `key: value` and `"key": "value"` for keys that name a secret (password, token, api_key, ...).
4. the configured `secret_patterns`: a named group `v` (or `secret`) masks only that group, else the whole match.

Only the secret part is masked where a rule says which it is (`password=[REDACTED]`, `postgres://app:[REDACTED]@db`),
so messages stay readable and fingerprints of redacted text stay stable. Masking is idempotent: redacting redacted
text changes nothing (the mask matches no rule, and rules skip a value that is already the mask).

Cost: a clean string must cost little, because every event passes here. All rules are compiled once per process
into one Hyperscan database in prefilter mode (a superset of each rule's matches; kept compiled under
`~/.cache/mendloop/redact/` for the next process); one scan of every string of a value says which rules may
match, and only those run as Python regexes. Non-ASCII text is folded to ASCII first,
one character for one, so that the scan still finds every match Python's Unicode-aware rules would. Without
Hyperscan (or for a rule it cannot compile) the rules run unfiltered: slower, never less thorough.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from mendloop.errors import ConfigError

MASK = "[REDACTED]"

# Keys whose words name a secret, for `key=value` text and for JSON keys (whose string values are masked whole).
_KEY_WORDS = (
    r"password|passwd|passphrase|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?"
    r"|client[_-]?secret|auth[_-]?key"
)
_NOT_MASKED = r"(?!\[REDACTED\])"
# A key that names a secret, then `=`, `:` or `": ` (the key word may end a longer name: `db_password`).
_KEY = r"(?i)(?:" + _KEY_WORDS + r")[\w.-]{0,40}+[\"']?\s*+[:=]\s*+"

# (name, regex, group that holds the secret or None for the whole match). Specific shapes first, so the generic
# key=value rule cannot eat half of them.
MENDLOOP_RULES: tuple[tuple[str, str, str | None], ...] = (
    (
        "private_key",
        # A truncated block (no END line: a log cut it) is masked to the end of the text.
        r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]*?-----END [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|[\s\S]*)",
        None,
    ),
    ("github_pat", r"\bgithub_pat_[A-Za-z0-9_]{20,}", None),
    ("github_token", r"\bgh[pousr]_[A-Za-z0-9]{20,}", None),
    ("gitlab_token", r"\bgl(?:pat|dt|ft|soat|rt|cbt|imt|ptt|oas)-[A-Za-z0-9_-]{16,}", None),
    ("google_api_key", r"\bAIza[0-9A-Za-z_-]{30,}", None),
    ("stripe_key", r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}", None),
    ("stripe_webhook_secret", r"\bwhsec_[0-9A-Za-z]{16,}", None),
    ("npm_token", r"\bnpm_[A-Za-z0-9]{30,}", None),
    ("huggingface_token", r"\bhf_[A-Za-z0-9]{30,}", None),
    ("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}|\bxapp-[A-Za-z0-9-]{10,}", None),
    ("openai_style_key", r"\bsk-[A-Za-z0-9_-]{16,}", None),
    ("aws_access_key_id", r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b", None),
    # Every rule is linear in the text it reads, whatever the text: a hostile string of a megabyte must not cost
    # seconds. So an unbounded run that must be followed by something starts only where the run starts (a
    # lookbehind), and runs that can't backtrack into a match are possessive.
    (
        "jwt",
        r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}",
        None,
    ),
    ("bearer", r"(?i)\bbearer\s++(?P<v>" + _NOT_MASKED + r"[A-Za-z0-9._~+/=-]{8,})", "v"),
    (
        # `Authorization: Basic ...`, `: token ...`: only in the header, so "basic authentication failed" stays.
        "authorization",
        r"(?i)\bauthorization[\"']?\s*+[:=]\s*+[\"']?(?:(?:basic|token|digest)\s++)?(?P<v>"
        + _NOT_MASKED
        + r"(?!bearer\b)[A-Za-z0-9._~+/=-]{8,})",
        "v",
    ),
    (
        "url_password",
        # scheme://user:password@host: the password may hold `@` and `:`; it ends at the last `@` before the host.
        r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]{0,31}+://[^\s:/@]*+:(?P<v>"
        + _NOT_MASKED
        + r"[^\s/]*[^\s/@])(?=@[^\s@/?#]+)",
        "v",
    ),
    (
        "quoted_secret_value",
        _KEY + r"\"(?P<v>" + _NOT_MASKED + r"[^\"\n]{3,})\"",
        "v",
    ),
    (
        "single_quoted_secret_value",
        _KEY + r"'(?P<v>" + _NOT_MASKED + r"[^'\n]{3,})'",
        "v",
    ),
)
# The generic rule runs after detect-secrets' (whose key=value rules name the vendor and mask only the value).
KEY_VALUE_RULE = (
    "secret_key_value",
    _KEY + r"[\"']?(?P<v>" + _NOT_MASKED + r"[^\s\"',;&]{3,})",
    "v",
)

# detect-secrets plugins whose denylist regexes capture the secret itself in group 1 (the rest is a label or a
# delimiter, kept). For every other plugin the whole match is masked: GitHub's group 1 is only the `ghp` prefix.
_GROUP_IS_SECRET = frozenset(
    {
        "AWSKeyDetector",
        "BasicAuthDetector",
        "CloudantDetector",
        "IbmCosHmacDetector",
        "IbmCloudIamDetector",
        "SoftlayerDetector",
        "NpmDetector",
    }
)
_LEFT_OUT = frozenset({"IPPublicDetector", "PrivateKeyDetector", "KeywordDetector"})

_SECRET_KEY = re.compile(rf"(?i)(?:{_KEY_WORDS})")


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    regex: re.Pattern[str]
    # The group that holds the secret (masked); None: the whole match.
    group: int | str | None


def detect_secrets_rules() -> list[Rule]:
    """The denylist regexes of the installed detect-secrets' non-entropy plugins."""
    # Imported when the rules are first built, not with this module: importing detect-secrets costs 0.25 s.
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    plugins: dict[str, Any] = dict(get_mapping_from_secret_type_to_class())
    rules: list[Rule] = []
    for _, cls in sorted(plugins.items()):
        if cls.__name__ in _LEFT_OUT:
            continue
        try:
            denylist = cls().denylist
        except (AttributeError, TypeError):  # the entropy plugins have none (and need arguments)
            continue
        for regex in denylist:
            group = 1 if cls.__name__ in _GROUP_IS_SECRET and regex.groups >= 1 else None
            rules.append(Rule(f"detect_secrets:{cls.__name__}", _linear(regex), group))
    return rules


# detect-secrets' regexes that are super-linear under Python's `re`, and a linear equivalent that matches at least
# what the original does (a rewrite only ever masks more). A hostile string must not buy seconds of CPU:
# - the separator of the keyword rules (Cloudant, IBM, SoftLayer): three quantifiers over the same spaces, cubic in
#   a run of spaces (800 spaces after "clkey" took 6 s): possessive spaces around one optional symbol;
# - the JWT rule: an attempt at every `eyJ` of a long run, each reading the rest of the run (quadratic: 200 KB took
#   34 s): it starts only where the run starts, and its runs are possessive;
# - the npm rule: `//.+/:_authToken=` tries every `//` of a line, each reading the rest of the line (80 KB: 60 s):
#   the token after `:_authToken=` wherever it is.
_REWRITES = (
    ("\\/\\/.+\\/:_authToken=\\s*", ":_authToken=\\s*+"),
    ("(?: *)(?:=|:|:=|=>| +|::)(?: *)", "(?: *+)(?:=>|:=|::|=|:)?(?: *+)"),
    ("eyJ[A-Za-z0-9-_=]+\\.[A-Za-z0-9-_=]+\\.?", "(?<![A-Za-z0-9_=-])eyJ[A-Za-z0-9-_=]++\\.[A-Za-z0-9-_=]++\\.?"),
)


def _linear(regex: re.Pattern[str]) -> re.Pattern[str]:
    source = regex.pattern
    for slow, fast in _REWRITES:
        source = source.replace(slow, fast)
    return regex if source == regex.pattern else re.compile(source, regex.flags)


def _configured(patterns: Iterable[str]) -> list[Rule]:
    rules = []
    for i, p in enumerate(patterns):
        field = f"secret_patterns.{i}"
        try:
            regex = re.compile(p)
        except re.error as exc:
            raise ConfigError(f"{field}: not a valid regex ({exc})", field=field) from exc
        if regex.fullmatch(""):
            raise ConfigError(f"{field}: matches the empty string (it would mask between every character)", field=field)
        group = next((g for g in ("v", "secret") if g in regex.groupindex), None)
        rules.append(Rule(f"configured:{i}", regex, group))
    return rules


class _Fold(dict[int, int | str]):
    """str.translate table: each character to one ASCII character that every rule treats alike (space, digit,
    letter with its ASCII case fold, other), so the prefilter's ASCII scan misses nothing Python's Unicode classes
    and case folding would match. Filled on demand."""

    def __missing__(self, cp: int) -> int | str:
        ch = chr(cp)
        out: int | str
        if cp < 128:
            out = cp
        elif ch.isspace():
            out = " "
        elif ch.isdecimal():
            out = "0"
        elif ch.isalnum():
            out = next((f for f in (ch.casefold(), ch.lower(), ch.upper()) if len(f) == 1 and f.isascii()), "a")
        else:
            out = "~"
        self[cp] = out
        return out


_FOLD = _Fold()


class _Prefilter:
    """One Hyperscan database of every rule (prefilter mode: a superset of each rule's matches)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.always: list[int] = list(range(len(rules)))  # rules that run without a prefilter hit
        self._db: Any = None
        self._local = threading.local()  # a scratch space serves one scan at a time: one per thread
        try:
            import hyperscan
        except ImportError:
            return
        self._hs = hyperscan
        flags: dict[int, int] = {}
        always: list[int] = []
        for i, rule in enumerate(rules):
            source = rule.regex.pattern
            # The scan reads every string of a value joined by newlines: buffer anchors would see only the first.
            if any(a in source for a in ("\\A", "\\Z", "\\z")):
                always.append(i)
                continue
            f = hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_MULTILINE
            if rule.regex.flags & re.IGNORECASE:
                f |= hyperscan.HS_FLAG_CASELESS
            if rule.regex.flags & re.DOTALL:
                f |= hyperscan.HS_FLAG_DOTALL
            flags[i] = f
        # The ids are part of the key: the database reports them, and they must name the same rules.
        cached = _cache_path(hyperscan, [(i, _source(rules[i].regex), flags[i]) for i in sorted(flags)])
        db = self._load(cached)
        if db is None:
            db = self._compile(rules, flags)
            if db is not None:
                self._save(cached, db)
        if db is None and flags:
            # One rule failed and Hyperscan does not say which: find it one by one; it runs unfiltered.
            for i in list(flags):
                if self._compile(rules, {i: flags[i]}) is None:
                    always.append(i)
                    del flags[i]
            db = self._compile(rules, flags)
            if db is None:
                return
        self._db = db
        self.always = sorted(always)

    def _load(self, path: Path | None) -> Any:
        if path is None:
            return None
        try:
            return self._hs.loadb(path.read_bytes(), self._hs.HS_MODE_BLOCK)
        except (OSError, self._hs.error):  # absent, unreadable, or from another build: compiled afresh
            return None

    def _save(self, path: Path | None, db: Any) -> None:
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
                f.write(self._hs.dumpb(db))
            os.replace(f.name, path)
        except (OSError, self._hs.error):
            pass  # a cache that can't be written only costs the next process the compile

    def _compile(self, rules: Sequence[Rule], flags: Mapping[int, int]) -> Any:
        if not flags:
            return None
        ids = sorted(flags)
        db = self._hs.Database(mode=self._hs.HS_MODE_BLOCK)
        try:
            db.compile(
                expressions=[_source(rules[i].regex) for i in ids],
                ids=ids,
                elements=len(ids),
                flags=[flags[i] for i in ids],
            )
        except self._hs.error:
            return None
        return db

    def hits(self, strings: Sequence[str]) -> list[int]:
        """Which rules may match one of `strings` (in rule order)."""
        if self._db is None:
            return self.always
        joined = "\n".join(strings)
        data = (joined if joined.isascii() else joined.translate(_FOLD)).encode("ascii")
        found: set[int] = set(self.always)

        def on_match(rule: int, _start: int, _end: int, _flags: int, _context: object) -> None:
            found.add(rule)

        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._hs.Scratch(self._db)
        # `on_match` is a local that outlives the scan (block mode calls it only during `scan`).
        self._db.scan(data, match_event_handler=on_match, scratch=scratch)
        return sorted(found) if len(found) > 1 else list(found)


def _cache_path(hyperscan: Any, expressions: Sequence[tuple[int, bytes, int]]) -> Path | None:
    """Where the compiled database of these expressions is kept between processes: compiling them costs about
    0.4 s, loading the compiled database a millisecond, and every `serve`, worker and CLI that builds an App would
    pay the compile at start. Keyed by everything the database depends on, so a change of rules, flags, Hyperscan
    or machine is a new file. None: no cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or (str(Path.home() / ".cache") if Path.home().is_dir() else "")
    if not base:
        return None
    key = hashlib.sha256(
        repr((getattr(hyperscan, "__version__", ""), platform.machine(), expressions)).encode()
    ).hexdigest()
    return Path(base) / "mendloop" / "redact" / f"{key[:32]}.hsdb"


def _source(regex: re.Pattern[str]) -> bytes:
    """A rule's regex as Hyperscan reads it (verbose mode as an inline flag: Hyperscan has no compile flag for it)."""
    source = regex.pattern.encode("ascii", "backslashreplace")
    return b"(?x)" + source if regex.flags & re.VERBOSE else source


@lru_cache(maxsize=8)
def _compiled(extra: tuple[str, ...]) -> tuple[tuple[Rule, ...], _Prefilter]:
    """The rules and their prefilter, once per process for each set of configured patterns (compiling costs about
    half a second; the tests and a server build many Redactors with the same settings)."""
    own = [Rule(name, re.compile(src), group) for name, src, group in MENDLOOP_RULES]
    generic = Rule(KEY_VALUE_RULE[0], re.compile(KEY_VALUE_RULE[1]), KEY_VALUE_RULE[2])
    rules = (*own, *detect_secrets_rules(), generic, *_configured(extra))
    # One more expression after the rules: a key word anywhere (then the keys of a value are checked one by one).
    return rules, _Prefilter((*rules, Rule("secret_key_word", _SECRET_KEY, None)))


_PLAIN = frozenset({int, float, bool, type(None)})


class Redactor:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.rules, self._prefilter = _compiled(tuple(extra))
        self._key_word = len(self.rules)  # the prefilter's id for "a key word appears somewhere"
        self._secret_keys: dict[str, bool] = {}

    def text(self, value: str) -> str:
        hits = self._prefilter.hits((value,))
        if hits and hits[-1] == self._key_word:
            hits = hits[:-1]
        return self._apply(value, hits) if hits else value

    def value(self, value: Any) -> Any:
        """Every string inside a JSON-like value redacted (dict keys too); a key that names a secret has its string
        value masked whole. Walks without recursion, so any depth is fine; returns `value` itself when there is
        nothing to mask (the common case: one walk and one scan)."""
        if isinstance(value, str):
            return self.text(value)
        if not isinstance(value, Mapping | list | tuple):
            return value
        strings: list[str] = []
        add = strings.append
        stack: list[Any] = [value]
        push, pop = stack.append, stack.pop
        # Exact types first: an ABC's isinstance costs several times more, and this runs on every value of every
        # event. Subclasses and other mappings and sequences take the slow branch.
        while stack:
            item = pop()
            for k, v in item.items() if type(item) is dict or isinstance(item, Mapping) else enumerate(item):
                if type(k) is str or isinstance(k, str):
                    add(k)
                t = type(v)
                if t is str:
                    add(v)
                elif t is dict or t is list or t is tuple:
                    push(v)
                elif t in _PLAIN:
                    continue
                elif isinstance(v, str):
                    add(v)
                elif isinstance(v, Mapping | list | tuple):
                    push(v)
        hits = self._prefilter.hits(strings) if strings else []
        if not hits:
            return value
        keys = hits[-1] == self._key_word
        return self._rebuild(value, hits[:-1] if keys else hits, keys)

    def _rebuild(self, value: Mapping[Any, Any] | Sequence[Any], hits: list[int], keys: bool) -> Any:
        def scalar(v: Any) -> Any:
            return self._apply(v, hits) if isinstance(v, str) and hits else v

        def container(v: Any) -> dict[Any, Any] | list[Any] | None:
            if isinstance(v, Mapping):
                return {}
            return [] if isinstance(v, list | tuple) else None

        root = container(value)
        assert root is not None
        stack: list[tuple[Any, Any]] = [(value, root)]
        while stack:
            src, dst = stack.pop()
            if isinstance(dst, dict):
                for k, v in src.items():
                    key = scalar(k)
                    if keys and isinstance(v, str) and isinstance(k, str) and self._is_secret_key(k):
                        dst[key] = MASK
                        continue
                    child = container(v)
                    dst[key] = scalar(v) if child is None else child
                    if child is not None:
                        stack.append((v, child))
            else:
                for v in src:
                    child = container(v)
                    dst.append(scalar(v) if child is None else child)
                    if child is not None:
                        stack.append((v, child))
        return root

    def _is_secret_key(self, key: str) -> bool:
        known = self._secret_keys.get(key)
        if known is None:
            known = bool(_SECRET_KEY.search(key))
            if len(self._secret_keys) < 10_000:  # keys repeat; a hostile stream of new ones can't grow it forever
                self._secret_keys[key] = known
        return known

    def _apply(self, text: str, hits: Iterable[int]) -> str:
        for i in hits:
            rule = self.rules[i]
            text = rule.regex.sub(_masker(rule.group), text)
        return text


@cache
def _masker(group: int | str | None) -> Any:
    def mask(m: re.Match[str]) -> str:
        whole = m.group(0)
        if group is None or m.start(group) < 0:
            return MASK if whole != MASK else whole
        start, end = m.start(group) - m.start(), m.end(group) - m.start()
        if whole[start:end] == MASK:
            return whole
        return whole[:start] + MASK + whole[end:]

    return mask
