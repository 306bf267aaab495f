"""The durable events table, read side (events are written by `Tx.emit` in the transaction that caused them)."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from mendloop.domain.records import EventRecord, NewEvent
from mendloop.storage import schema as t
from mendloop.storage.db import Database
from mendloop.storage.rows import event_of


class EventStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def publish(self, events: Sequence[NewEvent]) -> list[EventRecord]:
        with self.db.write() as tx:
            return tx.emit(events)

    def recent(
        self, *, event_type: str | None = None, limit: int = 50, since: float | None = None
    ) -> list[EventRecord]:
        q = sa.select(t.events).order_by(t.events.c.id.desc()).limit(limit)
        if event_type:
            q = q.where(t.events.c.type == event_type)
        if since is not None:
            q = q.where(t.events.c.created_at >= since)
        with self.db.read() as conn:
            return [event_of(r) for r in conn.execute(q)]

    def after(self, after_id: int, limit: int = 500) -> list[EventRecord]:
        q = sa.select(t.events).where(t.events.c.id > after_id).order_by(t.events.c.id).limit(limit)
        with self.db.read() as conn:
            return [event_of(r) for r in conn.execute(q)]

    def of_run(self, run_id: str) -> list[EventRecord]:
        q = sa.select(t.events).where(t.events.c.run_id == run_id).order_by(t.events.c.id)
        with self.db.read() as conn:
            return [event_of(r) for r in conn.execute(q)]
