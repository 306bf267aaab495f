"""Trust scores and their history. The arithmetic and the wording are `domain.trust`'s; this keeps the result."""

from __future__ import annotations

import sqlalchemy as sa

from mendloop.domain import trust
from mendloop.domain.records import TrustChange
from mendloop.storage import schema as t
from mendloop.storage.db import Database, Tx
from mendloop.storage.rows import trust_change_of

_COUNTED = (trust.TrustReason.RECURRENCE, trust.TrustReason.REGRESSION)


class TrustStore:
    def __init__(self, db: Database, weights: trust.TrustWeights) -> None:
        self.db = db
        self.weights = weights

    def apply(self, tx: Tx, move: trust.TrustMove, run_id: str | None) -> TrustChange:
        """Move a component's score inside the caller's transaction (read, decide, write: no lost update)."""
        old = tx.conn.execute(
            sa.select(t.trust_scores.c.score).where(t.trust_scores.c.component == move.component)
        ).scalar()
        change, events = trust.move(
            move, float(old) if old is not None else None, self.weights, run_id=run_id, now=tx.now
        )
        tx.conn.execute(
            self.db.insert(t.trust_scores)
            .values(component=change.component, score=change.new, updated_at=tx.now)
            .on_conflict_do_update(index_elements=["component"], set_={"score": change.new, "updated_at": tx.now})
        )
        tx.conn.execute(
            sa.insert(t.trust_history).values(
                component=change.component,
                old=change.old,
                new=change.new,
                reason=change.reason,
                # Which recurrence of its incident a recurrence (or regression) move was for; NULL for the others.
                recurrences=move.recurrences if move.reason in _COUNTED else None,
                run_id=run_id,
                created_at=tx.now,
            )
        )
        tx.emit(events)
        return change

    def score(self, component: str) -> float:
        with self.db.read() as conn:
            value = conn.execute(
                sa.select(t.trust_scores.c.score).where(t.trust_scores.c.component == component)
            ).scalar()
        return float(value) if value is not None else self.weights.initial

    def scores(self) -> dict[str, float]:
        with self.db.read() as conn:
            rows = conn.execute(sa.select(t.trust_scores.c.component, t.trust_scores.c.score))
            return {str(c): float(s) for c, s in rows}

    def history(
        self, component: str | None = None, run_id: str | None = None, *, last: int | None = None
    ) -> list[TrustChange]:
        """Oldest first; with `last`, only the newest `last` changes (a component's history grows with every run,
        so the API reads it by its (component, id) index from the newest end)."""
        q = sa.select(t.trust_history)
        if component:
            q = q.where(t.trust_history.c.component == component)
        if run_id:
            q = q.where(t.trust_history.c.run_id == run_id)
        if last is not None:
            q = q.order_by(t.trust_history.c.id.desc()).limit(last)
            with self.db.read() as conn:
                return [trust_change_of(r) for r in reversed(conn.execute(q).all())]
        with self.db.read() as conn:
            return [trust_change_of(r) for r in conn.execute(q.order_by(t.trust_history.c.id))]
