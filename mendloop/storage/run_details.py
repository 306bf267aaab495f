"""A run's detail as the API shows it (the run, its steps, its events, its trust and its work order), read for many
runs at once.

Twenty clients opening twenty runs cost twenty times seven statements one at a time on one process; asked together,
the same seven statements with `IN (...)` answer all of them (issue 10: details were the reads furthest from 20 ms
p99). One run's detail is the same read of one id, so there is one way to read a detail.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain.pauses import Pause
from mendloop.domain.records import EventRecord, Run, StepRecord, TrustChange, WorkOrder
from mendloop.storage import schema as t
from mendloop.storage.db import Database
from mendloop.storage.pauses import PauseStore
from mendloop.storage.rows import event_of, run_of, step_of, trust_change_of, work_order_of
from mendloop.storage.trust import TrustStore

# Bound parameters per IN list: far below every backend's limit (SQLite's is 32,766, PostgreSQL's 65,535).
_CHUNK = 500

R = TypeVar("R", StepRecord, EventRecord, TrustChange)


@dataclass(frozen=True, slots=True)
class RunParts:
    run: Run
    steps: list[StepRecord]
    events: list[EventRecord]
    trust_score: float | None  # None for a run without a component
    trust_changes: list[TrustChange]
    work_order: WorkOrder | None
    pauses: dict[str, Pause]


class RunDetails:
    def __init__(self, db: Database, trust: TrustStore, pauses: PauseStore) -> None:
        self.db = db
        self.trust = trust
        self.pauses = pauses

    def many(self, run_ids: Sequence[str]) -> dict[str, RunParts]:
        """Each found run's parts, by id, from one transaction (so a run and its steps agree); ids not found are
        left out. Steps, events and trust changes come oldest first."""
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return {}
        with self.db.read() as conn:
            runs = {r.id: r for r in map(run_of, _rows(conn, t.runs, t.runs.c.id, ids))}
            found = list(runs)
            steps = _grouped(map(step_of, _rows(conn, t.steps, t.steps.c.run_id, found)))
            events = _grouped(map(event_of, _rows(conn, t.events, t.events.c.run_id, found)))
            changes = _grouped(map(trust_change_of, _rows(conn, t.trust_history, t.trust_history.c.run_id, found)))
            components = sorted({r.component for r in runs.values() if r.component})
            scores = {
                str(row.component): float(row.score)
                for row in _rows(conn, t.trust_scores, t.trust_scores.c.component, components)
            }
            wo_ids = sorted({r.coding_work_order_id for r in runs.values() if r.coding_work_order_id})
            work_orders = {
                wo.id: wo for wo in map(work_order_of, _rows(conn, t.work_orders, t.work_orders.c.id, wo_ids))
            }
            pauses = self.pauses.current()
        initial = self.trust.weights.initial
        return {
            run_id: RunParts(
                run=r,
                steps=steps.get(run_id, []),
                events=events.get(run_id, []),
                trust_score=scores.get(r.component, initial) if r.component else None,
                trust_changes=changes.get(run_id, []),
                work_order=work_orders.get(r.coding_work_order_id) if r.coding_work_order_id else None,
                pauses=pauses,
            )
            for run_id in ids
            if (r := runs.get(run_id)) is not None
        }


def _rows(conn: Connection, table: sa.Table, column: sa.Column[Any], values: Sequence[str]) -> list[sa.Row[Any]]:
    """The rows whose `column` is among `values`, in id order (oldest first). Sorted here, not by ORDER BY: the
    rows are only those of the runs asked for, and a sort in SQL of rows found through an IN list is a temporary
    B-tree in SQLite's plan, which tests/test_query_plans.py rightly refuses for anything that grows."""
    rows = [
        row
        for i in range(0, len(values), _CHUNK)
        for row in conn.execute(sa.select(table).where(column.in_(values[i : i + _CHUNK])))
    ]
    if "id" in table.c:
        rows.sort(key=lambda row: row.id)
    return rows


def _grouped(records: Iterable[R]) -> dict[str, list[R]]:
    by_run: dict[str, list[R]] = defaultdict(list)
    for record in records:
        assert record.run_id is not None  # read by run_id
        by_run[record.run_id].append(record)
    return by_run
