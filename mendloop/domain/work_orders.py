"""Work order decisions: complete, fail, requeue, approve, reject, settle, reap.

Each is a pure function of the work order, its run and the time: it returns a `Transition` (the columns that
change, the events to publish, the answer to give) and storage persists exactly that, in one transaction with
the rows locked. Nothing here reads a clock or a database.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mendloop.domain.records import NewEvent, Run, WorkOrder
from mendloop.domain.states import (
    RUN_FINAL,
    WORK_ORDER_OPERATOR_HOLDS,
    RunStatus,
    WorkOrderStatus,
    check_run_move,
    check_work_order_move,
)
from mendloop.errors import Conflict

# Where the API serves a stored diff.
DIFF_URL = "/patches/diffs/{id}.diff"


@dataclass(frozen=True, slots=True)
class Transition:
    """What one decision does: column → value for the work order and for its run (empty: unchanged), the events
    to publish with them, a diff to store, and the answer the caller gets (kept for its idempotency key)."""

    work_order: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    events: list[NewEvent] = field(default_factory=list)
    diff: str | None = None
    answer: dict[str, Any] | None = None

    @property
    def changed(self) -> bool:
        return bool(self.work_order or self.run or self.events or self.diff)


@dataclass(frozen=True, slots=True)
class Completion:
    """An agent's (or an operator's) claim that a work order is done. A claim, never proof."""

    tests_passed: bool
    files_changed: int | None = None
    diff_url: str | None = None
    diff: str | None = None
    summary: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    lease_id: str | None = None
    # The agent asks for an operator's approval before anything is applied.
    approval_required: bool = False
    # The agent pushed a review branch: an operator merges it.
    branch: str | None = None
    # An operator's approve/merged: the hold is over.
    release_hold: bool = False


def _past(ts: float | None, now: float) -> bool:
    return ts is not None and ts < now


def check_lease(wo: WorkOrder, lease_id: str | None, *, required: bool, now: float) -> None:
    """A leased work order answers only to its current lease; an unleased one accepts no lease id."""
    if wo.lease_id is None:
        if required or lease_id is not None:
            raise Conflict(f"work order {wo.id} holds no lease (it is {wo.status})", id=wo.id, status=str(wo.status))
        return
    if lease_id is None:
        raise Conflict(f"work order {wo.id} is leased to {wo.lease_owner}; send its lease_id", id=wo.id)
    if lease_id != wo.lease_id or _past(wo.lease_expires_at, now):
        raise Conflict(f"lease {lease_id} on work order {wo.id} is stale", id=wo.id, status=str(wo.status))


def _common(wo: WorkOrder) -> dict[str, Any]:
    return {"run_id": wo.self_healing_run_id, "work_order_id": wo.id, "component": wo.component}


def _moved(wo: WorkOrder, changes: dict[str, Any]) -> WorkOrder:
    return dataclasses.replace(wo, **changes)


def _unleased(now: float) -> dict[str, Any]:
    return {"lease_id": None, "lease_owner": None, "lease_expires_at": None, "updated_at": now}


def _files(n: int | None) -> str:
    return f"{n} file{'s' if n != 1 else ''} changed" if n is not None else "files changed: not reported"


def completion_answer(wo: WorkOrder, on_failure: RunStatus) -> dict[str, Any]:
    run = wo.self_healing_run_id
    messages = {
        WorkOrderStatus.AWAITING_APPROVAL: f"Work order {wo.id}: verified patch held until an operator approves it "
        f"(run {run} waits)",
        WorkOrderStatus.AWAITING_MERGE: f"Work order {wo.id}: review branch waits until an operator marks it merged "
        f"(run {run} waits)",
        WorkOrderStatus.AWAITING_APPLY: f"Work order {wo.id}: patch received; run {run} checks, tests and applies it, "
        "then deploys and verifies",
        WorkOrderStatus.COMPLETED: f"Work order {wo.id} completed; run {run} resumes to deploy and verify",
    }
    return {
        "success": True,
        "work_order_id": wo.id,
        "status": wo.status.value,
        "self_healing_run_id": run,
        "patch_result": wo.patch_result,
        "message": messages.get(wo.status, f"Work order {wo.id} failed; run {run} → {on_failure.value}"),
    }


def complete(
    wo: WorkOrder,
    run: Run | None,
    claim: Completion,
    *,
    has_repository: bool,
    on_failure: RunStatus,
    now: float,
) -> Transition:
    """The agent's claim, applied. With tests passed the work order completes and its parked run is requeued to
    deploy, rerun and verify (verification decides), unless it is held: its diff waits for the run's patch
    pipeline (`awaiting_apply`, when there is a repository to apply it to), or an operator's approval or merge.
    With tests failed it fails, and its run stops as the playbook says. A repeated claim changes nothing."""
    if wo.status in (WorkOrderStatus.FAILED, WorkOrderStatus.CANCELLED):
        raise Conflict(f"work order {wo.id} is {wo.status}; it cannot be completed", id=wo.id, status=str(wo.status))
    if wo.status not in (WorkOrderStatus.QUEUED, WorkOrderStatus.IN_PROGRESS) and not (
        claim.release_hold and wo.status in WORK_ORDER_OPERATOR_HOLDS
    ):
        # The agent's part is over: the same claim again is answered as before; a different one (a late "tests
        # failed") cannot undo what was decided. Only verification overrules a completion.
        if claim.tests_passed:
            return Transition(answer=completion_answer(wo, on_failure))
        raise Conflict(
            f"work order {wo.id} is {wo.status}; a completion can no longer be changed", id=wo.id, status=str(wo.status)
        )
    check_lease(wo, claim.lease_id, required=False, now=now)
    patch_result: dict[str, Any] = {
        "tests_passed": claim.tests_passed,
        "files_changed": claim.files_changed,
        "diff_url": claim.diff_url or (DIFF_URL.format(id=wo.id) if claim.diff else None),
        **({"summary": claim.summary} if claim.summary else {}),
        **claim.extra,
    }
    if not claim.tests_passed:
        status = WorkOrderStatus.FAILED
    elif claim.branch and not claim.release_hold:
        status = WorkOrderStatus.AWAITING_MERGE
        patch_result["branch"] = claim.branch
    elif claim.approval_required and not claim.release_hold:
        status = WorkOrderStatus.AWAITING_APPROVAL
    elif claim.diff and has_repository:
        # Checked, tested and applied by the run's patch pipeline before anything is deployed.
        status = WorkOrderStatus.AWAITING_APPLY
    else:
        status = WorkOrderStatus.COMPLETED
    if status is not wo.status:
        check_work_order_move(wo.id, wo.status, status)
    wo_changes: dict[str, Any] = {
        "status": status,
        "patch_result": patch_result,
        "completed_at": now if status in (WorkOrderStatus.COMPLETED, WorkOrderStatus.FAILED) else None,
        "fail_reason": None if claim.tests_passed else "tests_failed",
        **_unleased(now),
    }
    updated = _moved(wo, wo_changes)
    run_changes: dict[str, Any] = {}
    # A patch waiting for an operator keeps the run parked until the operator acts.
    if run is not None and run.status is RunStatus.AWAITING_PATCH and status not in WORK_ORDER_OPERATOR_HOLDS:
        if claim.tests_passed:
            run_changes = {
                "status": RunStatus.QUEUED,
                "next_run_at": now,
                "outputs": {**run.outputs, "patch": patch_result},
            }
        else:
            run_changes = {
                "status": on_failure,
                "finished_at": now if on_failure in RUN_FINAL else None,
                "error": f"work order {wo.id} failed: tests failed",
            }
        check_run_move(run.id, run.status, run_changes["status"])
        run_changes["updated_at"] = now
    events = _completion_events(updated, run if run_changes else None, claim, patch_result, on_failure)
    return Transition(
        work_order=wo_changes,
        run=run_changes,
        events=events,
        diff=claim.diff or None,
        answer=completion_answer(updated, on_failure),
    )


def _completion_events(
    wo: WorkOrder, run: Run | None, claim: Completion, patch_result: dict[str, Any], on_failure: RunStatus
) -> list[NewEvent]:
    common = _common(wo)
    files = _files(claim.files_changed)
    if not claim.tests_passed:
        out = [
            NewEvent(
                type="coding_agent.work_order_updated",
                message=f"Work order {wo.id} failed: the coding agent's tests did not pass",
                payload={"status": wo.status.value, "patch_result": patch_result},
                **common,
            )
        ]
        if run is not None:
            out.append(
                NewEvent(
                    type="self_healing.completed",
                    message=f"Run {run.id} → {on_failure.value}: work order {wo.id} failed (tests failed)",
                    payload={"status": on_failure.value, "playbook_id": run.playbook_id, "escalated": True},
                    **common,
                )
            )
        return out
    out = [
        NewEvent(
            type="coding_agent.work_order_updated",
            message=f"Work order {wo.id} completed by the coding agent ({files})",
            payload={"status": wo.status.value, "patch_result": patch_result},
            **common,
        )
    ]
    if claim.diff:
        out.append(
            NewEvent(
                type="coding_agent.patch_generated",
                message=f"Patch for {wo.id} stored ({files})",
                payload={"diff_url": patch_result["diff_url"]},
                **common,
            )
        )
    held = wo.status is WorkOrderStatus.AWAITING_APPLY
    # Each message says who did what: here it is the agent's word; mendloop's own test run and its verification
    # have events of their own (engine/held_patch.py, the verify step).
    out.append(
        NewEvent(
            type="coding_agent.tests_passed",
            message=f"Coding agent reports tests passed for {wo.id}"
            + ("; mendloop tests the diff itself before applying it" if held else " (its claim; verification decides)"),
            payload={"files_changed": claim.files_changed},
            **common,
        )
    )
    if run is not None and not held:
        # Nothing for mendloop to apply (no diff, or no repository): the agent's change is live, by its account.
        out.append(
            NewEvent(
                type="self_healing.patch_applied",
                message=f"Code patch applied by the coding agent ({files}). Running verification...",
                payload={"work_order_id": wo.id, "files_changed": claim.files_changed},
                **common,
            )
        )
    return out


def fail_for_good(
    wo: WorkOrder, run: Run | None, *, reason: str, details: dict[str, Any], run_status: RunStatus, now: float
) -> Transition:
    """The work order fails for good; a run parked on it stops with `run_status`."""
    check_work_order_move(wo.id, wo.status, WorkOrderStatus.FAILED)
    wo_changes: dict[str, Any] = {
        "status": WorkOrderStatus.FAILED,
        "fail_reason": reason,
        "completed_at": now,
        "patch_result": {**(wo.patch_result or {}), "failure": {"reason": reason, **details}},
        **_unleased(now),
    }
    events = [
        NewEvent(
            type="coding_agent.work_order_updated",
            message=f"Work order {wo.id} failed: {reason}"
            + (f" ({details['message']})" if details.get("message") else ""),
            payload={"status": "failed", "reason": reason, "details": details},
            **_common(wo),
        )
    ]
    run_changes: dict[str, Any] = {}
    if run is not None and run.status is RunStatus.AWAITING_PATCH:
        check_run_move(run.id, run.status, run_status)
        run_changes = {
            "status": run_status,
            "finished_at": now if run_status in RUN_FINAL else None,
            "updated_at": now,
            "error": f"work order {wo.id} failed: {reason}",
        }
        events.append(
            NewEvent(
                type="self_healing.completed",
                message=f"Run {run.id} → {run_status.value}: work order {wo.id} failed ({reason})",
                payload={"status": run_status.value, "playbook_id": run.playbook_id, "escalated": True},
                run_id=run.id,
                work_order_id=wo.id,
                component=run.component,
            )
        )
    return Transition(work_order=wo_changes, run=run_changes, events=events)


def requeue(wo: WorkOrder, *, now: float, note: str | None, message: str, payload: dict[str, Any]) -> Transition:
    """Back in the queue for the next agent: the lease is dropped, the attempt stays counted."""
    check_work_order_move(wo.id, wo.status, WorkOrderStatus.QUEUED)
    changes: dict[str, Any] = {"status": WorkOrderStatus.QUEUED, **_unleased(now)}
    if note is not None:
        changes["note"] = note
    event = NewEvent(type="coding_agent.work_order_updated", message=message, payload=payload, **_common(wo))
    return Transition(work_order=changes, events=[event])


def give_up(
    wo: WorkOrder,
    run: Run | None,
    *,
    lease_id: str | None,
    reason: str,
    retryable: bool,
    details: dict[str, Any],
    run_status: RunStatus,
    now: float,
) -> Transition:
    """An agent gives a work order up: back in the queue while attempts and the deadline allow a retry, else
    failed for good."""
    if wo.status not in (WorkOrderStatus.QUEUED, WorkOrderStatus.IN_PROGRESS):
        # Held (its diff may be under test right now), completed or over: no longer the agent's to give up.
        raise Conflict(f"work order {wo.id} is {wo.status}; it cannot fail", id=wo.id, status=str(wo.status))
    check_lease(wo, lease_id, required=wo.lease_id is not None, now=now)
    if retryable and wo.attempts < wo.max_attempts and not _past(wo.deadline_at, now):
        return requeue(
            wo,
            now=now,
            note=f"{reason}: {details.get('message', '')}".strip(": "),
            message=f"Work order {wo.id} back in the queue after {reason} (attempt {wo.attempts})",
            payload={"status": "queued", "reason": reason, "details": details},
        )
    return fail_for_good(wo, run, reason=reason, details=details, run_status=run_status, now=now)


def reject(wo: WorkOrder, run: Run | None, *, reason: str, now: float) -> Transition:
    """An operator rejects a patch held for approval or merge: the run needs a human."""
    if wo.status not in WORK_ORDER_OPERATOR_HOLDS:
        raise Conflict(f"work order {wo.id} is not waiting for an operator", id=wo.id, status=str(wo.status))
    return fail_for_good(
        wo,
        run,
        reason="needs_human",
        details={"message": f"rejected by an operator: {reason}"},
        run_status=RunStatus.NEEDS_HUMAN,
        now=now,
    )


def settle(wo: WorkOrder, *, applied: dict[str, Any], now: float) -> Transition:
    """The run's patch pipeline checked, tested and applied the held diff: the work order completes."""
    if wo.status is WorkOrderStatus.COMPLETED:
        return Transition()
    check_work_order_move(wo.id, wo.status, WorkOrderStatus.COMPLETED)
    changes: dict[str, Any] = {
        "status": WorkOrderStatus.COMPLETED,
        "completed_at": now,
        "patch_result": {**(wo.patch_result or {}), "applied": applied},
        **_unleased(now),
    }
    event = NewEvent(
        type="coding_agent.work_order_updated",
        message=f"Work order {wo.id} completed: its patch passed the checks and the tests",
        payload={"status": "completed", "applied": applied},
        **_common(wo),
    )
    return Transition(work_order=changes, events=[event])


def overrule(wo: WorkOrder, run: Run | None, *, reason: str, details: dict[str, Any], now: float) -> Transition:
    """Fail a work order whose run decides its own fate (verification overruled the patch, or the patch pipeline
    rejected the held diff). Failing it twice changes nothing."""
    if wo.status is WorkOrderStatus.FAILED:
        return Transition()
    return fail_for_good(wo, run, reason=reason, details=details, run_status=RunStatus.NEEDS_HUMAN, now=now)


def needs_reaping(wo: WorkOrder, now: float) -> bool:
    """A lease that lapsed, or a deadline that passed while an agent could still work on it."""
    if wo.status is WorkOrderStatus.IN_PROGRESS and _past(wo.lease_expires_at, now):
        return True
    return wo.status in (WorkOrderStatus.QUEUED, WorkOrderStatus.IN_PROGRESS) and _past(wo.deadline_at, now)


def reap(wo: WorkOrder, run: Run | None, *, run_status: RunStatus, now: float) -> Transition:
    """A lapsed lease returns the work order to the queue; one out of attempts or past its deadline fails."""
    if _past(wo.deadline_at, now):
        return fail_for_good(
            wo, run, reason="timeout", details={"message": "deadline passed"}, run_status=run_status, now=now
        )
    if wo.attempts >= wo.max_attempts:
        return fail_for_good(
            wo,
            run,
            reason="timeout",
            details={"message": f"lease lapsed on the last of {wo.max_attempts} attempts"},
            run_status=run_status,
            now=now,
        )
    return requeue(
        wo,
        now=now,
        note=None,
        message=f"Work order {wo.id} back in the queue: {wo.lease_owner}'s lease lapsed",
        payload={"status": "queued", "reason": "lease_lapsed"},
    )


def claimed_event(wo: WorkOrder, agent_id: str) -> NewEvent:
    return NewEvent(
        type="coding_agent.work_order_updated",
        message=f"Coding agent {agent_id} analyzing work order {wo.id} (attempt {wo.attempts})",
        payload={"status": wo.status.value, "agent_id": agent_id, "attempt": wo.attempts},
        **_common(wo),
    )
