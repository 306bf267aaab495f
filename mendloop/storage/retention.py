"""Retention: deleting finished history in small batches, and the floor below which events may go.

`prune` deletes runs in a final state (domain/states.py RUN_FINAL: nothing can move them again) that finished
before a cutoff, with their steps, events, trust history and finished work orders (and those work orders'
diffs), a batch of runs per transaction so no lock is held for long. A run whose work order is still open is kept.
Queued, running, verifying and awaiting_patch runs are never touched. Events older than their own cutoff go too,
except those of runs still live.

The statistics survive: they are aggregates (storage/stats.py), not counts over these rows.

**The retention floor.** Whatever reads the events table by cursor (notification delivery, live streams) may
declare the lowest event id it still needs: a hook `Callable[[Connection], int | None]` (None: it needs nothing)
appended to `Retention.floors`. No event at or above the lowest floor is deleted. Built in: the
`notify_cursors` table (each target still needs the events after its `cursor`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain.states import RUN_FINAL, WORK_ORDER_FINAL
from mendloop.storage import schema as t
from mendloop.storage.db import Database

FloorHook = Callable[[Connection], int | None]
BATCH = 500
_FINAL_RUNS = [s.value for s in RUN_FINAL]
_FINAL_WORK_ORDERS = [s.value for s in WORK_ORDER_FINAL]


# A notification target whose row no process has touched for this long is no longer delivered by anyone (removed
# or renamed in the config: a delivering process renews its lease on the row every few seconds); its cursor must
# not hold back pruning for ever.
STALE_CURSOR_SECONDS = 7 * 86400


def notify_cursors_floor(conn: Connection, now: float) -> int | None:
    """The notification targets' cursors (storage/notify_cursor.py): each still needs the events after its own."""
    c = t.notify_cursors.c
    q = sa.select(sa.func.min(c.cursor)).where(c.updated_at >= now - STALE_CURSOR_SECONDS)
    low = conn.execute(q).scalar()
    return int(low) + 1 if low is not None else None


@dataclass
class PruneReport:
    runs: int = 0
    steps: int = 0
    events: int = 0
    trust_history: int = 0
    work_orders: int = 0
    diffs: int = 0
    audit: int = 0
    # The lowest event id a declared reader still needs (None: none declared one); no event at or above it went.
    event_floor: int | None = None
    dry_run: bool = False

    def add(self, other: PruneReport) -> None:
        for name in ("runs", "steps", "events", "trust_history", "work_orders", "diffs", "audit"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Retention:
    db: Database
    floors: list[FloorHook] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.floors.insert(0, lambda conn: notify_cursors_floor(conn, self.db.clock()))

    def floor(self, conn: Connection) -> int | None:
        found = [f for f in (hook(conn) for hook in self.floors) if f is not None]
        return min(found) if found else None

    def prune(
        self,
        *,
        runs_before: float | None,
        events_before: float | None = None,
        audit_before: float | None = None,
        dry_run: bool = False,
        batch: int = BATCH,
        max_batches: int | None = None,
    ) -> PruneReport:
        """Delete runs finished before `runs_before` (and what is theirs), and events created before
        `events_before`, and audit log rows written before `audit_before`; None leaves that kind alone.
        `dry_run` counts what would go and deletes nothing. `max_batches` bounds the transactions of each kind
        (the policy's housekeeping round must not hold up the other chores); the rest goes next time."""
        report = PruneReport(dry_run=dry_run)
        with self.db.read() as conn:
            report.event_floor = self.floor(conn)
        if dry_run:
            with self.db.read() as conn:
                report.add(self._count(conn, runs_before, events_before, report.event_floor))
                if audit_before is not None:
                    q = sa.select(sa.func.count()).select_from(t.audit_log).where(t.audit_log.c.at < audit_before)
                    report.audit = int(conn.execute(q).scalar_one())
            return report
        rounds = range(max_batches) if max_batches is not None else itertools.count()
        if runs_before is not None:
            for _ in rounds:
                part = self._prune_runs(runs_before, batch)
                report.add(part)
                if part.runs < batch:
                    break
        if events_before is not None:
            for _ in rounds:
                n = self._prune_events(events_before, batch)
                report.events += n
                if n < batch:
                    break
        if audit_before is not None:
            for _ in rounds:
                n = self._prune_audit(audit_before, batch)
                report.audit += n
                if n < batch:
                    break
        return report

    # -- what goes ---------------------------------------------------------------------------------------------

    @staticmethod
    def _old_runs(cutoff: float) -> sa.Select[tuple[str]]:
        r, w = t.runs.c, t.work_orders.c
        open_work = sa.exists().where(w.self_healing_run_id == r.id, w.status.not_in(_FINAL_WORK_ORDERS))
        return (
            sa.select(r.id).where(r.status.in_(_FINAL_RUNS), r.finished_at < cutoff, ~open_work).order_by(r.finished_at)
        )

    def _events_of(self, floor: int | None) -> sa.ColumnElement[bool]:
        return t.events.c.id < floor if floor is not None else sa.true()

    @staticmethod
    def _old_events(cutoff: float, floor: int | None) -> sa.ColumnElement[bool]:
        e, r = t.events.c, t.runs.c
        live_run = sa.exists().where(r.id == e.run_id, r.status.not_in(_FINAL_RUNS))
        cond = sa.and_(e.created_at < cutoff, sa.or_(e.run_id.is_(None), ~live_run))
        return sa.and_(cond, e.id < floor) if floor is not None else cond

    def _prune_runs(self, cutoff: float, batch: int) -> PruneReport:
        part = PruneReport()
        with self.db.write() as tx:
            ids = list(tx.conn.execute(self._old_runs(cutoff).limit(batch)).scalars())
            if not ids:
                return part
            floor = self.floor(tx.conn)
            w = t.work_orders.c
            wo_ids = list(
                tx.conn.execute(
                    sa.select(w.id).where(w.self_healing_run_id.in_(ids), w.status.in_(_FINAL_WORK_ORDERS))
                ).scalars()
            )
            c = tx.conn.execute
            part.diffs = c(sa.delete(t.diffs).where(t.diffs.c.work_order_id.in_(wo_ids))).rowcount if wo_ids else 0
            part.work_orders = c(sa.delete(t.work_orders).where(w.id.in_(wo_ids))).rowcount if wo_ids else 0
            part.steps = c(sa.delete(t.steps).where(t.steps.c.run_id.in_(ids))).rowcount
            part.trust_history = c(sa.delete(t.trust_history).where(t.trust_history.c.run_id.in_(ids))).rowcount
            part.events = c(sa.delete(t.events).where(t.events.c.run_id.in_(ids), self._events_of(floor))).rowcount
            part.runs = c(sa.delete(t.runs).where(t.runs.c.id.in_(ids))).rowcount
        return part

    def _prune_events(self, cutoff: float, batch: int) -> int:
        with self.db.write() as tx:
            floor = self.floor(tx.conn)
            ids = sa.select(t.events.c.id).where(self._old_events(cutoff, floor)).order_by(t.events.c.id).limit(batch)
            ids_list = list(tx.conn.execute(ids).scalars())
            if not ids_list:
                return 0
            return int(tx.conn.execute(sa.delete(t.events).where(t.events.c.id.in_(ids_list))).rowcount)

    def _prune_audit(self, cutoff: float, batch: int) -> int:
        # The audit log is kept by its own age (`retention.audit_days`): auditors usually want it longer.
        a = t.audit_log.c
        with self.db.write() as tx:
            ids = list(tx.conn.execute(sa.select(a.id).where(a.at < cutoff).order_by(a.id).limit(batch)).scalars())
            if not ids:
                return 0
            return int(tx.conn.execute(sa.delete(t.audit_log).where(a.id.in_(ids))).rowcount)

    def _count(
        self, conn: Connection, runs_before: float | None, events_before: float | None, floor: int | None
    ) -> PruneReport:
        part = PruneReport()

        def n(q: sa.Select[Any]) -> int:
            return int(conn.execute(sa.select(sa.func.count()).select_from(q.subquery())).scalar_one())

        if runs_before is not None:
            ids = self._old_runs(runs_before).order_by(None)
            w = t.work_orders.c
            wos = sa.select(w.id).where(w.self_healing_run_id.in_(ids), w.status.in_(_FINAL_WORK_ORDERS))
            part.runs = n(ids)
            part.work_orders = n(wos)
            part.diffs = n(sa.select(t.diffs.c.work_order_id).where(t.diffs.c.work_order_id.in_(wos)))
            part.steps = n(sa.select(t.steps.c.id).where(t.steps.c.run_id.in_(ids)))
            part.trust_history = n(sa.select(t.trust_history.c.id).where(t.trust_history.c.run_id.in_(ids)))
            part.events = n(sa.select(t.events.c.id).where(t.events.c.run_id.in_(ids), self._events_of(floor)))
        if events_before is not None:
            old = sa.select(t.events.c.id).where(self._old_events(events_before, floor))
            if runs_before is not None:
                # Not counted twice: the events of the runs counted above.
                old = old.where(
                    sa.or_(
                        t.events.c.run_id.is_(None),
                        t.events.c.run_id.not_in(self._old_runs(runs_before).order_by(None)),
                    )
                )
            part.events += n(old)
        return part
