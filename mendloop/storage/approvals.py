"""Persisting approvals: an operator's decision on a run parked in `awaiting_approval`, and the deadline's.

The decisions are `domain/approvals.py`'s; this module locks the run, hands it to the decision and writes what it
returns (the run's columns, the step row, the events) in one transaction. A parked run holds no lease, so the
lock is the row's: `FOR UPDATE` on PostgreSQL, SQLite's single writer.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from mendloop.domain.approvals import Decision
from mendloop.domain.records import Run
from mendloop.domain.states import RunStatus
from mendloop.errors import NotFound
from mendloop.storage import schema as t
from mendloop.storage import stats as stat_rows
from mendloop.storage.db import Database, Tx
from mendloop.storage.rows import run_of

DecideApproval = Callable[[Run, float], Decision | None]


class ApprovalStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def decide(self, run_id: str, decision: DecideApproval) -> Run:
        """Apply `decision` to the run under its row lock; the updated run. A decision that raises (Conflict: the
        run is not waiting) writes nothing."""
        with self.db.write() as tx:
            row = tx.conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id).with_for_update()).first()
            if row is None:
                raise NotFound("run", run_id)
            run = run_of(row)
            found = decision(run, tx.now)
            if found is not None:
                self._persist(tx, run, found)
            updated = tx.conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id)).one()
        return run_of(updated)

    def due(self) -> list[str]:
        """Runs whose approval deadline passed. A read (the index on status, next_run_at), so an idle server does
        not take the write lock every housekeeping round."""
        q = (
            sa.select(t.runs.c.id)
            .where(t.runs.c.status == RunStatus.AWAITING_APPROVAL.value, t.runs.c.next_run_at <= self.db.clock())
            .order_by(t.runs.c.next_run_at)
            .limit(100)
        )
        with self.db.read() as conn:
            return [str(r) for r in conn.execute(q).scalars()]

    def _persist(self, tx: Tx, run: Run, decision: Decision) -> None:
        values = dict(decision.run)
        values.update(updated_at=tx.now, lease_owner=None, lease_expires_at=None, stalled_claims=0)
        tx.conn.execute(sa.update(t.runs).where(t.runs.c.id == run.id).values(values))
        new_status = values.get("status")
        if new_status is not None:
            # A rejection or a timeout ends the run: the statistics count it like any other end.
            stat_rows.record_run_move(
                tx, run, RunStatus(new_status), escalated=run.escalated, finished_at=values.get("finished_at")
            )
        if decision.step is not None:
            step = decision.step
            tx.conn.execute(
                sa.insert(t.steps).values(
                    run_id=run.id,
                    step_index=step["step_index"],
                    step_id=step["step_id"],
                    action=step["action"],
                    attempt=1,
                    status=step["status"].value,
                    started_at=step["started_at"],
                    finished_at=tx.now,
                    output=step["output"],
                    error=step["error"],
                    idempotency_key=f"{run.id}:{step['step_id']}:approval",
                )
            )
        tx.emit(decision.events)
