"""incidents and watcher offsets

Revision ID: fa7cfd58ccc1
Revises: 0002
Create Date: 2026-11-26 09:58:01.807087
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "incidents",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_type", sa.String(length=200), nullable=True),
        sa.Column("event_type", sa.String(length=100), nullable=False),
        sa.Column("component", sa.String(length=200), nullable=True),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("sample", sa.Text(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("resolved_at", sa.Double(), nullable=True),
        sa.Column("last_run_id", sa.String(length=64), nullable=True),
        sa.Column("last_run_at", sa.Double(), nullable=True),
        sa.Column("absorbed", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incidents")),
    )
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.create_index("ix_incidents_fingerprint", ["fingerprint", "status"], unique=False)
        batch_op.create_index("ix_incidents_status_last_seen", ["status", "last_seen"], unique=False)

    op.create_table(
        "watcher_offsets",
        sa.Column("watcher", sa.String(length=200), nullable=False),
        sa.Column("path", sa.String(length=4000), nullable=False),
        sa.Column("dev", sa.BigInteger(), nullable=False),
        sa.Column("inode", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("watcher", "path", name=op.f("pk_watcher_offsets")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("incident_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("mutex_key", sa.String(length=300), nullable=True))
        batch_op.create_index("ix_runs_incident_id", ["incident_id"], unique=False)
        batch_op.create_index("ix_runs_mutex_key", ["mutex_key", "status"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_mutex_key")
        batch_op.drop_index("ix_runs_incident_id")
        batch_op.drop_column("mutex_key")
        batch_op.drop_column("incident_id")

    op.drop_table("watcher_offsets")
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.drop_index("ix_incidents_status_last_seen")
        batch_op.drop_index("ix_incidents_fingerprint")

    op.drop_table("incidents")
