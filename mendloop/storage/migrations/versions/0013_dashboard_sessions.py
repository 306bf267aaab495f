"""dashboard sessions, and the runs list's playbook and component filters as index walks

A browser cannot send a bearer header on a page load or an EventSource, so the dashboard's login trades a token
for a session: the table keeps the SHA-256 of the session's secret (never the secret) and the credential it
stands for, so a session ends with its token's revocation and with logout (its row deleted). The Runs tab filters
by playbook and by component: each gets an index of its column then (created_at, id), like the other lists.

Revision ID: 0013
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_INDEXES = [
    ("ix_runs_playbook_created_at", "runs", ["playbook_id", "created_at", "id"]),
    ("ix_runs_component_created_at", "runs", ["component", "created_at", "id"]),
]


def upgrade() -> None:
    op.create_table(
        "dashboard_sessions",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("credential_id", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_dashboard_sessions")),
    )
    op.create_index("ix_dashboard_sessions_credential_id", "dashboard_sessions", ["credential_id"])
    op.create_index("ix_dashboard_sessions_expires_at", "dashboard_sessions", ["expires_at"])
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in _INDEXES:
        op.drop_index(name, table_name=table)
    op.drop_table("dashboard_sessions")
