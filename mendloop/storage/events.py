"""The durable events table, read side (events are written by `Tx.emit` in the transaction that caused them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from mendloop.domain.page_cursor import After
from mendloop.domain.records import EventRecord, NewEvent
from mendloop.storage import schema as t
from mendloop.storage.db import Database
from mendloop.storage.pages import EVENTS_PAGE, newest_first
from mendloop.storage.rows import event_of

# Longer than any write transaction holds an event id before it commits (they take milliseconds).
_SINCE_SLACK = 60.0


class EventStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def publish(self, events: Sequence[NewEvent]) -> list[EventRecord]:
        with self.db.write() as tx:
            return tx.emit(events)

    def recent(
        self, *, event_type: str | None = None, limit: int = 50, since: float | None = None
    ) -> list[EventRecord]:
        return self.recent_page(event_type=event_type, limit=limit, since=since)[0]

    def recent_page(
        self,
        *,
        event_type: str | None = None,
        limit: int = 50,
        since: float | None = None,
        after: After | None = None,
        offset: int = 0,
    ) -> tuple[list[EventRecord], str | None]:
        """Newest first (id), from a cursor: the events and the next page's cursor."""
        q = sa.select(t.events)
        if event_type:
            q = q.where(t.events.c.type == event_type)
        with self.db.read() as conn:
            if since is not None:
                # Bounded below by id too: walking ids down from the newest, a filter on created_at alone would go
                # on through the whole history once the events since then are passed. Ids follow created_at but
                # for transactions committing out of order, so the bound starts `_SINCE_SLACK` seconds earlier.
                first = conn.execute(
                    sa.select(t.events.c.id)
                    .where(t.events.c.created_at >= since - _SINCE_SLACK)
                    .order_by(t.events.c.created_at)
                    .limit(1)
                ).scalar()
                if first is None:
                    return [], None
                q = q.where(t.events.c.id >= first, t.events.c.created_at >= since)
            rows, cursor = newest_first(
                conn,
                q,
                kind=EVENTS_PAGE,
                key=t.events.c.id,
                item_id=t.events.c.id,
                after=after,
                limit=limit,
                offset=offset,
            )
        return [event_of(r) for r in rows], cursor

    def after(self, after_id: int, limit: int = 500) -> list[EventRecord]:
        """The events visible now with an id above `after_id`. Not a cursor: on PostgreSQL a transaction holding a
        smaller id may still commit after this read. Follow the table with `event_feed.EventFeed` instead."""
        q = sa.select(t.events).where(t.events.c.id > after_id).order_by(t.events.c.id).limit(limit)
        with self.db.read() as conn:
            return [event_of(r) for r in conn.execute(q)]

    def of_run(self, run_id: str) -> list[EventRecord]:
        q = sa.select(t.events).where(t.events.c.run_id == run_id).order_by(t.events.c.id)
        with self.db.read() as conn:
            return [event_of(r) for r in conn.execute(q)]

    def merge_payloads(self, changes: Mapping[int, Mapping[str, Any]]) -> int:
        """Set keys of stored events' payloads, in one write transaction: for each event id, each key of its change
        replaces the payload's, except that a dict merges into a dict one level deep (`{"log_context": {"after":
        [...]}}` keeps the context's other keys). Events are otherwise immutable: this is for what arrives after
        its event was stored (a watcher's after-lines). The caller redacts. Returns how many events were found."""
        if not changes:
            return 0
        ev = t.events.c
        found = 0
        ids = list(changes)
        with self.db.write() as tx:
            # In chunks: far below every backend's limit on bound parameters.
            rows = [
                row
                for i in range(0, len(ids), 500)
                for row in tx.conn.execute(
                    sa.select(ev.id, ev.payload).where(ev.id.in_(ids[i : i + 500])).with_for_update()
                )
            ]
            for event_id, payload in rows:
                merged = dict(payload or {})
                for key, value in changes[int(event_id)].items():
                    old = merged.get(key)
                    merged[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, Mapping) else value
                tx.conn.execute(sa.update(t.events).where(ev.id == event_id).values(payload=merged))
                found += 1
        return found
