"""incident lifecycle: recurrences and what resolved an incident; the recurrence count of a trust move

An incident resolved by a run's verified fix keeps the run and the commit it applied; a detection after its
resolution reopens it and counts a recurrence, keeping when it was last resolved. A trust-history entry of a
recurrence move keeps the count it was for. Existing incidents have recurred 0 times and were resolved (if they
were) by no known run.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("recurrences", sa.Integer(), nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("resolved_by_run", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("resolved_commit", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("last_resolved_at", sa.Double(), nullable=True))
    with op.batch_alter_table("trust_history") as batch:
        batch.add_column(sa.Column("recurrences", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trust_history") as batch:
        batch.drop_column("recurrences")
    with op.batch_alter_table("incidents") as batch:
        batch.drop_column("last_resolved_at")
        batch.drop_column("resolved_commit")
        batch.drop_column("resolved_by_run")
        batch.drop_column("recurrences")
