"""held work order states; runs.stalled_claims

A work order held for the patch pipeline, an operator's approval or a merge used to be `in_progress` with a
special lease owner; each is now a status of its own (`awaiting_apply`, `awaiting_approval`, `awaiting_merge`).
Runs count the claims that made no progress, so a run that crashes its worker stops after a bounded number.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The lease owners that encoded a hold before this revision, and the status each is now.
_HOLDS = {
    "mendloop:patch-pipeline": "awaiting_apply",
    "mendloop:awaiting-approval": "awaiting_approval",
    "mendloop:awaiting-merge": "awaiting_merge",
}

_work_orders = sa.table(
    "work_orders",
    sa.column("status", sa.String),
    sa.column("lease_owner", sa.String),
    sa.column("lease_id", sa.String),
    sa.column("lease_expires_at", sa.Double),
)


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("stalled_claims", sa.Integer(), nullable=False, server_default=sa.text("0")))
    for owner, status in _HOLDS.items():
        op.execute(
            _work_orders.update()
            .where(_work_orders.c.status == "in_progress", _work_orders.c.lease_owner == owner)
            .values(status=status, lease_owner=None, lease_id=None, lease_expires_at=None)
        )


def downgrade() -> None:
    for owner, status in _HOLDS.items():
        op.execute(
            _work_orders.update().where(_work_orders.c.status == status).values(status="in_progress", lease_owner=owner)
        )
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("stalled_claims")
