"""Resolving an incident: by the run whose verified fix ended it, or by an operator. The decisions (columns and
events) are `domain.incidents`'; this locks the row by its status (a compare-and-set: of two resolvers exactly
one moves it) and writes them in the caller's transaction.

Kept apart from `incidents.py` (which needs the `Store`) so the run's side can call it with nothing but a
transaction."""

from __future__ import annotations

import sqlalchemy as sa

from mendloop.domain import incidents as decide
from mendloop.domain.records import Run
from mendloop.domain.states import RunStatus
from mendloop.storage import schema as t
from mendloop.storage.db import Tx


def _apply(tx: Tx, incident_id: str, change: decide.Change) -> bool:
    n = tx.conn.execute(
        sa.update(t.incidents)
        .where(t.incidents.c.id == incident_id, t.incidents.c.status == decide.OPEN)
        .values(change.values)
    ).rowcount
    if n:
        tx.emit([change.event])
    return bool(n)


def resolve_by_run_in(tx: Tx, incident_id: str, *, run_id: str, component: str | None, commit: str | None) -> bool:
    """Resolve the incident by a run's verified fix, in the caller's transaction; False when it was not open."""
    change = decide.resolved_by_run(incident_id, run_id=run_id, component=component, commit=commit, now=tx.now)
    return _apply(tx, incident_id, change)


def resolve_completed_in(tx: Tx, run: Run) -> bool:
    """A run has just completed: if it is a verified fix (`domain.incidents.verified_run`), resolve its incident
    with it and the commit it applied. False when nothing was resolved."""
    if run.status is not RunStatus.COMPLETED or not run.incident_id:
        return False
    if not decide.verified_run(run.playbook, run.outputs):
        return False
    commit = decide.applied_commit(run.outputs)
    return resolve_by_run_in(tx, run.incident_id, run_id=run.id, component=run.component, commit=commit)


def resolve_by_operator_in(tx: Tx, incident_id: str, *, component: str | None) -> bool:
    return _apply(tx, incident_id, decide.resolved_by_operator(incident_id, component=component, now=tx.now))
