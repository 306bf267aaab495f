"""The dashboard's sessions (`dashboard_sessions`): a session secret's digest and the credential it stands for.

The secret is 256 random bits handed to the browser once, in its cookie; the table keeps only its SHA-256. A
session ends when it expires, at logout (its row deleted) and when its token is revoked (TokenStore.revoke deletes
the token's sessions; the access middleware also refuses a session whose credential the keyring no longer knows).
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa

from mendloop.domain import sessions as decide
from mendloop.storage import schema as t
from mendloop.storage.db import Database

_PRUNE_EVERY = 300.0


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pruned_at = 0.0

    def create(self, credential_id: str, seconds: float = decide.SESSION_SECONDS) -> str:
        """A new session for the credential: its secret, the only time it exists outside the browser."""
        secret = secrets.token_urlsafe(32)
        with self.db.write() as tx:
            if tx.now - self._pruned_at > _PRUNE_EVERY:
                self._pruned_at = tx.now
                tx.conn.execute(sa.delete(t.dashboard_sessions).where(t.dashboard_sessions.c.expires_at < tx.now))
            tx.conn.execute(
                t.dashboard_sessions.insert().values(
                    digest=decide.digest(secret),
                    credential_id=credential_id,
                    created_at=tx.now,
                    expires_at=tx.now + seconds,
                )
            )
        return secret

    def credential_id(self, secret: str) -> str | None:
        """The credential a live session stands for; None for an unknown, ended or expired one."""
        c = t.dashboard_sessions.c
        q = sa.select(c.credential_id, c.expires_at).where(c.digest == decide.digest(secret))
        with self.db.read() as conn:
            found = conn.execute(q).first()
        if found is None or float(found.expires_at) < self.db.clock():
            return None
        return str(found.credential_id)

    def end(self, secret: str) -> None:
        with self.db.write() as tx:
            tx.conn.execute(
                sa.delete(t.dashboard_sessions).where(t.dashboard_sessions.c.digest == decide.digest(secret))
            )
