"""Held work orders have statuses of their own: the decisions that move them are pure, the migration converts
the rows that used to encode a hold as `in_progress` with a special lease owner, and a read never waits for
the writer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from mendloop.domain import work_orders as decide
from mendloop.domain.records import Run, WorkOrder
from mendloop.domain.states import (
    WORK_ORDER_HELD,
    RunStatus,
    WorkOrderStatus,
    work_order_can_move,
)
from mendloop.domain.work_orders import Completion
from mendloop.errors import Conflict
from mendloop.storage import migrate
from mendloop.storage.store import Store

NOW = 1_000_000.0


def _wo(status: WorkOrderStatus, **kw: object) -> WorkOrder:
    base: dict[str, object] = {
        "id": "wo_1",
        "type": "self_healing_patch",
        "description": "fix it",
        "context": {},
        "status": status,
        "self_healing_run_id": "run_1",
        "playbook_id": "pb",
        "component": "svc",
        "estimated_complexity": "medium",
        "priority": "high",
        "created_at": NOW - 60,
        "updated_at": NOW - 60,
        "completed_at": None,
        "patch_result": None,
        "attempts": 1,
        "fail_reason": None,
    }
    base.update(kw)
    return WorkOrder(**base)  # type: ignore[arg-type]


def _run(status: RunStatus = RunStatus.AWAITING_PATCH) -> Run:
    return Run(
        id="run_1",
        playbook_id="pb",
        playbook_version="1",
        playbook_type="code_patch",
        playbook={},
        status=status,
        component="svc",
        error_type="e",
        description="d",
        context={},
        step_index=1,
        attempt=0,
        outputs={"analyze": {"ok": True}},
        pending={},
        escalated=True,
        coding_work_order_id="wo_1",
        lease_owner=None,
        lease_expires_at=None,
        next_run_at=NOW,
        created_at=NOW - 60,
        updated_at=NOW - 60,
        finished_at=None,
        error=None,
        trigger_event_id=None,
        dedupe_key=None,
    )


def _complete(wo: WorkOrder, claim: Completion, *, repo: bool = True) -> decide.Transition:
    return decide.complete(wo, _run(), claim, has_repository=repo, on_failure=RunStatus.NEEDS_HUMAN, now=NOW)


def test_every_held_state_is_declared_with_its_ways_out() -> None:
    for held in WORK_ORDER_HELD:
        assert work_order_can_move(held, WorkOrderStatus.FAILED)
        assert work_order_can_move(held, WorkOrderStatus.CANCELLED)
        assert not work_order_can_move(held, WorkOrderStatus.QUEUED)
        assert not work_order_can_move(held, WorkOrderStatus.IN_PROGRESS)
    assert work_order_can_move(WorkOrderStatus.AWAITING_APPROVAL, WorkOrderStatus.AWAITING_APPLY)
    assert not work_order_can_move(WorkOrderStatus.AWAITING_MERGE, WorkOrderStatus.AWAITING_APPLY)


@pytest.mark.parametrize(
    ("claim", "repo", "status", "run_moves"),
    [
        (Completion(tests_passed=True, diff="d"), True, WorkOrderStatus.AWAITING_APPLY, True),
        (Completion(tests_passed=True, diff="d"), False, WorkOrderStatus.COMPLETED, True),
        (Completion(tests_passed=True), True, WorkOrderStatus.COMPLETED, True),
        (
            Completion(tests_passed=True, diff="d", approval_required=True),
            True,
            WorkOrderStatus.AWAITING_APPROVAL,
            False,
        ),
        (Completion(tests_passed=True, branch="mendloop/wo_1"), True, WorkOrderStatus.AWAITING_MERGE, False),
        (Completion(tests_passed=False), True, WorkOrderStatus.FAILED, True),
    ],
)
def test_a_completion_decides_the_status_and_whether_the_run_resumes(
    claim: Completion, repo: bool, status: WorkOrderStatus, run_moves: bool
) -> None:
    t = _complete(_wo(WorkOrderStatus.IN_PROGRESS, lease_id=None), claim, repo=repo)
    assert t.work_order["status"] is status
    assert t.work_order["lease_owner"] is None  # a hold is a status, never a lease owner
    assert bool(t.run) is run_moves
    if run_moves and claim.tests_passed:
        assert t.run["status"] is RunStatus.QUEUED and t.run["outputs"]["patch"]["tests_passed"] is True
        assert "pending_apply" not in t.run["outputs"]["patch"]
    assert t.answer is not None and t.answer["status"] == status.value


def test_a_repeated_claim_on_a_held_work_order_changes_nothing() -> None:
    for held in WORK_ORDER_HELD:
        t = _complete(_wo(held), Completion(tests_passed=True, diff="d"))
        assert not t.changed and t.answer is not None and t.answer["status"] == held.value


def test_an_operator_release_moves_an_approval_to_the_patch_pipeline() -> None:
    t = _complete(_wo(WorkOrderStatus.AWAITING_APPROVAL), Completion(tests_passed=True, diff="d", release_hold=True))
    assert t.work_order["status"] is WorkOrderStatus.AWAITING_APPLY and t.run["status"] is RunStatus.QUEUED


def test_reject_needs_an_operator_hold_and_stops_the_run() -> None:
    with pytest.raises(Conflict, match="not waiting for an operator"):
        decide.reject(_wo(WorkOrderStatus.AWAITING_APPLY), _run(), reason="no", now=NOW)
    t = decide.reject(_wo(WorkOrderStatus.AWAITING_MERGE), _run(), reason="no", now=NOW)
    assert t.work_order["status"] is WorkOrderStatus.FAILED and t.run["status"] is RunStatus.NEEDS_HUMAN
    assert [e.type for e in t.events] == ["coding_agent.work_order_updated", "self_healing.completed"]


def test_the_reaper_leaves_held_work_orders_alone() -> None:
    for held in WORK_ORDER_HELD:
        assert not decide.needs_reaping(_wo(held, deadline_at=NOW - 1), NOW)
    assert decide.needs_reaping(_wo(WorkOrderStatus.IN_PROGRESS, lease_expires_at=NOW - 1), NOW)
    assert decide.needs_reaping(_wo(WorkOrderStatus.QUEUED, deadline_at=NOW - 1), NOW)


def test_migration_turns_magic_lease_owners_into_statuses(empty_database_url: str) -> None:
    store = Store(empty_database_url)
    try:
        migrate.upgrade(store.engine, "0003")
        owners = {
            "wo_a": ("mendloop:patch-pipeline", "awaiting_apply"),
            "wo_b": ("mendloop:awaiting-approval", "awaiting_approval"),
            "wo_c": ("mendloop:awaiting-merge", "awaiting_merge"),
            "wo_d": ("agent-7", "in_progress"),
        }
        with store.engine.begin() as conn:
            for wo_id, (owner, _) in owners.items():
                conn.execute(
                    sa.text(
                        "INSERT INTO work_orders (id, type, description, context, status, estimated_complexity,"
                        " priority, created_at, updated_at, attempts, lease_owner, max_attempts, cancel_requested)"
                        " VALUES (:id, 't', 'd', '{}', 'in_progress', 'low', 'low', 0, 0, 1, :owner, 3, false)"
                    ),
                    {"id": wo_id, "owner": owner},
                )
        migrate.upgrade(store.engine)
        for wo_id, (owner, status) in owners.items():
            wo = store.get_work_order(wo_id)
            assert wo.status.value == status
            assert wo.lease_owner == (owner if status == "in_progress" else None)
    finally:
        store.close()


def test_a_read_does_not_wait_for_a_held_write_lock(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    migrate.upgrade(store.engine)
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.db.write() as tx:
            tx.conn.execute(sa.text("UPDATE sequences SET value = value"))
            holding.set()
            release.wait(20)

    th = threading.Thread(target=writer)
    th.start()
    try:
        assert holding.wait(10)
        assert store.recent_events() == []
        assert store.list_runs() == ([], 0)
        # The reads finished while the writer still held the lock (it holds it until released, or for 20 s): a
        # read that waited for the lock would only have returned after the writer gave up.
        still_writing = th.is_alive() and not release.is_set()
    finally:
        release.set()
        th.join()
        store.close()
    assert still_writing
