"""memory of past fixes: what each fix did and whether it held, the frames it went through; regressions

`fixes` keeps one row per run that ended having applied a patch or resolved its incident (its commit, diff summary,
whether verification held, when its incident recurred); `fix_frames` the (path, function) pairs of the traceback
its work order carried, so a failure with another fingerprint through the same code finds it. An incident counts
its regressions (recurrences after a run's verified fix) and keeps the commit of the latest one's fix. Existing
incidents have regressed 0 times; no fix is back-filled (older runs' work orders did not record a diff summary).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "fixes",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("incident_id", sa.String(length=64), nullable=True),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("component", sa.String(length=200), nullable=True),
        sa.Column("work_order_id", sa.String(length=64), nullable=True),
        sa.Column("playbook_id", sa.String(length=200), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("commit", sa.String(length=64), nullable=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("added", sa.Integer(), nullable=True),
        sa.Column("removed", sa.Integer(), nullable=True),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("reverted", sa.Boolean(), nullable=False),
        sa.Column("fixed_at", sa.Double(), nullable=False),
        sa.Column("recurred_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_fixes"),
        sa.UniqueConstraint("run_id", name="uq_fixes_run_id"),
    )
    op.create_index("ix_fixes_fingerprint", "fixes", ["fingerprint", "id"])
    op.create_index("ix_fixes_incident", "fixes", ["incident_id", "id"])
    op.create_table(
        "fix_frames",
        sa.Column("fix_id", _ID, nullable=False),
        sa.Column("path", sa.String(length=1000), nullable=False),
        sa.Column("function", sa.String(length=300), nullable=False),
        sa.ForeignKeyConstraint(["fix_id"], ["fixes.id"], name="fk_fix_frames_fix_id_fixes", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("fix_id", "path", "function", name="pk_fix_frames"),
    )
    op.create_index("ix_fix_frames_path_function", "fix_frames", ["path", "function", "fix_id"])
    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("regressions", sa.Integer(), nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("regressed_commit", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("incidents") as batch:
        batch.drop_column("regressed_commit")
        batch.drop_column("regressions")
    op.drop_index("ix_fix_frames_path_function", table_name="fix_frames")
    op.drop_table("fix_frames")
    op.drop_index("ix_fixes_incident", table_name="fixes")
    op.drop_index("ix_fixes_fingerprint", table_name="fixes")
    op.drop_table("fixes")
