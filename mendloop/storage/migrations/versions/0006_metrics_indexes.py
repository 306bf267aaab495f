"""metrics indexes: the covering indexes GET /metrics counts and sums over

Every scrape groups runs by playbook and status (with their escalation flag and start and finish times, for the
duration histogram), steps by action (with their start and finish times), and events by type and source. Each
index holds every column its query reads, so the scan reads the narrow index, never the wide rows (a run's
playbook, context and outputs are JSON).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runs_metrics", "runs", ["status", "playbook_id", "escalated", "created_at", "finished_at"])
    op.create_index("ix_steps_metrics", "steps", ["action", "started_at", "finished_at"])
    op.create_index("ix_events_type_source", "events", ["type", "source"])


def downgrade() -> None:
    op.drop_index("ix_events_type_source", table_name="events")
    op.drop_index("ix_steps_metrics", table_name="steps")
    op.drop_index("ix_runs_metrics", table_name="runs")
