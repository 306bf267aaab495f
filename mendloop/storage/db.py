"""The database: engines, and the two kinds of transaction, said at the call site.

- `write()` takes the write lock up front. On SQLite that is `BEGIN IMMEDIATE` (a deferred transaction that
  later writes can fail with SQLITE_BUSY instead of waiting), with the threads of this process queued on a lock.
  Events written in it are fanned out after it commits.
- `read()` never waits for the writer. On SQLite it is a deferred transaction on a connection of its own pool:
  in WAL mode it reads the last committed snapshot while a write is in progress (a read that began IMMEDIATE
  waited a second behind a held write lock; deferred, it took 3 ms). PostgreSQL reads under READ COMMITTED, in
  autocommit on read-only sessions (`_postgres_read_engine`).

Dialect differences live here and in the claim statements of runs.py and work_orders.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from mendloop.domain.records import EventRecord, NewEvent
from mendloop.errors import StorageError
from mendloop.storage import schema as t

Clock = Callable[[], float]
AfterCommit = Callable[[Sequence[EventRecord]], None]


def sqlite_insert(table: sa.Table) -> str:
    """`INSERT INTO table (every column, in table order) VALUES (?, ...)`: executemany of plain tuples on SQLite's
    hot paths, without SQLAlchemy's per-row parameter processing (JSON values serialised by the caller)."""
    return str(table.insert().compile(dialect=sqlite_dialect.dialect()))


_SQLITE_INSERT_EVENTS = sqlite_insert(t.events)
_EVENT_COLUMNS = ["id", "type", "source", "message", "payload", "run_id", "work_order_id", "component", "created_at"]
assert [c.name for c in t.events.c] == _EVENT_COLUMNS, "Tx.emit builds its tuples in this order"


# Connections kept open for reads: as many as the threads that answer requests at once under load (20 clients),
# so a burst reuses them instead of opening (PRAGMAs, a PostgreSQL backend) and closing one per request.
READ_POOL = 24


def _sqlite_engine(url: sa.URL, *, begin: str, pool_size: int = 8) -> Engine:
    engine = sa.create_engine(
        url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=pool_size, max_overflow=8
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver level so that SQLAlchemy's "begin" below decides the lock mode.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is durable against a process crash (kill -9); only a power cut can lose the last
        # transactions.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


def _postgres_read_engine(url: sa.URL) -> Engine:
    """Reads run under READ COMMITTED, where every statement takes its own snapshot whether or not a transaction
    wraps them: a read-only transaction adds nothing but its BEGIN and ROLLBACK, two round trips to a server that
    shares the CPUs (a work orders page: 9 round trips, 4.3 ms, where 6 statements do). So reads run in autocommit,
    on sessions that refuse writes: a write that strays into `read()` fails loudly instead of committing alone."""
    engine = sa.create_engine(
        url, isolation_level="AUTOCOMMIT", pool_size=READ_POOL, max_overflow=20, pool_pre_ping=True
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")

    return engine


class Tx:
    """One write transaction: its connection, and the events written in it (published after commit)."""

    __slots__ = ("conn", "db", "now", "published")

    def __init__(self, db: Database, conn: Connection) -> None:
        self.db = db
        self.conn = conn
        self.now = db.clock()
        self.published: list[EventRecord] = []

    def take_seq(self, name: str, n: int = 1) -> int:
        """Reserve the next `n` numbers of a named counter; returns the last (the first is last - n + 1)."""
        return int(self.conn.execute(self.db.take_seq_stmt, {"seq_name": name, "seq_n": n}).scalar_one())

    def emit(self, events: Sequence[NewEvent]) -> list[EventRecord]:
        """Store events in this transaction; they are fanned out once it commits."""
        if not events:
            return []
        now = self.db.clock()
        ids: Iterable[int]
        if self.db.is_sqlite and len(events) > 1:
            # This transaction holds SQLite's only write lock (BEGIN IMMEDIATE), so the next ids are ours to give,
            # and the rows go in with one executemany of plain tuples: RETURNING in parameter order would cost
            # SQLAlchemy an INSERT per row, and its per-row parameter processing is most of the remaining cost.
            last = self.conn.execute(self.db.max_event_id).scalar() or 0
            ids = range(last + 1, last + 1 + len(events))
            dumps = json.dumps
            self.conn.exec_driver_sql(
                _SQLITE_INSERT_EVENTS,
                [
                    (i, e.type, e.source, e.message, dumps(e.payload), e.run_id, e.work_order_id, e.component, now)
                    for i, e in zip(ids, events, strict=True)
                ],
            )
        else:
            rows = [
                {
                    "type": e.type,
                    "source": e.source,
                    "message": e.message,
                    "payload": e.payload,
                    "run_id": e.run_id,
                    "work_order_id": e.work_order_id,
                    "component": e.component,
                    "created_at": now,
                }
                for e in events
            ]
            ids = self.conn.execute(self.db.insert_events_returning, rows).scalars()
        stored = [
            EventRecord(
                id=int(row_id),
                type=e.type,
                source=e.source,
                message=e.message,
                payload=e.payload,
                created_at=now,
                run_id=e.run_id,
                work_order_id=e.work_order_id,
                component=e.component,
            )
            for row_id, e in zip(ids, events, strict=True)
        ]
        self.published.extend(stored)
        return stored

    def rollback(self) -> None:
        """Undo everything (events included): the caller found it had nothing to do after all."""
        self.conn.rollback()
        self.published.clear()


class Database:
    def __init__(self, url: str, *, clock: Clock = time.time, after_commit: AfterCommit | None = None) -> None:
        self.url = url
        self.clock = clock
        self._after_commit = after_commit
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise StorageError(f"invalid database URL {url!r}") from exc
        backend = parsed.get_backend_name()
        # The SQLite file (None: PostgreSQL or in memory), whose filesystem's free space the health probe watches.
        self.sqlite_file: Path | None = None
        if backend == "sqlite":
            self.engine = _sqlite_engine(parsed, begin="BEGIN IMMEDIATE")
            in_memory = parsed.database in (None, "", ":memory:")
            if not in_memory and parsed.database is not None and not parsed.database.startswith("file:"):
                self.sqlite_file = Path(parsed.database)
            # An in-memory database exists once per connection pool: it reads through the writer's engine.
            self.read_engine = (
                self.engine if in_memory else _sqlite_engine(parsed, begin="BEGIN DEFERRED", pool_size=READ_POOL)
            )
        elif backend == "postgresql":
            self.engine = sa.create_engine(parsed, pool_size=8, max_overflow=20, pool_pre_ping=True)
            self.read_engine = _postgres_read_engine(parsed)
        else:
            raise StorageError(f"unsupported database {backend!r}; use sqlite or postgresql")
        self.is_sqlite = backend == "sqlite"
        self.insert = sqlite_dialect.insert if self.is_sqlite else pg_dialect.insert
        self.insert_events_returning = sa.insert(t.events).returning(t.events.c.id, sort_by_parameter_order=True)
        self.max_event_id = sa.select(sa.func.max(t.events.c.id))
        # One upsert, built once: atomic on both databases (two first takers of a new name can't both start it at
        # n), one statement per run and work order created, and no statement construction on that hot path.
        seq, n = t.sequences, sa.bindparam("seq_n", type_=sa.BigInteger())
        self.take_seq_stmt = (
            self.insert(seq)
            .values(name=sa.bindparam("seq_name", type_=sa.String()), value=n)
            .on_conflict_do_update(index_elements=[seq.c.name], set_={"value": seq.c.value + n})
            .returning(seq.c.value)
        )
        # SQLite has one writer at a time. Threads of this process queue on a lock, woken the moment it is free,
        # instead of in SQLite's busy handler, which sleeps (1, 2, 5 ... 100 ms) between retries.
        self._writer: AbstractContextManager[Any] = threading.RLock() if self.is_sqlite else nullcontext()
        self._reading = threading.local()

    @contextmanager
    def write(self) -> Iterator[Tx]:
        try:
            with self._writer, self.engine.begin() as conn:
                tx = Tx(self, conn)
                yield tx
        except sa.exc.DBAPIError as exc:
            raise StorageError(_one_line(exc)) from exc
        if tx.published and self._after_commit is not None:
            self._after_commit(tx.published)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read connection. Nested in another read of the same thread it is that one (one transaction, one
        snapshot on SQLite): a request that reads several stores (a run's detail: seven) checks out one connection
        and begins once, instead of once per store, which was most of a small read's cost."""
        held: Connection | None = getattr(self._reading, "conn", None)
        if held is not None:
            yield held
            return
        try:
            with self.read_engine.connect() as conn:
                self._reading.conn = conn
                try:
                    yield conn
                finally:
                    self._reading.conn = None
        except sa.exc.DBAPIError as exc:
            raise StorageError(_one_line(exc)) from exc

    def close(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


def _one_line(exc: sa.exc.DBAPIError) -> str:
    """The driver's message in one line: libpq's runs on with a hint ("\n\tIs the server running ..."), and the
    message goes to logs, CLI errors and JSON bodies that show one line each."""
    return "database error: " + " ".join(str(exc.orig).split())
