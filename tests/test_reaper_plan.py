"""The reaper's search (WorkOrders.reap, each housekeeping second) is a range search on indexes (migration 0015),
not a walk of every queued work order: on a real SQLite file with many queued work orders, its plan searches the
(status, lease_expires_at) and (status, deadline_at) indexes."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from mendloop.storage import migrate
from mendloop.storage import schema as t


def test_reaper_search_uses_the_due_indexes(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'reap.db'}")
    try:
        migrate.upgrade(engine)
        now = time.time()
        with engine.begin() as conn:
            conn.execute(
                t.work_orders.insert(),
                [
                    {
                        "id": f"wo_{i:06d}",
                        "type": "self_healing_patch",
                        "description": "Code patch required",
                        "context": {},
                        "status": "queued",
                        "self_healing_run_id": f"run_{i:06d}",
                        "created_at": now,
                        "updated_at": now,
                        "estimated_complexity": "medium",
                        "priority": "normal",
                        "attempts": 0,
                        "max_attempts": 3,
                        "deadline_at": now + 86400,
                        "cancel_requested": False,
                    }
                    for i in range(2000)
                ],
            )
        due = sa.or_(
            sa.and_(t.work_orders.c.status == "in_progress", t.work_orders.c.lease_expires_at < now),
            sa.and_(t.work_orders.c.status.in_(["queued", "in_progress"]), t.work_orders.c.deadline_at < now),
        )
        query = sa.select(t.work_orders.c.id).where(due).limit(1)
        sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
        with engine.connect() as conn:
            plan = " | ".join(row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
        assert "ix_work_orders_status_lease_expires_at" in plan, plan
        assert "ix_work_orders_status_deadline_at" in plan, plan
    finally:
        engine.dispose()
