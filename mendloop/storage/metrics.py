"""The aggregates GET /metrics exposes, read from the database at scrape time.

Read from the database (not counted in process) so that every process's work counts: a `mendloop worker` on
another machine finishes runs this server never sees. Every query is one aggregate (GROUP BY) whose label values
are capped: the `MAX_LABEL_VALUES` largest groups keep their own label, the rest are summed under `OTHER`, so a
flood of playbooks, components or event sources can't grow a scrape without bound. Each query reads an index that
holds every column it needs (migration 0006), never the wide rows; `tests/test_metrics.py` checks the plans.

Histograms use fixed buckets (`DURATION_BUCKETS`, seconds) and are computed from the stored start and finish
times: a run from its creation to its finish, a step from its start to its finish, a patch from its work order's
creation to its completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain.incidents import OPEN
from mendloop.domain.states import RUN_FINAL, RunStatus, WorkOrderStatus
from mendloop.storage import schema as t
from mendloop.storage import stats
from mendloop.storage.db import Database

OTHER = "other"
MAX_LABEL_VALUES = 200
# From a fast command step (0.1 s) to a run parked a week on a coding agent.
DURATION_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 604800)
# A statement of any columns (SQLAlchemy 2.1's Select is variadic in them).
Query: TypeAlias = "sa.Select[*tuple[Any, ...]]"
# Bounds the groups of columns whose values are an enum (statuses, step actions): a guard, never reached.
_ENUM_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative counts: `buckets[i]` observations were at most `DURATION_BUCKETS[i]` seconds."""

    buckets: tuple[int, ...]
    count: int
    sum: float


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    events: dict[tuple[str, str], int]  # (type, source) -> events stored
    incidents_open: dict[str, int]  # component ("" for none) -> open incidents
    runs: dict[tuple[str, str], int]  # (playbook, live status) -> runs not ended
    # The statistics' (playbook, component, measure, sum) rows: ended runs and escalations are counted from them,
    # since retention deletes old runs and a counter must never go down.
    aggregates: list[stats.Row]
    run_seconds: dict[str, Histogram]  # final status -> created..finished
    step_seconds: dict[str, Histogram]  # action -> started..finished
    work_orders: dict[str, int]  # status -> work orders
    patch_seconds: Histogram  # completed work orders: created..completed
    trust: dict[str, float]  # component -> score (the MAX_LABEL_VALUES lowest)
    trust_components: int
    queue_due: int  # queued runs whose time has come
    queue_waiting: int  # queued runs waiting for a backoff or a sleep


def _folded(grouped: Query, keys: Sequence[str], rest: Sequence[str], sums: Sequence[str], limit: int) -> Query:
    """`grouped` (one row per group) with at most `limit` distinct values of `keys`: the largest by `sums[0]`,
    summed over `rest`; the others are summed under OTHER. One statement, so one snapshot of the table."""
    g = grouped.subquery("g")
    per_key = sa.func.sum(g.c[sums[0]]).over(partition_by=[g.c[k] for k in keys])
    totals = sa.select(*g.c, per_key.label("key_total")).subquery("k")
    rank = sa.func.dense_rank().over(order_by=[totals.c.key_total.desc(), *(totals.c[k] for k in keys)])
    ranked = sa.select(*totals.c, rank.label("rk")).subquery("r")
    labels = [sa.case((ranked.c.rk <= limit, ranked.c[k]), else_=sa.literal(OTHER)).label(k) for k in keys]
    named = sa.select(*labels, *(ranked.c[c] for c in rest), *(ranked.c[s] for s in sums)).subquery("f")
    by = [named.c[c] for c in (*keys, *rest)]
    return sa.select(*by, *(sa.func.sum(named.c[s]).label(s) for s in sums)).group_by(*by)


def _buckets(seconds: sa.ColumnElement[float]) -> list[sa.ColumnElement[Any]]:
    return [
        *(
            sa.func.sum(sa.case((seconds <= bound, 1), else_=0)).label(f"le{i}")
            for i, bound in enumerate(DURATION_BUCKETS)
        ),
        sa.func.count().label("n"),
        sa.func.coalesce(sa.func.sum(seconds), 0.0).label("total"),
    ]


def _histogram(row: sa.Row[*tuple[Any, ...]], offset: int) -> Histogram:
    values = list(row)[offset:]
    n = len(DURATION_BUCKETS)
    return Histogram(
        buckets=tuple(int(v or 0) for v in values[:n]),
        count=int(values[n]),
        sum=float(values[n + 1]),
    )


class MetricsQueries:
    def __init__(self, db: Database, *, max_label_values: int = MAX_LABEL_VALUES) -> None:
        self.db = db
        self.limit = max_label_values

    def snapshot(self, now: float) -> MetricsSnapshot:
        with self.db.read() as conn:
            runs = self._runs(conn)
            trust, trust_components = self._trust(conn)
            due, waiting = self._queue(conn, now)
            return MetricsSnapshot(
                events=self._events(conn),
                incidents_open=self._incidents_open(conn),
                runs=runs,
                aggregates=stats.StatStore.sums_in(conn),
                run_seconds=self._run_seconds(conn),
                step_seconds=self._step_seconds(conn),
                work_orders=self._work_orders(conn),
                patch_seconds=self._patch_seconds(conn),
                trust=trust,
                trust_components=trust_components,
                queue_due=due,
                queue_waiting=waiting,
            )

    # Each statement is its own method so that the plan test can EXPLAIN exactly what a scrape runs.

    def events_query(self) -> Query:
        e = t.events.c
        grouped = sa.select(e.type, e.source, sa.func.count().label("n")).group_by(e.type, e.source)
        return _folded(grouped, ["type", "source"], [], ["n"], self.limit)

    def _events(self, conn: Connection) -> dict[tuple[str, str], int]:
        return {(str(ty), str(src)): int(n) for ty, src, n in conn.execute(self.events_query())}

    def incidents_query(self) -> Query:
        i = t.incidents.c
        component = sa.func.coalesce(i.component, "").label("component")
        grouped = sa.select(component, sa.func.count().label("n")).where(i.status == OPEN).group_by(component)
        return _folded(grouped, ["component"], [], ["n"], self.limit)

    def _incidents_open(self, conn: Connection) -> dict[str, int]:
        return {str(c): int(n) for c, n in conn.execute(self.incidents_query())}

    def runs_query(self) -> Query:
        """Runs not ended, by playbook and status: what is in flight, not history."""
        r = t.runs.c
        grouped = (
            sa.select(r.playbook_id, r.status, sa.func.count().label("n"))
            .where(r.status.not_in([s.value for s in RUN_FINAL]))
            .group_by(r.playbook_id, r.status)
        )
        return _folded(grouped, ["playbook_id"], ["status"], ["n"], self.limit)

    def _runs(self, conn: Connection) -> dict[tuple[str, str], int]:
        return {(str(playbook), str(status)): int(n) for playbook, status, n in conn.execute(self.runs_query())}

    def run_seconds_query(self) -> Query:
        r = t.runs.c
        seconds = r.finished_at - r.created_at
        return (
            sa.select(r.status, *_buckets(seconds))
            .where(r.finished_at.is_not(None))
            .group_by(r.status)
            .limit(_ENUM_LIMIT)
        )

    def _run_seconds(self, conn: Connection) -> dict[str, Histogram]:
        return {str(row[0]): _histogram(row, 1) for row in conn.execute(self.run_seconds_query())}

    def step_seconds_query(self) -> Query:
        s = t.steps.c
        seconds = s.finished_at - s.started_at
        return sa.select(s.action, *_buckets(seconds)).group_by(s.action).limit(_ENUM_LIMIT)

    def _step_seconds(self, conn: Connection) -> dict[str, Histogram]:
        return {str(row[0]): _histogram(row, 1) for row in conn.execute(self.step_seconds_query())}

    def work_orders_query(self) -> Query:
        w = t.work_orders.c
        return sa.select(w.status, sa.func.count()).group_by(w.status).limit(_ENUM_LIMIT)

    def _work_orders(self, conn: Connection) -> dict[str, int]:
        return {str(s): int(n) for s, n in conn.execute(self.work_orders_query())}

    def patch_seconds_query(self) -> Query:
        w = t.work_orders.c
        seconds = w.completed_at - w.created_at
        return sa.select(*_buckets(seconds)).where(
            w.status == WorkOrderStatus.COMPLETED.value, w.completed_at.is_not(None)
        )

    def _patch_seconds(self, conn: Connection) -> Histogram:
        return _histogram(conn.execute(self.patch_seconds_query()).one(), 0)

    def trust_query(self) -> Query:
        ts = t.trust_scores.c
        # The least trusted first: those are the components an operator watches.
        return sa.select(ts.component, ts.score).order_by(ts.score, ts.component).limit(self.limit)

    def _trust(self, conn: Connection) -> tuple[dict[str, float], int]:
        scores = {str(c): float(s) for c, s in conn.execute(self.trust_query())}
        total = int(conn.execute(sa.select(sa.func.count()).select_from(t.trust_scores)).scalar_one())
        return scores, total

    def queue_query(self, now: float) -> Query:
        r = t.runs.c
        due = sa.func.coalesce(sa.func.sum(sa.case((r.next_run_at <= now, 1), else_=0)), 0)
        return sa.select(due, sa.func.count()).where(r.status == RunStatus.QUEUED.value)

    def _queue(self, conn: Connection, now: float) -> tuple[int, int]:
        due, total = conn.execute(self.queue_query(now)).one()
        return int(due), int(total) - int(due)

    def queries(self, now: float) -> dict[str, Query]:
        """Every statement a scrape runs, by name (for the plan test)."""
        return {
            "events": self.events_query(),
            "incidents": self.incidents_query(),
            "runs": self.runs_query(),
            "run_seconds": self.run_seconds_query(),
            "step_seconds": self.step_seconds_query(),
            "work_orders": self.work_orders_query(),
            "patch_seconds": self.patch_seconds_query(),
            "trust": self.trust_query(),
            "queue": self.queue_query(now),
        }
