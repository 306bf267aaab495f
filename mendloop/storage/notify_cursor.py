"""The notification targets' durable cursors (table `notify_cursors`): where each target is in the events table,
its counters, its retry state, and the lease of the one process delivering it.

Every change but `ensure` and `claim` is made only by the lease's holder (`lease_owner = owner` in the WHERE), and
says whether it was: a process that lost its lease (it stalled past `lease_seconds`) learns it at its next write
and stops, so two processes never deliver one target at once for longer than one attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from mendloop.storage import schema as t
from mendloop.storage.db import Database

_c = t.notify_cursors.c


@dataclass(frozen=True, slots=True)
class CursorRow:
    target: str
    cursor: int  # the last event handled (delivered, dropped or not wanted)
    delivered: int
    failed: int  # failed attempts, all told
    dropped: int  # events given up after `max_attempts`
    failures: int  # failed attempts in a row at the event after the cursor
    next_attempt_at: float | None
    last_error: str | None  # redacted before it is stored
    last_error_at: float | None
    last_delivered_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None


def _row(r: sa.Row[tuple[object, ...]]) -> CursorRow:
    m = r._mapping
    return CursorRow(
        target=str(m["target"]),
        cursor=int(m["cursor"]),
        delivered=int(m["delivered"]),
        failed=int(m["failed"]),
        dropped=int(m["dropped"]),
        failures=int(m["failures"]),
        next_attempt_at=m["next_attempt_at"],
        last_error=m["last_error"],
        last_error_at=m["last_error_at"],
        last_delivered_at=m["last_delivered_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
    )


class NotifyCursors:
    def __init__(self, db: Database) -> None:
        self.db = db

    def ensure(self, target: str, head: int) -> None:
        """A target seen for the first time starts at `head` (it is not sent the history); one already known keeps
        its cursor."""
        now = self.db.clock()
        row = {
            "target": target,
            "cursor": head,
            "delivered": 0,
            "failed": 0,
            "dropped": 0,
            "failures": 0,
            "created_at": now,
            "updated_at": now,
        }
        with self.db.write() as tx:
            tx.conn.execute(self.db.insert(t.notify_cursors).values(**row).on_conflict_do_nothing())

    def get(self, target: str) -> CursorRow | None:
        with self.db.read() as conn:
            r = conn.execute(sa.select(t.notify_cursors).where(_c.target == target)).first()
        return None if r is None else _row(r)

    def all(self) -> list[CursorRow]:
        with self.db.read() as conn:
            return [_row(r) for r in conn.execute(sa.select(t.notify_cursors).order_by(_c.target))]

    def claim(self, target: str, owner: str, *, now: float, lease_seconds: float) -> bool:
        """Take or renew the target's lease: free, lapsed, or already `owner`'s."""
        free = sa.or_(_c.lease_owner.is_(None), _c.lease_owner == owner, _c.lease_expires_at < now)
        q = (
            sa.update(t.notify_cursors)
            .where(_c.target == target, free)
            .values(lease_owner=owner, lease_expires_at=now + lease_seconds, updated_at=now)
        )
        with self.db.write() as tx:
            return tx.conn.execute(q).rowcount == 1

    def release(self, target: str, owner: str) -> None:
        """Hand the lease back (a clean stop), so the next process takes the target over at once."""
        q = (
            sa.update(t.notify_cursors)
            .where(_c.target == target, _c.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )
        with self.db.write() as tx:
            tx.conn.execute(q)

    def _held(self, target: str, owner: str, **values: object) -> bool:
        q = sa.update(t.notify_cursors).where(_c.target == target, _c.lease_owner == owner).values(**values)
        with self.db.write() as tx:
            return tx.conn.execute(q).rowcount == 1

    def delivered(self, target: str, owner: str, event_id: int, *, now: float) -> bool:
        """Event `event_id` was delivered: the cursor moves to it (after the delivery: at least once)."""
        return self._held(
            target,
            owner,
            cursor=event_id,
            delivered=_c.delivered + 1,
            failures=0,
            next_attempt_at=None,
            last_delivered_at=now,
            updated_at=now,
        )

    def failed(
        self,
        target: str,
        owner: str,
        event_id: int,
        *,
        failures: int,
        give_up: bool,
        next_at: float,
        error: str,
        now: float,
    ) -> bool:
        """An attempt at `event_id` failed: try it again at `next_at`, or (`give_up`) count it dropped and move past."""
        moved: dict[str, object] = (
            {"cursor": event_id, "dropped": _c.dropped + 1, "failures": 0, "next_attempt_at": None}
            if give_up
            else {"failures": failures, "next_attempt_at": next_at}
        )
        return self._held(
            target, owner, failed=_c.failed + 1, last_error=error, last_error_at=now, updated_at=now, **moved
        )

    def advance(self, target: str, owner: str, cursor: int, *, now: float) -> bool:
        """Past events the target does not want (never backwards)."""
        return self._held(target, owner, cursor=sa.case((_c.cursor < cursor, cursor), else_=_c.cursor), updated_at=now)
