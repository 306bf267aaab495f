"""API tokens: the `api_tokens` table (`mendloop tokens create/list/revoke`), and the keyring that tells who a
presented bearer token stands for, from the configuration, the database and the process's own agent credential.

A token is 256 random bits; the table keeps its SHA-256, never the token. The keyring compares a presented
token's digest against every known digest with `hmac.compare_digest` and no early exit, so an unknown token takes
as long to refuse as a known one to accept. It holds the database's active tokens in memory and reads them again
every `REFRESH_SECONDS` (a revocation from another process counts within that; one through the API at once), so
checking a token is no database read on the request path. A token it does not know makes it read the table
again first (at most every `MISS_REFRESH_SECONDS`), so a token just made works at once.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from mendloop.config import Settings, is_loopback
from mendloop.domain import roles
from mendloop.domain.roles import Credential, Role
from mendloop.errors import Conflict, InputError, NotFound
from mendloop.storage import schema as t
from mendloop.storage.db import Database

REFRESH_SECONDS = 1.0
# A token not found reads the table again first if it was read longer ago than this: a token made a moment ago
# (by `mendloop tokens create` in another process) works at once, and a flood of wrong tokens costs at most a few
# reads a second.
MISS_REFRESH_SECONDS = 0.2
TOKEN_PREFIX = "mlt_"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh secret: 256 random bits, with a prefix that says what it is (secret scanners can match it)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A stored token as `tokens list` shows it: never the token, never its digest."""

    id: str
    name: str
    role: Role
    repositories: tuple[str, ...]
    created_at: float
    revoked_at: float | None

    def credential(self) -> Credential:
        return Credential(f"db:{self.id}", self.name, self.role, roles.scope_of(self.repositories))


def _row(r: sa.Row[tuple[object, ...]]) -> TokenRow:
    m = r._mapping
    return TokenRow(
        id=str(m["id"]),
        name=str(m["name"]),
        role=Role(m["role"]),
        repositories=tuple(str(x) for x in (m["repositories"] or [])),
        created_at=float(m["created_at"]),
        revoked_at=None if m["revoked_at"] is None else float(m["revoked_at"]),
    )


_SHOWN = [c for c in t.api_tokens.c if c.name != "digest"]


class TokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str, role: str, repositories: Sequence[str] = ()) -> tuple[TokenRow, str]:
        """A new token named `name` (unique among the tokens not revoked): its row and the secret, the only
        time the secret exists outside the caller's hands."""
        name = name.strip()
        if not name or len(name) > 200:
            raise InputError("name: 1 to 200 characters", field="name")
        problem = roles.spec_problem(role, repositories)
        if problem:
            field = "role" if role not in {r.value for r in Role} else "repositories"
            raise InputError(f"{field}: {problem}", field=field)
        secret = new_token()
        with self.db.write() as tx:
            c = t.api_tokens.c
            taken = tx.conn.execute(sa.select(c.id).where(c.name == name, c.revoked_at.is_(None))).first()
            if taken is not None:
                raise Conflict(f"a token named {name!r} exists; revoke it first", field="name", id=str(taken.id))
            row = TokenRow(uuid.uuid4().hex[:16], name, Role(role), tuple(repositories), tx.now, None)
            tx.conn.execute(
                t.api_tokens.insert().values(
                    id=row.id,
                    name=name,
                    role=role,
                    repositories=list(repositories),
                    digest=digest(secret),
                    created_at=row.created_at,
                    revoked_at=None,
                )
            )
        return row, secret

    def rows(self, *, include_revoked: bool = True) -> list[TokenRow]:
        q = sa.select(*_SHOWN).order_by(t.api_tokens.c.created_at, t.api_tokens.c.id)
        if not include_revoked:
            q = q.where(t.api_tokens.c.revoked_at.is_(None))
        with self.db.read() as conn:
            return [_row(r) for r in conn.execute(q).all()]

    def revoke(self, name_or_id: str) -> TokenRow:
        """Revoke the token with this id, or the token not revoked with this name."""
        c = t.api_tokens.c
        with self.db.write() as tx:
            found = tx.conn.execute(sa.select(*_SHOWN).where(c.id == name_or_id)).first()
            if found is None:
                found = tx.conn.execute(sa.select(*_SHOWN).where(c.name == name_or_id, c.revoked_at.is_(None))).first()
            if found is None:
                raise NotFound("token", name_or_id)
            row = _row(found)
            if row.revoked_at is None:
                tx.conn.execute(sa.update(t.api_tokens).where(c.id == row.id).values(revoked_at=tx.now))
                row = TokenRow(row.id, row.name, row.role, row.repositories, row.created_at, tx.now)
            # The dashboard's sessions opened with it end with it.
            s = t.dashboard_sessions.c
            tx.conn.execute(sa.delete(t.dashboard_sessions).where(s.credential_id == row.credential().id))
        return row

    def active(self) -> list[tuple[str, Credential]]:
        """(digest, credential) of every token not revoked."""
        c = t.api_tokens.c
        q = sa.select(*t.api_tokens.c).where(c.revoked_at.is_(None))
        with self.db.read() as conn:
            return [(str(r.digest), _row(r).credential()) for r in conn.execute(q).all()]


def configured_credentials(settings: Settings) -> list[tuple[str, Credential]]:
    """(digest, credential) of every token in the configuration: `api_tokens` are admin's (as before roles),
    `tokens` have their own role, `intake_tokens` and `forwarder_tokens` are intake's."""
    found: list[tuple[str, Credential]] = []
    for i, token in enumerate(settings.api_tokens):
        found.append((digest(token), Credential(f"config:api_tokens[{i}]", f"api_tokens[{i}]", Role.ADMIN)))
    for entry in settings.tokens:
        scope = roles.scope_of(entry.repositories) if entry.role == "agent" else None
        found.append((digest(entry.token), Credential(f"config:{entry.name}", entry.name, Role(entry.role), scope)))
    for key in ("intake_tokens", "forwarder_tokens"):
        for i, token in enumerate(getattr(settings, key)):
            found.append((digest(token), Credential(f"config:{key}[{i}]", f"{key}[{i}]", Role.INTAKE)))
    return found


# Whoever calls a server that has no token at all (loopback only): everything is open to them.
ANONYMOUS = Credential("anonymous", "anonymous", Role.ADMIN)
PROCESS_AGENT = "process:agent"


class Keyring:
    """Who a bearer token stands for. `process_token`: the in-process agent credential of the embedded runner
    (generated by the App, never stored); it does not count as a configured token, so a server without any
    stays open on loopback."""

    def __init__(self, settings: Settings, store: TokenStore, *, process_token: str | None = None) -> None:
        self.store = store
        self._configured = configured_credentials(settings)
        # The tokens that close the API: not intake's, which only open POST /events.
        self._closing = bool(settings.api_tokens or settings.tokens)
        # Open (no token asked) only on loopback, and only until a token first exists: revoking the last token
        # must not open the API again (on 0.0.0.0 that would make every caller admin).
        self._open_allowed = is_loopback(settings.host)
        self._was_closed = False
        self._process: list[tuple[str, Credential]] = []
        if process_token:
            self._process.append(
                (digest(process_token), Credential(PROCESS_AGENT, "embedded agent runner", Role.AGENT))
            )
        self._stored: list[tuple[str, Credential]] = []
        self._loaded_at: float | None = None
        self._lock = threading.Lock()

    def stale(self, older_than: float = REFRESH_SECONDS) -> bool:
        loaded = self._loaded_at
        return loaded is None or time.monotonic() - loaded >= older_than

    def refresh(self, older_than: float = REFRESH_SECONDS) -> None:
        with self._lock:
            if not self.stale(older_than):
                return
            self._stored = self.store.active()
            self._loaded_at = time.monotonic()
            if self._stored:
                self._was_closed = True

    def invalidate(self) -> None:
        """Read the table again before the next check (a token was just created or revoked)."""
        self._loaded_at = None

    def is_open(self) -> bool:
        """No token in the configuration or the database: the API asks for none."""
        return self._open_allowed and not self._was_closed and not self._closing and not self._stored

    def by_id(self, credential_id: str) -> Credential | None:
        """The credential of a configured or stored token still known (not revoked), by its id: what a dashboard
        session stands for. Never the process's own agent credential, which no session may stand for."""
        for _, credential in itertools.chain(self._configured, self._stored):
            if credential.id == credential_id:
                return credential
        return None

    def resolve(self, token: str | None) -> Credential | None:
        """The credential `token` stands for; None for no token or an unknown or revoked one."""
        if token is None:
            return None
        given = digest(token).encode()
        found: Credential | None = None
        for known, credential in itertools.chain(self._configured, self._process, self._stored):
            # No early exit: the time depends on how many tokens there are, never on which one matched.
            if hmac.compare_digest(given, known.encode()) and found is None:
                found = credential
        return found


def has_tokens(settings: Settings, store: TokenStore) -> bool:
    """Whether anything closes the API: a token in the configuration or one not revoked in the database."""
    return bool(settings.api_tokens or settings.tokens or store.active())
