"""Notifications: which events a target wants, how severe each event is, what it is told, and when a failed delivery
is tried again. Pure decisions; the delivery itself is `engine/notifier.py`.

Severity is decided here from the event's type and payload, never stored: the ladder is info < warning < error <
critical, and a target's `min_severity` passes what is at least as severe. mendloop's own events:

| event | severity |
|---|---|
| `self_healing.completed` with status `completed` or `dry_run` | info |
| `self_healing.completed` with status `cancelled` | warning |
| `self_healing.completed` with status `failed` or `needs_human` | error |
| `self_healing.escalated` (to a coding agent), `self_healing.patch_reverted` | error |
| `incident.regressed` (a verified code fix did not hold) | error |
| `self_healing.circuit_open` | critical |
| `self_healing.step_failed`, `incident.reopened` | warning |
| `run.approval_requested`, `run.rejected`, `run.approval_timed_out`, `control.paused` (waits for a person) | warning |
| `coding_agent.work_order_updated` with status `failed` | error |
| any other `self_healing.*`, `coding_agent.*`, `incident.*`, `trust.*`, `run.*`, `control.*` | info |

Anything else is a detection or an event posted from outside: its payload's `severity` when that is one of the
four, else error (what intake assumes of a detection without one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

Severity = Literal["info", "warning", "error", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}

# mendloop's own event families: an event of one of them not in the table below is routine.
_OWN_PREFIXES = ("self_healing.", "coding_agent.", "incident.", "trust.", "run.", "control.")
_BY_TYPE: dict[str, Severity] = {
    "self_healing.escalated": "error",
    "self_healing.patch_reverted": "error",
    "self_healing.circuit_open": "critical",
    "self_healing.step_failed": "warning",
    "incident.reopened": "warning",
    # A fix that passed its verification did not hold: the verification itself is in question.
    "incident.regressed": "error",
    # A run waits for a person: whoever is told of warnings should know.
    "run.approval_requested": "warning",
    "run.rejected": "warning",
    "run.approval_timed_out": "warning",
    "control.paused": "warning",
}
_RUN_END: dict[str, Severity] = {
    "completed": "info",
    "dry_run": "info",
    "cancelled": "warning",
    "failed": "error",
    "needs_human": "error",
}

# An event-type glob: the characters of an event type, plus `*` and `?`.
_GLOB = re.compile(r"[A-Za-z0-9_\-.*?]{1,100}")


def severity_of(event_type: str, payload: dict[str, Any]) -> Severity:
    """How severe an event is (the table in this module's docstring)."""
    status = payload.get("status")
    if event_type == "self_healing.completed":
        return _RUN_END.get(str(status), "error")
    if event_type == "coding_agent.work_order_updated":
        return "error" if status == "failed" else "info"
    if event_type in _BY_TYPE:
        return _BY_TYPE[event_type]
    if event_type.startswith(_OWN_PREFIXES):
        return "info"
    given = payload.get("severity")
    return given if isinstance(given, str) and given in _RANK else "error"


def glob_problem(pattern: str) -> str | None:
    """Why `pattern` is not an event-type glob (`run.*`, `self_healing.completed`, `*`), or None."""
    if not _GLOB.fullmatch(pattern):
        return f"{pattern[:40]!r} is not an event-type glob (letters, digits, _ - . and the wildcards * ?)"
    return None


@dataclass(frozen=True, slots=True)
class NotifyFilter:
    """What a target wants. An empty `event_types` or `components` means every one."""

    event_types: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    min_severity: Severity = "info"

    def matches(self, event_type: str, component: str | None, severity: Severity) -> bool:
        if self.event_types and not any(fnmatchcase(event_type, g) for g in self.event_types):
            return False
        if self.components and component not in self.components:
            return False
        return _RANK[severity] >= _RANK[self.min_severity]


@dataclass(frozen=True, slots=True)
class Notice:
    title: str
    body: str
    severity: Severity


def run_link(run_id: str, public_url: str | None) -> str:
    """The run's page in the API: absolute under `public_url` when it is set, else the path alone (mendloop can't
    know the address its users reach it by)."""
    path = f"/patches/runs/{run_id}"
    return f"{public_url.rstrip('/')}{path}" if public_url else path


def notice(
    *,
    event_type: str,
    message: str,
    component: str | None,
    run_id: str | None,
    payload: dict[str, Any],
    public_url: str | None,
) -> Notice:
    """What a target is told about an event: its human message, and a link to its run when it has one."""
    level = severity_of(event_type, payload)
    title = f"mendloop [{level}] {event_type}" + (f" ({component})" if component else "")
    body = message.strip() or event_type
    if run_id:
        body += f"\n\nRun: {run_link(run_id, public_url)}"
    return Notice(title=title, body=body, severity=level)


def trial_notice(target: str) -> Notice:
    """What `mendloop notifications test NAME` sends."""
    return Notice(
        title="mendloop: test notification",
        body=f"A test notification from mendloop to the target {target!r}.",
        severity="info",
    )


@dataclass(frozen=True, slots=True)
class Retry:
    """After a failed attempt: give up on this event (`give_up`, the cursor moves past it), or try again at
    `next_at`."""

    give_up: bool
    next_at: float


def backoff_seconds(failures: int, *, base: float, maximum: float) -> float:
    """The wait after the `failures`-th failed attempt in a row (1, 2, ...): base, 2 base, 4 base, ... capped."""
    return float(min(maximum, base * 2 ** max(0, min(failures - 1, 60))))


def after_failure(failures: int, *, max_attempts: int, now: float, base: float, maximum: float) -> Retry:
    """What the `failures`-th failed attempt at one event leads to."""
    if failures >= max_attempts:
        return Retry(give_up=True, next_at=now)
    return Retry(give_up=False, next_at=now + backoff_seconds(failures, base=base, maximum=maximum))
