"""The work order queue behind the pull API: claim by lease, heartbeat, fail, and the reaper that returns lapsed
leases to the queue and fails work orders past their attempts or deadline. Same dialect rules as the Store:
`FOR UPDATE SKIP LOCKED` on PostgreSQL, one writer at a time on SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain.records import EventRecord, NewEvent, WorkOrder
from mendloop.domain.states import (
    RUN_FINAL,
    RunStatus,
    WorkOrderStatus,
    check_run_move,
    check_work_order_move,
)
from mendloop.errors import Conflict, NotFound
from mendloop.storage import schema as t
from mendloop.storage.store import Store, _run, _work_order


class WorkOrderQueue:
    def __init__(self, store: Store) -> None:
        self.store = store

    def claim(self, agent_id: str, *, repository: str | None, lease_seconds: float) -> WorkOrder | None:
        now = self.store.clock()
        lease_id = uuid.uuid4().hex
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
        with self.store._tx() as (conn, published):
            row = conn.execute(
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
            wo = _work_order(row)
            self.store._events(
                conn,
                published,
                [
                    NewEvent(
                        type="coding_agent.work_order_updated",
                        message=f"Coding agent {agent_id} analyzing work order {wo.id} (attempt {wo.attempts})",
                        payload={"status": wo.status.value, "agent_id": agent_id, "attempt": wo.attempts},
                        run_id=wo.self_healing_run_id,
                        work_order_id=wo.id,
                        component=wo.component,
                    )
                ],
            )
        return wo

    def heartbeat(self, wo_id: str, lease_id: str, *, note: str | None, lease_seconds: float) -> WorkOrder:
        now = self.store.clock()
        with self.store._tx() as (conn, _):
            wo = self._locked(conn, wo_id)
            self._check_lease(wo, lease_id, required=True, now=now)
            values: dict[str, Any] = {"lease_expires_at": now + lease_seconds, "updated_at": now}
            if note is not None:
                values["note"] = note
            row = conn.execute(
                sa.update(t.work_orders).where(t.work_orders.c.id == wo_id).values(values).returning(*t.work_orders.c)
            ).one()
        return _work_order(row)

    def fail(
        self,
        wo_id: str,
        *,
        lease_id: str | None,
        reason: str,
        retryable: bool,
        details: dict[str, Any],
        run_status: RunStatus,
    ) -> WorkOrder:
        now = self.store.clock()
        with self.store._tx() as (conn, published):
            wo = self._locked(conn, wo_id)
            self._check_lease(wo, lease_id, required=wo.lease_id is not None, now=now)
            requeue = retryable and wo.attempts < wo.max_attempts and not _past(wo.deadline_at, now)
            if requeue:
                check_work_order_move(wo.id, wo.status, WorkOrderStatus.QUEUED)
                self._requeue(
                    conn,
                    published,
                    wo,
                    now=now,
                    note=f"{reason}: {details.get('message', '')}".strip(": "),
                    message=f"Work order {wo.id} back in the queue after {reason} (attempt {wo.attempts})",
                    payload={"status": "queued", "reason": reason, "details": details},
                )
            else:
                self.fail_locked(conn, published, wo, reason=reason, details=details, run_status=run_status, now=now)
            row = conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id)).one()
        return _work_order(row)

    def fail_locked(
        self,
        conn: Connection,
        published: list[EventRecord],
        wo: WorkOrder,
        *,
        reason: str,
        details: dict[str, Any],
        run_status: RunStatus,
        now: float,
    ) -> None:
        """Fail a work order for good and stop its parked run, inside the caller's transaction."""
        check_work_order_move(wo.id, wo.status, WorkOrderStatus.FAILED)
        conn.execute(
            sa.update(t.work_orders)
            .where(t.work_orders.c.id == wo.id)
            .values(
                status=WorkOrderStatus.FAILED.value,
                fail_reason=reason,
                lease_id=None,
                lease_owner=None,
                lease_expires_at=None,
                completed_at=now,
                updated_at=now,
                patch_result={**(wo.patch_result or {}), "failure": {"reason": reason, **details}},
            )
        )
        events = [
            NewEvent(
                type="coding_agent.work_order_updated",
                message=f"Work order {wo.id} failed: {reason}"
                + (f" ({details['message']})" if details.get("message") else ""),
                payload={"status": "failed", "reason": reason, "details": details},
                run_id=wo.self_healing_run_id,
                work_order_id=wo.id,
                component=wo.component,
            )
        ]
        if wo.self_healing_run_id:
            run_row = conn.execute(sa.select(t.runs).where(t.runs.c.id == wo.self_healing_run_id)).first()
            if run_row is not None and RunStatus(run_row.status) is RunStatus.AWAITING_PATCH:
                run = _run(run_row)
                check_run_move(run.id, run.status, run_status)
                conn.execute(
                    sa.update(t.runs)
                    .where(t.runs.c.id == run.id)
                    .values(
                        status=run_status.value,
                        finished_at=now if run_status in RUN_FINAL else None,
                        updated_at=now,
                        error=f"work order {wo.id} failed: {reason}",
                    )
                )
                events.append(
                    NewEvent(
                        type="self_healing.completed",
                        message=f"Run {run.id} → {run_status.value}: work order {wo.id} failed ({reason})",
                        payload={"status": run_status.value, "playbook_id": run.playbook_id, "escalated": True},
                        run_id=run.id,
                        work_order_id=wo.id,
                        component=run.component,
                    )
                )
        self.store._events(conn, published, events)

    def settle_held(self, wo_id: str, *, patch_output: dict[str, Any]) -> WorkOrder:
        """The run's patch pipeline applied the agent's diff: the held work order completes."""
        now = self.store.clock()
        with self.store._tx() as (conn, published):
            wo = self._locked(conn, wo_id)
            if wo.status is WorkOrderStatus.COMPLETED:
                return wo
            check_work_order_move(wo.id, wo.status, WorkOrderStatus.COMPLETED)
            row = conn.execute(
                sa.update(t.work_orders)
                .where(t.work_orders.c.id == wo_id)
                .values(
                    status=WorkOrderStatus.COMPLETED.value,
                    lease_id=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    completed_at=now,
                    updated_at=now,
                    patch_result={**(wo.patch_result or {}), "applied": patch_output},
                )
                .returning(*t.work_orders.c)
            ).one()
            self.store._events(
                conn,
                published,
                [
                    NewEvent(
                        type="coding_agent.work_order_updated",
                        message=f"Work order {wo.id} completed: its patch passed the checks and the tests",
                        payload={"status": "completed", "applied": patch_output},
                        run_id=wo.self_healing_run_id,
                        work_order_id=wo.id,
                        component=wo.component,
                    )
                ],
            )
        return _work_order(row)

    def mark_failed(self, wo_id: str, *, reason: str, details: dict[str, Any]) -> WorkOrder:
        """Fail a work order whose run is not parked (the run decides its own fate), e.g. when verification
        overrules a completed patch or the patch pipeline rejects a held diff."""
        now = self.store.clock()
        with self.store._tx() as (conn, published):
            wo = self._locked(conn, wo_id)
            if wo.status is WorkOrderStatus.FAILED:
                return wo
            self.fail_locked(
                conn, published, wo, reason=reason, details=details, run_status=RunStatus.NEEDS_HUMAN, now=now
            )
            row = conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id)).one()
        return _work_order(row)

    def reap(self, run_status: RunStatus = RunStatus.NEEDS_HUMAN) -> list[str]:
        """Return lapsed leases to the queue; fail work orders out of attempts or past their deadline."""
        now = self.store.clock()
        touched: list[str] = []
        with self.store._tx() as (conn, published):
            rows = conn.execute(
                sa.select(t.work_orders)
                .where(
                    sa.or_(
                        sa.and_(
                            t.work_orders.c.status == WorkOrderStatus.IN_PROGRESS.value,
                            t.work_orders.c.lease_expires_at < now,
                        ),
                        sa.and_(
                            t.work_orders.c.status.in_(
                                [WorkOrderStatus.QUEUED.value, WorkOrderStatus.IN_PROGRESS.value]
                            ),
                            t.work_orders.c.deadline_at < now,
                        ),
                    )
                )
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                wo = _work_order(row)
                touched.append(wo.id)
                if _past(wo.deadline_at, now):
                    self.fail_locked(
                        conn,
                        published,
                        wo,
                        reason="timeout",
                        details={"message": "deadline passed"},
                        run_status=run_status,
                        now=now,
                    )
                elif wo.attempts >= wo.max_attempts:
                    self.fail_locked(
                        conn,
                        published,
                        wo,
                        reason="timeout",
                        details={"message": f"lease lapsed on the last of {wo.max_attempts} attempts"},
                        run_status=run_status,
                        now=now,
                    )
                else:
                    self._requeue(
                        conn,
                        published,
                        wo,
                        now=now,
                        note=None,
                        message=f"Work order {wo.id} back in the queue: {wo.lease_owner}'s lease lapsed",
                        payload={"status": "queued", "reason": "lease_lapsed"},
                    )
        return touched

    def _requeue(
        self,
        conn: Connection,
        published: list[EventRecord],
        wo: WorkOrder,
        *,
        now: float,
        note: str | None,
        message: str,
        payload: dict[str, Any],
    ) -> None:
        """Back in the queue for the next agent: the lease is dropped, the attempt stays counted."""
        values: dict[str, Any] = {
            "status": WorkOrderStatus.QUEUED.value,
            "lease_id": None,
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if note is not None:
            values["note"] = note
        conn.execute(sa.update(t.work_orders).where(t.work_orders.c.id == wo.id).values(values))
        self.store._events(
            conn,
            published,
            [
                NewEvent(
                    type="coding_agent.work_order_updated",
                    message=message,
                    payload=payload,
                    run_id=wo.self_healing_run_id,
                    work_order_id=wo.id,
                    component=wo.component,
                )
            ],
        )

    def _locked(self, conn: Connection, wo_id: str) -> WorkOrder:
        row = conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id).with_for_update()).first()
        if row is None:
            raise NotFound("work order", wo_id)
        return _work_order(row)

    @staticmethod
    def _check_lease(wo: WorkOrder, lease_id: str | None, *, required: bool, now: float) -> None:
        check_lease(wo, lease_id, required=required, now=now)


def check_lease(wo: WorkOrder, lease_id: str | None, *, required: bool, now: float) -> None:
    """A leased work order answers only to its current lease; an unleased one accepts no lease id."""
    if wo.lease_id is None:
        if required or lease_id is not None:
            raise Conflict(f"work order {wo.id} holds no lease (it is {wo.status})", id=wo.id, status=str(wo.status))
        return
    if lease_id is None:
        raise Conflict(f"work order {wo.id} is leased to {wo.lease_owner}; send its lease_id", id=wo.id)
    if lease_id != wo.lease_id or _past(wo.lease_expires_at, now):
        raise Conflict(f"lease {lease_id} on work order {wo.id} is stale", id=wo.id, status=str(wo.status))


def _past(ts: float | None, now: float) -> bool:
    return ts is not None and ts < now


__all__: Sequence[str] = ("WorkOrderQueue", "check_lease")
