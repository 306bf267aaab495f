"""Migration 0014 (the lists' row counts) on a database at the previous head with history in it: the counts start
as a full count of the rows there, the triggers count what comes after (and nothing twice), and it downgrades and
upgrades again."""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import command

from bench import gen_history
from mendloop.domain.list_totals import COUNTED, CountKey
from mendloop.storage import migrate, row_counts
from mendloop.storage import schema as t

PREVIOUS = "0013"


def _history(conn: sa.Connection, runs: int) -> None:
    for batch in gen_history.rows(runs, end=gen_history.end_of_history()):
        for name, tuples in batch.items():
            table = t.metadata.tables[name]
            columns = [c.name for c in table.c]
            rows = [dict(zip(columns, tup, strict=True)) for tup in tuples]
            for row in rows:
                for c in table.c:
                    if isinstance(c.type, sa.JSON) and isinstance(row[c.name], str):
                        row[c.name] = json.loads(row[c.name])
                if "id" in row and row["id"] is None:
                    row.pop("id")
            conn.execute(table.insert(), rows)


def _all_match(conn: sa.Connection) -> int:
    """Every counted key equals a full count of its table; returns how many keys were compared."""
    compared = 0
    for list_name, fields in COUNTED.items():
        table = t.metadata.tables[list_name]
        full = int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
        assert row_counts.counted_in(conn, CountKey(list_name, "", "")) == full > 0
        for field in fields:
            for value, n in conn.execute(sa.select(table.c[field], sa.func.count()).group_by(table.c[field])):
                if value is not None:
                    assert row_counts.counted_in(conn, CountKey(list_name, field, str(value))) == n, (list_name, value)
                    compared += 1
    return compared


def test_upgrade_counts_the_rows_there_and_the_triggers_the_rest(empty_database_url: str) -> None:
    engine = sa.create_engine(empty_database_url)
    try:
        migrate.upgrade(engine, PREVIOUS)
        with engine.begin() as conn:
            _history(conn, 40)
        migrate.upgrade(engine)
        with engine.begin() as conn:
            assert int(conn.execute(sa.select(sa.func.count()).select_from(t.row_count_deltas)).scalar_one()) == 0
            assert _all_match(conn) >= 5
            # What comes after goes through the triggers: a status change, a delete.
            run_id = conn.execute(sa.select(t.runs.c.id).where(t.runs.c.status == "completed").limit(1)).scalar_one()
            conn.execute(sa.update(t.runs).where(t.runs.c.id == run_id).values(status="failed"))
            conn.execute(sa.update(t.incidents).values(status="resolved"))
            conn.execute(sa.delete(t.steps).where(t.steps.c.run_id == run_id))
            conn.execute(sa.delete(t.trust_history).where(t.trust_history.c.run_id == run_id))
            conn.execute(sa.delete(t.events).where(t.events.c.run_id == run_id))
            conn.execute(sa.delete(t.work_orders).where(t.work_orders.c.self_healing_run_id == run_id))
            conn.execute(sa.delete(t.runs).where(t.runs.c.id == run_id))
            _all_match(conn)
        with engine.begin() as conn:
            config = migrate._config()
            config.attributes["connection"] = conn
            command.downgrade(config, PREVIOUS)
        assert "row_counts" not in sa.inspect(engine).get_table_names()
        migrate.upgrade(engine)
        with engine.begin() as conn:
            _all_match(conn)
    finally:
        engine.dispose()
