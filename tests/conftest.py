"""Shared pytest fixtures.

Database fixtures need MENDLOOP_TEST_POSTGRES_URL (``postgresql+psycopg://user@host:port/db``) for the
PostgreSQL variants; ``make test`` (scripts/test.sh) starts a throwaway cluster and sets it. Without it the
PostgreSQL variants are skipped locally and fail under CI (env CI set), where both backends must run.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

POSTGRES_URL_ENV = "MENDLOOP_TEST_POSTGRES_URL"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_postgres_url() -> str:
    """Return MENDLOOP_TEST_POSTGRES_URL, or skip (locally) / fail (in CI) when it is unset."""
    url = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if url:
        return url
    message = f"{POSTGRES_URL_ENV} is not set: run the tests with `make test`, which starts a PostgreSQL cluster"
    if _in_ci():
        pytest.fail(f"{message} (CI must run the PostgreSQL tests)", pytrace=False)
    pytest.skip(message)


def _psycopg_conninfo(url: URL) -> str:
    """SQLAlchemy ``postgresql+psycopg://...`` URL -> libpq URI usable by ``psycopg.connect``."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """SQLAlchemy URL (``postgresql+psycopg://...``) of the test server's admin database.

    For tests that need the server itself (create roles/databases, ...). Prefer ``database_url``.
    """
    return _require_postgres_url()


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
    ids=["sqlite", "postgres"],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLAlchemy URL of an empty database private to this test.

    ``sqlite``: a real file ``<tmp_path>/mendloop.db``. ``postgres``: a fresh ``t_<hex>`` database on the
    test server, dropped (``WITH (FORCE)``) after the test.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mendloop.db'}"
        return

    admin = make_url(_require_postgres_url())
    conninfo = _psycopg_conninfo(admin)
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
