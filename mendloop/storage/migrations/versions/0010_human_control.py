"""human control: the pauses table

A component (or `*`, every component) paused by an operator, with the reason: detections still create incidents
and queued runs, but no queued run of a paused component is claimed until it is resumed.

Revision ID: 0010
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pauses",
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("scope", name="pk_pauses"),
    )


def downgrade() -> None:
    op.drop_table("pauses")
