"""`mendloop db backup FILE`: a consistent copy of the database while it serves.

- SQLite: the online backup API (`sqlite3.Connection.backup`) in one step, so the copy is one read snapshot (in
  WAL mode writers go on meanwhile; what they commit after the copy began is not in it). It is written beside FILE
  and renamed into place, so FILE is never a half-written database.
- PostgreSQL: `pg_dump --format=custom` (restore with `pg_restore`), when pg_dump is on PATH; the password goes
  through the environment, not the command line.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import sqlalchemy as sa

from mendloop.errors import StorageError
from mendloop.infra import process

PG_DUMP_TIMEOUT = 6 * 3600.0


def backup(url: str, dest: Path) -> str:
    """Copy the database at `url` to `dest`; returns how (a few words for the CLI)."""
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite(parsed, dest)
    if backend == "postgresql":
        return _pg_dump(parsed, dest)
    raise StorageError(f"cannot back up a {backend!r} database; use sqlite or postgresql")


def _sqlite(url: sa.URL, dest: Path) -> str:
    if url.database in (None, "", ":memory:"):
        raise StorageError("an in-memory SQLite database has nothing to back up")
    src_path = Path(url.database)
    if not src_path.is_file():
        raise StorageError(f"no SQLite database at {src_path}")
    if dest.resolve() == src_path.resolve():
        raise StorageError("the backup file must not be the database itself")
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # pages=-1: every page in one step, one snapshot
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(partial, dest)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise StorageError(f"backup to {dest} failed: {exc}") from None
    return "sqlite online backup"


def _pg_dump(url: sa.URL, dest: Path) -> str:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise StorageError("pg_dump is not on PATH: install the PostgreSQL client tools to back up PostgreSQL")
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    libpq = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    partial = dest.with_name(f".{dest.name}.partial")
    done = process.run(
        [pg_dump, "--format=custom", "--no-password", f"--file={partial}", f"--dbname={libpq}"],
        timeout=PG_DUMP_TIMEOUT,
        env=env,
        keep_bytes=4000,
    )
    if not done.ok:
        partial.unlink(missing_ok=True)
        reason = " ".join(done.stderr_text().split()) or f"exit {done.returncode}"
        raise StorageError(f"pg_dump failed: {reason}")
    os.replace(partial, dest)
    return "pg_dump (custom format; restore with pg_restore)"
