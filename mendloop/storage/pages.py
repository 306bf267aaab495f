"""One page of a list, by keyset: newest first on (sort key, id), strictly after a cursor's position.

Every list the API offers reads through `newest_first`, over an index whose columns are its filters' then
(sort key, id): the database walks that index in order from the cursor and stops after a page, however long the
history (tests/test_query_plans.py holds each list to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from mendloop.domain.page_cursor import After, Key, decode, encode

# The list a cursor belongs to, and the types of its sort key and id (`page_cursor.decode` checks them).
RUNS_PAGE = "runs"
WORK_ORDERS_PAGE = "work_orders"
INCIDENTS_PAGE = "incidents"
EVENTS_PAGE = "events"
KEY_TYPES: dict[str, tuple[type[Key], type[Key]]] = {
    RUNS_PAGE: (float, str),
    WORK_ORDERS_PAGE: (float, str),
    INCIDENTS_PAGE: (float, str),
    EVENTS_PAGE: (int, int),
}


def newest_first(
    conn: Connection,
    q: sa.Select[Any],
    *,
    kind: str,
    key: sa.ColumnElement[Any],
    item_id: sa.ColumnElement[Any],
    after: After | None,
    limit: int,
    offset: int = 0,
) -> tuple[Sequence[Row[Any]], str | None]:
    """The page's rows and the cursor of the next page (None on the last page). `offset` still skips items, after
    the cursor's position, as the spec's `offset` does."""
    same = key is item_id  # a list ordered by its id alone (events)
    if after is not None:
        if same:
            q = q.where(item_id < after.id)
        else:
            # A row value: both dialects walk the index range from it (an OR of two comparisons is not one range).
            q = q.where(sa.tuple_(key, item_id) < sa.tuple_(sa.literal(after.key), sa.literal(after.id)))
    order = [item_id.desc()] if same else [key.desc(), item_id.desc()]
    q = q.order_by(*order).limit(limit + 1).offset(offset)
    rows = conn.execute(q).all()
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]._mapping
    return rows[:limit], encode(kind, _key(last[key]), _key(last[item_id]))


def _key(value: Any) -> Key:
    return value if isinstance(value, int | str) else float(value)


def cursor_of(kind: str, cursor: str | None) -> After | None:
    """A request's `cursor` for the list `kind`; an InputError naming `cursor` when it is not one of its cursors."""
    key, item_id = KEY_TYPES[kind]
    return decode(cursor, kind, key, item_id)
