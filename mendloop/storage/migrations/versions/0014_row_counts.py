"""row counts: the lists' `total` from counted rows kept by triggers, instead of a count over all history

`GET /patches/runs`, `/patches/work-orders` and `/incidents` answered an exact `total` with `SELECT count(*)`,
which walks every matching row: 17-60 ms at 1,000,000 runs, growing with history. From here the database keeps
how many rows each list has, unfiltered and per value of the filters that have a few values (status, an incident's
error type), in `row_count_deltas`: a trigger on each table inserts +1/-1 rows in the transaction of the insert,
the status change or the delete itself, so every writer is counted (the engine, retention's bulk deletes, an
operator's SQL) and the count is never ahead of or behind the rows. Inserts only, so concurrent writers never wait
on one counter row; housekeeping folds the deltas into `row_counts` (mendloop/storage/row_counts.py), as it does
the statistics' (0007). Unlike the statistics, these counts go down when retention deletes: they count what a list
can show.

The counts start as a count of the rows already there; the triggers are created after it, in the same
transaction, so no row is counted twice. The trigger bodies are repeated here rather than imported: a migration
must not change when the code does.

Revision ID: 0014
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# table -> the columns counted per value (besides the table's own total).
_COUNTED = {
    "runs": ("status",),
    "work_orders": ("status",),
    "incidents": ("status", "error_type"),
}
_INSERT = "INSERT INTO row_count_deltas (list_name, field, value, delta)"


def _arms(table: str, row: str, sign: int, fields: tuple[str, ...], *, changed: str | None = None) -> list[str]:
    """SELECTs of the delta rows of one row image (`NEW`/`OLD`): the table's total unless `changed` (an update),
    and one per counted column that is not NULL (and, on an update, changed)."""
    arms = [] if changed else [f"SELECT '{table}', '', '', {sign}"]
    for f in fields:
        cond = f"{row}.{f} IS NOT NULL"
        if changed:
            cond += f" AND OLD.{f} {changed} NEW.{f}"
        arms.append(f"SELECT '{table}', '{f}', {row}.{f}, {sign} WHERE {cond}")
    return arms


def _sqlite(table: str, fields: tuple[str, ...]) -> list[str]:
    distinct = " OR ".join(f"OLD.{f} IS NOT NEW.{f}" for f in fields)
    update = _arms(table, "OLD", -1, fields, changed="IS NOT") + _arms(table, "NEW", 1, fields, changed="IS NOT")
    return [
        f"CREATE TRIGGER row_counts_{table}_insert AFTER INSERT ON {table} BEGIN "
        f"{_INSERT} {' UNION ALL '.join(_arms(table, 'NEW', 1, fields))}; END",
        f"CREATE TRIGGER row_counts_{table}_delete AFTER DELETE ON {table} BEGIN "
        f"{_INSERT} {' UNION ALL '.join(_arms(table, 'OLD', -1, fields))}; END",
        f"CREATE TRIGGER row_counts_{table}_update AFTER UPDATE OF {', '.join(fields)} ON {table} "
        f"WHEN {distinct} BEGIN {_INSERT} {' UNION ALL '.join(update)}; END",
    ]


def _postgres(table: str, fields: tuple[str, ...]) -> list[str]:
    distinct = " OR ".join(f"OLD.{f} IS DISTINCT FROM NEW.{f}" for f in fields)
    changed = "IS DISTINCT FROM"
    update = _arms(table, "OLD", -1, fields, changed=changed) + _arms(table, "NEW", 1, fields, changed=changed)
    return [
        f"""CREATE FUNCTION row_counts_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    {_INSERT} {" UNION ALL ".join(_arms(table, "NEW", 1, fields))};
  ELSIF TG_OP = 'DELETE' THEN
    {_INSERT} {" UNION ALL ".join(_arms(table, "OLD", -1, fields))};
  ELSE
    {_INSERT} {" UNION ALL ".join(update)};
  END IF;
  RETURN NULL;
END $$""",
        f"CREATE TRIGGER row_counts_{table}_insert_delete AFTER INSERT OR DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION row_counts_{table}()",
        # The WHEN clause keeps the function out of every update that changes no counted column (leases,
        # heartbeats, last_seen): those are the hot ones.
        f"CREATE TRIGGER row_counts_{table}_update AFTER UPDATE OF {', '.join(fields)} ON {table} "
        f"FOR EACH ROW WHEN ({distinct}) EXECUTE FUNCTION row_counts_{table}()",
    ]


def upgrade() -> None:
    op.create_table(
        "row_count_deltas",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("list_name", sa.String(32), nullable=False),
        sa.Column("field", sa.String(32), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        sa.Column("delta", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_row_count_deltas"),
    )
    op.create_index("ix_row_count_deltas_key", "row_count_deltas", ["list_name", "field", "value"])
    op.create_table(
        "row_counts",
        sa.Column("list_name", sa.String(32), nullable=False),
        sa.Column("field", sa.String(32), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("list_name", "field", "value", name="pk_row_counts"),
    )
    conn = op.get_bind()
    for table, fields in _COUNTED.items():
        conn.execute(sa.text(f"INSERT INTO row_counts SELECT '{table}', '', '', count(*) FROM {table}"))
        for f in fields:
            conn.execute(
                sa.text(
                    f"INSERT INTO row_counts SELECT '{table}', '{f}', {f}, count(*) FROM {table} "
                    f"WHERE {f} IS NOT NULL GROUP BY {f}"
                )
            )
    make = _sqlite if conn.dialect.name == "sqlite" else _postgres
    for table, fields in _COUNTED.items():
        for statement in make(table, fields):
            conn.execute(sa.text(statement))


def downgrade() -> None:
    conn = op.get_bind()
    for table in _COUNTED:
        if conn.dialect.name == "sqlite":
            for kind in ("insert", "delete", "update"):
                conn.execute(sa.text(f"DROP TRIGGER IF EXISTS row_counts_{table}_{kind}"))
        else:
            conn.execute(sa.text(f"DROP TRIGGER IF EXISTS row_counts_{table}_insert_delete ON {table}"))
            conn.execute(sa.text(f"DROP TRIGGER IF EXISTS row_counts_{table}_update ON {table}"))
            conn.execute(sa.text(f"DROP FUNCTION IF EXISTS row_counts_{table}()"))
    op.drop_table("row_counts")
    op.drop_index("ix_row_count_deltas_key", table_name="row_count_deltas")
    op.drop_table("row_count_deltas")
