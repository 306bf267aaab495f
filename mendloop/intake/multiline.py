"""Lines → records: a Python traceback or a Java stack trace spread over many lines becomes one record, a JSON log
line is parsed, every other line is a record of its own.

Single lines are emitted as soon as they are fed: only a line that starts (or may start) a group waits, for its
continuation lines or for `group_timeout` seconds of quiet, so grouping never delays an ordinary line.
"""

from __future__ import annotations

import json as jsonlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from mendloop.infra.traceback import EXCEPTION_LINE as _PY_EXCEPTION_LINE
from mendloop.intake.lines import Line, strip_ansi

_PY_START = "Traceback (most recent call last):"
_PY_GROUP = "Exception Group Traceback"
_PY_CHAIN = frozenset(
    {
        "During handling of the above exception, another exception occurred:",
        "The above exception was the direct cause of the following exception:",
    }
)
# A qualified Java class name ending in Exception/Error/Throwable, then ":" or the end of the line:
# "java.lang.IllegalStateException: boom", 'Exception in thread "main" java.lang.NullPointerException'.
_JAVA_HEAD = re.compile(
    r"(?:^|[\s:\"'(\[])(?:[A-Za-z_$][\w$]*\.)+[A-Za-z_$][\w$]*(?:Exception|Error|Throwable)(?::|\s*$)"
)
_JAVA_MORE = re.compile(
    r"^\s+at\s|^\s*\.\.\. \d+ (?:more|common frames omitted)|^\s*Caused by:|^\s+Suppressed:|^\s*Wrapped by:"
)
_MESSAGE_KEYS = ("message", "msg", "log")


@dataclass(frozen=True)
class Record:
    """One event's worth of log: `lines` physical lines from `offset` to `end_offset` of `path` (offsets of its
    first and last line), `ts` when its first line was read. `json` is the parsed object of a JSON line (of the
    first line of a group), and then `text` is its "message"/"msg"/"log" field, or the raw line without one."""

    path: str
    text: str
    lines: int
    offset: int
    end_offset: int
    ts: float
    json: dict[str, Any] | None


@dataclass(frozen=True)
class _Item:
    line: Line
    text: str
    json: dict[str, Any] | None


@dataclass
class _Group:
    kind: Literal["python", "java_head", "java"]
    # python: "frames" (inside a traceback), "exception" (its last line seen), "blank" (blank lines after it that
    # belong to the group only if a chain marker follows), "chain" (after a chain marker, before its traceback).
    state: str
    items: list[_Item]
    exception_group: bool = False  # its lines are all indented; it has no exception line of its own
    held: list[_Item] = field(default_factory=list)
    size: int = 0
    last_ts: float = 0.0


def parse_json(text: str) -> tuple[str, dict[str, Any] | None]:
    """(message, object) for a line that is a JSON object; (text, None) for any other line."""
    stripped = text.strip()
    if len(stripped) < 2 or stripped[0] != "{" or stripped[-1] != "}":
        return text, None
    try:
        obj = jsonlib.loads(stripped)
    except (ValueError, RecursionError):
        return text, None
    if not isinstance(obj, dict):
        return text, None
    for key in _MESSAGE_KEYS:
        value = obj.get(key)
        if isinstance(value, str):
            # Docker's json-file "log" keeps the newline; escaped ANSI codes survive the tailer's stripping.
            return strip_ansi(value.rstrip("\r\n")), obj
    return text, obj


class Grouper:
    """Per path, turns fed Lines into Records. A group larger than `max_group_lines` or `max_group_bytes` is cut
    there, so a runaway stream of indented lines cannot hold memory."""

    def __init__(
        self, *, group_timeout: float = 0.5, max_group_lines: int = 1000, max_group_bytes: int = 1 << 20
    ) -> None:
        self.group_timeout = group_timeout
        self.max_group_lines = max_group_lines
        self.max_group_bytes = max_group_bytes
        self._groups: dict[str, _Group] = {}

    def feed(self, lines: Iterable[Line]) -> list[Record]:
        """Records completed by these lines, in order for each path."""
        out: list[Record] = []
        for line in lines:
            text, obj = parse_json(line.text)
            self._feed_one(_Item(line, text, obj), out)
        return out

    def flush(self, now: float | None = None) -> list[Record]:
        """Records of the groups quiet for `group_timeout` seconds at `now`; all pending groups when `now` is None
        (the stream ended)."""
        out: list[Record] = []
        for path in sorted(self._groups):
            group = self._groups[path]
            if now is None or now - group.last_ts >= self.group_timeout:
                del self._groups[path]
                self._emit(group, out)
        return out

    def next_deadline(self) -> float | None:
        """When the earliest pending group falls due for `flush`, or None when nothing is pending."""
        if not self._groups:
            return None
        return min(g.last_ts for g in self._groups.values()) + self.group_timeout

    @property
    def pending(self) -> int:
        return len(self._groups)

    # -- internals ---------------------------------------------------------------------------------------------

    def _feed_one(self, item: _Item, out: list[Record]) -> None:
        path = item.line.path
        group = self._groups.get(path)
        if group is not None:
            if self._continues(group, item):
                group.last_ts = item.line.ts
                group.size += len(item.text) + 1
                if len(group.items) + len(group.held) >= self.max_group_lines or group.size >= self.max_group_bytes:
                    del self._groups[path]
                    self._emit(group, out)
                return
            del self._groups[path]
            self._emit(group, out)
        self._start(item, out)

    def _start(self, item: _Item, out: list[Record]) -> None:
        text = item.text
        if _PY_START in text:
            group = _Group("python", "frames", [item], exception_group=_PY_GROUP in text)
        elif _JAVA_HEAD.search(text):
            # Only a following "\tat ..." line makes it a stack trace: until then it may be a plain log line.
            group = _Group("java_head", "head", [item])
        else:
            out.append(_record([item]))
            return
        group.last_ts = item.line.ts
        group.size = len(text) + 1
        self._groups[item.line.path] = group

    def _continues(self, group: _Group, item: _Item) -> bool:
        """Does `item` belong to `group`? Updates the group's state when it does."""
        text = item.text
        if group.kind != "python":
            if _JAVA_MORE.match(text):
                group.kind = "java"
                group.items.append(item)
                return True
            return False
        blank = not text.strip()
        indented = text[:1] in (" ", "\t")
        if group.state == "frames":
            if indented or blank:
                group.items.append(item)
                return True
            if not group.exception_group and _PY_EXCEPTION_LINE.match(text):
                group.items.append(item)
                group.state = "exception"
                return True
            return False
        if group.state in ("exception", "blank"):
            if blank:
                group.held.append(item)
                group.state = "blank"
                return True
            if text.strip() in _PY_CHAIN:
                group.items.extend(group.held)
                group.held.clear()
                group.items.append(item)
                group.state = "chain"
                return True
            return False
        # "chain": blank lines, then the next traceback.
        if blank or _PY_START in text:
            group.items.append(item)
            if not blank:
                group.state = "frames"
                group.exception_group = _PY_GROUP in text
            return True
        return False

    def _emit(self, group: _Group, out: list[Record]) -> None:
        # A "java_head" group is a plain line that named an exception but had no trace after it: one line.
        out.append(_record(group.items))
        # Blank lines held after a traceback turned out not to lead to a chained one: records of their own.
        out.extend(_record([held]) for held in group.held)


def _record(items: list[_Item]) -> Record:
    first, last = items[0], items[-1]
    text = items[0].text if len(items) == 1 else "\n".join(i.text for i in items)
    return Record(
        path=first.line.path,
        text=text,
        lines=len(items),
        offset=first.line.offset,
        end_offset=last.line.end_offset,
        ts=first.line.ts,
        json=first.json,
    )
