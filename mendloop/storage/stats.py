"""The statistics' aggregates: delta rows written with each counted state change, folded into totals.

- `record(tx, deltas)` inserts into `stat_deltas` inside the caller's transaction (the one that changes the run
  or the work order), so a statistic is never ahead of or behind the state it counts. Inserts only: concurrent
  workers never wait on one counter row.
- `fold()` (a housekeeping job) moves deltas into `stat_totals`, by storage/deltas.py (safe with several
  processes folding at once, and with deltas that commit late).
- `sums()` reads totals and unfolded deltas in one statement (one snapshot on both backends: a fold that commits
  meanwhile is seen whole or not at all); its cost is bounded by the number of keys and the fold interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from mendloop.domain import stats
from mendloop.domain.records import Run
from mendloop.domain.states import RUN_FINAL, WORK_ORDER_FINAL, RunStatus, WorkOrderStatus
from mendloop.domain.stats import Delta
from mendloop.storage import deltas, row_counts
from mendloop.storage import schema as t
from mendloop.storage.db import Database, Tx

FOLD_BATCH = 10_000
_RUN_LIVE = [s.value for s in RunStatus if s not in RUN_FINAL]
_WORK_ORDER_LIVE = [s.value for s in WorkOrderStatus if s not in WORK_ORDER_FINAL]

_FOLDING = deltas.Folding(
    deltas=t.stat_deltas,
    totals=t.stat_totals,
    keys=("playbook", "component", "measure"),
    delta="delta",
    total="value",
    stamped=("updated_at",),
)

Row = tuple[str, str, str, float]  # playbook, component, measure, sum


@dataclass(frozen=True, slots=True)
class Snapshot:
    rows: list[Row]
    live_runs: dict[str, int]  # live status -> runs
    live_work_orders: dict[str, int]


def _sums() -> sa.Select[Any]:
    tot, dl = t.stat_totals.c, t.stat_deltas.c
    both = sa.union_all(
        sa.select(tot.playbook, tot.component, tot.measure, tot.value.label("v")),
        sa.select(dl.playbook, dl.component, dl.measure, dl.delta.label("v")),
    ).subquery()
    return sa.select(both.c.playbook, both.c.component, both.c.measure, sa.func.sum(both.c.v)).group_by(
        both.c.playbook, both.c.component, both.c.measure
    )


# Read by every GET /patches/stats and work-order page: built once, not per request.
_SUMS = _sums()


def live_queries() -> tuple[sa.Select[Any], sa.Select[Any]]:
    """Runs and work orders by live status, from the lists' row counts (storage/row_counts.py): index lookups,
    whatever the number of runs in flight."""
    return (
        row_counts.by_value_query("runs", "status", _RUN_LIVE),
        row_counts.by_value_query("work_orders", "status", _WORK_ORDER_LIVE),
    )


def _live_in(conn: sa.Connection) -> tuple[dict[str, int], dict[str, int]]:
    return (
        row_counts.by_value_in(conn, "runs", "status", _RUN_LIVE),
        row_counts.by_value_in(conn, "work_orders", "status", _WORK_ORDER_LIVE),
    )


def record_run_move(tx: Tx, run: Run, new: RunStatus, *, escalated: bool, finished_at: float | None) -> None:
    """The deltas of `run` moving to `new` (nothing unless it ends there), in the move's transaction."""
    seconds = (finished_at or tx.now) - run.created_at
    record(tx, stats.run_moved(run.playbook_id, run.component, run.status, new, escalated=escalated, seconds=seconds))


def record(tx: Tx, deltas: Sequence[Delta]) -> None:
    if deltas:
        tx.conn.execute(
            t.stat_deltas.insert(),
            [
                {
                    "playbook": d.playbook,
                    "component": d.component,
                    "measure": d.measure,
                    "delta": d.delta,
                    "created_at": tx.now,
                }
                for d in deltas
            ],
        )


class StatStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def fold(self, batch: int = FOLD_BATCH) -> int:
        """Fold deltas into totals (storage/deltas.py); returns how many."""
        return deltas.fold(self.db, _FOLDING, batch)

    def snapshot(self) -> Snapshot:
        """The sums and the live counts, read in one transaction."""
        with self.db.read() as conn:
            return Snapshot(self.sums_in(conn), *_live_in(conn))

    @staticmethod
    def sums_in(conn: sa.Connection) -> list[Row]:
        """(playbook, component, measure, totals + unfolded deltas), in one statement."""
        return [(str(p), str(c), str(m), float(v)) for p, c, m, v in conn.execute(_SUMS)]

    def pending(self) -> int:
        """Deltas not folded yet."""
        with self.db.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t.stat_deltas)).scalar_one())
