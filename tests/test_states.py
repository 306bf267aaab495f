"""Every allowed transition lives in one table; check its shape exhaustively."""

from __future__ import annotations

import itertools

import pytest

from mendloop.domain.states import (
    RUN_FINAL,
    WORK_ORDER_FINAL,
    RunStatus,
    WorkOrderStatus,
    check_run_move,
    run_can_move,
    work_order_can_move,
)
from mendloop.errors import Conflict


def test_final_run_states_never_move() -> None:
    for old, new in itertools.product(RUN_FINAL, RunStatus):
        assert not run_can_move(old, new)


def test_final_work_order_states_only_move_when_verification_overrules() -> None:
    for old, new in itertools.product(WORK_ORDER_FINAL, WorkOrderStatus):
        allowed = old is WorkOrderStatus.COMPLETED and new is WorkOrderStatus.FAILED
        assert work_order_can_move(old, new) is allowed


def test_every_non_final_state_can_be_cancelled_and_reached() -> None:
    for status in set(RunStatus) - RUN_FINAL:
        assert run_can_move(status, RunStatus.CANCELLED)
    reachable = {RunStatus.QUEUED}
    frontier = [RunStatus.QUEUED]
    while frontier:
        old = frontier.pop()
        for new in RunStatus:
            if run_can_move(old, new) and new not in reachable:
                reachable.add(new)
                frontier.append(new)
    assert reachable == set(RunStatus)


def test_a_parked_run_only_resumes_or_stops() -> None:
    allowed = {s for s in RunStatus if run_can_move(RunStatus.AWAITING_PATCH, s)}
    assert allowed == {RunStatus.QUEUED, RunStatus.NEEDS_HUMAN, RunStatus.FAILED, RunStatus.CANCELLED}


def test_a_forbidden_move_is_a_conflict_naming_the_run() -> None:
    with pytest.raises(Conflict, match="run r1 is completed; it cannot become running"):
        check_run_move("r1", RunStatus.COMPLETED, RunStatus.RUNNING)
