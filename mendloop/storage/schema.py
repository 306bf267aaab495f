"""SQLAlchemy tables: one MetaData. Times are epoch seconds (float) so both dialects compare them the same way."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    }
)

# Integer ids autoincrement on both dialects; BIGINT on PostgreSQL for headroom.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Epoch: sa.Double[float] = sa.Double()

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(100), nullable=False),
    sa.Column("source", sa.String(200), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("work_order_id", sa.String(64), nullable=True),
    sa.Column("component", sa.String(200), nullable=True),
    sa.Column("created_at", Epoch, nullable=False),
    sa.Index("ix_events_type_id", "type", "id"),
    # A run's timeline, in id order (migration 0011; was run_id alone, which left PostgreSQL a sort).
    sa.Index("ix_events_run", "run_id", "id"),
    sa.Index("ix_events_created_at", "created_at"),
    # GET /metrics counts events by type and source (migration 0006).
    sa.Index("ix_events_type_source", "type", "source"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("playbook_id", sa.String(200), nullable=False),
    sa.Column("playbook_version", sa.String(64), nullable=False),
    sa.Column("playbook_type", sa.String(32), nullable=False),
    # The playbook as the run started with it: a parked run survives an edit or a deploy.
    sa.Column("playbook", sa.JSON, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("component", sa.String(200), nullable=True),
    sa.Column("error_type", sa.String(200), nullable=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("context", sa.JSON, nullable=False),
    sa.Column("step_index", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("pending", sa.JSON, nullable=False),
    sa.Column("escalated", sa.Boolean, nullable=False),
    sa.Column("coding_work_order_id", sa.String(64), nullable=True),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", Epoch, nullable=True),
    sa.Column("next_run_at", Epoch, nullable=False),
    sa.Column("created_at", Epoch, nullable=False),
    sa.Column("updated_at", Epoch, nullable=False),
    sa.Column("finished_at", Epoch, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("trigger_event_id", BigId, nullable=True),
    sa.Column("dedupe_key", sa.String(300), nullable=True, unique=True),
    sa.Column("incident_id", sa.String(64), nullable=True),
    # Runs with the same key never run at once (storm control's per-component mutex); NULL: no mutex.
    sa.Column("mutex_key", sa.String(300), nullable=True),
    # Claims since the run last committed progress: bounded, so a run that crashes its worker can't loop forever.
    sa.Column("stalled_claims", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Index("ix_runs_status_next_run_at", "status", "next_run_at"),
    sa.Index("ix_runs_incident", "incident_id", "id"),
    sa.Index("ix_runs_mutex_key", "mutex_key", "status"),
    sa.Index("ix_runs_lease_owner", "lease_owner"),
    # Covers GET /metrics' runs by playbook and status and its duration histogram (migration 0006).
    sa.Index("ix_runs_metrics", "status", "playbook_id", "escalated", "created_at", "finished_at"),
    # Retention finds finished runs by their finish time (migration 0007_stats_deltas).
    sa.Index("ix_runs_status_finished_at", "status", "finished_at"),
    # The runs list, newest first from a cursor, unfiltered and by status (migration 0011).
    sa.Index("ix_runs_created_at", "created_at", "id"),
    sa.Index("ix_runs_status_created_at", "status", "created_at", "id"),
    # The Runs tab's filters (migration 0013).
    sa.Index("ix_runs_playbook_created_at", "playbook_id", "created_at", "id"),
    sa.Index("ix_runs_component_created_at", "component", "created_at", "id"),
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step_index", sa.Integer, nullable=False),
    sa.Column("step_id", sa.String(200), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("started_at", Epoch, nullable=False),
    sa.Column("finished_at", Epoch, nullable=False),
    sa.Column("output", sa.JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("idempotency_key", sa.String(300), nullable=False),
    sa.Index("ix_steps_run_id", "run_id", "id"),
    # Covers GET /metrics' step duration histogram (migration 0006).
    sa.Index("ix_steps_metrics", "action", "started_at", "finished_at"),
)

work_orders = sa.Table(
    "work_orders",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("context", sa.JSON, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("self_healing_run_id", sa.String(64), nullable=True),
    sa.Column("playbook_id", sa.String(200), nullable=True),
    sa.Column("component", sa.String(200), nullable=True),
    sa.Column("estimated_complexity", sa.String(32), nullable=False),
    sa.Column("priority", sa.String(32), nullable=False),
    sa.Column("created_at", Epoch, nullable=False),
    sa.Column("updated_at", Epoch, nullable=False),
    sa.Column("completed_at", Epoch, nullable=True),
    sa.Column("patch_result", sa.JSON, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("fail_reason", sa.String(64), nullable=True),
    # The pull API's lease: one agent at a time works on a work order; a lapsed lease returns it to the queue.
    sa.Column("lease_id", sa.String(64), nullable=True),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", Epoch, nullable=True),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
    sa.Column("deadline_at", Epoch, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("repository", sa.String(1000), nullable=True),
    sa.Column("base_commit", sa.String(64), nullable=True),
    sa.Column("note", sa.Text, nullable=True),
    sa.Index("ix_work_orders_status", "status"),
    sa.Index("ix_work_orders_run", "self_healing_run_id"),
    # The work orders list, newest first from a cursor, with each filter (migration 0011).
    sa.Index("ix_work_orders_created_at", "created_at", "id"),
    sa.Index("ix_work_orders_status_created_at", "status", "created_at", "id"),
    sa.Index("ix_work_orders_run_created_at", "self_healing_run_id", "created_at", "id"),
    # The reaper's search each second: due leases and deadlines, a range search each (migration 0015).
    sa.Index("ix_work_orders_status_lease_expires_at", "status", "lease_expires_at"),
    sa.Index("ix_work_orders_status_deadline_at", "status", "deadline_at"),
)

diffs = sa.Table(
    "diffs",
    metadata,
    sa.Column("work_order_id", sa.String(64), primary_key=True),
    sa.Column("diff", sa.Text, nullable=False),
    sa.Column("created_at", Epoch, nullable=False),
)

trust_scores = sa.Table(
    "trust_scores",
    metadata,
    sa.Column("component", sa.String(200), primary_key=True),
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("updated_at", Epoch, nullable=False),
)

trust_history = sa.Table(
    "trust_history",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("component", sa.String(200), nullable=False),
    sa.Column("old", sa.Double, nullable=False),
    sa.Column("new", sa.Double, nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("created_at", Epoch, nullable=False),
    # The incident's recurrence count a `recurrence` move was for (NULL for other reasons).
    sa.Column("recurrences", sa.Integer, nullable=True),
    sa.Index("ix_trust_history_component", "component", "id"),
    # A run's detail: its trust changes (migration 0011).
    sa.Index("ix_trust_history_run_id", "run_id", "id"),
)

# Per-day counters behind readable ids such as wo_20251113_0001; incremented in the creating transaction.
sequences = sa.Table(
    "sequences",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

# Answers already given for an Idempotency-Key, so a retried request gets the same answer.
idempotency = sa.Table(
    "idempotency",
    metadata,
    sa.Column("scope", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("response", sa.JSON, nullable=False),
    sa.Column("created_at", Epoch, nullable=False),
)

# Repeats of one error (same fingerprint) grouped: counted, with first and last sight, and the runs they caused.
incidents = sa.Table(
    "incidents",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error_type", sa.String(200), nullable=True),
    sa.Column("event_type", sa.String(100), nullable=False),
    sa.Column("component", sa.String(200), nullable=True),
    sa.Column("source", sa.String(200), nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("sample", sa.Text, nullable=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("first_seen", Epoch, nullable=False),
    sa.Column("last_seen", Epoch, nullable=False),
    sa.Column("resolved_at", Epoch, nullable=True),
    sa.Column("last_run_id", sa.String(64), nullable=True),
    sa.Column("last_run_at", Epoch, nullable=True),
    sa.Column("absorbed", sa.BigInteger, nullable=False),
    # The lifecycle: reopenings after a resolution, and what resolved it (a run's verified fix, and its commit).
    sa.Column("recurrences", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("resolved_by_run", sa.String(64), nullable=True),
    sa.Column("resolved_commit", sa.String(64), nullable=True),
    sa.Column("last_resolved_at", Epoch, nullable=True),
    # Recurrences after a run's verified fix (migration 0012), and the commit of that fix at the latest one.
    sa.Column("regressions", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("regressed_commit", sa.String(64), nullable=True),
    sa.Index("ix_incidents_fingerprint", "fingerprint", "status"),
    # The incidents list, most recently seen first from a cursor, with each filter and pair (migration 0011).
    sa.Index("ix_incidents_last_seen", "last_seen", "id"),
    sa.Index("ix_incidents_status_last_seen_id", "status", "last_seen", "id"),
    sa.Index("ix_incidents_fingerprint_last_seen", "fingerprint", "last_seen", "id"),
    sa.Index("ix_incidents_status_fingerprint", "status", "fingerprint", "last_seen", "id"),
    sa.Index("ix_incidents_error_type_last_seen", "error_type", "last_seen", "id"),
    sa.Index("ix_incidents_status_error_type", "status", "error_type", "last_seen", "id"),
)

# The memory of past fixes (migration 0012): one row per run that ended having applied a patch or resolved its
# incident, with what it did, its commit and diff summary, whether its verification held, and when its incident
# came back. Kept past the run's retention: it is what the next work order of the same failure learns from.
fixes = sa.Table(
    "fixes",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False, unique=True),
    sa.Column("incident_id", sa.String(64), nullable=True),
    sa.Column("fingerprint", sa.String(64), nullable=True),
    sa.Column("component", sa.String(200), nullable=True),
    sa.Column("work_order_id", sa.String(64), nullable=True),
    sa.Column("playbook_id", sa.String(200), nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("commit", sa.String(64), nullable=True),
    sa.Column("files", sa.JSON, nullable=False),
    sa.Column("added", sa.Integer, nullable=True),
    sa.Column("removed", sa.Integer, nullable=True),
    sa.Column("verified", sa.Boolean, nullable=False),
    sa.Column("reverted", sa.Boolean, nullable=False),
    sa.Column("fixed_at", Epoch, nullable=False),
    sa.Column("recurred_at", Epoch, nullable=True),
    sa.Index("ix_fixes_fingerprint", "fingerprint", "id"),
    sa.Index("ix_fixes_incident", "incident_id", "id"),
)

# The traceback frames (repository path, function) the failing work order of a fix went through: how a new failure
# with another fingerprint finds fixes of the same code.
fix_frames = sa.Table(
    "fix_frames",
    metadata,
    sa.Column("fix_id", BigId, sa.ForeignKey("fixes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("path", sa.String(1000), primary_key=True),
    sa.Column("function", sa.String(300), primary_key=True),
    sa.Index("ix_fix_frames_path_function", "path", "function", "fix_id"),
)

# Where each watcher has read up to in each file, with the file's identity, so a restart neither misses nor
# repeats lines.
watcher_offsets = sa.Table(
    "watcher_offsets",
    metadata,
    sa.Column("watcher", sa.String(200), primary_key=True),
    sa.Column("path", sa.String(4000), primary_key=True),
    sa.Column("dev", sa.BigInteger, nullable=False),
    sa.Column("inode", sa.BigInteger, nullable=False),
    sa.Column("head_hash", sa.String(64), nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Epoch, nullable=False),
)

# Statistics (domain/stats.py): each counted state change inserts delta rows in its own transaction, so no
# counter row serialises the workers; a housekeeping job folds them into `stat_totals`, one row per key and
# measure. Readers sum both. Runs without a component are keyed by "" (domain.stats.NO_COMPONENT).
stat_deltas = sa.Table(
    "stat_deltas",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("playbook", sa.String(200), nullable=False),
    sa.Column("component", sa.String(200), nullable=False),
    sa.Column("measure", sa.String(64), nullable=False),
    sa.Column("delta", sa.Double, nullable=False),
    sa.Column("created_at", Epoch, nullable=False),
)

stat_totals = sa.Table(
    "stat_totals",
    metadata,
    sa.Column("playbook", sa.String(200), primary_key=True),
    sa.Column("component", sa.String(200), primary_key=True),
    sa.Column("measure", sa.String(64), primary_key=True),
    sa.Column("value", sa.Double, nullable=False),
    sa.Column("updated_at", Epoch, nullable=False),
)

# How many rows each list has, unfiltered (field "") and per value of a counted column (migration 0014): triggers
# on runs, work_orders and incidents insert +1/-1 rows into `row_count_deltas` in the transaction of each insert,
# counted-column change and delete; housekeeping folds them into `row_counts` (storage/row_counts.py). The lists'
# `total` reads these, not a count over all history.
row_count_deltas = sa.Table(
    "row_count_deltas",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("list_name", sa.String(32), nullable=False),
    sa.Column("field", sa.String(32), nullable=False),
    sa.Column("value", sa.String(200), nullable=False),
    sa.Column("delta", sa.BigInteger, nullable=False),
    sa.Index("ix_row_count_deltas_key", "list_name", "field", "value"),
)

row_counts = sa.Table(
    "row_counts",
    metadata,
    sa.Column("list_name", sa.String(32), primary_key=True),
    sa.Column("field", sa.String(32), primary_key=True),
    sa.Column("value", sa.String(200), primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)

# One durable cursor per notification target (`notify:`): the last event it was given, its counters (kept here so
# they survive restarts and count across processes), its retry state, and the lease of the one process that
# delivers it.
notify_cursors = sa.Table(
    "notify_cursors",
    metadata,
    sa.Column("target", sa.String(100), primary_key=True),
    sa.Column("cursor", sa.BigInteger, nullable=False),
    sa.Column("delivered", sa.BigInteger, nullable=False),
    sa.Column("failed", sa.BigInteger, nullable=False),
    sa.Column("dropped", sa.BigInteger, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", Epoch, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("last_error_at", Epoch, nullable=True),
    sa.Column("last_delivered_at", Epoch, nullable=True),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", Epoch, nullable=True),
    sa.Column("created_at", Epoch, nullable=False),
    sa.Column("updated_at", Epoch, nullable=False),
)

# API tokens made with `mendloop tokens create`: only the SHA-256 of each (a token is 256 random bits, so its
# digest is as good as a salted hash); `repositories` is the JSON list an agent token may work for.
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("repositories", sa.JSON, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("created_at", Epoch, nullable=False),
    sa.Column("revoked_at", Epoch, nullable=True),
    sa.Index("ix_api_tokens_digest", "digest", unique=True),
    sa.Index("ix_api_tokens_name", "name", "revoked_at"),
)

# Every operator and admin action, and every refusal with 403: who (the token's id, name and role), what (the
# action, the method and path, the object it names), when, from where, and the status answered.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", Epoch, nullable=False),
    sa.Column("actor_id", sa.String(200), nullable=True),
    sa.Column("actor_name", sa.String(200), nullable=True),
    sa.Column("role", sa.String(16), nullable=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("path", sa.String(2000), nullable=False),
    sa.Column("target_id", sa.String(300), nullable=True),
    sa.Column("client", sa.String(200), nullable=True),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Index("ix_audit_log_at", "at"),
    sa.Index("ix_audit_log_actor", "actor_name", "id"),
    sa.Index("ix_audit_log_action", "action", "id"),
)

# Paused components (migration 0010): no queued run of a paused component is claimed until it is resumed.
# `scope` is a component's name, or `*` for all of them.
pauses = sa.Table(
    "pauses",
    metadata,
    sa.Column("scope", sa.String(200), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", Epoch, nullable=False),
)

# The dashboard's sessions (migration 0013): the SHA-256 of a session's secret (the cookie), and the credential
# (`db:<token id>`, `config:<name>`) it stands for, so revoking that token ends the session.
dashboard_sessions = sa.Table(
    "dashboard_sessions",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("credential_id", sa.String(200), nullable=False),
    sa.Column("created_at", Epoch, nullable=False),
    sa.Column("expires_at", Epoch, nullable=False),
    sa.Index("ix_dashboard_sessions_credential_id", "credential_id"),
    sa.Index("ix_dashboard_sessions_expires_at", "expires_at"),
)
