"""work order leases

Revision ID: 2e45bae4f2f4
Revises: 0001
Create Date: 2026-11-26 09:49:49.002648
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    with op.batch_alter_table("work_orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("max_attempts", sa.Integer(), server_default="3", nullable=False))
        batch_op.add_column(sa.Column("deadline_at", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("repository", sa.String(length=1000), nullable=True))
        batch_op.add_column(sa.Column("base_commit", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("work_orders", schema=None) as batch_op:
        batch_op.drop_column("note")
        batch_op.drop_column("base_commit")
        batch_op.drop_column("repository")
        batch_op.drop_column("cancel_requested")
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("max_attempts")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("lease_owner")
        batch_op.drop_column("lease_id")
