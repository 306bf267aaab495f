"""Builders shared by the tests: pre-migrated databases, an App on a given database, playbook files, the API
in process or on a live server."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from mendloop.app import App
from mendloop.config import Settings, load_settings
from mendloop.domain.states import RunStatus


def in_ci() -> bool:
    """True when the environment variable CI says so (CI=true, CI=1, ...)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs every property with this many times its usual examples.
FUZZ_FACTOR = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1


def examples(n: int) -> int:
    """A property's `max_examples`: `n` in `make test`, FUZZ_FACTOR * n under `make fuzz`."""
    return n * FUZZ_FACTOR


_ports_given: set[int] = set()
_port_rnd = random.Random()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server the test starts next.

    Picked at random below the kernel's ephemeral range (32768+), where no outgoing connection of this or another
    process is given it as a source port meanwhile, and never twice in one process: parallel test sessions and
    xdist workers rarely meet, and a test can ask for several before binding any.
    """
    for _ in range(1000):
        port = _port_rnd.randrange(20000, 32000)
        if port in _ports_given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError("no free TCP port found in 20000-31999")


def write_playbooks(directory: Path, *playbooks: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for pb in playbooks:
        (directory / f"{pb['id']}.yaml").write_text(yaml.safe_dump(pb, sort_keys=False))
    return directory


def settings_for(database_url: str, tmp_path: Path, **extra: Any) -> Settings:
    cfg: dict[str, Any] = {"database_url": database_url, "poll_interval": 0.05, "workers": 1, **extra}
    path = tmp_path / "mendloop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_settings(path)


# URLs of databases that are already migrated to head (the `database_url` fixture, `migrated_sqlite`): App.open
# skips Alembic for them. Any other URL is migrated as `serve` would.
_MIGRATED: set[str] = set()
_sqlite_template: Path | None = None


def mark_migrated(url: str) -> str:
    _MIGRATED.add(url)
    return url


def migrate_with_app(url: str) -> None:
    """Migrate `url` to head the way the service does (App.open), then close every connection."""
    App(load_settings(None, database_url=url)).open(start_workers=False, start_watchers=False).close()


def sqlite_template() -> Path:
    """A SQLite file migrated to head, made once per process (per xdist worker) and removed at exit.

    Checkpointed and with no connection left open, so the file alone holds the whole database (no -wal to carry).
    """
    global _sqlite_template
    if _sqlite_template is None:
        directory = Path(tempfile.mkdtemp(prefix="mendloop-template-"))
        atexit.register(shutil.rmtree, directory, True)
        path = directory / "template.db"
        migrate_with_app(f"sqlite:///{path}")
        conn = sqlite3.connect(path)
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
        wal = path.with_name(path.name + "-wal")
        if busy or (wal.exists() and wal.stat().st_size):
            raise RuntimeError(f"{path}: the WAL could not be checkpointed into the file")
        _sqlite_template = path
    return _sqlite_template


def migrated_sqlite(path: Path) -> str:
    """A SQLite database at `path`, migrated to head (a copy of the template: no Alembic run); returns its URL.

    Asked again for the same path, it hands back the database already there.
    """
    url = f"sqlite:///{path}"
    if url in _MIGRATED and path.exists():
        return url
    shutil.copyfile(sqlite_template(), path)
    return mark_migrated(url)


def open_app(settings: Settings, *, start_workers: bool = False, upgrade: bool | None = None, **kw: Any) -> App:
    """Open an App; `upgrade=None` runs the migrations only when the database is not one handed out migrated."""
    if upgrade is None:
        upgrade = settings.database_url not in _MIGRATED
    return App(settings, **kw).open(start_workers=start_workers, upgrade=upgrade)


def drain(app: App, owner: str = "test:0:w", limit: int = 1000) -> int:
    """Run due work on the calling thread until none is due; returns how many claims were made."""
    n = 0
    while n < limit and app.workers.run_once(owner):
        n += 1
    return n


def wait_for(predicate: Callable[[], bool], timeout: float = 20, interval: float = 0.02) -> None:
    """Poll until `predicate` holds; a deadline, not a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def wait_status(app: App, run_id: str, *statuses: RunStatus, timeout: float = 20) -> RunStatus:
    wait_for(lambda: app.store.run_status(run_id) in statuses, timeout)
    return app.store.run_status(run_id)


class _InProcess(httpx.BaseTransport):
    """A sync httpx transport that hands each request to `httpx.ASGITransport` on an event loop in one thread.

    Requests from several threads run concurrently on that loop, as on a server. Bodies are read whole each way.
    """

    def __init__(self, asgi: Any, portal: Any) -> None:
        self._asgi = httpx.ASGITransport(app=asgi, raise_app_exceptions=False)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def call() -> httpx.Response:
            forwarded = httpx.Request(request.method, request.url, headers=request.headers, content=body)
            response = await self._asgi.handle_async_request(forwarded)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        response: httpx.Response = self._portal.call(call)
        return response


@contextmanager
def api_client(app: App) -> Iterator[httpx.Client]:
    """The API in process around an already open App: an httpx.Client over `httpx.ASGITransport`, with no socket or
    server. An unhandled error is a 500, as from a real server.

    Responses are buffered whole, so a test of a stream (SSE) or of a client in another process uses `api_server`.
    """
    import anyio.from_thread

    from mendloop.api.server import create_api

    with anyio.from_thread.start_blocking_portal() as portal:
        transport = _InProcess(create_api(app, manage=False), portal)
        with httpx.Client(transport=transport, base_url="http://mendloop.test", timeout=30) as client:
            yield client


@contextmanager
def api_server(app: App, port: int) -> Iterator[httpx.Client]:
    """The real API on 127.0.0.1:port in a thread, around an already open App."""
    from mendloop.api.server import create_api

    server = uvicorn.Server(
        uvicorn.Config(create_api(app, manage=False), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def mendloop_argv(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "mendloop", *args]


@contextmanager
def serve_process(
    config: Path,
    port: int,
    *,
    log: Path,
    env: dict[str, str] | None = None,
    timeout: float = 30,
    args: tuple[str, ...] = (),
) -> Iterator[Any]:
    """`mendloop serve` (with `args`) as a real subprocess; waits up to `timeout` s for /health and stops it by PID
    afterwards."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            mendloop_argv("serve", "--config", str(config), "--port", str(port), *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )
    try:
        wait_healthy(port, proc, log, timeout)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_healthy(port: int, proc: Any, log: Path, timeout: float = 30) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"mendloop serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout, 0.05)


def git(repo: Path, *args: str) -> str:
    """`git -C repo args` with a test identity; its stdout, stripped. A non-zero exit raises."""
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@contextmanager
def json_service(answer: Callable[[str, str, Any], Any]) -> Iterator[str]:
    """A real HTTP service on 127.0.0.1 that answers every request with `answer(method, path, body)` as JSON
    (200; `body` is the request's JSON, or None without one). Yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _any(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = json.dumps(answer(self.command, self.path, json.loads(raw) if raw else None)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie nobody reaps (this machine's pid 1 reaps no orphans) counts as dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


# A test command that waits until a file named `open` appears in the directory given as its argument: a test holds
# mendloop's own test run of a diff there (a directory, so the sandbox can show it), then opens it.
GATE_SCRIPT = (
    "import os, sys, time\nwhile not os.path.exists(os.path.join(sys.argv[1], 'open')):\n    time.sleep(0.02)\n"
)


@contextmanager
def history_app(database_url: str, tmp_path: Path, runs: int) -> Iterator[App]:
    """An open App over a history of `runs` runs in the schema's real shape (bench/gen_history.py) written into the
    test's database."""
    import sqlalchemy as sa

    from bench import gen_history

    end = gen_history.end_of_history()
    if database_url.startswith("sqlite"):
        gen_history.build_sqlite(Path(sa.make_url(database_url).database or ""), runs, end=end)
    else:
        gen_history.build_postgres(database_url, runs, end=end)
    app = open_app(settings_for(database_url, tmp_path))
    try:
        yield app
    finally:
        app.close()
