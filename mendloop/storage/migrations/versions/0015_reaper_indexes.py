"""reaper indexes: the reaper's search each housekeeping second walks only due work orders

`WorkOrders.reap` looks for work orders whose lease lapsed (in_progress, lease_expires_at < now) or whose deadline
passed (queued or in_progress, deadline_at < now). With only an index on status, that read walked every queued work
order: 92 ms a pass with 100,000 runs parked in awaiting_patch (bench/scale.py). An index of (status, each time)
makes both halves a range search that finds nothing when nothing is due. Indexes only: no data changes.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_NEW = [
    ("ix_work_orders_status_lease_expires_at", "work_orders", ["status", "lease_expires_at"]),
    ("ix_work_orders_status_deadline_at", "work_orders", ["status", "deadline_at"]),
]


def upgrade() -> None:
    for name, table, columns in _NEW:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(_NEW):
        op.drop_index(name, table_name=table)
