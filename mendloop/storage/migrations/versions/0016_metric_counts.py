"""metric counts: GET /metrics' event counters and duration histograms kept by triggers, not counted over history

A scrape grouped every event, every finished run, every step and every completed work order at scrape time: 0.5 s
of CPU a scrape at 100,000 runs (the step histogram alone 0.77 s of it on a loaded machine), ten times that at
1,000,000; and since retention deletes old rows, `mendloop_events_total` and the histograms' counts went down after
a prune, which a Prometheus counter must never do. From here triggers add rows to `row_count_deltas` (0014), insert
only, in the writing transaction, under list names of their own that no delete trigger touches:

- `m.events`: one +1 per event, keyed by its type and source (`value` = type, char 31, source; cut to the column);
- `m.run_s`, `m.step_s`, `m.patch_s`: per observation (a run finishing, a step recorded finished, a work order
  completing), keyed by its label (the run's final status, the step's action, "" for patches): one +1 in its
  bucket (`b0`.. for `DURATION_BUCKETS` in storage/metrics.py, `inf` past the last) and its duration in
  milliseconds in `ms` (the count is the buckets' sum).

Housekeeping folds them into `row_counts` with the lists' counts. The counts start from the rows already there,
computed here in the same transaction before the triggers exist, so nothing is counted twice. The bucket bounds
and trigger bodies are repeated here rather than imported: a migration must not change when the code does.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 604800)
_INSERT = "INSERT INTO row_count_deltas (list_name, field, value, delta)"


def _bucket(seconds: str) -> str:
    arms = " ".join(f"WHEN {seconds} <= {b} THEN 'b{i}'" for i, b in enumerate(BUCKETS))
    return f"CASE {arms} ELSE 'inf' END"


def _observation(name: str, label: str, seconds: str, ms: str) -> str:
    """The two delta rows of one observation (its bucket, its milliseconds) as one SELECT. The count is the sum of
    the buckets: a third row per step would cost every run a tenth more of its write."""
    return f"SELECT '{name}', {label}, {_bucket(seconds)}, 1 UNION ALL SELECT '{name}', {label}, 'ms', {ms}"


# (family, table, label, start column, end column, the row condition; NEW.x columns).
_HISTOGRAMS = (
    ("m.run_s", "runs", "status", "created_at", "finished_at", "finished_at IS NOT NULL"),
    ("m.step_s", "steps", "action", "started_at", "finished_at", "finished_at IS NOT NULL"),
    (
        "m.patch_s",
        "work_orders",
        "''",
        "created_at",
        "completed_at",
        "status = 'completed' AND completed_at IS NOT NULL",
    ),
)


def _new(expr: str) -> str:
    """`expr` on the NEW row: column names prefixed (the label '' stays a literal)."""
    out = expr
    for col in ("status", "action", "created_at", "started_at", "finished_at", "completed_at"):
        out = out.replace(col, f"NEW.{col}")
    return out


def _ms(dialect: str, seconds: str) -> str:
    return f"CAST(round(({seconds}) * 1000) AS {'INTEGER' if dialect == 'sqlite' else 'BIGINT'})"


def _event_key(dialect: str, row: str) -> str:
    sep = "char(31)" if dialect == "sqlite" else "chr(31)"
    return f"substr({row}type, 1, 100) || {sep} || substr({row}source, 1, 99)"


def _sqlite_triggers() -> list[str]:
    out = [
        f"CREATE TRIGGER metric_counts_events AFTER INSERT ON events BEGIN "
        f"{_INSERT} SELECT 'm.events', '', {_event_key('sqlite', 'NEW.')}, 1; END"
    ]
    for name, table, label, start, end, cond in _HISTOGRAMS:
        seconds = f"NEW.{end} - NEW.{start}"
        body = f"{_INSERT} {_observation(name, _new(label), seconds, _ms('sqlite', seconds))};"
        out.append(
            f"CREATE TRIGGER metric_counts_{table}_insert AFTER INSERT ON {table} WHEN {_new(cond)} BEGIN {body} END"
        )
        if table != "steps":  # a step is written once, finished; runs and work orders finish by an update
            was = _new(cond).replace("NEW.", "OLD.")
            out.append(
                f"CREATE TRIGGER metric_counts_{table}_update AFTER UPDATE OF {end}, status ON {table} "
                f"WHEN ({_new(cond)}) AND NOT ({was} AND OLD.{end} IS NOT NULL) BEGIN {body} END"
            )
    return out


def _postgres_triggers() -> list[str]:
    out = [
        f"""CREATE FUNCTION metric_counts_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  {_INSERT} SELECT 'm.events', '', {_event_key("postgresql", "NEW.")}, 1;
  RETURN NULL;
END $$""",
        "CREATE TRIGGER metric_counts_events AFTER INSERT ON events FOR EACH ROW "
        "EXECUTE FUNCTION metric_counts_events()",
    ]
    for name, table, label, start, end, cond in _HISTOGRAMS:
        seconds = f"NEW.{end} - NEW.{start}"
        out.append(
            f"""CREATE FUNCTION metric_counts_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  {_INSERT} {_observation(name, _new(label), seconds, _ms("postgresql", seconds))};
  RETURN NULL;
END $$"""
        )
        out.append(
            f"CREATE TRIGGER metric_counts_{table}_insert AFTER INSERT ON {table} FOR EACH ROW "
            f"WHEN ({_new(cond)}) EXECUTE FUNCTION metric_counts_{table}()"
        )
        if table != "steps":
            was = _new(cond).replace("NEW.", "OLD.")
            out.append(
                f"CREATE TRIGGER metric_counts_{table}_update AFTER UPDATE OF {end}, status ON {table} FOR EACH ROW "
                f"WHEN (({_new(cond)}) AND NOT ({was} AND OLD.{end} IS NOT NULL)) "
                f"EXECUTE FUNCTION metric_counts_{table}()"
            )
    return out


def _backfill(dialect: str) -> list[str]:
    """The counts of the rows already there, straight into the folded counts."""
    out = [
        f"INSERT INTO row_counts SELECT 'm.events', '', k, count(*) FROM "
        f"(SELECT {_event_key(dialect, '')} AS k FROM events) e GROUP BY k"
    ]
    for name, table, label, start, end, cond in _HISTOGRAMS:
        seconds = f"{end} - {start}"
        out.append(
            f"INSERT INTO row_counts SELECT '{name}', l, b, count(*) FROM (SELECT {label} AS l,"
            f" {_bucket(seconds)} AS b FROM {table} WHERE {cond}) x GROUP BY l, b"
        )
        out.append(
            f"INSERT INTO row_counts SELECT '{name}', l, 'ms', sum(ms) FROM (SELECT {label} AS l, "
            f"{_ms(dialect, seconds)} AS ms FROM {table} WHERE {cond}) x GROUP BY l"
        )
    return out


def upgrade() -> None:
    conn = op.get_bind()
    dialect = conn.dialect.name
    for statement in _backfill(dialect):
        conn.execute(sa.text(statement))
    for statement in _sqlite_triggers() if dialect == "sqlite" else _postgres_triggers():
        conn.execute(sa.text(statement))


def downgrade() -> None:
    conn = op.get_bind()
    tables = ["events", *(table for _n, table, *_rest in _HISTOGRAMS)]
    if conn.dialect.name == "sqlite":
        conn.execute(sa.text("DROP TRIGGER IF EXISTS metric_counts_events"))
        for table in tables[1:]:
            for kind in ("insert", "update"):
                conn.execute(sa.text(f"DROP TRIGGER IF EXISTS metric_counts_{table}_{kind}"))
    else:
        conn.execute(sa.text("DROP TRIGGER IF EXISTS metric_counts_events ON events"))
        conn.execute(sa.text("DROP FUNCTION IF EXISTS metric_counts_events()"))
        for table in tables[1:]:
            for kind in ("insert", "update"):
                conn.execute(sa.text(f"DROP TRIGGER IF EXISTS metric_counts_{table}_{kind} ON {table}"))
            conn.execute(sa.text(f"DROP FUNCTION IF EXISTS metric_counts_{table}()"))
    conn.execute(sa.text("DELETE FROM row_counts WHERE list_name LIKE 'm.%'"))
    conn.execute(sa.text("DELETE FROM row_count_deltas WHERE list_name LIKE 'm.%'"))
