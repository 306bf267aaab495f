"""Pauses: an operator stops new runs of a component, or of all of them (`*`), with a reason.

Pure: which pause applies to a component, and the events that report a pause and a resume. Storage keeps the
pauses (a table, so they survive restarts and hold for every worker process) and leaves a paused component's
queued runs unclaimed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mendloop.domain.records import NewEvent
from mendloop.errors import InputError

ALL = "*"


@dataclass(frozen=True, slots=True)
class Pause:
    scope: str  # a component, or ALL
    reason: str
    created_at: float


def scope_of(component: str | None) -> str:
    if component is not None and (not component.strip() or component == ALL):
        raise InputError("component must be a component's name (leave it out to pause all)", field="component")
    return component or ALL


def applying(pauses: Mapping[str, Pause], component: str | None) -> Pause | None:
    """The pause that holds a component's runs: its own first (its reason is the more specific), else the global
    one. A run without a component is held only by the global pause."""
    return (pauses.get(component) if component else None) or pauses.get(ALL)


def _what(scope: str) -> str:
    return "every component" if scope == ALL else f"component {scope}"


def paused_event(pause: Pause, by: str) -> NewEvent:
    return NewEvent(
        type="control.paused",
        message=f"Paused {_what(pause.scope)} by {by}: {pause.reason} (detections still open incidents; no run starts)",
        payload={"scope": pause.scope, "reason": pause.reason, "by": by},
        component=None if pause.scope == ALL else pause.scope,
    )


def resumed_event(pause: Pause, by: str) -> NewEvent:
    return NewEvent(
        type="control.resumed",
        message=f"Resumed {_what(pause.scope)} by {by} (was paused: {pause.reason})",
        payload={"scope": pause.scope, "reason": pause.reason, "by": by},
        component=None if pause.scope == ALL else pause.scope,
    )
