"""Every database operation, named by intent, written once for SQLite and PostgreSQL.

Dialect differences live here and only here: SQLite gets WAL, a busy timeout and `BEGIN IMMEDIATE` for writes
(one writer at a time, so a claim can never interleave with another); PostgreSQL claims with
`FOR UPDATE SKIP LOCKED` so many workers on many machines never take the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, Row

from mendloop.config import TrustConfig
from mendloop.domain.records import EventRecord, NewEvent, Run, StepRecord, TrustChange, WorkOrder
from mendloop.domain.states import (
    RUN_FINAL,
    RunStatus,
    StepStatus,
    WorkOrderStatus,
    check_run_move,
    check_work_order_move,
)
from mendloop.errors import Conflict, NotFound, StorageError
from mendloop.storage import schema as t
from mendloop.trust import TrustReason, describe, next_score

Clock = Callable[[], float]
_CLAIM_LOCK = sa.text("SELECT pg_advisory_xact_lock(7304815)")
# Holds a work order whose diff the run's patch pipeline has yet to check, test and apply.
PATCH_PIPELINE_OWNER = "mendloop:patch-pipeline"
# Hold a verified patch until an operator approves it, or a review branch until an operator marks it merged.
APPROVAL_OWNER = "mendloop:awaiting-approval"
MERGE_OWNER = "mendloop:awaiting-merge"
HOLDS = (APPROVAL_OWNER, MERGE_OWNER)
AfterCommit = Callable[[Sequence[EventRecord]], None]


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


@dataclass(frozen=True, slots=True)
class TrustMove:
    component: str
    reason: TrustReason


def sqlite_insert(table: sa.Table) -> str:
    """`INSERT INTO table (every column, in table order) VALUES (?, ...)`: executemany of plain tuples on SQLite's
    hot paths, without SQLAlchemy's per-row parameter processing (JSON values serialised by the caller)."""
    return str(table.insert().compile(dialect=sqlite_dialect.dialect()))


_SQLITE_INSERT_EVENTS = sqlite_insert(t.events)
_EVENT_COLUMNS = ["id", "type", "source", "message", "payload", "run_id", "work_order_id", "component", "created_at"]
assert [c.name for c in t.events.c] == _EVENT_COLUMNS, "Store._events builds its tuples in this order"


def _stamp(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)


class Store:
    def __init__(
        self,
        url: str,
        *,
        clock: Clock = time.time,
        trust: TrustConfig | None = None,
        after_commit: AfterCommit | None = None,
    ) -> None:
        self.url = url
        self.clock = clock
        self.trust_config = trust or TrustConfig()
        self._after_commit = after_commit
        self.engine: Engine = self._create_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._insert = sqlite_dialect.insert if self.is_sqlite else pg_dialect.insert
        self._update_cache: dict[tuple[str, ...], sa.Update] = {}
        self._claim_cache: dict[bool, sa.Update] = {}
        self._insert_events_returning = sa.insert(t.events).returning(t.events.c.id, sort_by_parameter_order=True)
        self._max_event_id = sa.select(sa.func.max(t.events.c.id))
        self._writer: AbstractContextManager[Any] = threading.RLock() if self.is_sqlite else nullcontext()

    # -- plumbing -------------------------------------------------------------------------------------------

    @staticmethod
    def _create_engine(url: str) -> Engine:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise StorageError(f"invalid database URL {url!r}") from exc
        if parsed.get_backend_name() == "sqlite":
            engine = sa.create_engine(
                parsed, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8, max_overflow=8
            )

            @sa.event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                # Autocommit at the driver level so that SQLAlchemy's "begin" below decides the lock mode.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode is durable against a process crash (kill -9); only a power cut can lose
                # the last transactions.
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @sa.event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                # IMMEDIATE takes the write lock up front: a deferred transaction that later writes can fail
                # with SQLITE_BUSY instead of waiting.
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        if parsed.get_backend_name() == "postgresql":
            return sa.create_engine(parsed, pool_size=10, max_overflow=20, pool_pre_ping=True)
        raise StorageError(f"unsupported database {parsed.get_backend_name()!r}; use sqlite or postgresql")

    @contextmanager
    def _tx(self) -> Iterator[tuple[Connection, list[EventRecord]]]:
        published: list[EventRecord] = []
        try:
            # SQLite has one writer at a time. Threads of this process queue on a lock, woken the moment it is
            # free, instead of in SQLite's busy handler, which sleeps (1, 2, 5 ... 100 ms) between retries.
            with self._writer, self.engine.begin() as conn:
                yield conn, published
        except sa.exc.DBAPIError as exc:
            raise StorageError(f"database error: {exc.orig}") from exc
        if published and self._after_commit is not None:
            self._after_commit(published)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except sa.exc.DBAPIError as exc:
            raise StorageError(f"database error: {exc.orig}") from exc

    def close(self) -> None:
        self.engine.dispose()

    def is_empty(self) -> bool:
        with self._read() as conn:
            return not sa.inspect(conn).has_table("runs")

    def ping(self) -> bool:
        with self._read() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True

    def _next_seq(self, conn: Connection, name: str) -> int:
        return self._take_seq(conn, name, 1)

    def _take_seq(self, conn: Connection, name: str, n: int) -> int:
        """Reserve the next `n` numbers of a sequence at once; returns the last (the first is last - n + 1)."""
        conn.execute(self._insert(t.sequences).values(name=name, value=0).on_conflict_do_nothing())
        value = conn.execute(
            sa.update(t.sequences)
            .where(t.sequences.c.name == name)
            .values(value=t.sequences.c.value + n)
            .returning(t.sequences.c.value)
        ).scalar_one()
        return int(value)

    def _events(self, conn: Connection, published: list[EventRecord], events: Sequence[NewEvent]) -> None:
        if not events:
            return
        now = self.clock()
        ids: Iterable[int]
        if self.is_sqlite and len(events) > 1:
            # This transaction holds SQLite's only write lock (BEGIN IMMEDIATE), so the next ids are ours to give,
            # and the rows go in with one executemany of plain tuples: RETURNING in parameter order would cost
            # SQLAlchemy an INSERT per row, and its per-row parameter processing is most of the remaining cost.
            last = conn.execute(self._max_event_id).scalar() or 0
            ids = range(last + 1, last + 1 + len(events))
            dumps = json.dumps
            conn.exec_driver_sql(
                _SQLITE_INSERT_EVENTS,
                [
                    (i, e.type, e.source, e.message, dumps(e.payload), e.run_id, e.work_order_id, e.component, now)
                    for i, e in zip(ids, events, strict=True)
                ],
            )
        else:
            rows = [
                {
                    "type": e.type,
                    "source": e.source,
                    "message": e.message,
                    "payload": e.payload,
                    "run_id": e.run_id,
                    "work_order_id": e.work_order_id,
                    "component": e.component,
                    "created_at": now,
                }
                for e in events
            ]
            ids = conn.execute(self._insert_events_returning, rows).scalars()
        for row_id, e in zip(ids, events, strict=True):
            published.append(
                EventRecord(
                    id=int(row_id),
                    type=e.type,
                    source=e.source,
                    message=e.message,
                    payload=e.payload,
                    created_at=now,
                    run_id=e.run_id,
                    work_order_id=e.work_order_id,
                    component=e.component,
                )
            )

    # -- events ---------------------------------------------------------------------------------------------

    def publish(self, events: Sequence[NewEvent]) -> list[EventRecord]:
        with self._tx() as (conn, published):
            self._events(conn, published, events)
        return published

    def recent_events(
        self, *, event_type: str | None = None, limit: int = 50, since: float | None = None
    ) -> list[EventRecord]:
        q = sa.select(t.events).order_by(t.events.c.id.desc()).limit(limit)
        if event_type:
            q = q.where(t.events.c.type == event_type)
        if since is not None:
            q = q.where(t.events.c.created_at >= since)
        with self._read() as conn:
            return [_event(r) for r in conn.execute(q)]

    def events_after(self, after_id: int, limit: int = 500) -> list[EventRecord]:
        q = sa.select(t.events).where(t.events.c.id > after_id).order_by(t.events.c.id).limit(limit)
        with self._read() as conn:
            return [_event(r) for r in conn.execute(q)]

    def run_events(self, run_id: str) -> list[EventRecord]:
        q = sa.select(t.events).where(t.events.c.run_id == run_id).order_by(t.events.c.id)
        with self._read() as conn:
            return [_event(r) for r in conn.execute(q)]

    # -- runs -----------------------------------------------------------------------------------------------

    def create_run(
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
        """Create a run (and its trigger event) in one transaction. With a dedupe key already used by a run that
        has not finished, return that run instead; the flag says whether a new run was created."""
        with self._tx() as (conn, published):
            if dedupe_key is not None:
                existing = conn.execute(sa.select(t.runs).where(t.runs.c.dedupe_key == dedupe_key)).first()
                if existing is not None:
                    return _run(existing), False
            run = self.insert_run(
                conn,
                published,
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

    def insert_run(
        self,
        conn: Connection,
        published: list[EventRecord],
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
    ) -> Run:
        """A new run inside the caller's transaction (its trigger event, the incident's trust move)."""
        now = self.clock()
        day = _stamp(now)
        seq = self._next_seq(conn, "run:" + day.strftime("%Y%m%d"))
        run_id = f"run_{day:%Y%m%d_%H%M%S}_{seq:06d}"
        trigger_id: int | None = None
        if trigger is not None:
            self._events(conn, published, [dataclasses.replace(trigger, run_id=run_id)])
            trigger_id = published[-1].id
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
            "step_index": 0,
            "attempt": 0,
            "outputs": {},
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
        }
        conn.execute(t.runs.insert(), row)
        self._events(
            conn,
            published,
            [
                NewEvent(
                    type="self_healing.triggered",
                    message=message,
                    payload={"playbook_id": playbook["id"], "error_type": error_type, "incident_id": incident_id},
                    run_id=run_id,
                    component=component,
                )
            ],
        )
        if component:
            self._move_trust(conn, published, component, TrustReason.INCIDENT, run_id)
        return _run(row)

    def claim_run(self, owner: str, lease_seconds: float, *, max_concurrent: int = 0) -> Run | None:
        """Lease the next due run: a queued one whose time has come, or one whose lease lapsed. A run whose mutex
        key is held by a running run waits; with `max_concurrent`, no run starts while that many execute."""
        now = self.clock()
        params: dict[str, Any] = {"now": now, "owner": owner, "expires": now + lease_seconds}
        if max_concurrent:
            params["cap"] = max_concurrent
        with self._tx() as (conn, _):
            if not self.is_sqlite:
                # The mutex and the cap read other runs' status: under READ COMMITTED two concurrent claims would
                # not see each other's uncommitted claim. Claims are short, so they take turns (SQLite's
                # BEGIN IMMEDIATE already does this); the claim statement then sees every committed claim.
                conn.execute(_CLAIM_LOCK)
            row = conn.execute(self._claim_stmt(capped=bool(max_concurrent)), params).first()
        return _run(row) if row is not None else None

    def _claim_stmt(self, *, capped: bool) -> sa.Update:
        stmt = self._claim_cache.get(capped)
        if stmt is None:
            stmt = self._claim_cache[capped] = self._build_claim(capped)
        return stmt

    def _build_claim(self, capped: bool) -> sa.Update:
        now: sa.BindParameter[float] = sa.bindparam("now", type_=sa.Double())
        active = [RunStatus.RUNNING.value, RunStatus.VERIFYING.value]
        other = t.runs.alias("other")
        # Storm control: runs sharing a mutex key (a component) never execute at once; extra runs wait.
        conds: list[sa.ColumnElement[bool]] = [
            sa.or_(
                t.runs.c.mutex_key.is_(None),
                ~sa.exists().where(
                    other.c.mutex_key == t.runs.c.mutex_key, other.c.status.in_(active), other.c.id != t.runs.c.id
                ),
            )
        ]
        if capped:
            running = sa.select(sa.func.count()).select_from(other).where(other.c.status.in_(active)).scalar_subquery()
            conds.append(running < sa.bindparam("cap", type_=sa.Integer()))
        due = (
            sa.select(t.runs.c.id)
            .where(
                sa.or_(
                    sa.and_(t.runs.c.status == RunStatus.QUEUED.value, t.runs.c.next_run_at <= now, *conds),
                    sa.and_(t.runs.c.status.in_(active), t.runs.c.lease_expires_at < now),
                )
            )
            .order_by(t.runs.c.next_run_at)
            .limit(1)
            # SKIP LOCKED on PostgreSQL; SQLite ignores it and serializes writers with BEGIN IMMEDIATE.
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
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

    def next_due_at(self) -> float | None:
        q = sa.select(sa.func.min(t.runs.c.next_run_at)).where(t.runs.c.status == RunStatus.QUEUED.value)
        with self._read() as conn:
            value = conn.execute(q).scalar()
        return float(value) if value is not None else None

    def extend_lease(self, run_id: str, owner: str, until: float) -> bool:
        with self._tx() as (conn, _):
            n = conn.execute(
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
        now = self.clock()
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
        with self._tx() as (conn, published):
            # Only the id comes back: the run's large JSON columns (playbook, outputs) are not read again.
            found = conn.execute(
                self._update_leased(tuple(sorted(values))), {**values, "_id": run.id, "_owner": owner}
            ).first()
            if found is None:
                conn.rollback()
                return None
            if outcome is not None:
                conn.execute(
                    t.steps.insert(),
                    {
                        "run_id": run.id,
                        "step_index": outcome.step_index,
                        "step_id": outcome.step_id,
                        "action": outcome.action,
                        "attempt": outcome.attempt,
                        "status": outcome.status.value,
                        "started_at": outcome.started_at,
                        "finished_at": now,
                        "output": outcome.output,
                        "error": outcome.error,
                        "idempotency_key": outcome.idempotency_key,
                    },
                )
            if trust is not None:
                self._move_trust(conn, published, trust.component, trust.reason, run.id)
            self._events(conn, published, events)
        if "status" in values:
            values["status"] = RunStatus(values["status"])
        return dataclasses.replace(run, **values)

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
        now = self.clock()
        check_run_move(run.id, run.status, RunStatus.AWAITING_PATCH)
        with self._tx() as (conn, published):
            seq = self._next_seq(conn, "wo:" + _stamp(now).strftime("%Y%m%d"))
            wo_id = f"wo_{_stamp(now):%Y%m%d}_{seq:04d}"
            row = conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run.id, t.runs.c.lease_owner == owner)
                .values(
                    status=RunStatus.AWAITING_PATCH.value,
                    step_index=next_index,
                    attempt=0,
                    escalated=True,
                    coding_work_order_id=wo_id,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                    outputs={**run.outputs, outcome.step_id: {"work_order_id": wo_id}},
                )
                .returning(*t.runs.c)
            ).first()
            if row is None:
                conn.rollback()
                return None
            wo_row = {
                "id": wo_id,
                "type": "self_healing_patch",
                "description": description,
                "context": context,
                "status": WorkOrderStatus.QUEUED.value,
                "self_healing_run_id": run.id,
                "playbook_id": run.playbook_id,
                "component": run.component,
                "estimated_complexity": estimated_complexity,
                "priority": priority,
                "created_at": now,
                "updated_at": now,
                "completed_at": None,
                "patch_result": None,
                "attempts": 0,
                "fail_reason": None,
                "lease_id": None,
                "lease_owner": None,
                "lease_expires_at": None,
                "max_attempts": max_attempts,
                "deadline_at": deadline_at,
                "cancel_requested": False,
                "repository": repository,
                "base_commit": base_commit,
                "note": None,
            }
            conn.execute(sa.insert(t.work_orders).values(wo_row))
            conn.execute(
                sa.insert(t.steps).values(
                    run_id=run.id,
                    step_index=outcome.step_index,
                    step_id=outcome.step_id,
                    action=outcome.action,
                    attempt=outcome.attempt,
                    status=StepStatus.SUCCEEDED.value,
                    started_at=outcome.started_at,
                    finished_at=now,
                    output={"work_order_id": wo_id},
                    error=None,
                    idempotency_key=outcome.idempotency_key,
                )
            )
            self._events(
                conn,
                published,
                [
                    NewEvent(
                        type="coding_agent.work_order_created",
                        message=f"Work order {wo_id} created: {description}",
                        payload={"work_order_id": wo_id, "estimated_complexity": estimated_complexity},
                        run_id=run.id,
                        work_order_id=wo_id,
                        component=run.component,
                    ),
                    NewEvent(
                        type="self_healing.escalated",
                        message=f"Escalated to coding agent (work order {wo_id})",
                        payload={"work_order_id": wo_id, "playbook_id": run.playbook_id},
                        run_id=run.id,
                        work_order_id=wo_id,
                        component=run.component,
                    ),
                ],
            )
        return _run(row), _work_order(wo_row)

    def release_leases_of(self, owners: Sequence[str]) -> int:
        """Give back the runs held by workers known to be dead, so they resume now rather than at lease expiry."""
        if not owners:
            return 0
        now = self.clock()
        with self._tx() as (conn, _):
            n = conn.execute(
                sa.update(t.runs)
                .where(
                    t.runs.c.lease_owner.in_(list(owners)),
                    t.runs.c.status.in_([RunStatus.RUNNING.value, RunStatus.VERIFYING.value]),
                )
                .values(status=RunStatus.QUEUED.value, lease_owner=None, lease_expires_at=None, next_run_at=now)
            ).rowcount
        return int(n)

    def lease_owners(self) -> list[str]:
        q = sa.select(t.runs.c.lease_owner).where(t.runs.c.lease_owner.is_not(None)).distinct()
        with self._read() as conn:
            return [str(o) for o in conn.execute(q).scalars()]

    def get_run(self, run_id: str) -> Run:
        with self._read() as conn:
            row = conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id)).first()
        if row is None:
            raise NotFound("run", run_id)
        return _run(row)

    def run_status(self, run_id: str) -> RunStatus:
        with self._read() as conn:
            value = conn.execute(sa.select(t.runs.c.status).where(t.runs.c.id == run_id)).scalar()
        if value is None:
            raise NotFound("run", run_id)
        return RunStatus(value)

    def list_runs(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Run], int]:
        q = sa.select(t.runs).order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc())
        c = sa.select(sa.func.count()).select_from(t.runs)
        if status:
            q = q.where(t.runs.c.status == status)
            c = c.where(t.runs.c.status == status)
        with self._read() as conn:
            rows = conn.execute(q.limit(limit).offset(offset)).all()
            total = int(conn.execute(c).scalar_one())
        return [_run(r) for r in rows], total

    def run_steps(self, run_id: str) -> list[StepRecord]:
        q = sa.select(t.steps).where(t.steps.c.run_id == run_id).order_by(t.steps.c.id)
        with self._read() as conn:
            return [_step(r) for r in conn.execute(q)]

    def cancel_run(self, run_id: str, reason: str) -> Run:
        now = self.clock()
        with self._tx() as (conn, published):
            row = conn.execute(sa.select(t.runs).where(t.runs.c.id == run_id)).first()
            if row is None:
                raise NotFound("run", run_id)
            run = _run(row)
            check_run_move(run.id, run.status, RunStatus.CANCELLED)
            updated = conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.id == run_id)
                .values(
                    status=RunStatus.CANCELLED.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=now,
                    updated_at=now,
                    error=reason,
                )
                .returning(*t.runs.c)
            ).one()
            if run.coding_work_order_id:
                conn.execute(
                    sa.update(t.work_orders)
                    .where(
                        t.work_orders.c.id == run.coding_work_order_id,
                        t.work_orders.c.status.in_([WorkOrderStatus.QUEUED.value, WorkOrderStatus.IN_PROGRESS.value]),
                    )
                    .values(status=WorkOrderStatus.CANCELLED.value, cancel_requested=True, updated_at=now)
                )
            self._events(
                conn,
                published,
                [
                    NewEvent(
                        type="self_healing.completed",
                        message=f"Run {run_id} cancelled: {reason}",
                        payload={"status": RunStatus.CANCELLED.value},
                        run_id=run_id,
                        component=run.component,
                    )
                ],
            )
        return _run(updated)

    def run_stats(self) -> dict[str, Any]:
        with self._read() as conn:
            by_status = {
                str(s): int(n)
                for s, n in conn.execute(sa.select(t.runs.c.status, sa.func.count()).group_by(t.runs.c.status))
            }
            escalated = int(conn.execute(sa.select(sa.func.count()).where(t.runs.c.escalated.is_(True))).scalar_one())
            auto_fixed = int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        t.runs.c.escalated.is_(False), t.runs.c.status == RunStatus.COMPLETED.value
                    )
                ).scalar_one()
            )
            patch_minutes = conn.execute(
                sa.select(sa.func.avg(t.work_orders.c.completed_at - t.work_orders.c.created_at)).where(
                    t.work_orders.c.status == WorkOrderStatus.COMPLETED.value
                )
            ).scalar()
        return {
            "by_status": by_status,
            "total": sum(by_status.values()),
            "finished": sum(n for s, n in by_status.items() if RunStatus(s) in RUN_FINAL),
            "escalated": escalated,
            "auto_fixed": auto_fixed,
            "average_patch_seconds": float(patch_minutes) if patch_minutes is not None else None,
        }

    # -- work orders ----------------------------------------------------------------------------------------

    def get_work_order(self, wo_id: str) -> WorkOrder:
        with self._read() as conn:
            row = conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id)).first()
        if row is None:
            raise NotFound("work order", wo_id)
        return _work_order(row)

    def list_work_orders(
        self, *, status: str | None = None, run_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[WorkOrder], int]:
        q = sa.select(t.work_orders).order_by(t.work_orders.c.created_at.desc(), t.work_orders.c.id.desc())
        c = sa.select(sa.func.count()).select_from(t.work_orders)
        conds = []
        if status:
            conds.append(t.work_orders.c.status == status)
        if run_id:
            conds.append(t.work_orders.c.self_healing_run_id == run_id)
        if conds:
            q = q.where(*conds)
            c = c.where(*conds)
        with self._read() as conn:
            rows = conn.execute(q.limit(limit).offset(offset)).all()
            total = int(conn.execute(c).scalar_one())
        return [_work_order(r) for r in rows], total

    def work_order_stats(self) -> dict[str, int]:
        with self._read() as conn:
            counts = {
                str(s): int(n)
                for s, n in conn.execute(
                    sa.select(t.work_orders.c.status, sa.func.count()).group_by(t.work_orders.c.status)
                )
            }
        stats = {"total_work_orders": sum(counts.values())}
        for s in WorkOrderStatus:
            stats[s.value] = counts.get(s.value, 0)
        return stats

    def finish_work_order(
        self,
        wo_id: str,
        *,
        succeeded: bool,
        patch_result: dict[str, Any],
        fail_reason: str | None,
        run_status_on_failure: RunStatus,
        diff: str | None,
        events: Callable[[WorkOrder, Run | None], list[NewEvent]],
        idempotency_key: str | None,
        answer: Callable[[WorkOrder], dict[str, Any]],
        lease_id: str | None = None,
        hold_for_patch: bool = False,
        hold_owner: str | None = None,
        release_hold: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """The agent's claim that a work order is done, applied in one transaction: the work order completes
        (and its run is requeued to deploy, rerun and verify) or fails (and its run stops where the playbook
        says). With `hold_for_patch` the work order stays in progress until the run's patch pipeline has checked,
        tested and applied the diff. Completing an already completed work order is harmless and changes nothing.
        Returns the answer and whether anything changed."""
        from mendloop.storage.queue import check_lease

        now = self.clock()
        scope = f"complete:{wo_id}"
        with self._tx() as (conn, published):
            if idempotency_key:
                prior = conn.execute(
                    sa.select(t.idempotency.c.response).where(
                        t.idempotency.c.scope == scope, t.idempotency.c.key == idempotency_key
                    )
                ).scalar()
                if prior is not None:
                    return dict(prior), False
            row = conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id).with_for_update()).first()
            if row is None:
                raise NotFound("work order", wo_id)
            wo = _work_order(row)
            if succeeded and (wo.status is WorkOrderStatus.COMPLETED or wo.lease_owner == PATCH_PIPELINE_OWNER):
                return answer(wo), False
            check_lease(wo, lease_id, required=False, now=now)
            new_status = WorkOrderStatus.COMPLETED if succeeded else WorkOrderStatus.FAILED
            if (hold_for_patch or hold_owner) and succeeded:
                new_status = WorkOrderStatus.IN_PROGRESS
            owner = hold_owner or (PATCH_PIPELINE_OWNER if hold_for_patch else None)
            if new_status is not wo.status:
                check_work_order_move(wo.id, wo.status, new_status)
            conn.execute(
                sa.update(t.work_orders)
                .where(t.work_orders.c.id == wo_id)
                .values(
                    status=new_status.value,
                    patch_result=patch_result,
                    completed_at=None if new_status is WorkOrderStatus.IN_PROGRESS else now,
                    updated_at=now,
                    fail_reason=fail_reason,
                    lease_id=None,
                    lease_owner=owner if new_status is WorkOrderStatus.IN_PROGRESS else None,
                    lease_expires_at=None,
                )
            )
            if diff:
                conn.execute(
                    self._insert(t.diffs)
                    .values(work_order_id=wo_id, diff=diff, created_at=now)
                    .on_conflict_do_update(index_elements=["work_order_id"], set_={"diff": diff, "created_at": now})
                )
            run: Run | None = None
            if wo.self_healing_run_id:
                run_row = conn.execute(sa.select(t.runs).where(t.runs.c.id == wo.self_healing_run_id)).first()
                if run_row is not None and RunStatus(run_row.status) is RunStatus.AWAITING_PATCH and not hold_owner:
                    run = _run(run_row)
                    if succeeded:
                        values: dict[str, Any] = {
                            "status": RunStatus.QUEUED.value,
                            "next_run_at": now,
                            "outputs": {**run.outputs, "patch": {**patch_result, "pending_apply": hold_for_patch}},
                        }
                    else:
                        values = {
                            "status": run_status_on_failure.value,
                            "finished_at": now if run_status_on_failure in RUN_FINAL else None,
                            "error": f"work order {wo_id} failed: {fail_reason or 'tests failed'}",
                        }
                    check_run_move(run.id, run.status, RunStatus(values["status"]))
                    values["updated_at"] = now
                    conn.execute(sa.update(t.runs).where(t.runs.c.id == run.id).values(values))
            updated = _work_order(conn.execute(sa.select(t.work_orders).where(t.work_orders.c.id == wo_id)).one())
            self._events(conn, published, events(updated, run))
            response = answer(updated)
            if idempotency_key:
                conn.execute(
                    sa.insert(t.idempotency).values(scope=scope, key=idempotency_key, response=response, created_at=now)
                )
        return response, True

    def get_diff(self, wo_id: str) -> str:
        with self._read() as conn:
            value = conn.execute(sa.select(t.diffs.c.diff).where(t.diffs.c.work_order_id == wo_id)).scalar()
        if value is None:
            raise NotFound("diff", wo_id)
        return str(value)

    # -- trust ----------------------------------------------------------------------------------------------

    def _move_trust(
        self,
        conn: Connection,
        published: list[EventRecord],
        component: str,
        reason: TrustReason,
        run_id: str | None,
    ) -> TrustChange:
        now = self.clock()
        old_value = conn.execute(
            sa.select(t.trust_scores.c.score).where(t.trust_scores.c.component == component)
        ).scalar()
        old = float(old_value) if old_value is not None else self.trust_config.initial
        new = next_score(old, reason, self.trust_config)
        conn.execute(
            self._insert(t.trust_scores)
            .values(component=component, score=new, updated_at=now)
            .on_conflict_do_update(index_elements=["component"], set_={"score": new, "updated_at": now})
        )
        conn.execute(
            sa.insert(t.trust_history).values(
                component=component, old=old, new=new, reason=reason.value, run_id=run_id, created_at=now
            )
        )
        if reason is not TrustReason.INCIDENT:
            self._events(
                conn,
                published,
                [
                    NewEvent(
                        type="trust.updated",
                        message=describe(old, new, reason),
                        payload={"component": component, "old": old, "new": new, "reason": reason.value},
                        run_id=run_id,
                        component=component,
                    )
                ],
            )
        return TrustChange(component=component, old=old, new=new, reason=reason.value, run_id=run_id, created_at=now)

    def trust_score(self, component: str) -> float:
        with self._read() as conn:
            value = conn.execute(
                sa.select(t.trust_scores.c.score).where(t.trust_scores.c.component == component)
            ).scalar()
        return float(value) if value is not None else self.trust_config.initial

    def trust_scores(self) -> dict[str, float]:
        with self._read() as conn:
            return {
                str(c): float(s) for c, s in conn.execute(sa.select(t.trust_scores.c.component, t.trust_scores.c.score))
            }

    def trust_history(self, component: str | None = None, run_id: str | None = None) -> list[TrustChange]:
        q = sa.select(t.trust_history).order_by(t.trust_history.c.id)
        if component:
            q = q.where(t.trust_history.c.component == component)
        if run_id:
            q = q.where(t.trust_history.c.run_id == run_id)
        with self._read() as conn:
            return [
                TrustChange(
                    component=r.component,
                    old=r.old,
                    new=r.new,
                    reason=r.reason,
                    run_id=r.run_id,
                    created_at=r.created_at,
                )
                for r in conn.execute(q)
            ]


@functools.cache
def process_token() -> str:
    """Tells this process from an earlier one that had the same pid."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def default_owner(suffix: str) -> str:
    """A lease owner names its host and process, so a restarted server can tell its dead predecessor's leases."""
    return f"{socket.gethostname()}:{process_token()}:{suffix}"


def _event(r: Row[Any]) -> EventRecord:
    return EventRecord(
        id=int(r.id),
        type=r.type,
        source=r.source,
        message=r.message,
        payload=dict(r.payload or {}),
        created_at=float(r.created_at),
        run_id=r.run_id,
        work_order_id=r.work_order_id,
        component=r.component,
    )


def _run(r: Row[Any] | dict[str, Any]) -> Run:
    d = dict(r._mapping) if isinstance(r, Row) else r
    return Run(
        id=d["id"],
        playbook_id=d["playbook_id"],
        playbook_version=d["playbook_version"],
        playbook_type=d["playbook_type"],
        playbook=dict(d["playbook"]),
        status=RunStatus(d["status"]),
        component=d["component"],
        error_type=d["error_type"],
        description=d["description"],
        context=dict(d["context"] or {}),
        step_index=int(d["step_index"]),
        attempt=int(d["attempt"]),
        outputs=dict(d["outputs"] or {}),
        pending=dict(d["pending"] or {}),
        escalated=bool(d["escalated"]),
        coding_work_order_id=d["coding_work_order_id"],
        lease_owner=d["lease_owner"],
        lease_expires_at=d["lease_expires_at"],
        next_run_at=float(d["next_run_at"]),
        created_at=float(d["created_at"]),
        updated_at=float(d["updated_at"]),
        finished_at=d["finished_at"],
        error=d["error"],
        trigger_event_id=d["trigger_event_id"],
        dedupe_key=d["dedupe_key"],
        incident_id=d.get("incident_id"),
        mutex_key=d.get("mutex_key"),
    )


def _step(r: Row[Any]) -> StepRecord:
    return StepRecord(
        id=int(r.id),
        run_id=r.run_id,
        step_index=int(r.step_index),
        step_id=r.step_id,
        action=r.action,
        attempt=int(r.attempt),
        status=StepStatus(r.status),
        started_at=float(r.started_at),
        finished_at=float(r.finished_at),
        output=dict(r.output or {}),
        error=r.error,
        idempotency_key=r.idempotency_key,
    )


def _work_order(r: Row[Any] | dict[str, Any]) -> WorkOrder:
    d = dict(r._mapping) if isinstance(r, Row) else r
    return WorkOrder(
        id=d["id"],
        type=d["type"],
        description=d["description"],
        context=dict(d["context"] or {}),
        status=WorkOrderStatus(d["status"]),
        self_healing_run_id=d["self_healing_run_id"],
        playbook_id=d["playbook_id"],
        component=d["component"],
        estimated_complexity=d["estimated_complexity"],
        priority=d["priority"],
        created_at=float(d["created_at"]),
        updated_at=float(d["updated_at"]),
        completed_at=d["completed_at"],
        patch_result=dict(d["patch_result"]) if d["patch_result"] is not None else None,
        attempts=int(d["attempts"]),
        fail_reason=d["fail_reason"],
        lease_id=d.get("lease_id"),
        lease_owner=d.get("lease_owner"),
        lease_expires_at=d.get("lease_expires_at"),
        max_attempts=int(d.get("max_attempts") or 3),
        deadline_at=d.get("deadline_at"),
        cancel_requested=bool(d.get("cancel_requested")),
        repository=d.get("repository"),
        base_commit=d.get("base_commit"),
        note=d.get("note"),
    )


__all__ = ["Conflict", "StepOutcome", "Store", "TrustMove", "default_owner"]
