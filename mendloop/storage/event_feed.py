"""The durable cursor over the events table: every committed event exactly once, in id order, after a cursor.

This is the one reader for everything that follows the events table by cursor (the live stream, and the
notifications that will deliver from it). Its API is small:

- `EventFeed(db).read_after(after_id, *, limit, types, components) -> (events, safe_next)`: the events with
  `after_id < id <= horizon` that match the filter, in id order, at most `limit`. `safe_next` is the cursor to pass
  next time: the last id returned when the page is full, else the horizon (events skipped by the filter are passed
  over too). Storing `safe_next` and reading again never misses a committed event and never repeats one.
- `head()`: the horizon now, where a reader that wants only what happens from now on starts.
- `oldest()`: the smallest id kept (retention prunes from the bottom), None for an empty table.

The horizon is the largest id below which every event is settled: committed, or rolled back and never to appear.
On SQLite there is one writer, ids are given under its lock and commit in order, so the horizon is the largest id
in the reader's snapshot.

On PostgreSQL ids come from a sequence and several writers commit in any order: a transaction that took id 10 may
commit after one that took id 11, so "id > cursor" alone would skip 10 for good. Filtering on the writer's
transaction id (`xid < pg_snapshot_xmin`) is not enough with an id cursor either: a transaction whose xid was
assigned early (by an earlier UPDATE) can take id 11 after a younger one took id 10 and commit first. So the horizon
is advanced in two steps instead, the way CREATE INDEX CONCURRENTLY waits for older writers:

1. read the sequence's last value V (non-transactional: every id handed out so far is <= V), then the virtual
   transaction ids of every session holding a writer's lock on `events`. An INSERT takes that lock before it
   evaluates `nextval`, so every transaction still holding an id <= V is in that set;
2. once none of those transactions is still in flight (a later call looks), every id <= V is settled: V is the
   new horizon.

With no writer in flight step 2 holds at once, so an idle feed is current. A transaction holding its lock for long
(a big batch) holds the horizon back for exactly that long, and no event above it is handed out meanwhile. The
state is per `EventFeed` and shared by its callers (it is thread-safe): make one per process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain.event_cursor import EventFilter, event_filter
from mendloop.domain.records import EventRecord
from mendloop.storage import schema as t
from mendloop.storage.db import Database
from mendloop.storage.rows import event_of

_LAST_ID = sa.text("SELECT pg_sequence_last_value(pg_get_serial_sequence('events', 'id')::regclass)")
# Lock modes of INSERT, UPDATE, DELETE and stronger; a reader's AccessShareLock (and FOR UPDATE's RowShareLock) can
# hold no id. `IS DISTINCT FROM`: a prepared (two-phase) transaction has no pid and must count.
_WRITERS = sa.text(
    "SELECT DISTINCT virtualtransaction FROM pg_locks"
    " WHERE locktype = 'relation' AND relation = 'events'::regclass"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')"
    " AND pid IS DISTINCT FROM pg_backend_pid()"
)
_STILL_RUNNING = sa.text("SELECT count(*) FROM pg_locks WHERE virtualtransaction = ANY(:vx)")


class EventFeed:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._settled = 0  # PostgreSQL: every id <= this is settled
        self._pending: tuple[int, list[str]] | None = None  # (V, writers that may hold an id <= V)

    def read_after(
        self,
        after_id: int,
        *,
        limit: int = 500,
        types: Iterable[str] = (),
        components: Iterable[str] = (),
    ) -> tuple[list[EventRecord], int]:
        """Events after `after_id` up to the horizon, matching `types` (exact, or `prefix.*`) and `components`;
        and the cursor to read after next. An InputError names a bad filter value."""
        where = event_filter(types, components)
        ev = t.events.c
        with self.db.read() as conn:
            horizon = self._horizon(conn)
            if horizon <= after_id:
                return [], after_id
            q = sa.select(t.events).where(ev.id > after_id, ev.id <= horizon).order_by(ev.id).limit(limit)
            for clause in _clauses(where):
                q = q.where(clause)
            events = [event_of(r) for r in conn.execute(q)]
        return events, events[-1].id if len(events) >= limit else horizon

    def head(self) -> int:
        """The horizon now: every event at or below it is committed (or will never be)."""
        with self.db.read() as conn:
            return self._horizon(conn)

    def oldest(self) -> int | None:
        with self.db.read() as conn:
            value = conn.execute(sa.select(sa.func.min(t.events.c.id))).scalar()
        return None if value is None else int(value)

    def _horizon(self, conn: Connection) -> int:
        if self.db.is_sqlite:
            # The same deferred transaction then reads the rows: one snapshot, one writer, ids in commit order.
            return int(conn.execute(self.db.max_event_id).scalar() or 0)
        with self._lock:
            if self._pending is not None:
                last, writers = self._pending
                if not writers or not conn.execute(_STILL_RUNNING, {"vx": writers}).scalar():
                    self._settled = max(self._settled, last)
                    self._pending = None
            if self._pending is None:
                # The sequence first, then the writers: a transaction that took an id <= last took its lock before.
                last = int(conn.execute(_LAST_ID).scalar() or 0)
                writers = [str(v) for v in conn.execute(_WRITERS).scalars()]
                if writers:
                    self._pending = (last, writers)
                else:
                    self._settled = max(self._settled, last)
            conn.commit()  # end the read transaction: pg_locks is read afresh each time anyway
            return self._settled


def _clauses(where: EventFilter) -> list[sa.ColumnElement[bool]]:
    ev = t.events.c
    out: list[sa.ColumnElement[bool]] = []
    if where.types or where.prefixes:
        out.append(
            sa.or_(
                *([ev.type.in_(where.types)] if where.types else []),
                # The prefix comes from a checked name (letters, digits, _ - .): `_` is LIKE's one-character
                # wildcard, so it is escaped.
                *(ev.type.like(p.replace("_", r"\_") + "%", escape="\\") for p in where.prefixes),
            )
        )
    if where.components:
        out.append(ev.component.in_(where.components))
    return out
