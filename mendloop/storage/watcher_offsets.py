"""Watcher checkpoints in the database (table `watcher_offsets`), so a restarted server resumes every followed file
exactly where it stopped. SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain.checkpoints import Checkpoint, FileIdentity
from mendloop.storage import schema as t
from mendloop.storage.store import Store

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def _signed(value: int) -> int:
    # st_dev and st_ino are unsigned 64-bit; BIGINT is signed. Stored two's complement, read back unsigned.
    return value - _U64 if value > _I64_MAX else value


def _unsigned(value: int) -> int:
    return value + _U64 if value < 0 else value


class DbOffsetStore:
    """The OffsetStore of `mendloop.intake.offsets` on `watcher_offsets`. `save` replaces the watcher's whole set in one
    transaction, and is skipped when the set is what this store last saved (an idle watcher writes nothing).
    `write` does the same inside a caller's transaction, so a checkpoint commits together with what was read."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._saved: dict[str, list[tuple[str, int, int, str, int]]] = {}
        self._lock = threading.Lock()

    def load(self, watcher: str) -> dict[str, Checkpoint]:
        q = sa.select(t.watcher_offsets).where(t.watcher_offsets.c.watcher == watcher)
        with self.store.db.read() as conn:
            rows = conn.execute(q).all()
        out: dict[str, Checkpoint] = {}
        for r in rows:
            ident = FileIdentity(_unsigned(int(r.dev)), _unsigned(int(r.inode)), str(r.head_hash))
            out[str(r.path)] = Checkpoint(str(r.path), ident, int(r.offset))
        with self._lock:
            self._saved[watcher] = sorted(c.key() for c in out.values())
        return out

    def save(self, watcher: str, checkpoints: Iterable[Checkpoint]) -> None:
        cps = list(checkpoints)
        keys = sorted(c.key() for c in cps)
        with self._lock:
            if self._saved.get(watcher) == keys:
                return
        with self.store.db.write() as tx:
            self._replace(tx.conn, watcher, cps)
        with self._lock:
            self._saved[watcher] = keys

    def write(self, conn: Connection, watcher: str, checkpoints: Iterable[Checkpoint]) -> None:
        """Replace the watcher's set inside the caller's transaction. Whether it commits is the caller's business,
        so the next `save` writes whatever it is given."""
        with self._lock:
            self._saved.pop(watcher, None)
        self._replace(conn, watcher, list(checkpoints))

    def _replace(self, conn: Connection, watcher: str, cps: list[Checkpoint]) -> None:
        conn.execute(sa.delete(t.watcher_offsets).where(t.watcher_offsets.c.watcher == watcher))
        if not cps:
            return
        now = self.store.clock()
        # One row per path: a path listed twice (never, from a Tailer) keeps its last checkpoint.
        rows = {
            c.path: {
                "watcher": watcher,
                "path": c.path,
                "dev": _signed(c.identity.dev),
                "inode": _signed(c.identity.inode),
                "head_hash": c.identity.head_hash,
                "offset": c.offset,
                "updated_at": now,
            }
            for c in cps
        }
        conn.execute(sa.insert(t.watcher_offsets), list(rows.values()))
