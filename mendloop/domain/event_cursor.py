"""Where a reader of the durable events table resumes, and which events it wants: pure decisions.

A cursor is the id of the last event a reader was given. Reading resumes strictly after it. Retention may have
pruned events after the cursor. Those are gone, and the reader is told so (`Resume.reset`) rather than silently
skipping them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mendloop.errors import InputError

# Event types are dotted words (`self_healing.completed`, `coding_agent.work_order_created`).
_TYPE = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_MAX_TERMS = 50
_MAX_CHARS = 100  # the events.type and component columns are longer, but no real name is


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Exact types, type prefixes (from `prefix.*`, kept with their trailing dot) and components. An empty part
    matches everything."""

    types: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    components: tuple[str, ...] = ()

    def matches(self, event_type: str, component: str | None) -> bool:
        if (self.types or self.prefixes) and not (
            event_type in self.types or any(event_type.startswith(p) for p in self.prefixes)
        ):
            return False
        return not self.components or component in self.components


def _terms(values: Iterable[str], field: str) -> list[str]:
    """Repeated parameters and comma lists alike: `?type=a&type=b,c` is a, b, c."""
    out = [term.strip() for value in values for term in value.split(",") if term.strip()]
    if len(out) > _MAX_TERMS:
        raise InputError(f"{field}: at most {_MAX_TERMS} values", field=field)
    for term in out:
        if len(term) > _MAX_CHARS:
            raise InputError(f"{field}: {term[:20]!r}... is longer than {_MAX_CHARS} characters", field=field)
    return out


def event_filter(types: Iterable[str] = (), components: Iterable[str] = ()) -> EventFilter:
    """The filter of a request's `type` and `component` values; an InputError naming the field for a bad one.
    A type is exact (`run.completed`) or a prefix (`coding_agent.*`); `*` alone means every type."""
    exact: list[str] = []
    prefixes: list[str] = []
    for term in _terms(types, "type"):
        if term == "*":
            return EventFilter(components=tuple(_terms(components, "component")))
        stem = term[:-2] if term.endswith(".*") else term
        if not _TYPE.fullmatch(stem):
            raise InputError(
                f"type: {term!r} is not an event type or a `prefix.*` pattern (letters, digits, _ - and dots)",
                field="type",
            )
        (prefixes if term.endswith(".*") else exact).append(stem + "." if term.endswith(".*") else stem)
    return EventFilter(tuple(exact), tuple(prefixes), tuple(_terms(components, "component")))


def parse_cursor(value: str | None, field: str) -> int | None:
    """A cursor as a client sends it (`Last-Event-ID`, `?after=`): a non-negative event id, or None when absent."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 18:
        raise InputError(f"{field}: {text[:30]!r} is not an event id (a non-negative integer)", field=field)
    return int(text)


@dataclass(frozen=True, slots=True)
class Resume:
    """Where to read from (strictly after `after`), and whether events the client never got were pruned."""

    after: int
    reset: bool


def resume(after: int, oldest: int | None) -> Resume:
    """A cursor older than the oldest event kept lost the events between: resume just before the oldest and say
    so. Ids are not dense (a rolled-back transaction leaves a gap), so a gap right below the oldest may be such a
    hole rather than pruned rows; a reset then only says more than it must, and loses nothing."""
    if oldest is not None and after < oldest - 1:
        return Resume(oldest - 1, reset=True)
    return Resume(after, reset=False)
