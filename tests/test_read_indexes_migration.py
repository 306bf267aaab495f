"""Migration 0011 (the read indexes) on a database at the previous head with history in it: the rows stay, the
indexes of every list are there (the two it replaces are gone), and it downgrades and upgrades again."""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import command

from bench import gen_history
from mendloop.storage import migrate
from mendloop.storage import schema as t

PREVIOUS = "0010"
NEW = {
    "runs": {"ix_runs_created_at", "ix_runs_status_created_at", "ix_runs_incident"},
    "work_orders": {"ix_work_orders_created_at", "ix_work_orders_status_created_at", "ix_work_orders_run_created_at"},
    "incidents": {"ix_incidents_last_seen", "ix_incidents_status_last_seen_id", "ix_incidents_status_error_type"},
    "trust_history": {"ix_trust_history_run_id"},
    "events": {"ix_events_run"},
}
REPLACED = {
    "runs": {"ix_runs_incident_id"},
    "incidents": {"ix_incidents_status_last_seen"},
    "events": {"ix_events_run_id"},
}
TABLES = ["runs", "steps", "events", "trust_history", "incidents", "work_orders"]


def _indexes(engine: sa.Engine, table: str) -> set[str]:
    return {str(ix["name"]) for ix in sa.inspect(engine).get_indexes(table)}


def _counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            name: int(conn.execute(sa.select(sa.func.count()).select_from(t.metadata.tables[name])).scalar_one())
            for name in TABLES
        }


def test_upgrade_from_the_previous_head_keeps_the_rows(empty_database_url: str) -> None:
    engine = sa.create_engine(empty_database_url)
    try:
        migrate.upgrade(engine, PREVIOUS)
        # The history's rows, written as at the previous head (0011 changes no column; later migrations add
        # tables and columns the previous head does not have: left out).
        inspector = sa.inspect(engine)
        present = {name: {str(c["name"]) for c in inspector.get_columns(name)} for name in TABLES}
        with engine.begin() as conn:
            for batch in gen_history.rows(40, end=gen_history.end_of_history()):
                for name, tuples in batch.items():
                    if name not in present:
                        continue
                    table = t.metadata.tables[name]
                    columns = [c.name for c in table.c]
                    rows = [{k: v for k, v in zip(columns, tup, strict=True) if k in present[name]} for tup in tuples]
                    for row in rows:
                        for c in table.c:
                            if isinstance(c.type, sa.JSON) and isinstance(row.get(c.name), str):
                                row[c.name] = json.loads(row[c.name])
                        if "id" in row and row["id"] is None:
                            row.pop("id")
                    conn.execute(table.insert(), rows)
        before = _counts(engine)
        assert before["runs"] == 40 and before["events"] == 240
        migrate.upgrade(engine)
        assert migrate.current(engine) == migrate.head()
        assert _counts(engine) == before
        for table, names in NEW.items():
            assert names <= _indexes(engine, table), table
        for table, names in REPLACED.items():
            assert not names & _indexes(engine, table), table
        with engine.begin() as conn:
            cfg = migrate._config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, PREVIOUS)
        for table, names in REPLACED.items():
            assert names <= _indexes(engine, table), table
        assert not NEW["runs"] & _indexes(engine, "runs")
        migrate.upgrade(engine)
        assert _counts(engine) == before
    finally:
        engine.dispose()
