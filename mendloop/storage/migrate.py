"""Alembic, driven from code: `mendloop db upgrade`, and `serve` on an empty database."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from mendloop.errors import StorageError

MIGRATIONS = Path(__file__).with_name("migrations")


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = _config()
    try:
        # SQLite: the engine's BEGIN IMMEDIATE hook gives alembic one exclusive transaction for the whole upgrade.
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except sa.exc.DBAPIError as exc:
        where = engine.url.render_as_string(hide_password=True)
        message = " ".join(str(exc.orig).split()) + _read_only_hint(engine)
        raise StorageError(f"cannot open or upgrade the database {where}: {message}") from None


def _read_only_hint(engine: Engine) -> str:
    """Why SQLite could not open a file for writing, when it is that: SQLite itself says only "unable to open
    database file" (its -wal and -shm files cannot be made) or "attempt to write a readonly database"."""
    name = engine.url.database
    if engine.dialect.name != "sqlite" or not name or name == ":memory:" or name.startswith("file:"):
        return ""
    path = Path(name)
    for candidate in (path, path.parent):
        if candidate.exists() and not os.access(candidate, os.W_OK):
            return f" ({candidate} is read-only)"
    return ""


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def revision(engine: Engine, message: str) -> None:
    """Developer helper: autogenerate a new revision from the difference with `schema.metadata`."""
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.revision(cfg, message=message, autogenerate=True)
