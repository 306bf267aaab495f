"""The prefix a logging framework puts in front of a message: timestamp, level, logger, thread, process.

A watcher fingerprints the message, not the line: `2026-11-26 10:00:00 ERROR: Pipeline timeout after 300 seconds`
and `ERROR: Pipeline timeout after 300 seconds` are one error, one incident, one run. `strip` recognises the
prefixes of the common formats: ISO 8601 and syslog timestamps, Python's `logging` defaults (`LEVEL:logger:` and
`%(asctime)s - %(name)s - %(levelname)s - `), bracketed fields (`[ERROR]`, `[main]`, `[Thread-1]`, `[pid 42]`),
logfmt's `time=… level=…`, and a level word with its colon; a watcher with its own `prefix:` regex uses that
instead. What is left is never empty: a line that is nothing but a prefix is its own message.
"""

from __future__ import annotations

import re

__all__ = ["strip"]

_LEVEL = r"(?:TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|CRITICAL|CRIT|FATAL|SEVERE|PANIC|ALERT|EMERG)"
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
# One prefix field, with the separator after it. Tried again and again from the start of the line.
_FIELD = re.compile(
    "(?:"
    + "|".join(
        (
            # ISO 8601 date and time (a space or T between), fractions, zone.
            r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?",
            # A bare time of day (10:00:00.123).
            r"\d{2}:\d{2}:\d{2}(?:[.,]\d+)?",
            # syslog: "Nov 26 10:00:00 host program[123]:" (the host and program follow as words below).
            _MONTH + r" {1,2}\d{1,2} \d{2}:\d{2}:\d{2}",
            # Epoch seconds or milliseconds.
            r"\d{10}(?:\d{3})?(?:\.\d+)?",
            # A bracketed or parenthesised field: [ERROR], [main], (Thread-1), [2026-11-26 10:00:00].
            r"\[[^\]\n]{1,80}\]|\([^)\n]{1,80}\)",
            # logfmt's time= / level= / logger= / thread= pairs.
            r"(?:time|ts|timestamp|level|lvl|severity|logger|thread|pid)=(?:\"[^\"\n]*\"|\S+)",
            # Python's default format "ERROR:root:" (a level, a logger and colons, no spaces).
            _LEVEL + r":[\w.\-]+:",
            # A level word, alone or with its colon.
            _LEVEL + r":?(?=\s|$)",
        )
    )
    + r")[\s:|\-]*",
    re.ASCII,
)
# syslog's "host program[pid]:" right after its timestamp.
_SYSLOG_SOURCE = re.compile(r"[\w.\-]+ [\w.\-/]+(?:\[\d+\])?:\s*", re.ASCII)
_SYSLOG_TIME = re.compile(_MONTH + r" {1,2}\d{1,2} \d{2}:\d{2}:\d{2}", re.ASCII)
# Python's "%(asctime)s - %(name)s - %(levelname)s - ": the logger name between two dashes before the level.
_NAME_BEFORE_LEVEL = re.compile(r"[\w.\-]+\s+-\s+(?=" + _LEVEL + r"\b)", re.ASCII)
# Logback's and log4j's "LEVEL c.e.Importer - ": a dotted logger name and a dash, right after the level.
_DOTTED_AFTER_LEVEL = re.compile(r"[\w$]+(?:\.[\w$]+)+\s+-\s+", re.ASCII)
_LEVEL_WORD = re.compile(r"\W*" + _LEVEL + r"\W*", re.ASCII | re.IGNORECASE)
# A prefix is short: the fields above never run past this many characters into the line.
_MAX_PREFIX = 200


def strip(line: str, custom: re.Pattern[str] | None = None) -> str:
    """`line` without the prefix its logging framework wrote (see the module); `custom`, when given, is the
    watcher's own prefix regex, matched at the start. The first line of a multi-line record is the one stripped."""
    if custom is not None:
        match = custom.match(line)
        rest = line[match.end() :] if match else line
        return rest if rest.strip() else line
    pos = 0
    after_level = False
    limit = min(len(line), _MAX_PREFIX)
    while pos < limit:
        match = _FIELD.match(line, pos)
        if match is None or match.end() == pos:
            name = _NAME_BEFORE_LEVEL.match(line, pos) if pos else None
            if name is None and after_level:
                name = _DOTTED_AFTER_LEVEL.match(line, pos)
            if name is None:
                break
            match = name
        after_level = bool(_LEVEL_WORD.fullmatch(match.group(0)))
        if _SYSLOG_TIME.fullmatch(match.group(0).rstrip(" :|-")):
            source = _SYSLOG_SOURCE.match(line, match.end())
            pos = source.end() if source else match.end()
            continue
        pos = match.end()
    rest = line[pos:]
    return rest if rest.strip() else line
