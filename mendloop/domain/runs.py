"""Run decisions that storage persists: what a new run, an escalation and a cancellation change and report.

Pure functions: the columns that change and the events to publish, never a clock or a database.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mendloop.domain.records import NewEvent, PlaybookRef, Run, RunSummary
from mendloop.domain.states import RunStatus, WorkOrderStatus, check_run_move
from mendloop.errors import Conflict, InputError

# A run that ended without its fix can be retried from a step; a completed run (or a dry run) has nothing to redo.
RETRYABLE = frozenset({RunStatus.FAILED, RunStatus.NEEDS_HUMAN, RunStatus.CANCELLED})


def stamp(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)


def run_id(now: float, seq: int) -> str:
    """Readable and unique: the time of creation and a per-day counter."""
    return f"run_{stamp(now):%Y%m%d_%H%M%S}_{seq:06d}"


def run_counter(now: float) -> str:
    return "run:" + stamp(now).strftime("%Y%m%d")


def work_order_id(now: float, seq: int) -> str:
    return f"wo_{stamp(now):%Y%m%d}_{seq:04d}"


def work_order_counter(now: float) -> str:
    return "wo:" + stamp(now).strftime("%Y%m%d")


def plan(
    pb: PlaybookRef,
    *,
    error_type: str,
    description: str,
    component: str | None,
    context: Mapping[str, Any],
    event: dict[str, Any],
    targets: Collection[str],
    default_target: str | None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """What a new run is made of, whoever starts it (a trigger, a detection): the columns of `RunStore.create`.

    The target is the named component when it is a configured target, else the playbook's own, else the default;
    the run's component is the one named, or its target. The context carries the caller's facts, then the error,
    the target and the triggering event, which templates read as `event`. A dry run (`dry_run`: the config's, or
    the playbook's own `dry_run: true`) is decided here, once: the step loop then renders and records its steps
    and executes none, whatever the config says by the time a worker claims it."""
    dry = dry_run or pb.document.get("dry_run") is True
    named = pb.document.get("target")
    if component and component in targets:
        target: str | None = component
    else:
        target = (named if isinstance(named, str) else None) or default_target
    return {
        "playbook": pb.document,
        "playbook_version": pb.version,
        "component": component or target,
        "error_type": error_type,
        "description": description,
        "context": {
            **context,
            "error_type": error_type,
            "description": description,
            "target": target,
            "event": event,
            **({"dry_run": True} if dry else {}),
        },
        "message": f"Running playbook: {pb.id}" + (" (dry run: nothing is executed)" if dry else ""),
    }


def triggered_event(
    *,
    run_id: str,
    playbook_id: str,
    error_type: str | None,
    incident_id: str | None,
    component: str | None,
    message: str,
) -> NewEvent:
    return NewEvent(
        type="self_healing.triggered",
        message=message,
        payload={"playbook_id": playbook_id, "error_type": error_type, "incident_id": incident_id},
        run_id=run_id,
        component=component,
    )


@dataclass(frozen=True, slots=True)
class Escalation:
    """A step handed the fix to a coding agent: the work order to create, and the run parks in awaiting_patch."""

    work_order: dict[str, Any]
    run: dict[str, Any]
    events: list[NewEvent]


def escalate(
    run: Run,
    *,
    wo_id: str,
    step_id: str,
    next_index: int,
    description: str,
    context: dict[str, Any],
    estimated_complexity: str,
    priority: str,
    repository: str | None,
    base_commit: str | None,
    max_attempts: int,
    deadline_at: float | None,
    now: float,
) -> Escalation:
    check_run_move(run.id, run.status, RunStatus.AWAITING_PATCH)
    work_order = {
        "id": wo_id,
        "type": "self_healing_patch",
        "description": description,
        "context": context,
        "status": WorkOrderStatus.QUEUED.value,
        "self_healing_run_id": run.id,
        "playbook_id": run.playbook_id,
        "component": run.component,
        "estimated_complexity": estimated_complexity,
        "priority": priority,
        "created_at": now,
        "updated_at": now,
        "completed_at": None,
        "patch_result": None,
        "attempts": 0,
        "fail_reason": None,
        "lease_id": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "max_attempts": max_attempts,
        "deadline_at": deadline_at,
        "cancel_requested": False,
        "repository": repository,
        "base_commit": base_commit,
        "note": None,
    }
    run_changes = {
        "status": RunStatus.AWAITING_PATCH.value,
        "step_index": next_index,
        "attempt": 0,
        "escalated": True,
        "coding_work_order_id": wo_id,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
        "stalled_claims": 0,
        "outputs": {**run.outputs, step_id: {"work_order_id": wo_id}},
    }
    common: dict[str, Any] = {"run_id": run.id, "work_order_id": wo_id, "component": run.component}
    events = [
        NewEvent(
            type="coding_agent.work_order_created",
            message=f"Work order {wo_id} created: {description}",
            payload={"work_order_id": wo_id, "estimated_complexity": estimated_complexity},
            **common,
        ),
        NewEvent(
            type="self_healing.escalated",
            message=f"Escalated to coding agent (work order {wo_id})",
            payload={"work_order_id": wo_id, "playbook_id": run.playbook_id},
            **common,
        ),
    ]
    return Escalation(work_order=work_order, run=run_changes, events=events)


def retry(run: Run, *, from_step: str) -> dict[str, Any]:
    """A new run of the same playbook document, context and component, starting at `from_step`, with the outputs
    of the steps before it carried over (templates read them as `steps.<id>`, as in the first run). The old run
    stays as it ended: final states have no way out, and each run's timeline stays its own. Its work order is not
    carried over: a step after an escalation that is retried sees the patch's outputs, not an open work order."""
    if run.status not in RETRYABLE:
        raise Conflict(
            f"run {run.id} is {run.status}; only a failed, needs_human or cancelled run can be retried",
            id=run.id,
            status=str(run.status),
        )
    ids = list(step_ids(run.playbook))
    if from_step not in ids:
        raise InputError(f"run {run.id} has no step {from_step!r}; its steps: {', '.join(ids)}", field="from_step")
    index = ids.index(from_step)
    earlier = set(ids[:index])
    if any(s.get("action") == "escalate" for s in run.playbook["steps"][:index]):
        earlier |= {"patch", "apply_patch"}  # what the escalation brought back, read by the later steps
    return {
        "playbook": run.playbook,
        "playbook_version": run.playbook_version,
        "component": run.component,
        "error_type": run.error_type,
        "description": run.description,
        "context": {**run.context, "retry_of": run.id, "retry_from": from_step},
        "outputs": {k: v for k, v in run.outputs.items() if k in earlier},
        "step_index": index,
        "incident_id": run.incident_id,
        "mutex_key": run.mutex_key,
        "message": f"Retry of run {run.id} from step {from_step!r}: playbook {run.playbook_id}",
    }


def retried_event(run: Run, new_run_id: str, from_step: str) -> NewEvent:
    return NewEvent(
        type="run.retried",
        message=f"Run {run.id} retried from step {from_step!r} as run {new_run_id}",
        payload={"new_run_id": new_run_id, "from_step": from_step},
        run_id=run.id,
        component=run.component,
    )


def cancel(run: Run, *, reason: str, now: float) -> tuple[dict[str, Any], dict[str, Any], list[NewEvent]]:
    """An operator cancels a run: the run's changes, its work order's (applied while the work order is still
    open, `WORK_ORDER_OPEN`: an agent working on it sees `cancel_requested` at its next heartbeat), the events."""
    check_run_move(run.id, run.status, RunStatus.CANCELLED)
    changes = {
        "status": RunStatus.CANCELLED.value,
        "lease_owner": None,
        "lease_expires_at": None,
        "finished_at": now,
        "updated_at": now,
        "error": reason,
    }
    work_order = {"status": WorkOrderStatus.CANCELLED.value, "cancel_requested": True, "updated_at": now}
    event = NewEvent(
        type="self_healing.completed",
        message=f"Run {run.id} cancelled: {reason}",
        payload={"status": RunStatus.CANCELLED.value},
        run_id=run.id,
        component=run.component,
    )
    return changes, work_order, [event]


def step_ids(playbook: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(s.get("id")) for s in playbook.get("steps", []))


def summary(run: Run) -> RunSummary:
    """The run as a list shows it (`RunSummary`)."""
    return RunSummary(
        id=run.id,
        playbook_id=run.playbook_id,
        playbook_version=run.playbook_version,
        playbook_type=run.playbook_type,
        status=run.status,
        component=run.component,
        error_type=run.error_type,
        description=run.description,
        step_index=run.step_index,
        step_ids=step_ids(run.playbook),
        pending=run.pending,
        escalated=run.escalated,
        coding_work_order_id=run.coding_work_order_id,
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
        error=run.error,
    )
