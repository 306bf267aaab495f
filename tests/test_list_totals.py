"""The lists' `total` comes from counted rows that triggers keep (migration 0014), not from a count over history:
after scripted runs (every outcome, escalations, a cancel), retries, incidents opened and resolved, and a prune,
every list's total under every filter equals a full count of its table, before and after the deltas are folded,
on SQLite and PostgreSQL. Filter sets without a count are counted up to a cap and say when they hit it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from mendloop.app import App
from mendloop.domain import list_totals
from mendloop.domain.states import RunStatus, WorkOrderStatus
from mendloop.storage import row_counts
from mendloop.storage import schema as t
from mendloop.testing import FakeClock
from tests.support import api_client, drain, open_app, settings_for, wait_for
from tests.test_retention import DAY, _app, _old_history
from tests.test_stats_aggregates import run_script

# list path, the answer's total key holder, the table, and the query parameter -> column of each filter.
LISTS: list[tuple[str, sa.Table, dict[str, str]]] = [
    ("/patches/runs", t.runs, {"status": "status"}),
    ("/patches/work-orders", t.work_orders, {"status": "status", "self_healing_run_id": "self_healing_run_id"}),
    ("/incidents", t.incidents, {"status": "status", "fingerprint": "fingerprint", "error_type": "error_type"}),
]


_STATUSES = {
    "runs": {s.value for s in RunStatus},
    "work_orders": {s.value for s in WorkOrderStatus},
    "incidents": {"open", "resolved"},
}


def _full_count(app: App, table: sa.Table, where: dict[str, str]) -> int:
    q = sa.select(sa.func.count()).select_from(table).where(*[table.c[c] == v for c, v in where.items()])
    with app.store.db.read() as conn:
        return int(conn.execute(q).scalar_one())


def _filter_sets(app: App, table: sa.Table, params: dict[str, str]) -> list[dict[str, str]]:
    """No filter, each filter alone with every value in the table (and one no row has), and every pair."""
    with app.store.db.read() as conn:
        values = {
            p: sorted({str(v) for v in conn.execute(sa.select(table.c[c]).distinct()).scalars() if v is not None})
            for p, c in params.items()
        }
    # Every status the API accepts (some no row has); any other filter, a value no row has too.
    values["status"] = sorted(set(values["status"]) | _STATUSES[table.name])
    sets: list[dict[str, str]] = [{}]
    for p, vs in values.items():
        sets += [{p: v} for v in (vs if p == "status" else [*vs, "none_has_this"])]
    names = list(values)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sets += [{a: va, b: vb} for va in values[a][:3] for vb in values[b][:3]]
    return sets


def _check_totals(app: App, client: httpx.Client) -> int:
    """Every list's total under every filter set is its full count; returns how many were compared."""
    compared = 0
    for path, table, params in LISTS:
        for filters in _filter_sets(app, table, params):
            answer = client.get(path, params={**filters, "limit": 1})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            want = _full_count(app, table, {params[p]: v for p, v in filters.items()})
            assert (body["total"], body["total_is_lower_bound"]) == (want, False), (path, filters)
            compared += 1
    return compared


def _incidents(app: App, clock: FakeClock) -> None:
    """Incidents of three error types, several repeats each, one resolved by an operator."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
    for i in range(12):
        clock.advance(1)
        app.intake.ingest(
            [
                app.intake.from_event(
                    event_type="app.exception",
                    payload={"error_type": f"e{i % 3}", "message": f"module {words[i]} broke"},
                    source="test",
                    message=f"module {words[i]} broke",
                )
            ]
        )
    with app.store.db.read() as conn:
        first = conn.execute(sa.select(t.incidents.c.id).order_by(t.incidents.c.id).limit(1)).scalar_one()
    app.incidents.resolve(str(first))


def test_totals_equal_full_counts_through_runs_retries_and_pruning(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    app = _app(database_url, tmp_path, clock)
    try:
        old, _parked, _queued = _old_history(app, clock, tmp_path)
        failed = [r for r in old if app.store.get_run(r).status is RunStatus.FAILED]
        assert failed
        app.remediation.retry_run(failed[0], app.store.run_steps(failed[0])[0].step_id)
        drain(app)
        _incidents(app, clock)
        clock.advance(40 * DAY)
        recent = run_script(app, clock, tmp_path)
        retried = app.remediation.retry_run(
            next(r for r in recent if app.store.get_run(r).status is RunStatus.FAILED), "bad"
        )
        drain(app)
        assert app.store.get_run(retried.id).status is RunStatus.FAILED
        with api_client(app) as client:
            assert app.store.row_counts.pending() > 0  # nothing folded yet: the totals read the deltas
            assert _check_totals(app, client) > 30
            assert app.store.row_counts.fold() > 0
            assert app.store.row_counts.pending() == 0
            _check_totals(app, client)

            report = app.store.retention.prune(runs_before=clock() - 30 * DAY, batch=4)
            assert report.runs >= len(old) and report.work_orders > 0
            _check_totals(app, client)  # the prune's deletes counted down, unfolded
            app.store.row_counts.fold()
            _check_totals(app, client)
            # A run created after the fold, and a status change, are counted at once.
            app.remediation.trigger(error_type="heal", description="x", component="svc3")
            drain(app)
            _check_totals(app, client)
            counts = client.get("/patches/runs", params={"status": "completed"}).json()["total"]
            assert counts == _full_count(app, t.runs, {"status": RunStatus.COMPLETED.value}) > 0
            assert client.get("/patches/work-orders", params={"status": "failed"}).json()["total"] == _full_count(
                app, t.work_orders, {"status": WorkOrderStatus.FAILED.value}
            )
    finally:
        app.close()


def test_a_filter_set_without_a_count_is_counted_up_to_the_cap(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    app = _app(database_url, tmp_path, clock)
    try:
        _incidents(app, clock)
        q = sa.select(t.incidents).where(t.incidents.c.status == "open", t.incidents.c.error_type == "e1")
        filters: dict[str, Any] = {"status": "open", "error_type": "e1"}
        exact = _full_count(app, t.incidents, {"status": "open", "error_type": "e1"})
        assert exact >= 2
        with app.store.db.read() as conn:
            assert row_counts.total_in(conn, "incidents", filters, q) == list_totals.Total(exact, False)
            assert row_counts.total_in(conn, "incidents", filters, q, cap=exact) == list_totals.Total(exact, False)
            assert row_counts.total_in(conn, "incidents", filters, q, cap=1) == list_totals.Total(1, True)
    finally:
        app.close()


def test_which_count_answers_a_filter_set() -> None:
    key_for = list_totals.key_for
    assert key_for("runs", {"status": None}) == list_totals.CountKey("runs", "", "")
    assert key_for("runs", {"status": "queued"}) == list_totals.CountKey("runs", "status", "queued")
    assert key_for("incidents", {"error_type": "E", "status": ""}) == list_totals.CountKey(
        "incidents", "error_type", "E"
    )
    assert key_for("incidents", {"fingerprint": "f"}) is None  # unbounded values: no count kept
    assert key_for("incidents", {"status": "open", "error_type": "E"}) is None
    assert key_for("work_orders", {"self_healing_run_id": "r"}) is None
    assert list_totals.capped(1001) == list_totals.Total(1000, True)
    assert list_totals.capped(1000) == list_totals.Total(1000, False)


def test_an_api_only_serve_folds_its_own_deltas(database_url: str, tmp_path: Path) -> None:
    """`workers: 0` (an API tier whose runs `mendloop worker`s elsewhere take) still writes events, incidents and
    runs, and so count deltas: its own housekeeping folds them, or nothing would and every total would sum a
    growing pile of deltas."""
    settings = settings_for(database_url, tmp_path, workers=0, stats={"fold_interval_seconds": 0.1})
    app = open_app(settings, start_workers=True)
    try:
        with api_client(app) as client:
            for i in range(5):
                detected = {"event_type": "pipeline.failed", "payload": {"error_type": "timeout", "component": f"c{i}"}}
                assert client.post("/events", json=detected).status_code < 300
            wait_for(lambda: app.store.row_counts.pending() == 0 and app.store.stats.pending() == 0, timeout=30)
            with app.store.db.read() as conn:  # folded into counts, not dropped
                assert conn.execute(sa.select(sa.func.count()).select_from(t.row_counts)).scalar_one() > 0
            assert _check_totals(app, client) > 0
    finally:
        app.close()
