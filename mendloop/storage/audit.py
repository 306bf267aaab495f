"""The audit log (table `audit_log`): every operator and admin action, and every refusal with 403. One row is
written in its own short transaction before the answer's first byte leaves, so an answered action is on record."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import sqlalchemy as sa

from mendloop.storage import schema as t
from mendloop.storage.db import Database


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    actor_id: str | None
    actor_name: str | None
    role: str | None
    action: str
    method: str
    path: str
    target_id: str | None
    client: str | None
    status: int
    id: int | None = None


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def write(self, entry: AuditEntry) -> None:
        values = asdict(entry)
        values.pop("id")
        values["path"] = values["path"][:2000]
        values["target_id"] = values["target_id"][:300] if values["target_id"] else None
        with self.db.write() as tx:
            tx.conn.execute(t.audit_log.insert().values(**values))

    def list(self, *, limit: int = 50, actor: str | None = None, action: str | None = None) -> list[AuditEntry]:
        """The newest entries first; `actor` matches the token's name or id."""
        c = t.audit_log.c
        q = sa.select(t.audit_log).order_by(c.id.desc()).limit(limit)
        if actor:
            q = q.where(sa.or_(c.actor_name == actor, c.actor_id == actor))
        if action:
            q = q.where(c.action == action)
        with self.db.read() as conn:
            return [AuditEntry(**dict(r._mapping)) for r in conn.execute(q).all()]
