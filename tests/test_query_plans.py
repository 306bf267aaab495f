"""Every list and detail the API offers, with each filter combination and a cursor, reads by index: the SQL each
request really runs (caught with a `before_cursor_execute` listener while the in-process client calls it) is
explained, `EXPLAIN QUERY PLAN` on SQLite and `EXPLAIN` on PostgreSQL, and a full scan of a table that grows with
history, or a sort of its rows, fails the test.

PostgreSQL explains with `enable_seqscan` and `enable_sort` off: a sequential scan or a sort left in the plan
then means no index path exists at all (the planner takes a cheap scan of a small table otherwise). The counts the
lists answer (`total`, the work orders' `stats`) may walk a whole covering index: that is their linear part, read
from the index alone; /patches/stats and /metrics are aggregates and are not lists (out of scope here).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.app import App
from tests.support import api_client, history_app

# The tables that grow with history: a plan may read them only through an index.
BIG = {
    "runs",
    "steps",
    "events",
    "trust_history",
    "incidents",
    "work_orders",
    "diffs",
    "idempotency",
    "fixes",
    "fix_frames",
}
RUNS = 300


@pytest.fixture
def history(database_url: str, tmp_path: Path) -> Iterator[App]:
    with history_app(database_url, tmp_path, RUNS) as app:
        yield app


class Captured:
    """The SELECTs the API ran, with their parameters, as the driver was given them."""

    def __init__(self, app: App) -> None:
        self.statements: list[tuple[str, Any]] = []
        db = app.store.db
        self.engines = {db.engine, db.read_engine}
        for engine in self.engines:
            sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if not many and statement.lstrip().upper().startswith("SELECT"):
            self.statements.append((statement, parameters))

    def close(self) -> None:
        for engine in self.engines:
            sa.event.remove(engine, "before_cursor_execute", self._seen)


def _requests(client: httpx.Client) -> list[tuple[str, dict[str, Any]]]:
    """Every list with each combination of its filters, first pages and cursor pages, and every detail."""
    runs = client.get("/patches/runs", params={"limit": 2}).json()
    run_id = runs["runs"][0]["run_id"]
    wos = client.get("/patches/work-orders", params={"limit": 2}).json()
    wo = wos["work_orders"][0]
    incidents = client.get("/incidents", params={"limit": 2}).json()
    incident = incidents["incidents"][0]
    events = client.get("/events/recent", params={"limit": 2}).json()
    component = client.get("/trust").json()["components"][0]["component"]
    out: list[tuple[str, dict[str, Any]]] = []

    def combos(path: str, filters: dict[str, Any], cursor: str | None) -> None:
        for n in range(len(filters) + 1):
            for chosen in itertools.combinations(filters, n):
                params = {k: filters[k] for k in chosen}
                out.append((path, {**params, "limit": 50}))
                out.append((path, {**params, "limit": 50, "offset": 10}))
                if cursor is not None:
                    out.append((path, {**params, "limit": 50, "cursor": cursor}))

    first = runs["runs"][0]
    combos(
        "/patches/runs",
        {"status": "completed", "playbook_id": first["playbook_id"], "component": first["component"] or "svc-00"},
        runs["next_cursor"],
    )
    combos(
        "/patches/work-orders",
        {"status": "completed", "self_healing_run_id": wo["self_healing_run_id"]},
        wos["next_cursor"],
    )
    combos(
        "/incidents",
        {"status": "resolved", "fingerprint": incident["fingerprint"], "error_type": incident["error_type"]},
        incidents["next_cursor"],
    )
    combos("/events/recent", {"event_type": "self_healing.triggered", "since": 0}, events["next_cursor"])
    out += [
        (f"/patches/runs/{run_id}", {}),
        (f"/patches/work-orders/{wo['work_order_id']}", {}),
        (f"/incidents/{incident['incident_id']}", {}),
        (f"/incidents/{incident['incident_id']}/history", {}),
        ("/trust", {}),
        (f"/trust/{component}", {}),
        ("/health", {}),
        # The dashboard's pages read through the same stores, and a few more queries of their own.
        ("/", {}),
        ("/ui/runs", {"component": first["component"] or "svc-00"}),
        ("/ui/runs", {"cursor": runs["next_cursor"]}),
        (f"/ui/runs/{run_id}", {}),
        ("/ui/patches", {}),
        (f"/ui/patches/{wo['work_order_id']}", {}),
        ("/ui/incidents", {"status": "open"}),
        ("/ui/trust", {}),
    ]
    return out


_SQLITE_SCAN = re.compile(r"\bSCAN (\w+)(?! USING (?:COVERING )?INDEX)(?! USING INTEGER PRIMARY KEY)")
_PG_SEQ = re.compile(r"Seq Scan on (\w+)")


def _problems_sqlite(plan: list[str], count: bool, statement: str = "") -> list[str]:
    bad = []
    for line in plan:
        m = _SQLITE_SCAN.search(line)
        if m and m.group(1) in BIG and not _rowid_walk(statement, m.group(1)):
            bad.append(line)
        if "USE TEMP B-TREE" in line and not count and not _aggregates_only(statement):
            bad.append(line)
    return bad


def _aggregates_only(statement: str) -> bool:
    """A statement over none of the BIG tables: the statistics' totals and unfolded deltas (storage/stats.py),
    whose rows are bounded by playbooks, components and measures and by the fold interval, not by history. Their
    GROUP BY sorts those few rows."""
    return not any(re.search(rf"\b{table}\b", statement) for table in BIG)


def _rowid_walk(statement: str, table: str) -> bool:
    """SQLite shows a walk of a table in its integer primary key's order as `SCAN table` too (the table is that
    index): accepted when nothing filters it, so it stops after the page (the unfiltered newest events)."""
    return f"ORDER BY {table}.id" in statement and not re.search(r"\bWHERE\b", statement)


def _problems_postgres(plan: list[str], count: bool, statement: str = "") -> list[str]:
    bad = []
    for line in plan:
        m = _PG_SEQ.search(line)
        if m and m.group(1) in BIG:
            bad.append(line.strip())
        if re.search(r"->\s*Sort|^\s*Sort", line) and not count and not _aggregates_only(statement):
            bad.append(line.strip())
    return bad


def _is_count(statement: str) -> bool:
    """A `total` or `stats` count: the lists' linear part, allowed to walk a covering index (see the docstring)."""
    return bool(re.match(r"\s*SELECT\s+(?:\w+\.\w+,\s*)?count\(\*\)", statement, re.IGNORECASE))


def test_every_list_and_detail_reads_by_index(history: App) -> None:
    app = history
    sqlite = app.store.is_sqlite
    with api_client(app) as client:
        requests = _requests(client)
        captured = Captured(app)
        try:
            seen: dict[str, list[tuple[str, Any]]] = {}
            for path, params in requests:
                start = len(captured.statements)
                r = client.get(path, params=params)
                assert r.status_code == 200, (path, params, r.text)
                seen[f"{path}?{params}"] = captured.statements[start:]
        finally:
            captured.close()
    assert all(seen[k] for k in seen if not k.startswith("/health")), "a request ran no SELECT: not captured?"
    failures: list[str] = []
    explained = 0
    with app.store.db.read_engine.connect() as conn:
        if not sqlite:
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.exec_driver_sql("SET enable_sort = off")
        for request, statements in seen.items():
            for statement, parameters in statements:
                if sqlite:
                    rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
                    plan = [str(r[-1]) for r in rows]
                    bad = _problems_sqlite(plan, _is_count(statement), statement)
                else:
                    rows = conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()
                    plan = [str(r[0]) for r in rows]
                    bad = _problems_postgres(plan, _is_count(statement), statement)
                explained += 1
                if bad:
                    failures.append(f"{request}\n  {' '.join(statement.split())}\n  " + "\n  ".join(plan))
        conn.rollback()
    assert explained >= len(requests)
    assert not failures, "\n\n".join(failures)


def test_the_memory_of_past_fixes_reads_by_index(history: App) -> None:
    """What a new work order's context recalls (by fingerprint and by traceback frames) and an incident's history:
    each statement explained like the API's."""
    app = history
    with app.store.db.read_engine.connect() as conn:
        f = sa.table("fixes", sa.column("incident_id"), sa.column("id"))
        incident = conn.execute(sa.select(f.c.incident_id).order_by(f.c.id.desc()).limit(1)).scalar_one()
        frames = [
            (str(p), str(fn)) for p, fn in conn.exec_driver_sql("SELECT path, function FROM fix_frames LIMIT 3").all()
        ]
    captured = Captured(app)
    try:
        recalled = app.store.fixes.recall(incident_id=incident, frames=frames)
        history_of = app.store.fixes.history(incident)
    finally:
        captured.close()
    assert recalled and history_of["fixes"], "the history has no fixes: nothing was explained"
    assert len(captured.statements) >= 4
    failures = []
    with app.store.db.read_engine.connect() as conn:
        if not app.store.is_sqlite:
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.exec_driver_sql("SET enable_sort = off")
        for statement, parameters in captured.statements:
            if app.store.is_sqlite:
                plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
                bad = _problems_sqlite(plan, False, statement)
            else:
                plan = [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + statement, parameters)]
                bad = _problems_postgres(plan, False, statement)
            if bad:
                failures.append(f"{' '.join(statement.split())}\n  " + "\n  ".join(plan))
        conn.rollback()
    assert not failures, "\n\n".join(failures)


def test_the_checks_see_a_scan_and_a_sort(history: App) -> None:
    """The checks themselves: a list query without its index is a full scan and a sort, and is caught."""
    statement = "SELECT * FROM runs ORDER BY updated_at DESC LIMIT 50"
    with history.store.db.read_engine.connect() as conn:
        if history.store.is_sqlite:
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement).all()]
            assert _problems_sqlite(plan, False, statement) == ["SCAN runs", "USE TEMP B-TREE FOR ORDER BY"]
        else:
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.exec_driver_sql("SET enable_sort = off")
            plan = [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + statement).all()]
            found = _problems_postgres(plan, False, statement)
            assert any(p.startswith("->  Seq Scan on runs") for p in found), plan
            assert any("Sort" in p for p in found), plan
            conn.rollback()
