"""Fingerprints: the same error, whatever its values, gets the same short id, so repeats group into one incident.

`normalise` replaces the variable parts of a message with placeholders: URLs, quoted values, UUIDs, timestamps,
times, IP addresses, hex values, paths and numbers (any token of hex digits that holds a digit counts as a number,
so that `12345678` and `a71d08e2` are the same kind of id). Every rule reads a digit run as `\\d+`, never with a
length, so replacing any digit run with another never changes a fingerprint; and a normal form is its own normal
form (`normalise` is idempotent). The tests check both with hypothesis.

`fingerprint_traceback` keys a parsed traceback by its exception type and its frames' files and functions: a
code change that moves line numbers, or another value in the message, is still the same incident.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

from mendloop.infra.traceback import ParsedTraceback

# Normalising a 10 MB line would stall intake; what follows the first 64 KiB does not change the fingerprint.
MAX_CHARS = 64 * 1024

_HEX = "0-9A-Fa-f"
_PLACEHOLDERS = ("url", "str", "uuid", "ts", "time", "ip", "hex", "path", "n")


def _starts(first: str, *, not_after: str) -> str:
    """Where `first` (a regex) matches, not after one of `not_after` (a class body) nor after a placeholder: to
    these rules a placeholder is a word. (`first` comes first so that most places fail at once.)"""
    return f"(?={first})(?<![{not_after}])" + "".join(f"(?<!<{p}>)" for p in _PLACEHOLDERS)


def _not_before(chars: str) -> str:
    """Not before one of `chars` nor before a placeholder."""
    return f"(?![{chars}]|<(?:{'|'.join(_PLACEHOLDERS)})>)"


# Terminal colours, and an escape character that starts no sequence: none is left to start one once they are gone.
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~])?", re.ASCII)
_WHITESPACE = re.compile(r"\s+", re.ASCII)

# (regex, placeholder) in order: earlier rules see the text before later ones split it into pieces. ASCII: `\d`
# means [0-9] as the hex classes do, so a digit is a digit to every rule alike.
#
# Normalised text is normalised already (`normalise` is idempotent). One pass leaves no digit, so a second pass could
# only change text through the rules that need none: URLs, quoted values, paths and lists. None of them may find a
# match that the first pass's later rules made:
# - a placeholder replaces a value that blocked a rule's boundary (`1/x` is `<n>/x`, and `/x` after `>` would be a
#   path): so these rules treat every placeholder as a word, in all their lookarounds (`_starts`, `_not_before`);
#   a list collapses to its first item, so that holds whichever placeholder is left in front;
# - whitespace collapses before any rule runs, so no quoted value spans a newline that becomes a space later;
# - a Windows path never ends in a backslash, so it takes no escape away from a quote (`"C:\a\"` stays unquoted).
_RULE_SOURCES: list[tuple[str, str]] = [
    (_starts("[A-Za-z]", not_after=r"\w") + r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,;:!?)\]]", "<url>"),
    # Quoted values; a quote inside a word ("don't") is an apostrophe, not the start of a value.
    (r'"(?:[^"\\]|\\.)*"', "<str>"),
    (_starts("'", not_after=r"\w'") + r"'(?:[^'\\]|\\.)*'" + _not_before(r"\w'"), "<str>"),
    # UUIDs (and other ids of five dash-joined hex groups).
    (rf"(?<![\w-])(?=[{_HEX}-]*\d)[{_HEX}]+(?:-[{_HEX}]+){{4}}(?![\w-])", "<uuid>"),
    # ISO dates and timestamps: 2026-11-26, 2026-11-26T10:00:00.123Z, 2026-11-26 10:00:00,123+01:00.
    (
        r"(?<![\w.:-])\d+-\d+-\d+(?:[T ]\d+:\d+(?::\d+)?(?:[.,]\d+)?)?(?:Z|[+-]\d+(?::\d+)?)?(?![\w:])",
        "<ts>",
    ),
    (r"(?<![\w.:])\d+:\d+:\d+(?:[.,]\d+)?(?![\w:])", "<time>"),
    # IPv4 (with a port), then IPv6: hex groups and at least two colons, holding a digit.
    (r"(?<![\w.])\d+\.\d+\.\d+\.\d+(?::\d+)?(?!\w|\.\d)", "<ip>"),
    (rf"(?<![\w:.])(?=[{_HEX}:]*\d)(?:[{_HEX}]*:){{2,}}[{_HEX}]*(?![\w:])", "<ip>"),
    (rf"(?<!\w)\d+[xX][{_HEX}]+(?!\w)", "<hex>"),
    # Paths: absolute, home- or dot-relative, Windows, and relative ones that end in a file name with an extension.
    (_starts("[~./]", not_after=r"\w:/.~-") + r"(?:~|\.\.?)?(?:/[\w.@%+=,-]+)+/?", "<path>"),
    (_starts("[A-Za-z]:", not_after=r"\w") + r"[A-Za-z]:\\[\w.@%+=,\\-]*[\w.@%+=,-]", "<path>"),
    (_starts(r"[\w.-]", not_after=r"\w./-") + r"(?:[\w.-]+/)+[\w-]*\.[A-Za-z][\w.]*" + _not_before(r"\w/"), "<path>"),
    # Numbers: a whole token of hex digits holding a digit, else any digit run (user42 → user<n>).
    (rf"(?<!\w)(?=[{_HEX}]*\d)[{_HEX}]+(?!\w)", "<n>"),
    (r"\d+", "<n>"),
    # A list of values of any length is one shape: "ids 1, 2, 3" and "ids 7" differ only in count.
    (r"(<(?:n|str|uuid|hex|ip)>)(?:\s*,\s*<(?:n|str|uuid|hex|ip)>)+", r"\1"),
]
_RULES = [(re.compile(source, re.ASCII), placeholder) for source, placeholder in _RULE_SOURCES]
# A text a rule can match holds one of these: a rule whose needles are all absent is skipped, not run (a plain
# substring test costs a fraction of a regex scan, and most messages hold no URL, quote, path or UUID). Empty:
# always run.
_NEEDLES: list[tuple[str, ...]] = [
    ("://",),
    ('"',),
    ("'",),
    ("-",),
    ("-",),
    (":",),
    (".",),
    (":",),
    ("x", "X"),
    ("/",),
    (":\\",),
    ("/",),
    (),
    (),
    (",",),
]
assert len(_NEEDLES) == len(_RULES)
_GUARDED = [(rx, placeholder, needles) for (rx, placeholder), needles in zip(_RULES, _NEEDLES, strict=True)]
# No placeholder is more than three times as long as the shortest text it replaces (`<n>` for `1`, `<path>` for
# `/a`), and no rule makes the text longer otherwise.
_MAX_GROWTH = 3


def normalise(text: str) -> str:
    """The message with its variable parts replaced by placeholders and its whitespace collapsed.

    Placeholders can be longer than what they replace (`1` → `<n>`): when the normal form of the first MAX_CHARS
    would be longer than MAX_CHARS, it is the normal form of the first third instead, so that a normal form is
    never cut when it is normalised again."""
    out = _apply(text[:MAX_CHARS])
    if len(out) > MAX_CHARS:
        out = _apply(text[: MAX_CHARS // _MAX_GROWTH])
    return out


def _apply(text: str) -> str:
    if "\x1b" in text:
        text = _ESCAPES.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    for rx, placeholder, needles in _GUARDED:
        if needles:
            for needle in needles:
                if needle in text:
                    break
            else:
                continue
        text = rx.sub(placeholder, text)
    return text


def fingerprint(text: str, *, error_type: str | None = None, pattern: str | None = None) -> str:
    """16 hex digits naming the shape of `text` (and `error_type` and the watcher's `pattern`, when given)."""
    if pattern is None:
        return _digest("line", error_type, normalise(text))
    return _digest("line", error_type, pattern, normalise(text))


def fingerprint_traceback(tb: ParsedTraceback, *, error_type: str | None = None) -> str:
    """A traceback by exception type and (file name, function) of each frame: not by line numbers, not by the
    values in its message. A traceback without frames falls back to its type and normalised message."""
    if tb.frames:
        return _digest(
            "traceback", error_type, tb.exception_type, *(f"{_basename(f.file)}:{f.function}" for f in tb.frames)
        )
    return _digest("traceback", error_type, tb.exception_type, normalise(tb.message))


def fingerprint_labels(labels: Mapping[str, str]) -> str:
    """An alert by its label set, as Alertmanager names one: the exact labels, not their normal form (two alerts
    that differ only in `instance` are two incidents)."""
    return _digest("labels", None, *(f"{k}={v}" for k, v in sorted(labels.items())))


def _basename(path: str) -> str:
    # A traceback may come from another host or OS, so split on both separators rather than use this OS's rules.
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _digest(kind: str, error_type: str | None, *parts: str) -> str:
    # JSON, not a separator: no two different part lists serialise to the same text.
    key = json.dumps([kind, error_type, *parts], ensure_ascii=True)
    return hashlib.sha1(key.encode("ascii")).hexdigest()[:16]
