"""The claim of the next due run reads by index, however long the queue: no scan of `runs`, no sort of its rows.

A claim runs once per run and step on every worker. Written as one OR of "queued and due" and "lease lapsed",
SQLite planned it as a MULTI-INDEX OR that gathered every queued run and sorted them: 0.4 ms a claim at 1,000
queued runs, linear in the backlog. Each half now walks its own index and stops at the first row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from mendloop.app import App
from tests.support import open_app, settings_for
from tests.test_query_plans import _problems_postgres, _problems_sqlite

QUEUED = 200


@pytest.fixture
def queued(database_url: str, tmp_path: Path) -> Iterator[App]:
    app = open_app(settings_for(database_url, tmp_path, workers=0), start_workers=False)
    for i in range(QUEUED):
        app.remediation.trigger(error_type="database_connection", description=f"backlog {i}")
    yield app
    app.close()


def _claim_as_run(app: App, capped: bool) -> tuple[str, Any]:
    """The claim's statement and parameters exactly as the driver got them, caught while a real claim runs."""
    seen: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE RUNS"):
            seen.append((statement, parameters))

    sa.event.listen(app.store.engine, "before_cursor_execute", catch)
    try:
        assert app.store.claim_run("w", 60.0, max_concurrent=4 if capped else 0) is not None
    finally:
        sa.event.remove(app.store.engine, "before_cursor_execute", catch)
    assert len(seen) == 1, seen
    return seen[0]


@pytest.mark.parametrize("capped", [False, True])
def test_the_claim_walks_indexes_only(queued: App, capped: bool) -> None:
    app = queued
    statement, params = _claim_as_run(app, capped)
    with app.store.engine.connect() as conn:
        if app.store.is_sqlite:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
            plan = [str(r[-1]) for r in rows]
            bad = _problems_sqlite(plan, False, statement) + [line for line in plan if "MULTI-INDEX OR" in line]
        else:
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.exec_driver_sql("SET enable_sort = off")
            rows = conn.exec_driver_sql("EXPLAIN " + statement, params).all()
            plan = [str(r[0]) for r in rows]
            bad = _problems_postgres(plan, False, statement)
        conn.rollback()
    assert plan, "nothing explained"
    assert not bad, "\n".join(plan)


def test_a_claim_still_takes_a_lapsed_lease_before_new_work(queued: App) -> None:
    """The two halves keep the old priority: a run whose worker died is taken back before a queued one."""
    app = queued
    first = app.store.claim_run("dead-worker", 0.0)
    assert first is not None
    again = app.store.claim_run("live-worker", 60.0)
    assert again is not None and again.id == first.id
    fresh = app.store.claim_run("live-worker", 60.0)
    assert fresh is not None and fresh.id != first.id
