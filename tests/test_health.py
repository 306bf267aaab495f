"""Operations (issue 8, item 14): /health reports the age of the last successful write, made by a probe off the
request path, and turns degraded while the database cannot be written (really: a SQLite file locked by another
connection, a PostgreSQL database made read-only), then ok again; the server caps connections and event
streams and drops connections whose headers never complete."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
import uvicorn

from mendloop.api.server import create_api, uvicorn_config
from mendloop.app import App
from tests.support import api_client, free_port, open_app, settings_for, wait_for

TOKEN_A = "stream-token-a-0123456789"
TOKEN_B = "stream-token-b-0123456789"
FAST_PROBE = {"probe_interval_seconds": 0.05, "max_write_age_seconds": 0.5}


def _app(database_url: str, tmp_path: Path, **extra: Any) -> App:
    return open_app(settings_for(database_url, tmp_path, workers=0, **extra))


@contextlib.contextmanager
def serving(app: App) -> Iterator[str]:
    """The API on 127.0.0.1 with the uvicorn settings `serve` uses (`uvicorn_config`), in a thread."""
    port = free_port()
    api = create_api(app, manage=False)
    server = uvicorn.Server(uvicorn_config(api, app.settings.model_copy(update={"port": port}), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _quick_health(client: httpx.Client) -> httpx.Response:
    # Answered from memory: it never waits on the database, however stuck the probe is. Waiting on the locked
    # database would take the store's busy timeout (30 s) and fail this read's 10 s; timing is for bench/health.py.
    return client.get("/health", timeout=10)


# -- the write probe --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_health_degrades_while_another_connection_holds_the_sqlite_file(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path, health=FAST_PROBE)
    locker = None
    try:
        with api_client(app) as client:
            first = _quick_health(client)
            body = first.json()
            assert first.status_code == 200 and body["status"] == "ok" and body["database"] == "ok"
            assert 0 <= body["last_write_age_seconds"] < 0.5
            assert body["storm"]["rate_limited"] == 0
            # Another process's exclusive lock: reads still work, no write can commit.
            path = sa.make_url(database_url).database
            assert path is not None
            import sqlite3

            locker = sqlite3.connect(path, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            wait_for(lambda: _quick_health(client).status_code == 503, 10)
            down = _quick_health(client).json()
            assert down["status"] == "degraded"
            assert down["database"].startswith("error: no successful write for")
            assert down["last_write_age_seconds"] > 0.5
            locker.execute("ROLLBACK")
            wait_for(lambda: _quick_health(client).status_code == 200, 10)
            back = _quick_health(client).json()
            assert back["database"] == "ok" and back["last_write_age_seconds"] < 0.5
    finally:
        if locker is not None:
            locker.close()
        app.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_health_degrades_while_postgres_refuses_writes(database_url: str, tmp_path: Path) -> None:
    url = sa.make_url(database_url)
    name = url.database
    admin = psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname="postgres", autocommit=True
    )

    def set_read_only(on: bool) -> None:
        # New sessions of this database start read-only (or not); existing ones are ended so the pool reconnects.
        setting = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        admin.execute(f'ALTER DATABASE "{name}" {setting}')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )

    app = _app(database_url, tmp_path, health=FAST_PROBE)
    try:
        with api_client(app) as client:
            assert _quick_health(client).json()["status"] == "ok"
            set_read_only(True)
            # The first failed probe may be the one whose connection was terminated ("terminating connection due
            # to administrator command"), degraded too; the next one meets the read-only database.
            wait_for(lambda: "read-only" in str(_quick_health(client).json().get("database")), 10)
            down = _quick_health(client).json()
            assert _quick_health(client).status_code == 503
            assert down["status"] == "degraded"
            assert "read-only" in down["database"], down["database"]
            # A read still works: this is what a SELECT 1 health check would have called healthy.
            assert client.get("/events/recent").status_code == 200
            set_read_only(False)
            wait_for(lambda: _quick_health(client).status_code == 200, 10)
            assert _quick_health(client).json()["database"] == "ok"
    finally:
        app.close()
        set_read_only(False)
        admin.close()


# -- connections --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_event_streams_are_capped_per_client_and_in_total(database_url: str, tmp_path: Path) -> None:
    app = _app(
        database_url,
        tmp_path,
        api_tokens=[TOKEN_A, TOKEN_B],
        limits={"max_sse_streams": 3, "max_sse_streams_per_client": 2},
    )
    try:
        with serving(app) as base, httpx.Client(base_url=base, timeout=10) as client, contextlib.ExitStack() as held:

            def open_stream(token: str) -> httpx.Response:
                r = held.enter_context(
                    client.stream("GET", "/events/stream", headers={"Authorization": f"Bearer {token}"})
                )
                if r.status_code != 200:
                    r.read()
                return r

            a1, a2 = open_stream(TOKEN_A), open_stream(TOKEN_A)
            assert a1.status_code == a2.status_code == 200
            third = open_stream(TOKEN_A)
            assert third.status_code == 429
            body = third.json()
            assert body["limit"] == "limits.max_sse_streams_per_client" and body["max"] == 2
            assert body["field"] == "stream"
            assert open_stream(TOKEN_B).status_code == 200  # another client: its own slots
            total = open_stream(TOKEN_B)
            assert total.status_code == 429 and total.json()["limit"] == "limits.max_sse_streams"
            # A stream that ends gives its slot back.
            a1.close()
            wait_for(lambda: open_stream(TOKEN_B).status_code == 200, 10)
            # The others are still answered normally.
            assert client.get("/health").status_code == 200
    finally:
        app.close()


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_slow_headers_are_dropped_and_connections_capped(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path, limits={"header_timeout_seconds": 1.5, "max_connections": 4})
    try:
        with serving(app) as base:
            idle = _connect(base)  # sends nothing
            slow = _connect(base)  # sends part of its headers, and never the rest
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            third = _connect(base)
            opened = time.monotonic()
            # 3 held connections and this request make 4: past the cap, a 503.
            capped = httpx.get(f"{base}/health", timeout=10)
            assert capped.status_code == 503
            for s in (idle, slow, third):
                assert s.recv(1024) == b""  # closed by the server: blocks until then (10 s socket timeout)
                s.close()
            held_for = time.monotonic() - opened
            assert 1.0 <= held_for < 8, held_for
            # The slots are free again, and a request that sends its headers at once is served.
            wait_for(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, 10)
    finally:
        app.close()
