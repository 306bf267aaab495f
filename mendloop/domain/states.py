"""Run and work order states, and every allowed transition in one place."""

from __future__ import annotations

from enum import StrEnum

from mendloop.errors import Conflict


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_PATCH = "awaiting_patch"
    # Parked like awaiting_patch (no lease, not claimable) until an operator approves or rejects, or the deadline
    # (`next_run_at`) passes and its `on_timeout` decides.
    AWAITING_APPROVAL = "awaiting_approval"
    VERIFYING = "verifying"
    COMPLETED = "completed"
    FAILED = "failed"
    NEEDS_HUMAN = "needs_human"
    CANCELLED = "cancelled"
    # A dry run ended: its steps were rendered and recorded, none executed (not a fix: no incident is resolved).
    DRY_RUN = "dry_run"


class WorkOrderStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"  # leased to an agent
    # Held: the agent's part is done and the work order waits on mendloop or an operator, holding no lease.
    AWAITING_APPLY = "awaiting_apply"  # its diff waits for the run's patch pipeline (check, test, commit)
    AWAITING_APPROVAL = "awaiting_approval"  # a verified patch waits for an operator's approval
    AWAITING_MERGE = "awaiting_merge"  # a review branch waits for an operator to mark it merged
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    # Stopped by the run's cancel while it ran (its program killed, its waits cut short); never retried.
    CANCELLED = "cancelled"


RUN_FINAL = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.NEEDS_HUMAN, RunStatus.CANCELLED, RunStatus.DRY_RUN}
)
# A trigger's caller waits until the run reaches one of these.
RUN_SETTLED = RUN_FINAL | {RunStatus.AWAITING_PATCH, RunStatus.AWAITING_APPROVAL}
WORK_ORDER_FINAL = frozenset({WorkOrderStatus.COMPLETED, WorkOrderStatus.FAILED, WorkOrderStatus.CANCELLED})
# The agent's job is over in these; COMPLETED can still turn FAILED when verification overrules the claim.
WORK_ORDER_HELD = frozenset(
    {WorkOrderStatus.AWAITING_APPLY, WorkOrderStatus.AWAITING_APPROVAL, WorkOrderStatus.AWAITING_MERGE}
)
# Held for an operator: the run stays parked in awaiting_patch until the operator acts.
WORK_ORDER_OPERATOR_HOLDS = frozenset({WorkOrderStatus.AWAITING_APPROVAL, WorkOrderStatus.AWAITING_MERGE})
# Not yet over: an agent or an operator can still move it; cancelling its run cancels it.
WORK_ORDER_OPEN = frozenset({WorkOrderStatus.QUEUED, WorkOrderStatus.IN_PROGRESS}) | WORK_ORDER_HELD

_RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.VERIFYING, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.QUEUED,  # lease released for a backoff or a sleep, or reclaimed after a crash
            RunStatus.RUNNING,
            RunStatus.DRY_RUN,
            RunStatus.AWAITING_PATCH,
            RunStatus.AWAITING_APPROVAL,
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
            RunStatus.DRY_RUN,
            RunStatus.VERIFYING,
            RunStatus.AWAITING_PATCH,
            RunStatus.AWAITING_APPROVAL,
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.NEEDS_HUMAN,
            RunStatus.CANCELLED,
        }
    ),
    RunStatus.AWAITING_PATCH: frozenset(
        {RunStatus.QUEUED, RunStatus.NEEDS_HUMAN, RunStatus.FAILED, RunStatus.CANCELLED}
    ),
    # Approved: queued to go on; rejected: a human takes over; timed out with on_timeout=fail: failed.
    RunStatus.AWAITING_APPROVAL: frozenset(
        {RunStatus.QUEUED, RunStatus.NEEDS_HUMAN, RunStatus.FAILED, RunStatus.CANCELLED}
    ),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.DRY_RUN: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.NEEDS_HUMAN: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}

_AGENT_DONE = frozenset(
    {
        WorkOrderStatus.COMPLETED,
        WorkOrderStatus.FAILED,
        WorkOrderStatus.CANCELLED,
        *WORK_ORDER_HELD,
    }
)
_WORK_ORDER_TRANSITIONS: dict[WorkOrderStatus, frozenset[WorkOrderStatus]] = {
    # A completion needs no lease: an agent may work without the pull API and only report.
    WorkOrderStatus.QUEUED: frozenset({WorkOrderStatus.IN_PROGRESS, *_AGENT_DONE}),
    WorkOrderStatus.IN_PROGRESS: frozenset({WorkOrderStatus.QUEUED, *_AGENT_DONE}),
    # The patch pipeline applied the diff, or rejected it (unsafe, tests failed).
    WorkOrderStatus.AWAITING_APPLY: frozenset(
        {WorkOrderStatus.COMPLETED, WorkOrderStatus.FAILED, WorkOrderStatus.CANCELLED}
    ),
    # Approved: the diff goes to the patch pipeline (or straight to verification without a repository).
    WorkOrderStatus.AWAITING_APPROVAL: frozenset(
        {
            WorkOrderStatus.AWAITING_APPLY,
            WorkOrderStatus.COMPLETED,
            WorkOrderStatus.FAILED,
            WorkOrderStatus.CANCELLED,
        }
    ),
    WorkOrderStatus.AWAITING_MERGE: frozenset(
        {WorkOrderStatus.COMPLETED, WorkOrderStatus.FAILED, WorkOrderStatus.CANCELLED}
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
    "tests_regressed",  # a test that passed at the base fails with the patch
    "tests_disabled",  # a test that passed at the base is skipped or gone, or fewer tests ran
    "test_env_error",  # the test command cannot start (exit 126/127, no such program): the environment's fault
    "unsafe_patch",
    "verification_failed",
)
# The reasons another attempt (by this agent or another) may do better: the agent runner's default for `retryable`.
# Not test_env_error: the same attempt in the same broken environment fails the same way.
RETRYABLE_FAIL_REASONS = frozenset(
    {"agent_error", "timeout", "tests_failed", "tests_regressed", "tests_disabled", "needs_human"}
)
assert RETRYABLE_FAIL_REASONS <= set(FAIL_REASONS)
