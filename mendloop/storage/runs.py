"""Runs and their steps: create, claim by lease, advance, escalate, cancel, and the reads of the API.

Claims: `FOR UPDATE SKIP LOCKED` on PostgreSQL so many workers on many machines never take the same run; on
SQLite the write transaction (BEGIN IMMEDIATE) already serialises them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain import runs as decide
from mendloop.domain import stats
from mendloop.domain.list_totals import Total
from mendloop.domain.page_cursor import After
from mendloop.domain.records import NewEvent, Run, RunSummary, StepRecord, WorkOrder
from mendloop.domain.states import RUN_FINAL, WORK_ORDER_OPEN, RunStatus, StepStatus, WorkOrderStatus, check_run_move
from mendloop.domain.trust import TrustMove, TrustReason
from mendloop.errors import NotFound
from mendloop.storage import fixes
from mendloop.storage import schema as t
from mendloop.storage import stats as stat_rows
from mendloop.storage.db import Database, Tx
from mendloop.storage.incident_resolution import resolve_completed_in
from mendloop.storage.pages import RUNS_PAGE, newest_first
from mendloop.storage.row_counts import total_in
from mendloop.storage.rows import SUMMARY_COLUMNS, run_of, run_summary_of, step_of, work_order_of
from mendloop.storage.trust import TrustStore

_CLAIM_LOCK = sa.text("SELECT pg_advisory_xact_lock(7304815)")
_ACTIVE = [RunStatus.RUNNING.value, RunStatus.VERIFYING.value]


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """One step's result, committed together with the run's new position."""

    step_index: int
    step_id: str
    action: str
    attempt: int
    status: StepStatus
    started_at: float
    output: dict[str, Any]
    error: str | None
    idempotency_key: str


def _step_row(run_id: str, outcome: StepOutcome, finished_at: float) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "step_index": outcome.step_index,
        "step_id": outcome.step_id,
        "action": outcome.action,
        "attempt": outcome.attempt,
        "status": outcome.status.value,
        "started_at": outcome.started_at,
        "finished_at": finished_at,
        "output": outcome.output,
        "error": outcome.error,
        "idempotency_key": outcome.idempotency_key,
    }


class RunStore:
    def __init__(self, db: Database, trust: TrustStore) -> None:
        self.db = db
        self.trust = trust
        self._update_cache: dict[tuple[str, ...], sa.Update] = {}
        self._claim_cache: dict[bool, sa.Update] = {}

    # -- writes ---------------------------------------------------------------------------------------------

    def create(
        self,
        *,
        playbook: dict[str, Any],
        playbook_version: str,
        component: str | None,
        error_type: str | None,
        description: str,
        context: dict[str, Any],
        trigger: NewEvent | None,
        dedupe_key: str | None = None,
        message: str,
    ) -> tuple[Run, bool]:
        """Create a run (and its trigger event) in one transaction. With a dedupe key already used by a run, return
        that run instead; the flag says whether a new run was created."""
        with self.db.write() as tx:
            if dedupe_key is not None:
                existing = tx.conn.execute(sa.select(t.runs).where(t.runs.c.dedupe_key == dedupe_key)).first()
                if existing is not None:
                    return run_of(existing), False
            run = self.insert(
                tx,
                playbook=playbook,
                playbook_version=playbook_version,
                component=component,
                error_type=error_type,
                description=description,
                context=context,
                trigger=trigger,
                dedupe_key=dedupe_key,
                message=message,
            )
        return run, True

    def insert(
        self,
        tx: Tx,
        *,
        playbook: dict[str, Any],
        playbook_version: str,
        component: str | None,
        error_type: str | None,
        description: str,
        context: dict[str, Any],
        trigger: NewEvent | None,
        message: str,
        dedupe_key: str | None = None,
        incident_id: str | None = None,
        mutex_key: str | None = None,
        status: RunStatus = RunStatus.QUEUED,
        error: str | None = None,
        step_index: int = 0,
        outputs: dict[str, Any] | None = None,
        new_incident: bool = True,
    ) -> Run:
        """A new run inside the caller's transaction, with its trigger event and the incident's trust move (none for
        a retry, `new_incident=False`: the same incident is not counted twice)."""
        now = tx.now
        run_id = decide.run_id(now, tx.take_seq(decide.run_counter(now)))
        trigger_id: int | None = None
        if trigger is not None:
            trigger_id = tx.emit([dataclasses.replace(trigger, run_id=run_id)])[0].id
        row = {
            "id": run_id,
            "playbook_id": playbook["id"],
            "playbook_version": playbook_version,
            "playbook_type": playbook["type"],
            "playbook": playbook,
            "status": status.value,
            "component": component,
            "error_type": error_type,
            "description": description,
            "context": context,
            "step_index": step_index,
            "attempt": 0,
            "outputs": outputs or {},
            "pending": {},
            "escalated": False,
            "coding_work_order_id": None,
            "lease_owner": None,
            "lease_expires_at": None,
            "next_run_at": now,
            "created_at": now,
            "updated_at": now,
            "finished_at": now if status in RUN_FINAL else None,
            "error": error,
            "trigger_event_id": trigger_id,
            "dedupe_key": dedupe_key,
            "incident_id": incident_id,
            "mutex_key": mutex_key,
            "stalled_claims": 0,
        }
        tx.conn.execute(t.runs.insert(), row)
        stat_rows.record(tx, stats.run_created(playbook["id"], component, status, escalated=False, seconds=0.0))
        tx.emit(
            [
                decide.triggered_event(
                    run_id=run_id,
                    playbook_id=playbook["id"],
                    error_type=error_type,
                    incident_id=incident_id,
                    component=component,
                    message=message,
                )
            ]
        )
        if component and new_incident:
            self.trust.apply(tx, TrustMove(component, TrustReason.INCIDENT), run_id)
        return run_of(row)

    def retry(self, run_id: str, from_step: str) -> Run:
        """A new run from `from_step` of a run that ended without its fix (`domain.runs.retry`), in one transaction
        with a `run.retried` event on the old run's timeline."""
        with self.db.write() as tx:
            row = tx.conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id)).first()
            if row is None:
                raise NotFound("run", run_id)
            old = run_of(row)
            new = self.insert(tx, **decide.retry(old, from_step=from_step), trigger=None, new_incident=False)
            tx.emit([decide.retried_event(old, new.id, from_step)])
        return new

    def claim(self, owner: str, lease_seconds: float, *, max_concurrent: int = 0) -> Run | None:
        """Lease the next due run: a queued one whose time has come, or one whose lease lapsed. A run whose mutex
        key is held by a running run waits; with `max_concurrent`, no run starts while that many execute. Each
        claim counts on the run until it commits progress (`stalled_claims`)."""
        with self.db.write() as tx:
            now = tx.now
            params: dict[str, Any] = {"now": now, "owner": owner, "expires": now + lease_seconds}
            if max_concurrent:
                params["cap"] = max_concurrent
            if not self.db.is_sqlite:
                # The mutex and the cap read other runs' status: under READ COMMITTED two concurrent claims would
                # not see each other's uncommitted claim. Claims are short, so they take turns (SQLite's
                # BEGIN IMMEDIATE already does this); the claim statement then sees every committed claim.
                tx.conn.execute(_CLAIM_LOCK)
            row = tx.conn.execute(self._claim_stmt(capped=bool(max_concurrent)), params).first()
        return run_of(row) if row is not None else None

    def _claim_stmt(self, *, capped: bool) -> sa.Update:
        stmt = self._claim_cache.get(capped)
        if stmt is None:
            stmt = self._claim_cache[capped] = self._build_claim(capped)
        return stmt

    def _build_claim(self, capped: bool) -> sa.Update:
        now: sa.BindParameter[float] = sa.bindparam("now", type_=sa.Double())
        other = t.runs.alias("other")
        # Storm control: runs sharing a mutex key (a component) never execute at once; extra runs wait.
        conds: list[sa.ColumnElement[bool]] = [
            sa.or_(
                t.runs.c.mutex_key.is_(None),
                ~sa.exists().where(
                    other.c.mutex_key == t.runs.c.mutex_key, other.c.status.in_(_ACTIVE), other.c.id != t.runs.c.id
                ),
            )
        ]
        # Paused (by component, or all): a queued run waits for the resume. A lapsed lease is still re-claimed: that
        # run had started, and a crash must not leave it half done for the length of a pause.
        conds.append(~sa.exists().where(sa.or_(t.pauses.c.scope == "*", t.pauses.c.scope == t.runs.c.component)))
        if capped:
            running = sa.select(sa.func.count()).select_from(other).where(other.c.status.in_(_ACTIVE)).scalar_subquery()
            conds.append(running < sa.bindparam("cap", type_=sa.Integer()))
        # Two searches, each down its own index, instead of one OR: SQLite answers an OR of the two with a
        # MULTI-INDEX OR that gathers every queued run and sorts them (0.4 ms a claim at 1,000 queued, growing
        # with the backlog). A lapsed lease comes first (any one: only runs in flight are searched, no sort):
        # that run had started, and a crash must not leave it half done behind new work. SKIP LOCKED on
        # PostgreSQL; SQLite ignores it and serializes writers with BEGIN IMMEDIATE.
        lapsed = (
            sa.select(t.runs.c.id)
            .where(t.runs.c.status.in_(_ACTIVE), t.runs.c.lease_expires_at < now)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        queued = (
            sa.select(t.runs.c.id)
            .where(t.runs.c.status == RunStatus.QUEUED.value, t.runs.c.next_run_at <= now, *conds)
            .order_by(t.runs.c.next_run_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        due = sa.func.coalesce(lapsed, queued)
        return (
            sa.update(t.runs)
            .where(t.runs.c.id == due)
            .values(
                status=sa.case(
                    (t.runs.c.status == RunStatus.VERIFYING.value, RunStatus.VERIFYING.value),
                    else_=RunStatus.RUNNING.value,
                ),
                lease_owner=sa.bindparam("owner", type_=sa.String()),
                lease_expires_at=sa.bindparam("expires", type_=sa.Double()),
                stalled_claims=t.runs.c.stalled_claims + 1,
                updated_at=now,
            )
            .returning(*t.runs.c)
        )

    def _update_leased(self, keys: tuple[str, ...]) -> sa.Update:
        """UPDATE runs SET <keys> WHERE id = :_id AND lease_owner = :_owner, built once per set of keys:
        bound parameters keep SQLAlchemy from re-coercing every value on the hot path."""
        stmt = self._update_cache.get(keys)
        if stmt is None:
            stmt = (
                sa.update(t.runs)
                .where(t.runs.c.id == sa.bindparam("_id"), t.runs.c.lease_owner == sa.bindparam("_owner"))
                .values({k: sa.bindparam(k, type_=t.runs.c[k].type) for k in keys})
                .returning(t.runs.c.id)
            )
            self._update_cache[keys] = stmt
        return stmt

    def extend_lease(self, run_id: str, owner: str, until: float) -> bool:
        with self.db.write() as tx:
            n = tx.conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.lease_owner == owner)
                .values(lease_expires_at=until)
            ).rowcount
        return bool(n)

    def advance(
        self,
        run: Run,
        owner: str,
        *,
        outcome: StepOutcome | None,
        changes: dict[str, Any],
        events: Sequence[NewEvent] = (),
        trust: TrustMove | None = None,
        lease_seconds: float,
    ) -> Run | None:
        """Commit a step's outcome and the run's next position in one transaction, only while `owner` still
        holds the lease. Returns the updated run, or None when the lease was lost (someone else owns it now)."""
        now = self.db.clock()
        values = dict(changes)
        new_status = values.get("status")
        if new_status is not None:
            check_run_move(run.id, run.status, RunStatus(new_status))
            if RunStatus(new_status) in RUN_FINAL:
                values.setdefault("finished_at", now)
            if RunStatus(new_status) not in (RunStatus.RUNNING, RunStatus.VERIFYING):
                values["lease_owner"] = None
                values["lease_expires_at"] = None
        if "lease_owner" not in values:
            values["lease_expires_at"] = now + lease_seconds
        values["updated_at"] = now
        # Progress committed: the claim did not crash the worker, and an earlier crash's error is history.
        values.setdefault("stalled_claims", 0)
        values.setdefault("error", None)
        with self.db.write() as tx:
            # Only the id comes back: the run's large JSON columns (playbook, outputs) are not read again.
            found = tx.conn.execute(
                self._update_leased(tuple(sorted(values))), {**values, "_id": run.id, "_owner": owner}
            ).first()
            if found is None:
                tx.rollback()
                return None
            if outcome is not None:
                tx.conn.execute(t.steps.insert(), _step_row(run.id, outcome, now))
            if new_status is not None:
                stat_rows.record_run_move(
                    tx,
                    run,
                    RunStatus(new_status),
                    escalated=bool(values.get("escalated", run.escalated)),
                    finished_at=values.get("finished_at") or now,
                )
            if trust is not None:
                self.trust.apply(tx, trust, run.id)
            tx.emit(events)
            if values.get("status") == RunStatus.COMPLETED.value and run.incident_id:
                # A verified fix resolves the run's incident in the transaction that completes the run.
                resolve_completed_in(tx, dataclasses.replace(run, **{**values, "status": RunStatus.COMPLETED}))
            if new_status is not None and RunStatus(new_status) in RUN_FINAL:
                # What it did about its incident is remembered for the next work order of the same failure.
                fixes.record_in(tx, dataclasses.replace(run, **{**values, "status": RunStatus(new_status)}))
        if "status" in values:
            values["status"] = RunStatus(values["status"])
        return dataclasses.replace(run, **values)

    def record_crash(self, run_id: str, owner: str, error: str) -> None:
        """The worker crashed outside any step while it held this run: keep the error on the run and let its lease
        lapse now, so it is claimed again at once in the status it had (a verifying run stays verifying), while
        its `stalled_claims` keeps counting."""
        with self.db.write() as tx:
            tx.conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run_id, t.runs.c.lease_owner == owner, t.runs.c.status.in_(_ACTIVE))
                .values(lease_owner=None, lease_expires_at=0.0, updated_at=tx.now, error=error[:2000])
            )

    def escalate(
        self,
        run: Run,
        owner: str,
        *,
        outcome: StepOutcome,
        next_index: int,
        description: str,
        context: dict[str, Any],
        estimated_complexity: str,
        priority: str,
        repository: str | None = None,
        base_commit: str | None = None,
        max_attempts: int = 3,
        deadline_at: float | None = None,
    ) -> tuple[Run, WorkOrder] | None:
        """Create the work order and park the run in `awaiting_patch` in one transaction."""
        with self.db.write() as tx:
            now = tx.now
            wo_id = decide.work_order_id(now, tx.take_seq(decide.work_order_counter(now)))
            esc = decide.escalate(
                run,
                wo_id=wo_id,
                step_id=outcome.step_id,
                next_index=next_index,
                description=description,
                context=context,
                estimated_complexity=estimated_complexity,
                priority=priority,
                repository=repository,
                base_commit=base_commit,
                max_attempts=max_attempts,
                deadline_at=deadline_at,
                now=now,
            )
            row = tx.conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run.id, t.runs.c.lease_owner == owner)
                .values(esc.run)
                .returning(*t.runs.c)
            ).first()
            if row is None:
                tx.rollback()
                return None
            tx.conn.execute(sa.insert(t.work_orders).values(esc.work_order))
            stat_rows.record(tx, stats.run_escalated(run.playbook_id, run.component))
            step = dataclasses.replace(
                outcome, status=StepStatus.SUCCEEDED, output={"work_order_id": wo_id}, error=None
            )
            tx.conn.execute(sa.insert(t.steps).values(_step_row(run.id, step, now)))
            tx.emit(esc.events)
        return run_of(row), work_order_of(esc.work_order)

    def release_leases_of(self, owners: Sequence[str]) -> int:
        """Give back the runs held by workers known to be dead, so they resume now rather than at lease expiry."""
        if not owners:
            return 0
        with self.db.write() as tx:
            n = tx.conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.lease_owner.in_(list(owners)), t.runs.c.status.in_(_ACTIVE))
                .values(status=RunStatus.QUEUED.value, lease_owner=None, lease_expires_at=None, next_run_at=tx.now)
            ).rowcount
        return int(n)

    def stopped(self, held: Mapping[str, str]) -> set[str]:
        """Of `held` (run id -> the owner executing it), the runs that owner no longer holds or that were
        cancelled, in ONE query: the worker pool's cancel watcher asks every second for all its runs at once."""
        if not held:
            return set()
        q = sa.select(t.runs.c.id, t.runs.c.lease_owner, t.runs.c.status).where(t.runs.c.id.in_(list(held)))
        with self.db.read() as conn:
            rows = conn.execute(q).all()
        kept = {r.id for r in rows if r.lease_owner == held[r.id] and r.status != RunStatus.CANCELLED.value}
        return set(held) - kept

    def record_cancelled_step(self, run_id: str, outcome: StepOutcome, events: Sequence[NewEvent]) -> bool:
        """Keep the step a cancel stopped, and say so on the timeline, once the run is cancelled: the cancel
        released the lease, so `advance` cannot. False (nothing kept) when the run is not cancelled: its lease
        was lost to another worker instead, which runs the step again."""
        with self.db.write() as tx:
            status = tx.conn.execute(sa.select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar()
            if status != RunStatus.CANCELLED.value:
                tx.rollback()
                return False
            tx.conn.execute(t.steps.insert(), _step_row(run_id, outcome, tx.now))
            tx.emit(events)
        return True

    def cancel(self, run_id: str, reason: str) -> Run:
        with self.db.write() as tx:
            row = tx.conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id)).first()
            if row is None:
                raise NotFound("run", run_id)
            run = run_of(row)
            changes, work_order, events = decide.cancel(run, reason=reason, now=tx.now)
            updated = tx.conn.execute(
                sa.update(t.runs).where(t.runs.c.id == run_id).values(changes).returning(*t.runs.c)
            ).one()
            cancelled = run_of(updated)
            stat_rows.record_run_move(
                tx, run, cancelled.status, escalated=cancelled.escalated, finished_at=cancelled.finished_at
            )
            if run.coding_work_order_id:
                # Only an open work order is cancelled, so it leaves no final state (no patch time to take back).
                wo_row = tx.conn.execute(
                    sa.update(t.work_orders)
                    .where(
                        t.work_orders.c.id == run.coding_work_order_id,
                        t.work_orders.c.status.in_([s.value for s in WORK_ORDER_OPEN]),
                    )
                    .values(work_order)
                    .returning(t.work_orders.c.playbook_id, t.work_orders.c.component)
                ).first()
                if wo_row is not None:
                    stat_rows.record(
                        tx,
                        stats.work_order_moved(
                            wo_row.playbook_id,
                            wo_row.component,
                            WorkOrderStatus.QUEUED,
                            WorkOrderStatus.CANCELLED,
                            old_seconds=None,
                            new_seconds=None,
                        ),
                    )
            tx.emit(events)
        return cancelled

    # -- reads ----------------------------------------------------------------------------------------------

    def next_due_at(self) -> float | None:
        q = sa.select(sa.func.min(t.runs.c.next_run_at)).where(t.runs.c.status == RunStatus.QUEUED.value)
        with self.db.read() as conn:
            value = conn.execute(q).scalar()
        return float(value) if value is not None else None

    def lease_owners(self) -> list[str]:
        q = sa.select(t.runs.c.lease_owner).where(t.runs.c.lease_owner.is_not(None)).distinct()
        with self.db.read() as conn:
            return [str(o) for o in conn.execute(q).scalars()]

    def get(self, run_id: str) -> Run:
        with self.db.read() as conn:
            row = conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id)).first()
        if row is None:
            raise NotFound("run", run_id)
        return run_of(row)

    def status(self, run_id: str) -> RunStatus:
        with self.db.read() as conn:
            value = conn.execute(sa.select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar()
        if value is None:
            raise NotFound("run", run_id)
        return RunStatus(value)

    def find(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[RunSummary], int]:
        runs, total, _ = self.page(status=status, limit=limit, offset=offset)
        return runs, total.n

    def page(
        self,
        *,
        status: str | None = None,
        playbook_id: str | None = None,
        component: str | None = None,
        after: After | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[RunSummary], Total, str | None]:
        """Newest first (created_at, id), from a cursor: the runs, how many match (storage/row_counts.py), the next
        page's cursor. Each filter alone walks its own index (status, playbook_id or component, then created_at and
        id)."""
        q = self._filtered(status, playbook_id, component)
        with self.db.read() as conn:
            rows, cursor = self._newest(conn, q, after, limit, offset)
            filters = {"status": status, "playbook_id": playbook_id, "component": component}
            total = total_in(conn, "runs", filters, q)
        return [run_summary_of(r) for r in rows], total, cursor

    def newest(
        self,
        *,
        status: str | None = None,
        playbook_id: str | None = None,
        component: str | None = None,
        after: After | None = None,
        limit: int = 50,
    ) -> tuple[list[RunSummary], str | None]:
        """`page` without the count of matching runs, the one part of it that grows with history (the
        dashboard's Runs tab, whose keyset pages need none)."""
        q = self._filtered(status, playbook_id, component)
        with self.db.read() as conn:
            rows, cursor = self._newest(conn, q, after, limit, 0)
        return [run_summary_of(r) for r in rows], cursor

    @staticmethod
    def _filtered(status: str | None, playbook_id: str | None, component: str | None) -> sa.Select[Any]:
        q = sa.select(*SUMMARY_COLUMNS)
        for column, value in (
            (t.runs.c.status, status),
            (t.runs.c.playbook_id, playbook_id),
            (t.runs.c.component, component),
        ):
            if value:
                q = q.where(column == value)
        return q

    @staticmethod
    def _newest(
        conn: Connection, q: sa.Select[Any], after: After | None, limit: int, offset: int
    ) -> tuple[Sequence[sa.Row[Any]], str | None]:
        return newest_first(
            conn,
            q,
            kind=RUNS_PAGE,
            key=t.runs.c.created_at,
            item_id=t.runs.c.id,
            after=after,
            limit=limit,
            offset=offset,
        )

    def steps(self, run_id: str) -> list[StepRecord]:
        q = sa.select(t.steps).where(t.steps.c.run_id == run_id).order_by(t.steps.c.id)
        with self.db.read() as conn:
            return [step_of(r) for r in conn.execute(q)]
