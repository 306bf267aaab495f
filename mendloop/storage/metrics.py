"""The aggregates GET /metrics exposes, read from the database at scrape time.

Read from the database (not counted in process) so that every process's work counts: a `mendloop worker` on
another machine finishes runs this server never sees. Every query is one aggregate (GROUP BY) whose label values
are capped: the `MAX_LABEL_VALUES` largest groups keep their own label, the rest are summed under `OTHER`, so a
flood of playbooks, components or event sources can't grow a scrape without bound. Each query reads an index that
holds every column it needs (migration 0006), never the wide rows; `tests/test_metrics.py` checks the plans.

Histograms use fixed buckets (`DURATION_BUCKETS`, seconds): a run from its creation to its finish, a step from its
start to its finish, a patch from its work order's creation to its completion. They and the event counters are
kept by triggers (migration 0016) in the lists' row counts under families of their own (`KEPT`), one row per
observation or event folded by housekeeping: a scrape reads a few hundred kept rows, not the history (grouping
every step at scrape time cost 0.77 s at 100,000 runs), and a prune, which deletes history, never lowers them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain.incidents import OPEN
from mendloop.domain.states import RUN_FINAL, RunStatus, WorkOrderStatus
from mendloop.storage import row_counts, stats
from mendloop.storage import schema as t
from mendloop.storage.db import Database

OTHER = "other"
MAX_LABEL_VALUES = 200
# From a fast command step (0.1 s) to a run parked a week on a coding agent.
DURATION_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 604800)
# A statement of any columns (SQLAlchemy 2.1's Select is variadic in them).
Query: TypeAlias = "sa.Select[*tuple[Any, ...]]"
# Bounds the groups of columns whose values are an enum (statuses, step actions): a guard, never reached.
_ENUM_LIMIT = 1000
# The kept families of migration 0016 in row_counts / row_count_deltas (list_name): events by type and source
# (`value` = type, char 31, source), and per label (`field`) the bucket counts `b<i>` / `inf` and the sum `ms`.
EVENTS, RUN_SECONDS, STEP_SECONDS, PATCH_SECONDS = "m.events", "m.run_s", "m.step_s", "m.patch_s"
KEPT = (EVENTS, RUN_SECONDS, STEP_SECONDS, PATCH_SECONDS)
_WORK_ORDER_STATUSES = tuple(s.value for s in WorkOrderStatus)
_RUN_LIVE = tuple(s.value for s in RunStatus if s not in RUN_FINAL)
_EVENT_KEY_SEPARATOR = "\x1f"


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


def _kept_query() -> Query:
    """The kept families' folded counts plus their unfolded deltas, summed by key: two index ranges."""
    c, d = t.row_counts.c, t.row_count_deltas.c
    both = sa.union_all(
        sa.select(c.list_name, c.field, c.value, c.n.label("n")).where(c.list_name.in_(KEPT)),
        sa.select(d.list_name, d.field, d.value, d.delta.label("n")).where(d.list_name.in_(KEPT)),
    ).subquery("kept")
    return sa.select(both.c.list_name, both.c.field, both.c.value, sa.func.sum(both.c.n)).group_by(
        both.c.list_name, both.c.field, both.c.value
    )


# Read by every scrape: built once.
_KEPT = _kept_query()


def histogram_of(counts: dict[str, int]) -> Histogram:
    """A label's kept rows (`b<i>`, `inf`, `ms`) as the cumulative histogram Prometheus wants (the count is every
    bucket's, `inf` included)."""
    cumulative, total = [], 0
    for i in range(len(DURATION_BUCKETS)):
        total += counts.get(f"b{i}", 0)
        cumulative.append(total)
    return Histogram(buckets=tuple(cumulative), count=total + counts.get("inf", 0), sum=counts.get("ms", 0) / 1000)


def capped(counts: dict[tuple[str, str], int], limit: int) -> dict[tuple[str, str], int]:
    """The `limit` largest keys, the others summed under (OTHER, OTHER)."""
    if len(counts) <= limit:
        return counts
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[:limit])
    kept[(OTHER, OTHER)] = kept.get((OTHER, OTHER), 0) + sum(n for _k, n in ranked[limit:])
    return kept


@dataclass(frozen=True, slots=True)
class Kept:
    events: dict[tuple[str, str], int]
    run_seconds: dict[str, Histogram]
    step_seconds: dict[str, Histogram]
    patch_seconds: Histogram


def kept_in(conn: Connection, limit: int) -> Kept:
    events: dict[tuple[str, str], int] = {}
    observed: dict[str, dict[str, dict[str, int]]] = {RUN_SECONDS: {}, STEP_SECONDS: {}, PATCH_SECONDS: {}}
    for family, field, value, n in conn.execute(_KEPT):
        if not n:
            continue
        if family == EVENTS:
            kind, _, source = str(value).partition(_EVENT_KEY_SEPARATOR)
            events[(kind, source)] = events.get((kind, source), 0) + int(n)
        else:
            observed[str(family)].setdefault(str(field), {})[str(value)] = int(n)

    def by_label(family: str) -> dict[str, Histogram]:
        labels = sorted(observed[family].items(), key=lambda kv: -sum(n for k, n in kv[1].items() if k != "ms"))[
            :_ENUM_LIMIT
        ]
        return {label: histogram_of(counts) for label, counts in labels}

    return Kept(
        events=capped(events, limit),
        run_seconds=by_label(RUN_SECONDS),
        step_seconds=by_label(STEP_SECONDS),
        patch_seconds=histogram_of(observed[PATCH_SECONDS].get("", {})),
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
            kept = kept_in(conn, self.limit)
            return MetricsSnapshot(
                events=kept.events,
                incidents_open=self._incidents_open(conn),
                runs=runs,
                aggregates=stats.StatStore.sums_in(conn),
                run_seconds=kept.run_seconds,
                step_seconds=kept.step_seconds,
                work_orders=self._work_orders(conn),
                patch_seconds=kept.patch_seconds,
                trust=trust,
                trust_components=trust_components,
                queue_due=due,
                queue_waiting=waiting,
            )

    # Each statement is its own method so that the plan test can EXPLAIN exactly what a scrape runs.

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
            # The live statuses by name: an IN is a range of the index per status, a NOT IN walked every run.
            .where(r.status.in_(_RUN_LIVE))
            .group_by(r.playbook_id, r.status)
        )
        return _folded(grouped, ["playbook_id"], ["status"], ["n"], self.limit)

    def _runs(self, conn: Connection) -> dict[tuple[str, str], int]:
        return {(str(playbook), str(status)): int(n) for playbook, status, n in conn.execute(self.runs_query())}

    def work_orders_query(self) -> Query:
        """Work orders by status, from the lists' row counts (migration 0014): index lookups, not a count of every
        work order ever made."""
        return row_counts.by_value_query("work_orders", "status", _WORK_ORDER_STATUSES)

    def _work_orders(self, conn: Connection) -> dict[str, int]:
        return row_counts.by_value_in(conn, "work_orders", "status", _WORK_ORDER_STATUSES)

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
            "kept": _KEPT,
            "incidents": self.incidents_query(),
            "runs": self.runs_query(),
            "work_orders": self.work_orders_query(),
            "trust": self.trust_query(),
            "queue": self.queue_query(now),
        }
