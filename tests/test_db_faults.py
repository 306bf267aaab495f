"""Database faults under load: PostgreSQL's backends killed (pg_terminate_backend) and the server restarted while
worker threads run; a SQLite file on a full disk and on a read-only mount. mendloop reconnects or degrades with a
one-line error, corrupts nothing, and finishes everything once the database is back.

The PostgreSQL test restarts a private cluster (scripts/pg-test-cluster.sh), never the session's shared one; the
SQLite tests mount a small tmpfs (root only, as in CI and this machine; skipped elsewhere).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from mendloop.app import App
from mendloop.domain.states import RunStatus
from mendloop.errors import StorageError
from mendloop.storage.health import disk_problem
from tests.support import (
    api_client,
    free_port,
    mendloop_argv,
    migrate_with_app,
    migrated_sqlite,
    open_app,
    serve_process,
    settings_for,
    wait_for,
    write_playbooks,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "scripts" / "pg-test-cluster.sh"
# Appends the step's idempotency key to argv[1]: each completed step leaves one line.
STEP = "import os,sys; open(sys.argv[1],'a').write(os.environ['MENDLOOP_IDEMPOTENCY_KEY']+'\\n')"


def playbook(log: Path) -> dict[str, Any]:
    steps = [
        {"id": f"s{i}", "action": "command", "with": {"argv": [sys.executable, "-c", STEP, str(log)]}} for i in (1, 2)
    ]
    return {"id": "two", "type": "retry", "description": "d", "steps": steps}


def completed(app: App) -> int:
    return app.store.list_runs(status=RunStatus.COMPLETED.value, limit=1)[1]


def trigger(app: App, n: int, tag: str) -> list[str]:
    return [app.remediation.trigger(error_type="two", description=f"{tag} {i}")[0].id for i in range(n)]


def assert_each_step_once(log: Path, run_ids: list[str]) -> None:
    """Every run's two steps left their line. A step cut off by a lost connection may run again with the same key
    (at-least-once, as the idempotency key tells the step); no run has a key of a step attempt beyond its first."""
    keys = Counter(log.read_text().split())
    steps: dict[str, set[str]] = {}
    for key in keys:
        run, step, attempt = key.split(":")
        assert attempt == "1", key
        steps.setdefault(run, set()).add(step)
    assert steps == {r: {"s1", "s2"} for r in run_ids}


@pytest.fixture
def private_postgres() -> Iterator[tuple[str, str]]:
    """A PostgreSQL cluster of this test's own (it is restarted); yields (its directory, its SQLAlchemy URL)."""
    directory = tempfile.mkdtemp(prefix="mendloop-pgfault-")
    port = free_port()
    subprocess.run(["bash", str(CLUSTER), "start", directory, str(port)], check=True, capture_output=True)
    try:
        yield directory, f"postgresql+psycopg://test@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", directory], check=False, capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_backends_killed_and_server_restarted_mid_load_then_everything_finishes(
    private_postgres: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory, url = private_postgres
    port = url.rsplit(":", 1)[1].split("/")[0]
    migrate_with_app(url)
    log = tmp_path / "effects.log"
    write_playbooks(tmp_path / "pb", playbook(log))
    settings = settings_for(url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"two": "two"}, workers=2)
    app = open_app(settings, start_workers=True, upgrade=False)
    conninfo = f"postgresql://test@127.0.0.1:{port}/postgres"
    try:
        run_ids = trigger(app, 30, "before")
        wait_for(lambda: completed(app) >= 3, timeout=60)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = 'postgres' AND pid <> pg_backend_pid() AND backend_type = 'client backend') k"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        done = completed(app)
        wait_for(lambda: completed(app) > done, timeout=60)  # still working after its connections were cut
        subprocess.run(["bash", str(CLUSTER), "stop", directory], check=True, capture_output=True)
        with pytest.raises(StorageError) as down:
            trigger(app, 1, "while down")
        assert "\n" not in down.value.message
        subprocess.run(["bash", str(CLUSTER), "start", directory, port], check=True, capture_output=True)
        run_ids += trigger(app, 10, "after")  # the pool reconnects by itself
        wait_for(lambda: completed(app) == len(run_ids), timeout=120)
        statuses = Counter(app.store.run_status(r) for r in run_ids)
        assert statuses == {RunStatus.COMPLETED: len(run_ids)}
        assert_each_step_once(log, run_ids)
        assert app.health is not None
        wait_for(lambda: app.health.probe_once().error is None, timeout=30)
    finally:
        app.close()


# -- SQLite on a small filesystem --------------------------------------------------------------------------------


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 6 MB tmpfs mounted for this test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = Path(tempfile.mkdtemp(prefix="mendloop-smallfs-"))
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        mount.rmdir()


def fill(path: Path) -> None:
    """Write `path` until the filesystem has no byte left (unbuffered: each write reaches the disk or fails)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return row
    finally:
        conn.close()


def sqlite_app(mount: Path, tmp_path: Path) -> tuple[App, Path, Path]:
    db = mount / "mendloop.db"
    url = migrated_sqlite(db)
    log = tmp_path / "effects.log"
    write_playbooks(tmp_path / "pb", playbook(log))
    settings = settings_for(url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"two": "two"}, workers=2)
    return open_app(settings, start_workers=True), db, log


def assert_refused_cleanly(app: App) -> None:
    """A write is a one-line 503 through the API and /health says degraded, naming the database's error."""
    assert app.health is not None
    state = app.health.probe_once()
    assert state.error is not None and "\n" not in state.error
    with api_client(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert health.json()["database"] != "ok"
        r = client.post("/patches/trigger", json={"error_type": "two", "description": "refused", "wait_seconds": 0})
    assert r.status_code == 503, r.text
    body = r.json()
    message = body.get("detail") or body.get("message") or body.get("error")
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in r.text


def assert_recovers(app: App, db: Path, run_ids: list[str], log: Path) -> None:
    assert app.health is not None
    wait_for(lambda: app.health.probe_once().error is None, timeout=30)
    run_ids += trigger(app, 5, "after")
    wait_for(lambda: completed(app) == len(run_ids), timeout=60)
    assert_each_step_once(log, run_ids)
    assert integrity(db) == "ok"


def test_sqlite_disk_full_is_a_clear_error_corrupts_nothing_and_recovers(
    small_fs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, db, log = sqlite_app(small_fs, tmp_path)
    try:
        run_ids = trigger(app, 5, "before")
        wait_for(lambda: completed(app) == 5, timeout=60)
        filler = small_fs / "filler"
        caplog.set_level(logging.WARNING)
        fill(filler)
        with pytest.raises(StorageError) as full:
            trigger(app, 20, "while full")  # a few may fit in free pages; the disk fills before 20 do
        assert "full" in full.value.message and "\n" not in full.value.message
        assert_refused_cleanly(app)
        assert integrity(db) == "ok"
        # What was logged while full: warnings of one line each, no tracebacks.
        spam = [r for r in caplog.records if r.exc_info or "\n" in r.getMessage()]
        assert spam == [], [r.getMessage() for r in spam[:3]]
        filler.unlink()
        run_ids += [r.id for r in app.store.list_runs(limit=100)[0] if r.id not in run_ids]
        assert_recovers(app, db, run_ids, log)
    finally:
        app.close()


def test_serve_on_a_read_only_sqlite_file_refuses_in_one_line_and_starts_once_writable(
    small_fs: Path, tmp_path: Path, free_port: int
) -> None:
    """A file that can't be written can't be served (migrations, leases and the write probe all write): `serve`
    exits non-zero with one line naming the file, no traceback, and starts on the same file once it is writable.
    The view is a read-only bind mount of the tmpfs, since root ignores file permissions."""
    app, db, _ = sqlite_app(small_fs, tmp_path)
    try:
        run_ids = trigger(app, 3, "before")
        wait_for(lambda: completed(app) == 3, timeout=60)
    finally:
        app.close()
    view = Path(tempfile.mkdtemp(prefix="mendloop-roview-"))
    subprocess.run(["mount", "--bind", str(small_fs), str(view)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        cfg = tmp_path / "ro.yaml"
        cfg.write_text(f"database_url: sqlite:///{view / 'mendloop.db'}\n")
        refused = subprocess.run(
            mendloop_argv("serve", "--config", str(cfg), "--port", str(free_port)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0
        err = refused.stderr.strip()
        # One line says why (a preflight warning about the built-ins may come before it), and no traceback.
        assert "Traceback" not in err and [ln for ln in err.splitlines() if ln.startswith("error:")] == [
            err.splitlines()[-1]
        ], err
        assert err.endswith(f"{view / 'mendloop.db'} is read-only)")
        assert integrity(db) == "ok"
        subprocess.run(["mount", "-o", "remount,rw,bind", str(view)], check=True, capture_output=True)
        with serve_process(cfg, free_port, log=tmp_path / "serve.log"):
            health = httpx.get(f"http://127.0.0.1:{free_port}/health", timeout=10)
            assert health.status_code == 200 and health.json()["database"] == "ok"
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False, capture_output=True)
        view.rmdir()
    assert integrity(db) == "ok"
    assert len(run_ids) == 3


def test_the_probe_counts_a_nearly_full_disk_as_a_failed_write(small_fs: Path, tmp_path: Path) -> None:
    """A one-row update can still fit in pages the SQLite file already has when its disk is full: the probe must
    not report healthy on that write alone."""
    db = small_fs / "mendloop.db"
    assert disk_problem(db) is None  # the tmpfs starts with megabytes free
    assert disk_problem(None) is None  # PostgreSQL: its own server watches its disk
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    problem = disk_problem(db, min_free=free + 1)
    assert problem is not None and "is full" in problem and str(db) in problem and "\n" not in problem
    assert disk_problem(tmp_path / "absent" / "mendloop.db") is not None  # its folder is gone: said, not raised
