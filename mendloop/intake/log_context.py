"""The log lines around a detection (a watcher's `context_lines`), for its work order: the lines of the same file
just before the record that matched (so the `Import failed for rent.csv:` in front of a traceback is there), the
record's own lines (the whole traceback), and the lines after it.

The detection never waits for its after-lines (first remediation latency matters): it carries what was read with
it, and the rest is attached to its stored event later (`Awaiting`), once `after` lines came, the file has been
idle for `IDLE_SECONDS`, another file took its path, or the watcher stopped.

Bounded: each line is cut at `MAX_LINE_CHARS` characters (a 10 MB line is 2,000 characters and a marker here; the
tailer cut it at `max_line_bytes` already), and each of `before`, `lines` and `after` holds at most
`MAX_SECTION_CHARS` characters (the oldest before-lines, the latest after-lines and the middle of a huge traceback
go first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mendloop.domain.records import Detection
from mendloop.intake.multiline import Record

MAX_LINE_CHARS = 2000
MAX_SECTION_CHARS = 64 * 1024
IDLE_SECONDS = 1.0
CUT = " [...cut]"


def clip(line: str) -> str:
    """One line as the context keeps it: at most `MAX_LINE_CHARS` characters (and the marker when cut)."""
    return line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + CUT


def record_lines(text: str) -> list[str]:
    """A record's physical lines, each clipped (a traceback's record is its lines joined by newlines)."""
    if len(text) <= MAX_LINE_CHARS and "\n" not in text:
        return [text]  # the common case, without a split
    return [clip(line) for line in text.split("\n")]


def fit_middle(lines: Sequence[str], budget: int = MAX_SECTION_CHARS) -> list[str]:
    """`lines` within `budget` characters: its beginning and its end, with a marker where the middle was cut (a
    traceback's first line says what it is, its last lines where it failed)."""
    if sum(map(len, lines)) <= budget:
        return list(lines)
    head: list[str] = []
    tail: list[str] = []
    used = 0
    i, j = 0, len(lines) - 1
    while i <= j:
        take_head = len(head) <= len(tail)
        line = lines[i] if take_head else lines[j]
        if used + len(line) > budget:
            break
        used += len(line)
        if take_head:
            head.append(line)
            i += 1
        else:
            tail.append(line)
            j -= 1
    return [*head, f"[... {j - i + 1} lines cut ...]", *reversed(tail)]


def last_lines(lines: Sequence[str], n: int) -> list[str]:
    """The last `n` of `lines` within `MAX_SECTION_CHARS` characters (the ring of before-lines)."""
    out = list(lines[-n:]) if n > 0 else []
    if len(out) * (MAX_LINE_CHARS + len(CUT)) <= MAX_SECTION_CHARS:
        return out  # clipped lines this few always fit: no need to count
    chars = sum(map(len, out))
    drop = 0
    while chars > MAX_SECTION_CHARS and drop < len(out):
        chars -= len(out[drop])
        drop += 1
    return out[drop:]


def first_lines(lines: Sequence[str], n: int) -> list[str]:
    """The first `n` of `lines` within about `MAX_SECTION_CHARS` characters (after-lines)."""
    out: list[str] = []
    chars = 0
    for line in lines[:n]:
        if chars >= MAX_SECTION_CHARS:
            break
        out.append(line)
        chars += len(line)
    return out


@dataclass(eq=False)
class Awaiting:
    """A detection's context still collecting its after-lines. `context` is the dict its detections carry (the
    after-lines read in its own batch go there); `event_ids` are its stored events, once the sink has them."""

    path: str
    context: dict[str, Any]
    wanted: int
    last_seen: float  # when a line of its file was last read (or it was made): it is due `idle` seconds after
    idle: float = IDLE_SECONDS
    after: list[str] = field(default_factory=list)
    chars: int = 0
    event_ids: list[int] = field(default_factory=list)
    changed: bool = False  # after-lines came since it was handed to the sink

    @property
    def full(self) -> bool:
        return len(self.after) >= self.wanted or self.chars >= MAX_SECTION_CHARS

    def add(self, lines: Sequence[str]) -> None:
        for line in lines:
            if self.full:
                return
            self.after.append(line)
            self.chars += len(line)
            self.changed = True

    def due(self, now: float) -> bool:
        return self.full or now - self.last_seen >= self.idle

    def deadline(self) -> float:
        return self.last_seen + self.idle


def context_of(path: str, before: list[str], lines: list[str]) -> dict[str, Any]:
    """The `log_context` of one record (its `after` filled in as the lines come)."""
    return {"path": path, "before": before, "lines": fit_middle(lines), "after": []}


class Contexts:
    """One watcher's context lines: the last `before` lines of each file, and the contexts still collecting
    after-lines (`awaiting`, oldest first)."""

    def __init__(self, before: int, after: int, idle: float = IDLE_SECONDS) -> None:
        self.before = before
        self.after = after
        self.idle = idle
        self.awaiting: list[Awaiting] = []
        self._last: dict[str, list[str]] = {}  # per path: the last lines read, the next detection's before-lines
        self._end: dict[str, int] = {}  # per path: end of the last record seen; one before it is another file's

    @property
    def enabled(self) -> bool:
        return self.before > 0 or self.after > 0

    def touched(self, path: str, now: float) -> None:
        """Lines of `path` were read at `now`: its contexts are not idle."""
        for waiting in self.awaiting:
            if waiting.path == path:
                waiting.last_seen = now

    def forget(self, path: str) -> None:
        """`path` is no longer followed."""
        self._last.pop(path, None)
        self._end.pop(path, None)

    def attach(
        self, path: str, recs: Sequence[Record], found: Sequence[Detection], indexes: Sequence[int], now: float
    ) -> list[Awaiting | None]:
        """Each detection's `log_context` (set in its payload) from the lines before its record (`indexes[k]` is
        the record of `found[k]`) and after it; returns, in `found`'s order, the collector of each one whose
        after-lines are still to come (None for the others).

        Slices of one list of this batch's lines, not a ring fed line by line: a storm of 100,000 matching lines
        costs a slice per detection."""
        matched = set(indexes)
        contexts: dict[int, dict[str, Any]] = {}
        collecting: dict[int, Awaiting] = {}
        earlier = [w for w in self.awaiting if w.path == path and not w.full]
        at = 0
        while at < len(recs):
            if recs[at].offset < self._end.get(path, -1):
                # Another file at this path (rotated, truncated): its lines are no context of the old one's.
                self._last[path] = []
                for waiting in [*earlier, *collecting.values()]:
                    waiting.wanted = len(waiting.after)
                earlier = []
            flat = list(self._last.get(path, ()))
            first = len(flat)
            ends: dict[int, int] = {}  # where the lines after each matched record start in `flat`
            while at < len(recs):
                r = recs[at]
                self._end[path] = r.end_offset
                lines = record_lines(r.text)
                if at in matched:
                    contexts[at] = context_of(path, last_lines(flat, self.before), lines)
                    ends[at] = len(flat) + len(lines)
                flat.extend(lines)
                at += 1
                if at < len(recs) and recs[at].offset < r.end_offset:
                    break
            for waiting in earlier:
                waiting.add(flat[first : first + self.after])
            for i, end in ends.items():
                after = first_lines(flat[end : end + self.after], self.after)
                # What came with it travels with it; only what is still to come needs an update.
                contexts[i]["after"] = after
                if self.after > 0 and len(after) < self.after:
                    collecting[i] = Awaiting(path, contexts[i], self.after, now, self.idle, list(after))
                    collecting[i].chars = sum(len(x) for x in after)
            self._last[path] = last_lines(flat, self.before)
        self.awaiting += [w for w in collecting.values() if not w.full]
        out: list[Awaiting | None] = []
        for d, i in zip(found, indexes, strict=True):
            d.payload["log_context"] = contexts[i]
            mine = collecting.get(i)
            out.append(mine if mine is not None and not mine.full else None)
        return out

    def stored(self, awaiting: Sequence[Awaiting | None], ids: Sequence[int | None] | None) -> None:
        """The sink stored the batch (`ids`: the event of each detection, None when it cannot say): each collector
        learns its events; one whose event is unknown (or went to a detection it was merged into) collects no
        more."""
        if ids is not None and len(ids) == len(awaiting):
            seen: set[int] = set()
            for waiting, event_id in zip(awaiting, ids, strict=True):
                if waiting is not None and event_id is not None and event_id not in seen:
                    seen.add(event_id)
                    waiting.event_ids.append(event_id)
        mine = {id(w) for w in awaiting if w is not None}
        self.awaiting = [w for w in self.awaiting if id(w) not in mine or w.event_ids]

    def due(self, now: float, *, everything: bool = False) -> dict[int, list[str]]:
        """{event id: its whole after-lines} of the contexts that are complete or idle (all of them when the
        watcher stops) and got lines since their event was stored; those leave `awaiting`."""
        if not self.awaiting:
            return {}
        done = [w for w in self.awaiting if everything or w.due(now)]
        if not done:
            return {}
        gone = {id(w) for w in done}
        self.awaiting = [w for w in self.awaiting if id(w) not in gone]
        return {event_id: list(w.after) for w in done if w.changed for event_id in w.event_ids}

    def next_deadline(self) -> float | None:
        return min((w.deadline() for w in self.awaiting), default=None)
