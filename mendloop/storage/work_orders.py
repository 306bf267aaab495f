"""Work orders: the queue behind the pull API (claim by lease, heartbeat), the diffs, and `change`, which
persists a decision of `domain.work_orders` with the work order and its run locked.

Same dialect rules as runs: `FOR UPDATE SKIP LOCKED` on PostgreSQL, one writer at a time on SQLite.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import sqlalchemy as sa

from mendloop.domain import stats
from mendloop.domain import work_orders as decide
from mendloop.domain.list_totals import CAP, Total
from mendloop.domain.page_cursor import After
from mendloop.domain.records import Run, WorkOrder
from mendloop.domain.states import RunStatus, WorkOrderStatus
from mendloop.domain.work_orders import Transition
from mendloop.errors import Conflict, InputError, MendloopError, NotFound
from mendloop.storage import schema as t
from mendloop.storage import stats as stat_rows
from mendloop.storage.db import Database, Tx
from mendloop.storage.pages import WORK_ORDERS_PAGE, newest_first
from mendloop.storage.row_counts import total_in
from mendloop.storage.rows import run_of, work_order_of

# A decision: the locked work order, its run (if any) and the transaction's time → what changes.
Decide = Callable[[WorkOrder, Run | None, float], Transition]


def _column_values(changes: dict[str, Any]) -> dict[str, Any]:
    """A decision's changes as column values: statuses (of work orders and runs) stored by their value."""
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in changes.items()}


class WorkOrderStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- the pull API ---------------------------------------------------------------------------------------

    def repository_of(self, wo_id: str) -> str | None:
        """The repository a work order is for (None: it names none); NotFound when there is no such work order."""
        with self.db.read() as conn:
            row = conn.execute(sa.select(t.work_orders.c.repository).where(t.work_orders.c.id == wo_id)).first()
        if row is None:
            raise NotFound("work order", wo_id)
        return None if row.repository is None else str(row.repository)

    def repository_of_run(self, run_id: str) -> tuple[bool, str | None]:
        """Whether the run has a work order, and that work order's repository (None: it names none), in one read;
        NotFound when there is no such run."""
        r, w = t.runs.c, t.work_orders.c
        q = (
            sa.select(r.coding_work_order_id, w.repository)
            .select_from(t.runs.outerjoin(t.work_orders, w.id == r.coding_work_order_id))
            .where(r.id == run_id)
        )
        with self.db.read() as conn:
            row = conn.execute(q).first()
        if row is None:
            raise NotFound("run", run_id)
        return row.coding_work_order_id is not None, None if row.repository is None else str(row.repository)

    def claim(
        self,
        agent_id: str,
        *,
        repository: str | None,
        lease_seconds: float,
        repositories: Sequence[str] | None = None,
    ) -> WorkOrder | None:
        """`repositories`: the agent token's scope (None: any), so only work orders of those repositories."""
        lease_id = uuid.uuid4().hex
        with self.db.write() as tx:
            now = tx.now
            q = (
                sa.select(t.work_orders.c.id)
                .where(
                    t.work_orders.c.status == WorkOrderStatus.QUEUED.value,
                    t.work_orders.c.cancel_requested.is_(False),
                    sa.or_(t.work_orders.c.deadline_at.is_(None), t.work_orders.c.deadline_at > now),
                )
                .order_by(t.work_orders.c.created_at, t.work_orders.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if repository:
                q = q.where(sa.or_(t.work_orders.c.repository == repository, t.work_orders.c.repository.is_(None)))
            if repositories is not None:
                q = q.where(t.work_orders.c.repository.in_(list(repositories)))
            row = tx.conn.execute(
                sa.update(t.work_orders)
                .where(t.work_orders.c.id == q.scalar_subquery())
                .values(
                    status=WorkOrderStatus.IN_PROGRESS.value,
                    lease_id=lease_id,
                    lease_owner=agent_id,
                    lease_expires_at=now + lease_seconds,
                    attempts=t.work_orders.c.attempts + 1,
                    updated_at=now,
                )
                .returning(*t.work_orders.c)
            ).first()
            if row is None:
                return None
            wo = work_order_of(row)
            tx.emit([decide.claimed_event(wo, agent_id)])
        return wo

    def heartbeat(self, wo_id: str, lease_id: str, *, note: str | None, lease_seconds: float) -> WorkOrder:
        with self.db.write() as tx:
            wo = self._locked(tx, wo_id)
            decide.check_lease(wo, lease_id, required=True, now=tx.now)
            values: dict[str, Any] = {"lease_expires_at": tx.now + lease_seconds, "updated_at": tx.now}
            if note is not None:
                values["note"] = note
            row = tx.conn.execute(
                sa.update(t.work_orders).where(t.work_orders.c.id == wo_id).values(values).returning(*t.work_orders.c)
            ).one()
        return work_order_of(row)

    # -- decisions ------------------------------------------------------------------------------------------

    def change(
        self,
        wo_id: str,
        decision: Decide,
        *,
        idempotency_key: str | None = None,
        request: str | None = None,
        scope: str = "complete",
    ) -> tuple[Transition, WorkOrder]:
        """Lock the work order and its run, take the decision, persist what it returns, in one transaction: a
        compare-and-set, so of concurrent callers exactly one moves the work order and the others decide on what
        it became. With an idempotency key, `request` (a digest of the request) is kept with the answer: the same
        key and request get the first answer again (a refusal included), the same key with another request is
        an InputError."""
        key_scope = f"{scope}:{wo_id}"
        try:
            with self.db.write() as tx:
                # The lock first: a concurrent request with the same key waits here, then finds its answer.
                wo = self._locked(tx, wo_id)
                if idempotency_key:
                    prior = tx.conn.execute(
                        sa.select(t.idempotency.c.response).where(
                            t.idempotency.c.scope == key_scope, t.idempotency.c.key == idempotency_key
                        )
                    ).scalar()
                    if prior is not None:
                        return _replayed(dict(prior), request, idempotency_key), wo
                run = self._run_of(tx, wo)
                transition = decision(wo, run, tx.now)
                self.persist(tx, wo, run, transition)
                if idempotency_key and transition.answer is not None:
                    tx.conn.execute(
                        sa.insert(t.idempotency).values(
                            scope=key_scope,
                            key=idempotency_key,
                            response={"request": request, "answer": transition.answer},
                            created_at=tx.now,
                        )
                    )
                updated = self._get(tx, wo_id)
        except _Replay as replay:
            raise replay.error from None
        except (Conflict, InputError) as exc:
            if idempotency_key:
                self._remember_refusal(key_scope, idempotency_key, request, exc)
            raise
        return transition, updated

    def _remember_refusal(self, scope: str, key: str, request: str | None, exc: Conflict | InputError) -> None:
        """A refused request's key keeps the refusal, so its retry is refused the same way, whatever happened
        since (the transaction that refused it wrote nothing)."""
        refusal: dict[str, Any] = {
            "kind": "input" if isinstance(exc, InputError) else "conflict",
            "message": exc.message,
            "fields": exc.fields,
        }
        with self.db.write() as tx:
            tx.conn.execute(
                self.db.insert(t.idempotency)
                .values(scope=scope, key=key, response={"request": request, "refusal": refusal}, created_at=tx.now)
                .on_conflict_do_nothing()
            )

    def persist(self, tx: Tx, wo: WorkOrder, run: Run | None, transition: Transition) -> None:
        if transition.work_order:
            tx.conn.execute(
                sa.update(t.work_orders)
                .where(t.work_orders.c.id == wo.id)
                .values(_column_values(transition.work_order))
            )
        if transition.run and run is not None:
            tx.conn.execute(sa.update(t.runs).where(t.runs.c.id == run.id).values(_column_values(transition.run)))
        if transition.diff:
            tx.conn.execute(
                self.db.insert(t.diffs)
                .values(work_order_id=wo.id, diff=transition.diff, created_at=tx.now)
                .on_conflict_do_update(
                    index_elements=["work_order_id"], set_={"diff": transition.diff, "created_at": tx.now}
                )
            )
        stat_rows.record(tx, _deltas(wo, run, transition, tx.now))
        tx.emit(transition.events)

    def reap(self, decision: Decide) -> list[str]:
        """Apply `decision` to every work order whose lease lapsed or whose deadline passed. The search is a read,
        so an idle server doesn't take the write lock every second."""
        now = self.db.clock()
        due = sa.or_(
            sa.and_(
                t.work_orders.c.status == WorkOrderStatus.IN_PROGRESS.value,
                t.work_orders.c.lease_expires_at < sa.bindparam("now"),
            ),
            sa.and_(
                t.work_orders.c.status.in_([WorkOrderStatus.QUEUED.value, WorkOrderStatus.IN_PROGRESS.value]),
                t.work_orders.c.deadline_at < sa.bindparam("now"),
            ),
        )
        with self.db.read() as conn:
            if conn.execute(sa.select(t.work_orders.c.id).where(due).limit(1), {"now": now}).first() is None:
                return []
        touched: list[str] = []
        with self.db.write() as tx:
            rows = tx.conn.execute(
                sa.select(t.work_orders).where(due).with_for_update(skip_locked=True), {"now": tx.now}
            ).all()
            for row in rows:
                wo = work_order_of(row)
                if not decide.needs_reaping(wo, tx.now):
                    continue
                touched.append(wo.id)
                run = self._run_of(tx, wo)
                self.persist(tx, wo, run, decision(wo, run, tx.now))
        return touched

    # -- reads ----------------------------------------------------------------------------------------------

    def get(self, wo_id: str) -> WorkOrder:
        with self.db.read() as conn:
            row = conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id)).first()
        if row is None:
            raise NotFound("work order", wo_id)
        return work_order_of(row)

    def find(
        self, *, status: str | None = None, run_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[WorkOrder], int]:
        found, total, _ = self.page(status=status, run_id=run_id, limit=limit, offset=offset)
        return found, total.n

    def page(
        self,
        *,
        status: str | None = None,
        run_id: str | None = None,
        after: After | None = None,
        limit: int = 50,
        offset: int = 0,
        repositories: Sequence[str] | None = None,
    ) -> tuple[list[WorkOrder], Total, str | None]:
        """Newest first (created_at, id), from a cursor: the work orders, how many match (storage/row_counts.py),
        the next cursor. `repositories`: an agent token's scope (None: every work order), as a claim applies it."""
        q = sa.select(t.work_orders)
        conds = []
        if status:
            conds.append(t.work_orders.c.status == status)
        if run_id:
            conds.append(t.work_orders.c.self_healing_run_id == run_id)
        if repositories is not None:
            conds.append(t.work_orders.c.repository.in_(list(repositories)))
        if conds:
            q = q.where(*conds)
        with self.db.read() as conn:
            rows, cursor = newest_first(
                conn,
                q,
                kind=WORK_ORDERS_PAGE,
                key=t.work_orders.c.created_at,
                item_id=t.work_orders.c.id,
                after=after,
                limit=limit,
                offset=offset,
            )
            # A scope is a set of repositories, which no kept count answers: it is counted up to the cap.
            scoped = "scope:" + ",".join(repositories) if repositories is not None else None
            filters = {"status": status, "self_healing_run_id": run_id, "repository_scope": scoped}
            total = total_in(conn, "work_orders", filters, q)
        return [work_order_of(r) for r in rows], total, cursor

    def counts_in_scope(self, repositories: Sequence[str], cap: int = CAP) -> dict[str, int]:
        """Work orders by status among `repositories` (an agent token's scope), over at most `cap` + 1 of them, as
        the scoped list's total is counted."""
        scoped = (
            sa.select(t.work_orders.c.status)
            .where(t.work_orders.c.repository.in_(list(repositories)))
            .limit(cap + 1)
            .subquery()
        )
        with self.db.read() as conn:
            rows = conn.execute(sa.select(scoped.c.status, sa.func.count()).group_by(scoped.c.status)).all()
        return {str(status): int(n) for status, n in rows}

    def diff(self, wo_id: str) -> str:
        with self.db.read() as conn:
            value = conn.execute(sa.select(t.diffs.c.diff).where(t.diffs.c.work_order_id == wo_id)).scalar()
        if value is None:
            raise NotFound("diff", wo_id)
        return str(value)

    def _locked(self, tx: Tx, wo_id: str) -> WorkOrder:
        row = tx.conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id).with_for_update()).first()
        if row is None:
            raise NotFound("work order", wo_id)
        return work_order_of(row)

    def _get(self, tx: Tx, wo_id: str) -> WorkOrder:
        row = tx.conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id)).first()
        if row is None:
            raise NotFound("work order", wo_id)
        return work_order_of(row)

    @staticmethod
    def _run_of(tx: Tx, wo: WorkOrder) -> Run | None:
        if not wo.self_healing_run_id:
            return None
        row = tx.conn.execute(sa.select(t.runs).where(t.runs.c.id == wo.self_healing_run_id).with_for_update()).first()
        return run_of(row) if row is not None else None


def _deltas(wo: WorkOrder, run: Run | None, transition: Transition, now: float) -> list[stats.Delta]:
    """What a persisted decision moves in the statistics: the work order's status, and its run's."""
    deltas: list[stats.Delta] = []
    wo_changes = transition.work_order or {}
    if "status" in wo_changes:
        completed_at = wo_changes.get("completed_at", wo.completed_at)
        deltas += stats.work_order_moved(
            wo.playbook_id,
            wo.component,
            wo.status,
            WorkOrderStatus(wo_changes["status"]),
            old_seconds=wo.completed_at - wo.created_at if wo.completed_at is not None else None,
            new_seconds=(completed_at if completed_at is not None else now) - wo.created_at,
        )
    run_changes = transition.run or {}
    if run is not None and "status" in run_changes:
        deltas += stats.run_moved(
            run.playbook_id,
            run.component,
            run.status,
            RunStatus(run_changes["status"]),
            escalated=bool(run_changes.get("escalated", run.escalated)),
            seconds=float(run_changes.get("finished_at") or now) - run.created_at,
        )
    return deltas


class _Replay(Exception):
    """Carries a stored refusal out of the transaction without recording it again."""

    def __init__(self, error: MendloopError) -> None:
        super().__init__(error.message)
        self.error = error


def _replayed(stored: dict[str, Any], request: str | None, key: str) -> Transition:
    if "answer" not in stored and "refusal" not in stored:
        return Transition(answer=stored)  # kept before requests were recorded with their key
    if stored.get("request") != request:
        raise _Replay(
            InputError(
                f"Idempotency-Key {key!r} was used for another request; send a new key for a new request",
                field="Idempotency-Key",
            )
        )
    refusal = stored.get("refusal")
    if refusal is not None:
        fields = dict(refusal.get("fields") or {})
        if refusal.get("kind") == "input":
            field = fields.pop("field", None)
            raise _Replay(InputError(str(refusal["message"]), field=field, **fields))
        raise _Replay(Conflict(str(refusal["message"]), **fields))
    return Transition(answer=dict(stored["answer"]))
