"""An incident's lifecycle: resolved by a verified fix (or an operator), reopened when its error comes back.

Pure functions: the columns that change and the event that reports it; `storage/incidents.py` and
`storage/incident_resolution.py` lock the row and write them.

What counts as a verified fix: the run completed, at least one of its `verify` steps ran and judged the check
passed, and no `verify` step's latest result in the run failed. A run that completes without that (no `verify`
step in the playbook, every one skipped, or one that failed under `on_failure: continue`) fixed something nobody
checked: its incident stays `open`, where the next detection counts on it and an operator may still resolve it
(`POST /incidents/{id}/resolve`). It is the same line trust draws: only a passed `verify` restores trust.

A detection of a resolved incident's fingerprint reopens that incident (however it was resolved: by a run, by an
operator, by Alertmanager's `resolved`): `open` again, `recurrences` + 1, the last resolution kept in
`last_resolved_at`. Storm control treats it as the same incident it always was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mendloop.domain.records import Incident, NewEvent

OPEN = "open"
RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class TrackedIncident(Incident):
    """An incident with its lifecycle: how often it came back, and what resolved it last."""

    recurrences: int = 0
    resolved_by_run: str | None = None
    # The commit of the patch the resolving run applied (None when it applied none).
    resolved_commit: str | None = None
    # When it was resolved before its latest reopening (None: never reopened).
    last_resolved_at: float | None = None
    # Recurrences after a run's verified fix (domain/fix_memory.py), and that fix's commit at the latest one.
    regressions: int = 0
    regressed_commit: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """The incident's columns that change, and the event that says so."""

    values: dict[str, Any]
    event: NewEvent


def verified(verify_steps: Iterable[str], outputs: Mapping[str, Any]) -> bool:
    """Whether a completed run's outputs show a passed verification (see the module's docstring).

    `verify_steps` are the ids of the playbook's `verify` steps; a skipped step leaves no output, a step that ran
    leaves `{"passed": ...}` (a check that could not run at all leaves no `passed`: not a pass)."""
    results = [outputs[s] for s in verify_steps if s in outputs]
    return bool(results) and all(isinstance(r, Mapping) and r.get("passed") is True for r in results)


def verified_run(playbook: Mapping[str, Any], outputs: Mapping[str, Any]) -> bool:
    """`verified` for a run's own playbook document (the one it started with)."""
    steps = playbook.get("steps")
    if not isinstance(steps, list):
        return False
    ids = [str(s["id"]) for s in steps if isinstance(s, Mapping) and s.get("action") == "verify" and "id" in s]
    return verified(ids, outputs)


def applied_commit(outputs: Mapping[str, Any]) -> str | None:
    """The commit of the patch a run applied and kept, if any."""
    applied = outputs.get("apply_patch")
    if not isinstance(applied, Mapping) or applied.get("reverted"):
        return None
    commit = applied.get("commit")
    return commit if isinstance(commit, str) and commit else None


def resolved_by_run(incident_id: str, *, run_id: str, component: str | None, commit: str | None, now: float) -> Change:
    by = f"run {run_id}'s verified fix" + (f" (commit {commit[:12]})" if commit else "")
    return Change(
        values={"status": RESOLVED, "resolved_at": now, "resolved_by_run": run_id, "resolved_commit": commit},
        event=NewEvent(
            type="incident.resolved",
            message=f"Incident {incident_id} resolved by {by}",
            payload={"incident_id": incident_id, "resolved_by_run": run_id, "commit": commit, "by": "run"},
            run_id=run_id,
            component=component,
        ),
    )


def resolved_by_operator(incident_id: str, *, component: str | None, now: float) -> Change:
    return Change(
        values={"status": RESOLVED, "resolved_at": now, "resolved_by_run": None, "resolved_commit": None},
        event=NewEvent(
            type="incident.resolved",
            message=f"Incident {incident_id} resolved by an operator",
            payload={"incident_id": incident_id, "resolved_by_run": None, "commit": None, "by": "operator"},
            component=component,
        ),
    )


def reopened(
    incident_id: str,
    *,
    recurrences: int,
    resolved_at: float | None,
    resolved_by: str | None,
    component: str | None,
    run_id: str | None,
) -> Change:
    """A detection of a resolved incident: `recurrences` is its count before this one."""
    count = recurrences + 1
    after = f"run {resolved_by}'s fix" if resolved_by else "its resolution"
    return Change(
        values={
            "status": OPEN,
            "recurrences": count,
            "last_resolved_at": resolved_at,
            "resolved_at": None,
            "resolved_by_run": None,
            "resolved_commit": None,
        },
        event=NewEvent(
            type="incident.reopened",
            message=f"Incident {incident_id} reopened: it recurred after {after} (recurrence {count})",
            payload={
                "incident_id": incident_id,
                "recurrences": count,
                "last_resolved_at": resolved_at,
                "last_resolved_by_run": resolved_by,
            },
            run_id=run_id,
            component=component,
        ),
    )
