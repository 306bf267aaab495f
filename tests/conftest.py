"""Shared pytest fixtures and the Hypothesis profiles.

Database fixtures need MENDLOOP_TEST_POSTGRES_URL (``postgresql+psycopg://user@host:port/db``) for the
PostgreSQL variants; ``make test`` (scripts/test.sh) starts a throwaway cluster and sets it. Without it the
PostgreSQL variants are skipped locally and fail under CI (env CI set), where both backends must run.

Databases are handed out already migrated: Alembic runs once per session (per xdist worker) into a template, and
each test gets a copy (a file copy for SQLite, ``CREATE DATABASE ... TEMPLATE`` for PostgreSQL). Tests of the
migrations themselves take ``empty_database_url``.

Hypothesis: profile ``ci`` (chosen when CI is set) is derandomized, so a landing can't fail by chance;
``fuzz`` (``make fuzz``: HYPOTHESIS_PROFILE=fuzz) runs the same properties with random seeds and
``support.FUZZ_FACTOR`` times the examples; ``dev`` (the default) uses random seeds.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, settings
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from mendloop.app import App
from tests.support import api_client, api_server, free_port, in_ci, mark_migrated, migrate_with_app, migrated_sqlite

POSTGRES_URL_ENV = "MENDLOOP_TEST_POSTGRES_URL"

settings.register_profile("dev", deadline=None)
# Same examples on every run and every machine; no deadline or too_slow check, which a loaded CI machine would trip.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("fuzz", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if in_ci() else "dev"))


def _require_postgres_url() -> str:
    """Return MENDLOOP_TEST_POSTGRES_URL, or skip (locally) / fail (in CI) when it is unset."""
    url = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if url:
        return url
    message = f"{POSTGRES_URL_ENV} is not set: run the tests with `make test`, which starts a PostgreSQL cluster"
    if in_ci():
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


@contextmanager
def _postgres_database(template: str | None = None) -> Iterator[str]:
    """A fresh ``t_<hex>`` database on the test server (a copy of `template` when given), dropped
    (``WITH (FORCE)``) afterwards; yields its SQLAlchemy URL."""
    admin = make_url(_require_postgres_url())
    conninfo = _psycopg_conninfo(admin)
    name = f"t_{uuid.uuid4().hex[:16]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create = sql.SQL("{} TEMPLATE {}").format(create, sql.Identifier(template))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(create)
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def _postgres_template() -> Iterator[str]:
    """Name of a database migrated to head once per session; tests get copies of it. Nobody stays connected to
    it (PostgreSQL copies a template only then)."""
    with _postgres_database() as url:
        migrate_with_app(url)
        name = make_url(url).database
        assert name is not None
        yield name


_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=_BACKENDS, ids=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLAlchemy URL of a database private to this test, migrated to head (App.open and `open_app` skip Alembic).

    ``sqlite``: a real file ``<tmp_path>/mendloop.db``, a copy of the session's template. ``postgres``: a fresh
    ``t_<hex>`` database on the test server made from the session's template, dropped after the test.
    """
    if request.param == "sqlite":
        yield migrated_sqlite(tmp_path / "mendloop.db")
        return
    template: str = request.getfixturevalue("_postgres_template")
    with _postgres_database(template) as url:
        yield mark_migrated(url)


@pytest.fixture(params=_BACKENDS, ids=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLAlchemy URL of an empty database private to this test, for the tests of the migrations themselves."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with _postgres_database() as url:
        yield url


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (`support.free_port`)."""
    return free_port()


@pytest.fixture
def client(app: App) -> Iterator[httpx.Client]:
    """The API in process (no socket, no server thread) around the test module's `app` fixture."""
    with api_client(app) as c:
        yield c


@pytest.fixture
def live_client(app: App, free_port: int) -> Iterator[httpx.Client]:
    """The API on a real server on 127.0.0.1 around the test module's `app`: for streams (SSE)."""
    with api_server(app, free_port) as c:
        yield c
