"""Run and work order states, and every allowed transition in one place."""

from __future__ import annotations

from enum import StrEnum

from mendloop.errors import Conflict


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_PATCH = "awaiting_patch"
    VERIFYING = "verifying"
    COMPLETED = "completed"
    FAILED = "failed"
    NEEDS_HUMAN = "needs_human"
    CANCELLED = "cancelled"


class WorkOrderStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


RUN_FINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.NEEDS_HUMAN, RunStatus.CANCELLED})
# A trigger's caller waits until the run reaches one of these.
RUN_SETTLED = RUN_FINAL | {RunStatus.AWAITING_PATCH}
WORK_ORDER_FINAL = frozenset({WorkOrderStatus.COMPLETED, WorkOrderStatus.FAILED, WorkOrderStatus.CANCELLED})
# The agent's job is over in these; COMPLETED can still turn FAILED when verification overrules the claim.

_RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.VERIFYING, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.QUEUED,  # lease released for a backoff or a sleep, or reclaimed after a crash
            RunStatus.RUNNING,
            RunStatus.AWAITING_PATCH,
            RunStatus.VERIFYING,
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.NEEDS_HUMAN,
            RunStatus.CANCELLED,
        }
    ),
    RunStatus.VERIFYING: frozenset(
        {
            RunStatus.QUEUED,
            RunStatus.RUNNING,
            RunStatus.VERIFYING,
            RunStatus.AWAITING_PATCH,
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.NEEDS_HUMAN,
            RunStatus.CANCELLED,
        }
    ),
    RunStatus.AWAITING_PATCH: frozenset(
        {RunStatus.QUEUED, RunStatus.NEEDS_HUMAN, RunStatus.FAILED, RunStatus.CANCELLED}
    ),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.NEEDS_HUMAN: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}

_WORK_ORDER_TRANSITIONS: dict[WorkOrderStatus, frozenset[WorkOrderStatus]] = {
    WorkOrderStatus.QUEUED: frozenset(
        {
            WorkOrderStatus.IN_PROGRESS,
            WorkOrderStatus.COMPLETED,
            WorkOrderStatus.FAILED,
            WorkOrderStatus.CANCELLED,
        }
    ),
    WorkOrderStatus.IN_PROGRESS: frozenset(
        {WorkOrderStatus.QUEUED, WorkOrderStatus.COMPLETED, WorkOrderStatus.FAILED, WorkOrderStatus.CANCELLED}
    ),
    # A completion is a claim: verification that fails afterwards overrules it.
    WorkOrderStatus.COMPLETED: frozenset({WorkOrderStatus.FAILED}),
    WorkOrderStatus.FAILED: frozenset(),
    WorkOrderStatus.CANCELLED: frozenset(),
}


def run_can_move(old: RunStatus, new: RunStatus) -> bool:
    return new in _RUN_TRANSITIONS[old]


def work_order_can_move(old: WorkOrderStatus, new: WorkOrderStatus) -> bool:
    return new in _WORK_ORDER_TRANSITIONS[old]


def check_run_move(run_id: str, old: RunStatus, new: RunStatus) -> None:
    if not run_can_move(old, new):
        raise Conflict(f"run {run_id} is {old}; it cannot become {new}", id=run_id, status=str(old))


def check_work_order_move(wo_id: str, old: WorkOrderStatus, new: WorkOrderStatus) -> None:
    if not work_order_can_move(old, new):
        raise Conflict(f"work order {wo_id} is {old}; it cannot become {new}", id=wo_id, status=str(old))


# Why a work order failed (the pull API's `fail` reasons, and the patch pipeline's).
FAIL_REASONS = (
    "cannot_reproduce",
    "needs_human",
    "out_of_scope",
    "agent_error",
    "timeout",
    "tests_failed",
    "unsafe_patch",
    "verification_failed",
)
