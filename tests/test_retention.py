"""Retention and backup, on SQLite and PostgreSQL: `db prune` deletes only old finished runs (with their steps,
events, trust history and finished work orders), never a live run, never an event a declared cursor still needs,
and the statistics stay as they were; the `retention:` policy prunes by itself; `db backup` copies a database
that is being written into a valid database holding every row committed before it began."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from mendloop.app import App
from mendloop.domain.records import NewEvent
from mendloop.domain.states import RunStatus
from mendloop.errors import NotFound
from mendloop.storage import schema as t
from mendloop.storage.audit import AuditEntry
from mendloop.storage.notify_cursor import NotifyCursors
from mendloop.storage.store import Store
from mendloop.testing import FakeClock
from tests.support import (
    api_client,
    drain,
    mendloop_argv,
    migrated_sqlite,
    open_app,
    settings_for,
    wait_for,
    write_playbooks,
)
from tests.test_stats_aggregates import _playbooks, figures, run_script

DAY = 86400.0


def _count(app: App, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    with app.store.db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())


def _old_history(app: App, clock: FakeClock, tmp_path: Path) -> tuple[list[str], str, str]:
    """Finished runs (every outcome), a run parked on an open work order and a queued run, all 40 days old by
    the time the test prunes."""
    old = run_script(app, clock, tmp_path)
    parked, _ = app.remediation.trigger(error_type="needs_code", description="x", component="svc1")
    drain(app)
    assert app.store.get_run(parked.id).status is RunStatus.AWAITING_PATCH
    queued, _ = app.remediation.trigger(error_type="heal", description="x", component="svc2")
    # Due in a year (as a long backoff leaves it): the drains of the younger runs leave it queued.
    with app.store.engine.begin() as conn:
        conn.execute(sa.update(t.runs).where(t.runs.c.id == queued.id).values(next_run_at=clock() + 365 * DAY))
    return old, parked.id, queued.id


def ended_runs(client: httpx.Client) -> dict[tuple[tuple[str, str], ...], float]:
    """The /metrics counters that count ended runs and escalations, by their labels."""
    answer = client.get("/metrics")
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        if family.name in ("mendloop_runs", "mendloop_escalations")
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def _app(database_url: str, tmp_path: Path, clock: FakeClock, *, start: bool = False, **extra: object) -> App:
    pbs = _playbooks(tmp_path / "fixed")
    write_playbooks(tmp_path / "pb", *pbs)
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={p["id"]: p["id"] for p in pbs},
        **extra,
    )
    return open_app(settings, clock=clock, start_workers=start)


def test_prune_removes_only_old_finished_rows_keeps_stats_and_the_floor(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    app = _app(database_url, tmp_path, clock)
    try:
        old, parked, queued = _old_history(app, clock, tmp_path)
        clock.advance(40 * DAY)
        recent = run_script(app, clock, tmp_path)  # finished 40 days later
        # A notification target's cursor stands in the middle of the old runs' events: it still needs the rest.
        with app.store.db.read() as conn:
            old_events = list(
                conn.execute(
                    sa.select(t.events.c.id).where(t.events.c.run_id.in_(old)).order_by(t.events.c.id)
                ).scalars()
            )
        cursor = old_events[len(old_events) // 2]
        NotifyCursors(app.store.db).ensure("ops", cursor)
        kept_events = _count(app, t.events, t.events.c.id > cursor)
        with api_client(app) as client:
            before = figures(client)
            counted_before = ended_runs(client)
            assert sum(counted_before.values()) >= len(old)
            counted = app.store.retention.prune(runs_before=clock() - 30 * DAY, dry_run=True)
            assert counted.runs == len(old) and counted.event_floor == cursor + 1
            assert _count(app, t.runs) == len(old) + 2 + len(recent)  # a dry run deletes nothing

            report = app.store.retention.prune(
                runs_before=clock() - 30 * DAY, events_before=clock() - 30 * DAY, batch=3
            )
            assert report.runs == len(old) and report.work_orders == 3 and report.steps > 0
            assert (report.steps, report.trust_history) == (counted.steps, counted.trust_history)
            for run_id in old:
                with pytest.raises(NotFound):
                    app.store.get_run(run_id)
            assert _count(app, t.steps, t.steps.c.run_id.in_(old)) == 0
            assert _count(app, t.trust_history, t.trust_history.c.run_id.in_(old)) == 0
            assert _count(app, t.work_orders, t.work_orders.c.self_healing_run_id.in_(old)) == 0
            # Live runs stay, however old: the parked one with its open work order, the queued one.
            assert app.store.get_run(parked).status is RunStatus.AWAITING_PATCH
            assert app.store.get_run(queued).status is RunStatus.QUEUED
            assert (
                app.store.get_work_order(app.store.get_run(parked).coding_work_order_id or "").status.value == "queued"
            )
            assert _count(app, t.runs, t.runs.c.id.in_(recent)) == len(recent)
            assert app.store.run_steps(parked) and app.store.run_events(queued)
            # Every event the cursor still needs is there; the old runs' earlier events are gone.
            assert _count(app, t.events, t.events.c.id > cursor) == kept_events
            assert _count(app, t.events, t.events.c.run_id.in_(old), t.events.c.id <= cursor) == 0
            # The statistics are aggregates: the same before and after, and after a fold; so are the /metrics
            # counters of ended runs and escalations (a counter that went down would read as a reset).
            assert figures(client) == before
            assert ended_runs(client) == counted_before
            app.store.stats.fold()
            assert figures(client) == before
            # The cursor moves on: the rest can go.
            with app.store.engine.begin() as conn:
                conn.execute(sa.update(t.notify_cursors).values(cursor=10**12))
            app.store.retention.prune(runs_before=None, events_before=clock() - 30 * DAY)
            assert _count(app, t.events, t.events.c.run_id.in_(old)) == 0
            assert app.store.run_events(queued)  # a live run's events are never old
    finally:
        app.close()


def test_the_retention_policy_prunes_by_itself(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    app = _app(database_url, tmp_path, clock)
    try:
        old = run_script(app, clock, tmp_path)
    finally:
        app.close()
    clock.advance(31 * DAY)
    (tmp_path / "2").mkdir()
    app = _app(database_url, tmp_path / "2", clock, retention={"runs_days": 30, "interval_seconds": 1}, start=True)
    try:
        wait_for(lambda: _count(app, t.runs, t.runs.c.id.in_(old)) == 0, timeout=30)
        assert app.store.statistics().overall.runs == len(old)
    finally:
        app.close()


def test_a_bounded_prune_goes_a_slice_at_a_time(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    app = _app(database_url, tmp_path, clock)
    try:
        old = run_script(app, clock, tmp_path)
        clock.advance(31 * DAY)
        left = len(old)
        while left:
            report = app.store.retention.prune(runs_before=clock() - 30 * DAY, batch=1, max_batches=2)
            assert report.runs == min(2, left)
            left -= report.runs
            assert _count(app, t.runs, t.runs.c.id.in_(old)) == left
    finally:
        app.close()


def test_the_audit_log_is_kept_by_its_own_age(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    app = _app(database_url, tmp_path, clock, retention={"audit_days": 90, "runs_days": 30})
    try:

        def entry(at: float) -> AuditEntry:
            return AuditEntry(
                at=at, actor_id="t1", actor_name="alice", role="operator", action="runs.cancel",
                method="POST", path="/patches/runs/r1/cancel", target_id="r1", client="127.0.0.1", status=200,
            )  # fmt: skip

        for age_days in (200, 100, 60, 1):
            app.audit.write(entry(clock() - age_days * DAY))
        dry = app.store.retention.prune(runs_before=None, audit_before=clock() - 90 * DAY, dry_run=True)
        assert dry.audit == 2 and len(app.audit.list(limit=10)) == 4
        report = app.prune()  # the policy: runs by 30 days, the audit log by its own 90
        assert report.audit == 2
        assert sorted(round((clock() - e.at) / DAY) for e in app.audit.list(limit=10)) == [1, 60]
    finally:
        app.close()


def test_db_prune_on_the_command_line(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "m.db")
    clock = FakeClock()  # November 2025: older than 30 days by the wall clock the command uses
    app = _app(url, tmp_path, clock)
    try:
        old = run_script(app, clock, tmp_path)
    finally:
        app.close()
    config = str(tmp_path / "mendloop.yaml")
    dry = subprocess.run(
        mendloop_argv("db", "prune", "--older-than", "30d", "--dry-run", "--json", "-c", config),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["runs"] == len(old) and json.loads(dry.stdout)["dry_run"] is True
    done = subprocess.run(
        mendloop_argv("db", "prune", "--older-than", "30d", "-c", config), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "runs" in done.stdout and str(len(old)) in done.stdout
    with sqlite3.connect(tmp_path / "m.db") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    bad = subprocess.run(
        mendloop_argv("db", "prune", "--older-than", "30x", "-c", config), capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "--older-than" in bad.stderr


def _writer(url: str, stop: threading.Event, written: list[int]) -> None:
    store = Store(url)
    try:
        while not stop.is_set():
            store.publish([NewEvent(type="test.write", message="w") for _ in range(20)])
            written.append(20)
    finally:
        store.close()


def test_backup_of_a_sqlite_file_while_it_is_written(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "live.db")
    stop = threading.Event()
    written: list[int] = []
    writer = threading.Thread(target=_writer, args=(url, stop, written))
    writer.start()
    try:
        wait_for(lambda: sum(written) >= 2000, timeout=60)
        store = Store(url)
        try:
            with store.db.read() as conn:
                committed = int(conn.execute(sa.select(sa.func.count()).select_from(t.events)).scalar_one())
        finally:
            store.close()
        (tmp_path / "cfg.yaml").write_text(f"database_url: {url}\n")
        began = sum(written)
        done = subprocess.run(
            mendloop_argv("db", "backup", str(tmp_path / "copy.db"), "-c", str(tmp_path / "cfg.yaml")),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        ended = sum(written)
    finally:
        stop.set()
        writer.join(30)
    assert ended > began  # the writes went on while the copy was made
    with sqlite3.connect(tmp_path / "copy.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        copied = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() is not None
    assert committed <= copied <= sum(written)
    assert not (tmp_path / ".copy.db.partial").exists()


def test_backup_of_postgresql_with_pg_dump(database_url: str, tmp_path: Path) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("pg_dump is the PostgreSQL backup")
    if shutil.which("pg_dump") is None or shutil.which("pg_restore") is None:
        pytest.skip("pg_dump is not installed here")
    store = Store(database_url)
    try:
        store.publish([NewEvent(type="test.write", message=f"m{i}") for i in range(37)])
    finally:
        store.close()
    (tmp_path / "cfg.yaml").write_text(f"database_url: {database_url}\n")
    dump = tmp_path / "pg.dump"
    done = subprocess.run(
        mendloop_argv("db", "backup", str(dump), "-c", str(tmp_path / "cfg.yaml")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    script = subprocess.run(
        ["pg_restore", "--data-only", "--table=events", "-f", "-", str(dump)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0, script.stderr
    body = script.stdout.split("COPY public.events", 1)[1].split("\n\\.", 1)[0]
    assert len(body.strip().splitlines()) - 1 == 37  # the COPY line's tail, then one line per row
    # Without pg_dump on PATH: one line, and a non-zero exit.
    empty = tmp_path / "bin"
    empty.mkdir()
    missing = subprocess.run(
        mendloop_argv("db", "backup", str(tmp_path / "x.dump"), "-c", str(tmp_path / "cfg.yaml")),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": str(empty)},
    )
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: pg_dump is not on PATH: install the PostgreSQL client tools to back up PostgreSQL"
    )


def test_a_declared_floor_hook_keeps_the_events_it_needs(database_url: str) -> None:
    """The `retention floor` hook: any part appends a function giving the lowest event id it still needs."""
    clock = FakeClock()
    store = Store(database_url, clock=clock)
    try:
        ids = [e.id for e in store.publish([NewEvent(type="test.old", message=f"m{i}") for i in range(10)])]
        clock.advance(40 * DAY)
        store.retention.floors.append(lambda _conn: ids[6])
        store.retention.floors.append(lambda _conn: None)  # a reader with nothing to keep
        report = store.retention.prune(runs_before=None, events_before=clock() - 30 * DAY, batch=4)
        assert (report.events, report.event_floor) == (6, ids[6])
        with store.db.read() as conn:
            left = list(conn.execute(sa.select(t.events.c.id).order_by(t.events.c.id)).scalars())
        assert left == ids[6:]
    finally:
        store.close()


def test_a_notification_cursor_nobody_delivers_any_more_stops_holding_events(database_url: str) -> None:
    """A target removed from the config leaves its row; once no process has touched it for a week, its cursor no
    longer keeps events from going (a delivering process renews its lease on the row every few seconds)."""
    clock = FakeClock()
    store = Store(database_url, clock=clock)
    try:
        ids = [e.id for e in store.publish([NewEvent(type="test.old", message=f"m{i}") for i in range(10)])]
        cursors = NotifyCursors(store.db)
        cursors.ensure("renamed-away", ids[2])
        clock.advance(40 * DAY)
        cursors.ensure("still-here", ids[5])  # written now: someone delivers it
        report = store.retention.prune(runs_before=None, events_before=clock() - 30 * DAY, dry_run=True)
        assert report.event_floor == ids[5] + 1  # the stale cursor at ids[2] holds nothing back
        report = store.retention.prune(runs_before=None, events_before=clock() - 30 * DAY)
        assert report.events == 6
    finally:
        store.close()
