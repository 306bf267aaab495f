"""Approvals: a run parked in `awaiting_approval` until an operator approves or rejects it, or its deadline passes.

Two things park a run this way, and both are decided here:

- an `approval` step (kind `step`): approved, the run goes on after it; its output records the decision;
- a trust gate (kind `gate`) in front of a `destructive: true` step or a held patch's apply, when the component's
  trust is below the gate configured for it: approved, the gated step itself runs next.

Pure functions: the run's columns that change, the step row to record and the events, never a clock or a database.
The deadline is the run's `next_run_at` (a parked run is never claimed, so the column is free to say when the
reaper looks at it again); without a deadline it is `NO_DEADLINE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mendloop.domain.records import NewEvent, Run
from mendloop.domain.states import RunStatus, StepStatus, check_run_move
from mendloop.errors import Conflict

OnTimeout = Literal["reject", "approve", "fail"]
ON_TIMEOUT: tuple[OnTimeout, ...] = ("reject", "approve", "fail")
Kind = Literal["step", "gate"]
# `next_run_at` is NOT NULL: an approval without a deadline waits until this (year 5138), i.e. for ever.
NO_DEADLINE = 1e11
# The step id under which the held patch's apply is recorded (the step loop's `apply_patch`).
APPLY_PATCH = "apply_patch"


@dataclass(frozen=True, slots=True)
class Rule:
    """Which rule asked for the approval, shown on the timeline: an approval step, or a trust gate with the score
    it compared (or, when the score was at or above the gate, which let the step run on its own)."""

    name: Literal["approval_step", "trust_gate"]
    score: float | None = None
    gate: float | None = None

    def as_payload(self) -> dict[str, Any]:
        return {"rule": self.name, "score": self.score, "gate": self.gate}


def trust_gate(score: float, gate: float | None) -> Rule | None:
    """The trust gate's rule for a component, or None when no gate is configured for it. `needs_approval` says
    whether it holds the step: below the gate an operator decides, at or above it the step runs on its own."""
    if gate is None:
        return None
    return Rule("trust_gate", score=round(score, 4), gate=gate)


def needs_approval(rule: Rule | None) -> bool:
    if rule is None or rule.name == "approval_step":
        return rule is not None
    assert rule.score is not None and rule.gate is not None
    return rule.score < rule.gate


def autonomous_event(run: Run, step_id: str, rule: Rule) -> NewEvent:
    """The timeline's line when a gated step runs on its own: the score was at or above the gate."""
    return NewEvent(
        type="run.autonomous",
        message=f"Run {run.id}: {_what(step_id)} runs without approval: trust {rule.score} is at or above the "
        f"gate {rule.gate}",
        payload={"step_id": step_id, **rule.as_payload()},
        run_id=run.id,
        component=run.component,
    )


@dataclass(frozen=True, slots=True)
class Decision:
    """What storage persists for an approval: the run's changes, a step row (None: no row) and the events."""

    run: dict[str, Any]
    events: list[NewEvent]
    step: dict[str, Any] | None = field(default=None)


def request(
    run: Run,
    *,
    kind: Kind,
    step_id: str,
    rule: Rule,
    message: str | None,
    deadline_at: float | None,
    on_timeout: OnTimeout,
    now: float,
) -> Decision:
    """Park the run until someone decides. The lease goes with the status (the run is not claimable)."""
    check_run_move(run.id, run.status, RunStatus.AWAITING_APPROVAL)
    approval = {
        "kind": kind,
        "step_id": step_id,
        "step_index": run.step_index,
        "message": message,
        "requested_at": now,
        "deadline_at": deadline_at,
        "on_timeout": on_timeout,
        **rule.as_payload(),
    }
    why = (
        f"trust {rule.score} is below the gate {rule.gate} for {run.component}"
        if rule.name == "trust_gate"
        else (message or "the playbook asks for it")
    )
    event = NewEvent(
        type="run.approval_requested",
        message=f"Run {run.id} waits for approval of {_what(step_id)}: {why}",
        payload={"step_id": step_id, "deadline_at": deadline_at, "on_timeout": on_timeout, **rule.as_payload()},
        run_id=run.id,
        component=run.component,
    )
    changes = {
        "status": RunStatus.AWAITING_APPROVAL.value,
        "pending": {"approval": approval},
        "next_run_at": deadline_at if deadline_at is not None else NO_DEADLINE,
        "attempt": 0,
    }
    return Decision(run=changes, events=[event])


def decide(run: Run, *, approved: bool, by: str, comment: str | None, now: float) -> Decision:
    """An operator's (or the deadline's) answer. Approved: the run is queued to go on. Rejected: a human takes
    the run over (`needs_human`, as for a rejected patch)."""
    approval = waiting(run)
    step_id = str(approval["step_id"])
    answer = {"approved": approved, "by": by, "comment": comment, "decided_at": now}
    common: dict[str, Any] = {"run_id": run.id, "component": run.component}
    said = f": {comment}" if comment else ""
    if approved:
        check_run_move(run.id, run.status, RunStatus.QUEUED)
        changes: dict[str, Any] = {
            "status": RunStatus.QUEUED.value,
            "next_run_at": now,
            "attempt": 0,
            "error": None,
        }
        if approval["kind"] == "step":
            changes["step_index"] = int(approval["step_index"]) + 1
            changes["outputs"] = {**run.outputs, step_id: answer}
            changes["pending"] = {}
        else:
            # The gated step runs next, once: the step loop sees it was approved and does not ask again.
            changes["pending"] = {"approved": step_id}
        event = NewEvent(
            type="run.approved",
            message=f"Run {run.id}: {_what(step_id)} approved by {by}{said}",
            payload={"step_id": step_id, **answer},
            **common,
        )
        return Decision(run=changes, events=[event], step=_step(approval, StepStatus.SUCCEEDED, answer, None))
    error = f"approval of {_what(step_id)} rejected by {by}{said}"
    return _stop(run, approval, RunStatus.NEEDS_HUMAN, error, answer, "run.rejected", now)


def time_out(run: Run, *, now: float) -> Decision | None:
    """The deadline passed with no decision: `on_timeout` decides. None when there is nothing to do (decided
    meanwhile, or not yet due)."""
    if run.status is not RunStatus.AWAITING_APPROVAL or run.next_run_at > now:
        return None
    approval = waiting(run)
    on_timeout = approval.get("on_timeout", "reject")
    comment = "no decision before the deadline"
    if on_timeout == "approve":
        return decide(run, approved=True, by="timeout", comment=comment, now=now)
    if on_timeout == "reject":
        return decide(run, approved=False, by="timeout", comment=comment, now=now)
    answer = {"approved": False, "by": "timeout", "comment": comment, "decided_at": now}
    error = f"approval of {_what(str(approval['step_id']))} timed out"
    return _stop(run, approval, RunStatus.FAILED, error, answer, "run.approval_timed_out", now)


def waiting(run: Run) -> dict[str, Any]:
    """The approval a run waits for; Conflict when it waits for none."""
    approval = run.pending.get("approval") if run.status is RunStatus.AWAITING_APPROVAL else None
    if not isinstance(approval, dict):
        raise Conflict(f"run {run.id} is not waiting for an approval", id=run.id, status=str(run.status))
    return approval


def _stop(
    run: Run,
    approval: dict[str, Any],
    status: RunStatus,
    error: str,
    answer: dict[str, Any],
    event_type: str,
    now: float,
) -> Decision:
    check_run_move(run.id, run.status, status)
    step_id = str(approval["step_id"])
    changes: dict[str, Any] = {"status": status.value, "error": error, "finished_at": now, "pending": {}}
    common: dict[str, Any] = {"run_id": run.id, "component": run.component}
    ended = "needs a human" if status is RunStatus.NEEDS_HUMAN else "failed"
    events = [
        NewEvent(type=event_type, message=f"Run {run.id}: {error}", payload={"step_id": step_id, **answer}, **common),
        NewEvent(
            type="self_healing.completed",
            message=f"Run {run.id} {ended}: {error}",
            payload={"status": status.value, "playbook_id": run.playbook_id, "escalated": run.escalated},
            work_order_id=run.coding_work_order_id,
            **common,
        ),
    ]
    return Decision(run=changes, events=events, step=_step(approval, StepStatus.FAILED, answer, error))


def _step(approval: dict[str, Any], status: StepStatus, output: dict[str, Any], error: str | None) -> dict[str, Any]:
    """The steps row of the decision: the approval step itself, or the gate in front of a step."""
    step_id = str(approval["step_id"])
    gate = approval["kind"] == "gate"
    return {
        "step_index": int(approval["step_index"]),
        "step_id": f"{step_id}.approval" if gate else step_id,
        "action": "approval",
        "status": status,
        "started_at": float(approval["requested_at"]),
        "output": {**output, **({"rule": approval.get("rule")} if gate else {})},
        "error": error,
    }


def _what(step_id: str) -> str:
    return "the patch apply" if step_id == APPLY_PATCH else f"step {step_id!r}"
