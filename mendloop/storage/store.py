"""The storage layer's front door: one `Database` and the stores over it, each named by what it keeps.

`Store` composes them and answers the calls the engine, the API and the CLI make; the queries themselves live in
`runs.py`, `work_orders.py`, `events.py`, `trust.py` and `incidents.py`, written once for SQLite and PostgreSQL.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mendloop.domain.records import EventRecord, NewEvent, Run, RunSummary, StepRecord, TrustChange, WorkOrder
from mendloop.domain.states import RunStatus
from mendloop.domain.stats import Summary, summarize
from mendloop.domain.trust import TrustMove, TrustWeights
from mendloop.storage.approvals import ApprovalStore
from mendloop.storage.db import AfterCommit, Clock, Database
from mendloop.storage.events import EventStore
from mendloop.storage.fixes import FixStore
from mendloop.storage.pauses import PauseStore
from mendloop.storage.retention import Retention
from mendloop.storage.row_counts import RowCounts
from mendloop.storage.run_details import RunDetails
from mendloop.storage.runs import RunStore, StepOutcome
from mendloop.storage.stats import StatStore
from mendloop.storage.trust import TrustStore
from mendloop.storage.work_orders import WorkOrderStore


class _DefaultWeights:
    """`TrustConfig`'s defaults, for a Store opened without settings (`db current`, tools)."""

    initial = 1.0
    incident_weight = 0.25
    verified_fix_weight = 0.5
    failed_verification_weight = 0.4


class Store:
    def __init__(
        self,
        url: str,
        *,
        clock: Clock = time.time,
        trust: TrustWeights | None = None,
        after_commit: AfterCommit | None = None,
    ) -> None:
        self.db = Database(url, clock=clock, after_commit=after_commit)
        self.url = url
        self.clock = clock
        self.engine: Engine = self.db.engine
        self.is_sqlite = self.db.is_sqlite
        self.events = EventStore(self.db)
        self.trust = TrustStore(self.db, trust or _DefaultWeights())
        self.runs = RunStore(self.db, self.trust)
        self.work_orders = WorkOrderStore(self.db)
        self.stats = StatStore(self.db)
        self.row_counts = RowCounts(self.db)
        # Parts that read the events table by cursor declare their floor here (`retention.floors`).
        self.retention = Retention(self.db)
        self.approvals = ApprovalStore(self.db)
        self.pauses = PauseStore(self.db)
        self.fixes = FixStore(self.db)
        self.run_details = RunDetails(self.db, self.trust, self.pauses)

    def close(self) -> None:
        self.db.close()

    def is_empty(self) -> bool:
        with self.db.read() as conn:
            return not sa.inspect(conn).has_table("runs")

    def ping(self) -> bool:
        with self.db.read() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True

    # -- the calls the engine, the API and the CLI make -------------------------------------------------------

    def publish(self, events: Sequence[NewEvent]) -> list[EventRecord]:
        return self.events.publish(events)

    def recent_events(
        self, *, event_type: str | None = None, limit: int = 50, since: float | None = None
    ) -> list[EventRecord]:
        return self.events.recent(event_type=event_type, limit=limit, since=since)

    def events_after(self, after_id: int, limit: int = 500) -> list[EventRecord]:
        return self.events.after(after_id, limit)

    def run_events(self, run_id: str) -> list[EventRecord]:
        return self.events.of_run(run_id)

    def create_run(self, **kw: Any) -> tuple[Run, bool]:
        return self.runs.create(**kw)

    def claim_run(self, owner: str, lease_seconds: float, *, max_concurrent: int = 0) -> Run | None:
        return self.runs.claim(owner, lease_seconds, max_concurrent=max_concurrent)

    def next_due_at(self) -> float | None:
        return self.runs.next_due_at()

    def extend_lease(self, run_id: str, owner: str, until: float) -> bool:
        return self.runs.extend_lease(run_id, owner, until)

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
        return self.runs.advance(
            run, owner, outcome=outcome, changes=changes, events=events, trust=trust, lease_seconds=lease_seconds
        )

    def record_crash(self, run_id: str, owner: str, error: str) -> None:
        self.runs.record_crash(run_id, owner, error)

    def escalate(self, run: Run, owner: str, **kw: Any) -> tuple[Run, WorkOrder] | None:
        return self.runs.escalate(run, owner, **kw)

    def release_leases_of(self, owners: Sequence[str]) -> int:
        return self.runs.release_leases_of(owners)

    def lease_owners(self) -> list[str]:
        return self.runs.lease_owners()

    def stopped_runs(self, held: Mapping[str, str]) -> set[str]:
        return self.runs.stopped(held)

    def record_cancelled_step(self, run_id: str, outcome: StepOutcome, events: Sequence[NewEvent]) -> bool:
        return self.runs.record_cancelled_step(run_id, outcome, events)

    def get_run(self, run_id: str) -> Run:
        return self.runs.get(run_id)

    def run_status(self, run_id: str) -> RunStatus:
        return self.runs.status(run_id)

    def list_runs(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[RunSummary], int]:
        return self.runs.find(status=status, limit=limit, offset=offset)

    def run_steps(self, run_id: str) -> list[StepRecord]:
        return self.runs.steps(run_id)

    def retry_run(self, run_id: str, from_step: str) -> Run:
        return self.runs.retry(run_id, from_step)

    def cancel_run(self, run_id: str, reason: str) -> Run:
        return self.runs.cancel(run_id, reason)

    def statistics(self) -> Summary:
        """The statistics from their aggregates (storage/stats.py): cost bounded by keys, not by history."""
        snap = self.stats.snapshot()
        return summarize(snap.rows, snap.live_runs, snap.live_work_orders)

    def run_stats(self) -> dict[str, Any]:
        s = self.statistics()
        return {
            "by_status": s.runs_by_status,
            "total": s.overall.runs,
            "finished": s.overall.finished,
            "escalated": s.overall.escalated,
            "auto_fixed": s.overall.auto_fixed,
            "average_patch_seconds": s.average_patch_seconds,
        }

    def get_work_order(self, wo_id: str) -> WorkOrder:
        return self.work_orders.get(wo_id)

    def list_work_orders(
        self, *, status: str | None = None, run_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[WorkOrder], int]:
        return self.work_orders.find(status=status, run_id=run_id, limit=limit, offset=offset)

    def work_order_stats(self) -> dict[str, int]:
        return self.statistics().work_orders

    def get_diff(self, wo_id: str) -> str:
        return self.work_orders.diff(wo_id)

    def trust_score(self, component: str) -> float:
        return self.trust.score(component)

    def trust_scores(self) -> dict[str, float]:
        return self.trust.scores()

    def trust_history(
        self, component: str | None = None, run_id: str | None = None, *, last: int | None = None
    ) -> list[TrustChange]:
        return self.trust.history(component, run_id, last=last)


@functools.cache
def process_token() -> str:
    """Tells this process from an earlier one that had the same pid."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def default_owner(suffix: str) -> str:
    """A lease owner names its host and process, so a restarted server can tell its dead predecessor's leases."""
    return f"{socket.gethostname()}:{process_token()}:{suffix}"


__all__ = ["StepOutcome", "Store", "TrustMove", "default_owner", "process_token"]
