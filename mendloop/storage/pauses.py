"""Paused components, kept in the `pauses` table: every worker process on every machine reads the same pauses
(the run claim skips a paused component's queued runs), and they survive restarts."""

from __future__ import annotations

import sqlalchemy as sa

from mendloop.domain import pauses as decide
from mendloop.domain.pauses import Pause
from mendloop.storage import schema as t
from mendloop.storage.db import Database


class PauseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def pause(self, scope: str, reason: str, by: str = "operator") -> Pause:
        """Pause a scope, or give it a new reason; a `control.paused` event either way."""
        with self.db.write() as tx:
            pause = Pause(scope, reason, tx.now)
            tx.conn.execute(
                self.db.insert(t.pauses)
                .values(scope=scope, reason=reason, created_at=tx.now)
                .on_conflict_do_update(index_elements=["scope"], set_={"reason": reason, "created_at": tx.now})
            )
            tx.emit([decide.paused_event(pause, by)])
        return pause

    def resume(self, scope: str | None, by: str = "operator") -> list[Pause]:
        """Lift one scope's pause, or every pause (None); what was lifted, each with a `control.resumed` event."""
        with self.db.write() as tx:
            q = sa.delete(t.pauses).returning(*t.pauses.c)
            if scope is not None:
                q = q.where(t.pauses.c.scope == scope)
            lifted = [Pause(str(r.scope), str(r.reason), float(r.created_at)) for r in tx.conn.execute(q)]
            tx.emit([decide.resumed_event(p, by) for p in lifted])
        return sorted(lifted, key=lambda p: p.scope)

    def current(self) -> dict[str, Pause]:
        with self.db.read() as conn:
            rows = conn.execute(sa.select(t.pauses)).all()
        return {str(r.scope): Pause(str(r.scope), str(r.reason), float(r.created_at)) for r in rows}
