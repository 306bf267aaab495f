"""Reads never wait behind the writer: on SQLite, `Store` reads answer while another connection holds the write
lock (`BEGIN IMMEDIATE`), from the last committed snapshot."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from mendloop.config import TrustConfig
from mendloop.domain.records import NewEvent
from mendloop.storage.store import Store
from tests.support import migrated_sqlite

PLAYBOOK = {"id": "pb", "type": "retry", "description": "d", "steps": [{"id": "a", "action": "sleep"}]}
DEADLINE = 10.0  # below the busy timeout (30 s): a read that waited for the lock would still be waiting


def test_reads_answer_while_another_connection_holds_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "mendloop.db"
    store = Store(migrated_sqlite(path), trust=TrustConfig())
    run, _ = store.create_run(
        playbook=PLAYBOOK,
        playbook_version="1",
        component="svc",
        error_type="e",
        description="d",
        context={},
        trigger=NewEvent(type="t", message="m"),
        message="Running playbook: pb",
    )
    # A second process's writer, as sqlite3 sees it: the write lock taken and a row written, not committed.
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO events (type, source, message, payload, created_at) VALUES ('held', 's', 'm', '{}', 0)")
    answers: dict[str, Any] = {}
    failure: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            answers["recent"] = store.recent_events(limit=10)
            answers["runs"] = store.list_runs(limit=10)
            answers["run"] = store.get_run(run.id)
            answers["steps"] = store.run_steps(run.id)
            answers["run_events"] = store.run_events(run.id)
            answers["trust"] = store.trust_history(run_id=run.id)
            answers["work_orders"] = store.list_work_orders(limit=10)
        except BaseException as exc:  # the thread's failure is the test's
            failure.append(exc)
        finally:
            done.set()

    try:
        threading.Thread(target=read, daemon=True).start()
        assert done.wait(DEADLINE), "a read waited behind the write lock"
        # The lock was held the whole time: another writer that does not wait is refused.
        probe = sqlite3.connect(path, isolation_level=None, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")
        probe.close()
    finally:
        writer.rollback()
        writer.close()
    assert not failure, failure
    assert "held" not in {e.type for e in answers["recent"]}  # the last committed snapshot, not the held write
    assert [r.id for r in answers["runs"][0]] == [run.id] and answers["runs"][1] == 1
    assert answers["run"].id == run.id
    assert {e.type for e in answers["run_events"]} >= {"t"}
    assert [c.run_id for c in answers["trust"]] == [run.id]
    store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_postgres_reads_are_autocommit_on_read_only_sessions(database_url: str) -> None:
    """PostgreSQL reads take no BEGIN and ROLLBACK (two round trips each under READ COMMITTED, where each statement
    has its own snapshot anyway), and a write that strays into `read()` fails instead of committing alone."""
    import sqlalchemy as sa

    from mendloop.storage.db import Database

    db = Database(database_url)
    try:
        with db.read() as conn:
            assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
            # No transaction block is open between statements: the session is idle, not "in transaction".
            assert conn.connection.dbapi_connection.info.transaction_status.name == "IDLE"  # type: ignore[union-attr]
            with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
                conn.exec_driver_sql("INSERT INTO pauses (scope, reason, created_at) VALUES ('x', 'r', 0)")
        with db.write() as tx:  # the writer's engine still writes
            tx.conn.exec_driver_sql("INSERT INTO pauses (scope, reason, created_at) VALUES ('x', 'r', 0)")
        with db.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM pauses WHERE scope = 'x'").scalar() == 1
    finally:
        db.close()
