"""stats deltas: the statistics' aggregates (stat_deltas, folded into stat_totals), backfilled from the rows

GET /patches/stats counted over all of history on every request. From here each counted state change inserts
delta rows in its own transaction and a housekeeping job folds them into one total per (playbook, component,
measure) (mendloop/storage/stats.py). The totals start as what the old counts would have said of the rows
already there, with the measures of mendloop/domain/stats.py (the names are repeated here: a migration must
not change when the code does). Retention (mendloop/storage/retention.py) finds finished runs by an index on
(status, finished_at).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_RUN_FINAL = ("completed", "failed", "needs_human", "cancelled")
_WORK_ORDER_FINAL = ("completed", "failed", "cancelled")


def upgrade() -> None:
    op.create_table(
        "stat_deltas",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("playbook", sa.String(200), nullable=False),
        sa.Column("component", sa.String(200), nullable=False),
        sa.Column("measure", sa.String(64), nullable=False),
        sa.Column("delta", sa.Double, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stat_deltas"),
    )
    op.create_table(
        "stat_totals",
        sa.Column("playbook", sa.String(200), nullable=False),
        sa.Column("component", sa.String(200), nullable=False),
        sa.Column("measure", sa.String(64), nullable=False),
        sa.Column("value", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("playbook", "component", "measure", name="pk_stat_totals"),
    )
    op.create_index("ix_runs_status_finished_at", "runs", ["status", "finished_at"])
    _backfill()


def _backfill() -> None:
    runs = sa.table(
        "runs",
        sa.column("playbook_id", sa.String),
        sa.column("component", sa.String),
        sa.column("status", sa.String),
        sa.column("escalated", sa.Boolean),
        sa.column("created_at", sa.Double),
        sa.column("finished_at", sa.Double),
    )
    wos = sa.table(
        "work_orders",
        sa.column("playbook_id", sa.String),
        sa.column("component", sa.String),
        sa.column("status", sa.String),
        sa.column("created_at", sa.Double),
        sa.column("completed_at", sa.Double),
    )
    totals = sa.table(
        "stat_totals",
        sa.column("playbook", sa.String),
        sa.column("component", sa.String),
        sa.column("measure", sa.String),
        sa.column("value", sa.Double),
        sa.column("updated_at", sa.Double),
    )
    now = time.time()
    conn = op.get_bind()

    def add(
        table: sa.TableClause,
        playbook: sa.ColumnElement[str],
        measure: str,
        value: sa.ColumnElement[Any],
        *where: sa.ColumnElement[bool],
    ) -> None:
        pb = sa.func.coalesce(playbook, "")
        comp = sa.func.coalesce(table.c.component, "")
        q = sa.select(pb, comp, sa.literal(measure), sa.cast(value, sa.Double), sa.literal(now, sa.Double))
        q = q.where(*where).group_by(pb, comp)
        conn.execute(totals.insert().from_select(["playbook", "component", "measure", "value", "updated_at"], q))

    count = sa.func.count()
    add(runs, runs.c.playbook_id, "runs", count)
    for status in _RUN_FINAL:
        add(runs, runs.c.playbook_id, f"runs.{status}", count, runs.c.status == status)
    add(runs, runs.c.playbook_id, "runs.escalated", count, runs.c.escalated.is_(True))
    add(runs, runs.c.playbook_id, "runs.auto_fixed", count, runs.c.escalated.is_(False), runs.c.status == "completed")
    add(
        runs,
        runs.c.playbook_id,
        "runs.heal_seconds",
        sa.func.sum(runs.c.finished_at - runs.c.created_at),
        runs.c.status == "completed",
        runs.c.finished_at.is_not(None),
    )
    add(wos, wos.c.playbook_id, "work_orders", count)
    for status in _WORK_ORDER_FINAL:
        add(wos, wos.c.playbook_id, f"work_orders.{status}", count, wos.c.status == status)
    add(
        wos,
        wos.c.playbook_id,
        "work_orders.patch_seconds",
        sa.func.sum(wos.c.completed_at - wos.c.created_at),
        wos.c.status == "completed",
        wos.c.completed_at.is_not(None),
    )


def downgrade() -> None:
    op.drop_index("ix_runs_status_finished_at", table_name="runs")
    op.drop_table("stat_totals")
    op.drop_table("stat_deltas")
