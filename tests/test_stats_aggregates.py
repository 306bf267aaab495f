"""GET /patches/stats from its aggregates (delta rows folded into totals), on SQLite and PostgreSQL.

A scripted set of runs (three playbooks, two components, every outcome: healed, failed, cancelled, escalated and
verified, escalated and overruled by verification, escalated and failed by the agent) is counted by the test
itself; the endpoint must say the same before a fold, after one, and after two folds race. The migration fills
the aggregates from the rows of a database upgraded from the previous head."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from mendloop.app import App
from mendloop.domain import stats as measures
from mendloop.domain.states import RunStatus, WorkOrderStatus
from mendloop.storage import migrate
from mendloop.storage import schema as t
from mendloop.storage import stats as stat_rows
from mendloop.storage.store import Store
from mendloop.testing import FakeClock
from tests.support import api_client, drain, migrated_sqlite, open_app, settings_for, write_playbooks

PY = sys.executable
CHECK = "import sys,os; sys.exit(0 if os.path.exists(sys.argv[1]) else 1)"


def _playbooks(fixed: Path) -> list[dict[str, Any]]:
    return [
        {
            "id": "heal",
            "type": "data_fix",
            "description": "d",
            "steps": [{"id": "ok", "action": "command", "with": {"argv": [PY, "-c", "pass"]}}],
        },
        {
            "id": "broken",
            "type": "data_fix",
            "description": "d",
            "steps": [{"id": "bad", "action": "command", "with": {"argv": ["false"]}, "on_failure": "fail"}],
        },
        {
            "id": "needs_code",
            "type": "code_patch",
            "description": "d",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "Fix it"}},
                {
                    "id": "verify",
                    "action": "verify",
                    "with": {
                        "check": {"command": {"argv": [PY, "-c", CHECK, str(fixed)]}},
                        "expect": "result.exit_code == 0",
                    },
                    "on_failure": "needs_human",
                },
            ],
        },
    ]


def make_app(database_url: str, tmp_path: Path, clock: FakeClock) -> App:
    pbs = _playbooks(tmp_path / "fixed")
    write_playbooks(tmp_path / "pb", *pbs)
    settings = settings_for(
        database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={p["id"]: p["id"] for p in pbs}
    )
    return open_app(settings, clock=clock)


def run_script(app: App, clock: FakeClock, tmp_path: Path) -> list[str]:
    """Every outcome across two components; returns the run ids. Each run takes a different time."""
    ids: list[str] = []

    def trigger(playbook: str, component: str) -> str:
        run, _ = app.remediation.trigger(error_type=playbook, description="x", component=component)
        ids.append(run.id)
        return run.id

    for i, (playbook, component) in enumerate(
        [
            ("heal", "svc1"),
            ("heal", "svc1"),
            ("broken", "svc1"),
            ("heal", "svc2"),
            ("broken", "svc2"),
            ("broken", "svc2"),
        ]
    ):
        trigger(playbook, component)
        clock.advance(10 + i)
        drain(app)
    cancelled = trigger("heal", "svc1")
    app.remediation.cancel_run(cancelled)

    def escalated(component: str, *, tests_passed: bool, fixed: bool) -> None:
        run_id = trigger("needs_code", component)
        drain(app)
        wo_id = app.store.get_run(run_id).coding_work_order_id or ""
        assert wo_id
        clock.advance(60 * (len(ids) + 1))
        (tmp_path / "fixed").unlink(missing_ok=True)
        if fixed:
            (tmp_path / "fixed").write_text("y")
        app.remediation.complete_work_order(wo_id, tests_passed=tests_passed, files_changed=1, diff_url=None)
        drain(app)

    escalated("svc1", tests_passed=True, fixed=True)  # verified: completed
    escalated("svc2", tests_passed=True, fixed=False)  # the completion is overruled: work order failed, needs_human
    escalated("svc2", tests_passed=False, fixed=False)  # the agent's tests failed: work order failed, needs_human
    return ids


def expected(app: App, ids: list[str], times: int = 1) -> dict[str, Any]:
    """The figures, counted here from the runs of the script (run `times` times)."""
    runs = [app.store.get_run(i) for i in ids]
    assert Counter(r.status for r in runs) == {
        RunStatus.COMPLETED: 4 * times,
        RunStatus.FAILED: 3 * times,
        RunStatus.CANCELLED: 1 * times,
        RunStatus.NEEDS_HUMAN: 2 * times,
    }
    wos = [app.store.get_work_order(r.coding_work_order_id) for r in runs if r.coding_work_order_id]
    assert Counter(w.status for w in wos) == {WorkOrderStatus.COMPLETED: times, WorkOrderStatus.FAILED: 2 * times}

    def rates(group: list[Any]) -> dict[str, Any]:
        finished = [r for r in group if r.finished_at is not None]
        completed = [r for r in group if r.status is RunStatus.COMPLETED]
        heal = sum((r.finished_at or 0) - r.created_at for r in completed)
        return {
            "runs": len(group),
            "escalation_rate": round(sum(r.escalated for r in group) / len(group), 4),
            "auto_fix_rate": round(sum(not r.escalated for r in completed) / len(finished), 4) if finished else 0.0,
            "mean_time_to_heal_seconds": round(heal / len(completed), 3) if completed else None,
        }

    done = [w for w in wos if w.status is WorkOrderStatus.COMPLETED]
    patch = sum((w.completed_at or 0) - w.created_at for w in done) / len(done)
    return {
        "total_playbook_runs": len(runs),
        "runs_by_status": dict(Counter(r.status.value for r in runs)),
        "work_orders": {
            "total_work_orders": 3 * times,
            **{s.value: 0 for s in WorkOrderStatus},
            "completed": times,
            "failed": 2 * times,
        },
        "escalation_rate": rates(runs)["escalation_rate"],
        "auto_fix_rate": rates(runs)["auto_fix_rate"],
        "average_patch_time_minutes": round(patch / 60, 2),
        "by_playbook": {p: rates([r for r in runs if r.playbook_id == p]) for p in ("broken", "heal", "needs_code")},
        "by_component": {c: rates([r for r in runs if r.component == c]) for c in ("svc1", "svc2")},
    }


def figures(client: httpx.Client) -> dict[str, Any]:
    body = client.get("/patches/stats").json()
    return {k: body[k] for k in body if k not in ("definitions", "storm")}


def test_stats_equal_the_scripts_own_count_before_and_after_a_fold(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    app = make_app(database_url, tmp_path, clock)
    try:
        ids = run_script(app, clock, tmp_path)
        want = expected(app, ids)
        assert want["by_playbook"]["heal"]["auto_fix_rate"] == 0.75  # 3 healed, 1 cancelled
        assert want["by_component"]["svc1"]["escalation_rate"] == round(1 / 5, 4)
        with api_client(app) as client:
            assert app.store.stats.pending() > 0
            assert figures(client) == want
            assert app.store.stats.fold() > 0
            assert app.store.stats.pending() == 0
            assert figures(client) == want
            # New changes after a fold land as deltas again and add to the totals.
            more = run_script(app, clock, tmp_path)
            assert app.store.stats.pending() > 0
            both = expected(app, ids + more, times=2)
            assert figures(client) == both
            app.store.stats.fold(batch=7)  # several batches
            assert app.store.stats.pending() == 0
            assert figures(client) == both
    finally:
        app.close()


def test_two_folds_at_once_count_each_delta_once(database_url: str) -> None:
    n = 3000
    keys = [("heal", "svc1"), ("heal", "svc2"), ("broken", "")]
    setup = Store(database_url)
    try:
        for start in range(0, n, 500):
            with setup.db.write() as tx:
                stat_rows.record(
                    tx,
                    [
                        measures.Delta(*keys[i % 3], measures.HEAL_SECONDS, 1.5)
                        for i in range(start, min(n, start + 500))
                    ],
                )
    finally:
        setup.close()
    stores = [Store(database_url), Store(database_url)]
    barrier = threading.Barrier(2)
    folded: list[int] = []
    errors: list[BaseException] = []

    def fold(store: Store) -> None:
        try:
            barrier.wait()
            folded.append(store.stats.fold(batch=50))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fold, args=(s,)) for s in stores]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        assert sum(folded) == n
        with stores[0].db.read() as conn:
            totals = {
                (r.playbook, r.component): r.value
                for r in conn.execute(sa.select(t.stat_totals).where(t.stat_totals.c.measure == measures.HEAL_SECONDS))
            }
        assert totals == dict.fromkeys(keys, 1.5 * (n // 3))
        assert stores[0].stats.pending() == 0
    finally:
        for s in stores:
            s.close()


def test_the_migration_fills_the_aggregates_from_the_rows_there(empty_database_url: str) -> None:
    store = Store(empty_database_url)
    try:
        migrate.upgrade(store.engine, "0006")
        run_cols = (
            "id, playbook_id, playbook_version, playbook_type, playbook, status, component, error_type, description,"
            " context, step_index, attempt, outputs, pending, escalated, next_run_at, created_at, updated_at,"
            " finished_at"
        )
        rows = [
            # id, playbook, status, component, escalated, created, finished
            ("r1", "heal", "completed", "svc1", False, 100.0, 130.0),
            ("r2", "heal", "completed", "svc2", False, 100.0, 110.0),
            ("r3", "heal", "failed", "svc1", False, 100.0, 105.0),
            ("r4", "needs_code", "completed", "svc1", True, 100.0, 400.0),
            ("r5", "needs_code", "needs_human", None, True, 100.0, 200.0),
            ("r6", "heal", "queued", "svc2", False, 100.0, None),
            ("r7", "heal", "cancelled", "svc2", False, 100.0, 101.0),
        ]
        wos = [
            ("wo1", "needs_code", "svc1", "completed", 150.0, 270.0),
            ("wo2", "needs_code", None, "failed", 150.0, 190.0),
            ("wo3", "needs_code", "svc1", "queued", 150.0, None),
        ]
        with store.engine.begin() as conn:
            for rid, pb, status, comp, esc, created, finished in rows:
                conn.execute(
                    sa.text(
                        f"INSERT INTO runs ({run_cols}) VALUES (:id, :pb, '1', 'data_fix', '{{}}', :status, :comp,"
                        " NULL, 'd', '{}', 0, 0, '{}', '{}', :esc, :created, :created, :created, :finished)"
                    ),
                    {
                        "id": rid,
                        "pb": pb,
                        "status": status,
                        "comp": comp,
                        "esc": esc,
                        "created": created,
                        "finished": finished,
                    },
                )
            for wid, pb, comp, status, created, completed in wos:
                conn.execute(
                    sa.text(
                        "INSERT INTO work_orders (id, type, description, context, status, playbook_id, component,"
                        " estimated_complexity, priority, created_at, updated_at, completed_at, attempts)"
                        " VALUES (:id, 'code_patch', 'd', '{}', :status, :pb, :comp, 'low', 'high', :created,"
                        " :created, :completed, 1)"
                    ),
                    {"id": wid, "pb": pb, "comp": comp, "status": status, "created": created, "completed": completed},
                )
        migrate.upgrade(store.engine)
        assert migrate.current(store.engine) == migrate.head()
        s = store.statistics()
        assert s.overall.runs == 7 and s.runs_by_status == {
            "queued": 1,
            "completed": 3,
            "failed": 1,
            "needs_human": 1,
            "cancelled": 1,
        }
        # The definitions of the counts this replaces: escalated / all, completed unescalated / finished.
        assert s.overall.escalation_rate == round(2 / 7, 4) and s.overall.auto_fix_rate == round(2 / 6, 4)
        assert s.work_orders["total_work_orders"] == 3
        assert (s.work_orders["completed"], s.work_orders["failed"], s.work_orders["queued"]) == (1, 1, 1)
        assert s.average_patch_seconds == 120.0
        assert s.by_playbook["heal"].mean_time_to_heal_seconds == 20.0
        assert s.by_playbook["needs_code"].escalation_rate == 1.0
        assert s.by_component["svc1"].runs == 3 and s.by_component["svc1"].auto_fix_rate == round(1 / 3, 4)
        assert set(s.by_component) == {"svc1", "svc2"}  # r5 has no component
    finally:
        store.close()


def test_the_stats_read_never_scans_history(tmp_path: Path) -> None:
    """SQLite's plan: the live counts are index lookups of the row counts; only the small aggregate tables are
    scanned."""
    url = migrated_sqlite(tmp_path / "plan.db")
    store = Store(url)
    try:
        with store.db.read() as conn:
            plans: list[str] = []
            for q in stat_rows.live_queries():
                sql = str(q.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
                plans += [
                    row[-1]
                    for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
                    # Labels: the one-row SELECT the subqueries hang from, and each subquery (its lines follow).
                    if not str(row[-1]).startswith(("SCALAR SUBQUERY", "SCAN CONSTANT ROW"))
                ]
        assert plans and all(p.startswith("SEARCH") and "INDEX" in p for p in plans), plans
        assert not any("TEMP B-TREE" in p for p in plans), plans
    finally:
        store.close()
