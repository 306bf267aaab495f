"""The lists' row counts: read a list's `total` without counting its history (domain/list_totals.py says which).

Triggers (migration 0014) insert +1/-1 rows into `row_count_deltas` in the transaction of every insert, counted
column change and delete of runs, work orders and incidents; `fold()` (housekeeping, with the statistics') moves
them into `row_counts` by storage/deltas.py. A total is the folded count plus the key's unfolded deltas, in one
statement: an index lookup and a range bounded by the fold interval.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mendloop.domain.list_totals import CAP, CountKey, Total, capped, key_for
from mendloop.storage import deltas
from mendloop.storage import schema as t
from mendloop.storage.db import Database

FOLD_BATCH = 10_000
_FOLDING = deltas.Folding(
    deltas=t.row_count_deltas, totals=t.row_counts, keys=("list_name", "field", "value"), delta="delta", total="n"
)


def _count_of(key: CountKey) -> sa.ColumnElement[Any]:
    """The folded count plus the unfolded deltas of `key`: two index lookups."""
    c, d = t.row_counts.c, t.row_count_deltas.c
    folded = (
        sa.select(sa.func.coalesce(sa.func.sum(c.n), 0))
        .where(c.list_name == key.list_name, c.field == key.field, c.value == key.value)
        .scalar_subquery()
    )
    pending = (
        sa.select(sa.func.coalesce(sa.func.sum(d.delta), 0))
        .where(d.list_name == key.list_name, d.field == key.field, d.value == key.value)
        .scalar_subquery()
    )
    return folded + pending


@functools.lru_cache(maxsize=256)
def _counted_query(key: CountKey) -> sa.Select[Any]:
    return sa.select(_count_of(key))


def counted_in(conn: Connection, key: CountKey) -> int:
    """The rows of the list `key` names, as of this statement."""
    return int(conn.execute(_counted_query(key)).scalar_one())


@functools.lru_cache(maxsize=64)
def _by_value_query(list_name: str, field: str, values: tuple[str, ...]) -> sa.Select[Any]:
    # Built once per call site: building the 2 x len(values) subqueries was most of a stats read's CPU (1.9 of
    # its 4.2 ms, a work-order page's count included), and SQLAlchemy caches only the compiled form.
    return sa.select(*[_count_of(CountKey(list_name, field, v)).label(f"c{i}") for i, v in enumerate(values)])


def by_value_query(list_name: str, field: str, values: Sequence[str]) -> sa.Select[Any]:
    """One row: the count of each of `values` of `field`, in their order (one statement, one snapshot)."""
    return _by_value_query(list_name, field, tuple(values))


def by_value_in(conn: Connection, list_name: str, field: str, values: Sequence[str]) -> dict[str, int]:
    """`values` of `field` -> rows of `list_name` with it, the ones with none left out."""
    row = conn.execute(by_value_query(list_name, field, values)).one()
    return {v: int(n) for v, n in zip(values, row, strict=True) if n}


def total_in(
    conn: Connection, list_name: str, filters: dict[str, str | None], matching: sa.Select[Any], cap: int = CAP
) -> Total:
    """`list_name`'s total under `filters`: from the counts when they answer it, else `matching` (a select of the
    list's rows under the same filters) counted up to `cap`."""
    key = key_for(list_name, filters)
    if key is not None:
        return Total(counted_in(conn, key), False)
    bounded = matching.with_only_columns(sa.literal(1)).limit(cap + 1).subquery()
    return capped(int(conn.execute(sa.select(sa.func.count()).select_from(bounded)).scalar_one()), cap)


class RowCounts:
    def __init__(self, db: Database) -> None:
        self.db = db

    def fold(self, batch: int = FOLD_BATCH) -> int:
        """Fold the deltas into the counts; returns how many."""
        return deltas.fold(self.db, _FOLDING, batch)

    def pending(self) -> int:
        with self.db.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(t.row_count_deltas)).scalar_one())
