#!/usr/bin/env python3
"""importer: a small CSV importer service, the second example mendloop heals (docs/first-service.md).

    python3 importer.py --port 8300 --state-dir ./state

It imports the CSV files of its inbox (`inbox/` beside this file) into a SQLite database it keeps open, caches what
it parsed in memory up to a byte limit, and answers an admin API on 127.0.0.1. It logs with Python's `logging`
(`2026-12-02 10:00:00,123 ERROR [importer.db] Lost connection to the database: ...`) to `importer.log` in the state
directory. It does not restart itself and has no analysis endpoint: mendloop restarts it (`runs: {process: ...}`)
and decides causes from its log. Standard library only.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # keep the service directory (a git repository in the guide) clean

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from collections import OrderedDict  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import parsing  # noqa: E402

LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
LOG = logging.getLogger("importer")
DB_LOG = logging.getLogger("importer.db")
CACHE_LOG = logging.getLogger("importer.cache")
CSV_LOG = logging.getLogger("importer.csv")

BOOT_ID = uuid.uuid4().hex[:12]
STARTED_AT = datetime.now(UTC).isoformat(timespec="milliseconds")
MAX_BODY_BYTES = 64 * 1024
MAX_ATTEMPTS_KEPT = 100
DEFAULT_CACHE_LIMIT = 8 * 1024 * 1024
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\.csv$")


class ApiError(Exception):
    """An answer other than 2xx, as JSON: `{"error", "field"?, ...}`."""

    def __init__(self, status: int, error: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.extra = status, error, field, extra

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, **self.extra}
        if self.field is not None:
            out["field"] = self.field
        return out


class DatabaseLost(Exception):
    pass


class Database:
    """One SQLite connection, opened at start and kept open (as a service keeps its connection to a database
    server). `drop` closes it the way a server going away does: the next use fails until `reopen`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS payments (source TEXT NOT NULL, line INTEGER NOT NULL, month TEXT NOT NULL,"
            " payee TEXT NOT NULL, amount_cents INTEGER NOT NULL, currency TEXT NOT NULL, PRIMARY KEY (source, line))"
        )
        return conn

    def connected(self) -> bool:
        with self.lock:
            try:
                self.conn.execute("SELECT 1").fetchone()
                return True
            except sqlite3.Error:
                return False

    def drop(self) -> None:
        with self.lock:
            self.conn.close()

    def reopen(self) -> None:
        with self.lock:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
            self.conn = self._open()

    def replace_rows(self, source: str, rows: list[parsing.Row]) -> None:
        """The file's rows, all or nothing: importing a file again replaces what it stored before."""
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    self.conn.execute("DELETE FROM payments WHERE source = ?", (source,))
                    self.conn.executemany(
                        "INSERT INTO payments VALUES (?, ?, ?, ?, ?, ?)",
                        [(source, r.line, r.month, r.payee, r.amount_cents, r.currency) for r in rows],
                    )
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
            except sqlite3.ProgrammingError as exc:  # "Cannot operate on a closed database."
                raise DatabaseLost(str(exc)) from exc

    def stored(self) -> dict[str, int]:
        with self.lock:
            try:
                found = self.conn.execute("SELECT source, COUNT(*) FROM payments GROUP BY source").fetchall()
            except sqlite3.ProgrammingError as exc:
                raise DatabaseLost(str(exc)) from exc
        return dict(found)


class Cache:
    """Parsed files kept in memory, up to `limit` bytes. It never evicts: past the limit it logs an overflow, and
    only a flush (`POST /ops/cache/flush`) empties it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.entries: OrderedDict[str, bytes] = OrderedDict()

    def bytes(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.entries.values())

    def put(self, key: str, value: bytes) -> None:
        with self.lock:
            self.entries[key] = value
            held = sum(len(v) for v in self.entries.values())
        if held > self.limit:
            CACHE_LOG.error("Cache overflow: %d bytes held, limit %d bytes", held, self.limit)

    def flush(self) -> int:
        with self.lock:
            freed = sum(len(v) for v in self.entries.values())
            self.entries.clear()
        CACHE_LOG.info("Cache flushed: %d bytes freed", freed)
        return freed


class Attempts:
    """Every import attempt, newest last, in `imports.json` of the state directory (written atomically), so the
    most recent failed import can be retried after a restart."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = json.load(fh)
            self.items: list[dict[str, Any]] = loaded if isinstance(loaded, list) else []
        except (OSError, ValueError):
            self.items = []

    def add(self, attempt: dict[str, Any]) -> None:
        with self.lock:
            self.items = [*self.items, attempt][-MAX_ATTEMPTS_KEPT:]
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.items, fh, indent=1)
            os.replace(tmp, self.path)

    def last_failed(self) -> str | None:
        """The file of the newest attempt if it failed: a retry after a success has nothing to redo."""
        with self.lock:
            return None if not self.items or self.items[-1]["ok"] else str(self.items[-1]["file"])

    def recent(self, n: int = 20) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.items[-n:])


class Importer:
    def __init__(self, state_dir: str, inbox: str, cache_limit: int) -> None:
        self.inbox = inbox
        self.db = Database(os.path.join(state_dir, "importer.db"))
        self.cache = Cache(cache_limit)
        self.attempts = Attempts(os.path.join(state_dir, "imports.json"))

    def run(self, name: object) -> tuple[int, dict[str, Any]]:
        """Import one inbox file. (HTTP status, `{"ok", "rows", "error", "file"}`)."""
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
            raise ApiError(400, "file must be the name of a .csv file in the inbox, e.g. rent.csv", "file")
        path = os.path.join(self.inbox, name)
        if not os.path.isfile(path):
            raise ApiError(404, f"no file {name!r} in the inbox", "file", inbox=sorted(self._inbox_files()))
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        status, answer = 200, {"ok": True, "rows": 0, "error": None, "file": name}
        try:
            rows = parsing.parse_rows(name, text)
            self.db.replace_rows(name, rows)
        except DatabaseLost as exc:
            DB_LOG.error("Lost connection to the database: %s (import of %s not stored)", exc, name)
            status, answer = 503, {**answer, "ok": False, "error": "database connection lost"}
        except Exception as exc:  # any bug in the import is logged with its traceback and answered, never fatal
            CSV_LOG.exception("Import failed for %s:", name)
            status, answer = 500, {**answer, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            self.cache.put(f"rows:{name}", text.encode("utf-8"))
            answer = {**answer, "rows": len(rows), "total_cents": sum(r.amount_cents for r in rows)}
            CSV_LOG.info("Imported %s: %d rows", name, len(rows))
        self.attempts.add({**answer, "at": datetime.now(UTC).isoformat(timespec="milliseconds")})
        return status, answer

    def _inbox_files(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.inbox) if _FILE_NAME.fullmatch(n)]
        except OSError:
            return []

    def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        routes: dict[str, tuple[str, ...]] = {
            "/healthz": ("GET",),
            "/ops/db": ("GET",),
            "/ops/db/reopen": ("POST",),
            "/ops/cache": ("GET",),
            "/ops/cache/flush": ("POST",),
            "/faults/drop-db": ("POST",),
            "/faults/fill-cache": ("POST",),
            "/imports": ("GET",),
            "/imports/run": ("POST",),
            "/imports/retry": ("POST",),
        }
        if path not in routes:
            raise ApiError(404, f"no such endpoint: {path}", endpoints=sorted(routes))
        if method not in routes[path]:
            raise ApiError(405, f"method {method} not allowed on {path}", allowed=list(routes[path]))
        if path == "/healthz":
            connected = self.db.connected()
            return 200, {
                "status": "ok" if connected else "degraded",
                "pid": os.getpid(),
                "boot_id": BOOT_ID,
                "started_at": STARTED_AT,
                "db": "connected" if connected else "lost",
            }
        if path == "/ops/db":
            return 200, {"db_connected": self.db.connected()}
        if path == "/ops/db/reopen":
            self.db.reopen()
            DB_LOG.info("Database connection reopened")
            return 200, {"db_connected": self.db.connected()}
        if path == "/ops/cache":
            return 200, {"bytes": self.cache.bytes(), "limit": self.cache.limit}
        if path == "/ops/cache/flush":
            return 200, {"flushed_bytes": self.cache.flush(), "bytes": self.cache.bytes()}
        if path == "/faults/drop-db":
            self.db.drop()
            DB_LOG.warning("Fault injected: the database connection was closed")
            return 200, {"dropped": True}
        if path == "/faults/fill-cache":
            self.cache.put(f"fill:{uuid.uuid4().hex}", b"\0" * (self.cache.limit - self.cache.bytes() + 1024 * 1024))
            return 200, {"bytes": self.cache.bytes(), "limit": self.cache.limit}
        if path == "/imports":
            try:
                stored: dict[str, int] | None = self.db.stored()
            except DatabaseLost:
                stored = None
            return 200, {"inbox": sorted(self._inbox_files()), "stored": stored, "attempts": self.attempts.recent()}
        if path == "/imports/run":
            return self.run(body.get("file"))
        failed = self.attempts.last_failed()  # /imports/retry
        if failed is None:
            return 409, {"ok": False, "rows": 0, "error": "no failed import to retry", "file": None}
        return self.run(failed)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logging.getLogger("importer.http").debug(format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            body = self._body() if method in ("POST", "PUT") else {}
            status, answer = self.server.importer.handle(method, urlsplit(self.path).path, body)
        except ApiError as exc:
            status, answer = exc.status, exc.body()
        except Exception:  # the admin API answers JSON whatever happens; the traceback goes to the log
            LOG.exception("Request %s %s failed:", method, self.path)
            status, answer = 500, {"error": "internal error; see importer.log"}
        data = (json.dumps(answer, sort_keys=True) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "Content-Length must be a number", "Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise ApiError(413, f"a body holds at most {MAX_BODY_BYTES} bytes", "body")
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body must be a JSON object", "body") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "body")
        return body


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, importer: Importer) -> None:
        self.importer = importer
        super().__init__(("127.0.0.1", port), Handler)


def setup_logging(log_path: str) -> None:
    root = logging.getLogger("importer")
    root.setLevel(logging.INFO)
    root.propagate = False
    handler = logging.FileHandler(log_path, encoding="utf-8") if log_path != "-" else logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="importer: a CSV importer service mendloop heals")
    parser.add_argument("--port", type=int, default=8300, help="TCP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--state-dir", default="./state", help="importer.db, importer.log and imports.json")
    parser.add_argument("--inbox", default=os.path.join(HERE, "inbox"), help="the directory of CSV files to import")
    parser.add_argument("--log", help="the log file (default: importer.log in the state directory; - for stderr)")
    parser.add_argument("--cache-limit-bytes", type=int, default=DEFAULT_CACHE_LIMIT)
    parser.add_argument("--pidfile", help="write this process's pid there once it listens (a supervisor reads it)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.cache_limit_bytes < 1:
        parser.error("--cache-limit-bytes must be positive")
    state_dir = os.path.abspath(args.state_dir)
    os.makedirs(state_dir, exist_ok=True)
    setup_logging(args.log or os.path.join(state_dir, "importer.log"))
    importer = Importer(state_dir, os.path.abspath(args.inbox), args.cache_limit_bytes)
    try:
        server = Server(args.port, importer)
    except OSError as exc:
        LOG.error("Cannot listen on 127.0.0.1:%d: %s", args.port, exc)
        return 2

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    port = server.server_address[1]
    if args.pidfile:
        tmp = f"{args.pidfile}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, args.pidfile)
    LOG.info("Importer started on http://127.0.0.1:%d (pid %d, boot %s)", port, os.getpid(), BOOT_ID)
    print(f"importer listening on http://127.0.0.1:{port}", flush=True)  # noqa: T201 (a script's own output)
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        LOG.info("Importer stopping (pid %d)", os.getpid())
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
