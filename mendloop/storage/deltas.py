"""Folding delta rows into totals: the one mechanism behind the statistics' aggregates (storage/stats.py) and the
lists' row counts (storage/row_counts.py).

Writers insert delta rows (never update a counter row, so concurrent workers never wait on one); `fold` moves
them into one total per key. It deletes a bounded id range with `DELETE ... RETURNING` and adds exactly the rows
it deleted: two processes folding at once (SQLite or PostgreSQL) can't both delete one row, so nothing is counted
twice, and a delta committed late with a low id (PostgreSQL) is simply found by the next fold, since a fold takes
what is there rather than what follows a cursor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from mendloop.storage.db import Database, Tx


@dataclass(frozen=True, slots=True)
class Folding:
    """Which deltas fold into which totals: the key columns (the same names in both tables), the deltas' amount
    column, the totals' sum column, and columns the fold stamps with the transaction's time."""

    deltas: sa.Table
    totals: sa.Table
    keys: Sequence[str]
    delta: str
    total: str
    stamped: Sequence[str] = field(default_factory=tuple)


def fold(db: Database, how: Folding, batch: int) -> int:
    """Fold `how.deltas` into `how.totals`, one bounded id range per transaction (no long lock); returns how many."""
    folded = 0
    while True:
        n = _fold_once(db, how, batch)
        folded += n
        if n < batch:
            return folded


def _fold_once(db: Database, how: Folding, batch: int) -> int:
    d = how.deltas.c
    with db.read() as conn:
        first = conn.execute(sa.select(sa.func.min(d.id))).scalar()
    if first is None:
        return 0
    with db.write() as tx:
        taken = tx.conn.execute(
            sa.delete(how.deltas).where(d.id < int(first) + batch).returning(*[d[k] for k in how.keys], d[how.delta])
        ).all()
        sums: dict[tuple[Any, ...], float] = {}
        for row in taken:
            key = tuple(row[:-1])
            sums[key] = sums.get(key, 0) + row[-1]
        if sums:
            _upsert(db, tx, how, sums)
    return len(taken)


def _upsert(db: Database, tx: Tx, how: Folding, sums: Mapping[tuple[Any, ...], float]) -> None:
    ins = db.insert(how.totals)
    set_: dict[str, Any] = {how.total: how.totals.c[how.total] + ins.excluded[how.total]}
    set_.update({c: ins.excluded[c] for c in how.stamped})
    # Sorted: two folds upserting the same keys take their row locks in one order (no deadlock).
    tx.conn.execute(
        ins.on_conflict_do_update(index_elements=list(how.keys), set_=set_),
        [
            {**dict(zip(how.keys, key, strict=True)), how.total: value, **dict.fromkeys(how.stamped, tx.now)}
            for key, value in sorted(sums.items())
        ],
    )
