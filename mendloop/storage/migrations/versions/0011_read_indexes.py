"""read indexes: every list the API offers walks an index in its order, from its cursor, with each filter

The lists are newest first on (sort key, id): runs and work orders by created_at, incidents by last_seen, events by
id. Each filter a list offers gets an index of its columns then (sort key, id), so a page is a range walk that stops
after `limit` rows instead of a scan and a sort of the whole history (tests/test_query_plans.py holds each query
to it). A run's detail reads its trust changes by run id and its events by (run_id, id), and an incident's runs by
(incident_id, id).

Two older indexes are replaced by their longer forms (the longer one serves every lookup the shorter did):
(status, last_seen) on incidents, (incident_id) on runs and (run_id) on events. Indexes only: no data changes.

Revision ID: 0011
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_NEW = [
    ("ix_runs_created_at", "runs", ["created_at", "id"]),
    ("ix_runs_status_created_at", "runs", ["status", "created_at", "id"]),
    ("ix_runs_incident", "runs", ["incident_id", "id"]),
    ("ix_work_orders_created_at", "work_orders", ["created_at", "id"]),
    ("ix_work_orders_status_created_at", "work_orders", ["status", "created_at", "id"]),
    ("ix_work_orders_run_created_at", "work_orders", ["self_healing_run_id", "created_at", "id"]),
    ("ix_incidents_last_seen", "incidents", ["last_seen", "id"]),
    ("ix_incidents_status_last_seen_id", "incidents", ["status", "last_seen", "id"]),
    ("ix_incidents_fingerprint_last_seen", "incidents", ["fingerprint", "last_seen", "id"]),
    ("ix_incidents_status_fingerprint", "incidents", ["status", "fingerprint", "last_seen", "id"]),
    ("ix_incidents_error_type_last_seen", "incidents", ["error_type", "last_seen", "id"]),
    ("ix_incidents_status_error_type", "incidents", ["status", "error_type", "last_seen", "id"]),
    ("ix_trust_history_run_id", "trust_history", ["run_id", "id"]),
    ("ix_events_run", "events", ["run_id", "id"]),
]
_REPLACED = [
    ("ix_incidents_status_last_seen", "incidents", ["status", "last_seen"]),
    ("ix_runs_incident_id", "runs", ["incident_id"]),
    ("ix_events_run_id", "events", ["run_id"]),
]


def upgrade() -> None:
    for name, table, columns in _NEW:
        op.create_index(name, table, columns)
    for name, table, _ in _REPLACED:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, columns in _REPLACED:
        op.create_index(name, table, columns)
    for name, table, _ in reversed(_NEW):
        op.drop_index(name, table_name=table)
