"""Records → the answer models of `responses.py`: the spec's JSON shapes (its fields exactly, plus a few more)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from mendloop.api import responses as out
from mendloop.domain import pauses as pauses_decide
from mendloop.domain.bounded import bounded
from mendloop.domain.incidents import TrackedIncident
from mendloop.domain.pauses import Pause
from mendloop.domain.records import EventRecord, Run, RunSummary, StepRecord, TrustChange, WorkOrder
from mendloop.domain.runs import summary
from mendloop.domain.states import RUN_FINAL, WORK_ORDER_FINAL, RunStatus

# Stored JSON is answered at most this deep: new input is capped shallower, and an older row must not make a read
# fail (the answer's serialiser recurses once per level).
READ_DEPTH = 48


def iso(ts: float | None) -> str | None:
    """An API timestamp: UTC, to the millisecond (two steps of one run are often within the same second)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_seconds(ts: float) -> str:
    """A timeline line's time: to the second, as a person reads it."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def work_order(wo: WorkOrder, pauses: Mapping[str, Pause] | None = None) -> out.WorkOrderOut:
    return out.WorkOrderOut(
        work_order_id=wo.id,
        type=wo.type,
        description=wo.description,
        context=bounded(wo.context, READ_DEPTH),
        status=wo.status.value,
        self_healing_run_id=wo.self_healing_run_id,
        estimated_complexity=wo.estimated_complexity,
        priority=wo.priority,
        created_at=iso(wo.created_at),
        patch_result=bounded(wo.patch_result, READ_DEPTH),
        playbook_id=wo.playbook_id,
        component=wo.component,
        updated_at=iso(wo.updated_at),
        completed_at=iso(wo.completed_at),
        attempts=wo.attempts,
        max_attempts=wo.max_attempts,
        fail_reason=wo.fail_reason,
        repository=wo.repository,
        base_commit=wo.base_commit,
        leased_to=wo.lease_owner,
        lease_expires_at=iso(wo.lease_expires_at),
        deadline_at=iso(wo.deadline_at),
        cancel_requested=wo.cancel_requested,
        note=wo.note,
        paused=paused_reason(pauses, wo.component, ended=wo.status in WORK_ORDER_FINAL) if pauses else None,
    )


def run(r: Run | RunSummary, pauses: Mapping[str, Pause] | None = None) -> out.RunOut:
    return out.RunOut.model_validate({**_run_fields(r), "paused": _run_paused(r, pauses)})


def _run_paused(r: Run | RunSummary, pauses: Mapping[str, Pause] | None) -> str | None:
    return paused_reason(pauses, r.component, ended=r.status in RUN_FINAL) if pauses else None


def _run_fields(run: Run | RunSummary) -> dict[str, object]:
    r = run if isinstance(run, RunSummary) else summary(run)
    steps = r.step_ids
    current = steps[r.step_index] if r.step_index < len(steps) else None
    return {
        "run_id": r.id,
        "playbook_id": r.playbook_id,
        "playbook_type": r.playbook_type,
        "playbook_version": r.playbook_version,
        "status": r.status.value,
        "component": r.component,
        "error_type": r.error_type,
        "description": r.description,
        "escalated_to_coding": r.escalated,
        "coding_work_order_id": r.coding_work_order_id,
        # A completed run went through every step (some perhaps skipped), whichever way it left the last one.
        "steps_completed": len(steps) if r.status is RunStatus.COMPLETED else min(r.step_index, len(steps)),
        "steps_total": len(steps),
        "current_step": current,
        "created_at": iso(r.created_at),
        "updated_at": iso(r.updated_at),
        "finished_at": iso(r.finished_at),
        "error": r.error,
        "approval": r.pending.get("approval") if r.status is RunStatus.AWAITING_APPROVAL else None,
    }


def run_detail(
    r: Run,
    steps: list[StepRecord],
    events: list[EventRecord],
    *,
    trust_score: float | None,
    trust_changes: list[TrustChange],
    wo: WorkOrder | None,
    pauses: Mapping[str, Pause] | None = None,
) -> out.RunDetail:
    return out.RunDetail.model_validate(
        {
            **_run_fields(r),
            "paused": _run_paused(r, pauses),
            "steps": [step(s) for s in steps],
            "timeline": timeline(r, steps, events),
            "context": bounded(r.context, READ_DEPTH),
            "trust": out.RunTrust(
                component=r.component, score=trust_score, changes=[trust_change(c) for c in trust_changes]
            ),
            "work_order": work_order(wo) if wo is not None else None,
        }
    )


def step(s: StepRecord) -> out.StepOut:
    return out.StepOut(
        step_index=s.step_index,
        step_id=s.step_id,
        action=s.action,
        attempt=s.attempt,
        status=s.status.value,
        started_at=iso(s.started_at),
        finished_at=iso(s.finished_at),
        duration_ms=round((s.finished_at - s.started_at) * 1000, 1),
        output=bounded(s.output, READ_DEPTH),
        error=s.error,
        idempotency_key=s.idempotency_key,
    )


def event(e: EventRecord) -> out.EventOut:
    return out.EventOut(
        id=e.id,
        event_type=e.type,
        source=e.source,
        message=e.message,
        payload=bounded(e.payload, READ_DEPTH),
        run_id=e.run_id,
        work_order_id=e.work_order_id,
        component=e.component,
        timestamp=iso(e.created_at),
        created_at=e.created_at,
    )


def _step_line(s: StepRecord, names: dict[str, str], attempts: dict[str, int]) -> str:
    title = names.get(s.step_id) or s.step_id.replace("_", " ")
    if s.status.value == "skipped":
        why = s.output.get("skipped") if isinstance(s.output, dict) else None
        return f"Step skipped: {title} ({why or 'condition not met'})"
    if s.status.value == "cancelled":
        return f"Step stopped by the cancel: {title}: {s.error}"
    # "attempt k/n" whenever the step may be tried more than once, so a failure that will be retried says so.
    most = attempts.get(s.step_id, 1)
    attempt = f" (attempt {s.attempt}/{most})" if most > 1 else ""
    if s.action == "verify":
        if s.status.value == "succeeded":
            return f"Verification passed: {title}{attempt}"
        return f"Verification failed: {title}{attempt}: {s.error}"
    if s.status.value == "succeeded":
        return f"Step done: {title}{attempt if s.attempt > 1 else ''}"
    return f"Step failed: {title}{attempt or f' (attempt {s.attempt})'}: {s.error}"


def timeline(r: Run, steps: list[StepRecord], events: list[EventRecord]) -> list[out.EventLine | out.StepLine]:
    names = {st["id"]: st.get("name") or st["id"].replace("_", " ") for st in r.playbook.get("steps", [])}
    attempts = {st["id"]: _max_attempts(st) for st in r.playbook.get("steps", [])}
    items: list[tuple[float, int, out.EventLine | out.StepLine]] = []
    for e in events:
        line = out.EventLine(time=iso_seconds(e.created_at), kind="event", event_type=e.type, message=e.message)
        items.append((e.created_at, 0, line))
    for s in steps:
        if s.action == "escalate" and s.status.value == "succeeded":
            continue  # the escalation event says it better
        step_line = out.StepLine(
            time=iso_seconds(s.finished_at), kind="step", step_id=s.step_id, message=_step_line(s, names, attempts)
        )
        items.append((s.finished_at, 1, step_line))
    items.sort(key=lambda i: (i[0], i[1]))
    return [i[2] for i in items]


def trust_change(c: TrustChange) -> out.TrustChangeOut:
    return out.TrustChangeOut(
        component=c.component, old=c.old, new=c.new, reason=c.reason, run_id=c.run_id, time=iso(c.created_at)
    )


def pause(p: Pause, *, reason: bool = True) -> out.PauseOut:
    """A pause; `reason=False` (an anonymous caller of /health) leaves the operator's words out."""
    shown = p.reason if reason else "(send a token to see why)"
    return out.PauseOut(scope=p.scope, reason=shown, paused_at=iso(p.created_at))


def paused_reason(pauses: Mapping[str, Pause], component: str | None, *, ended: bool = False) -> str | None:
    """What a run, an incident or a work order shows while a pause holds its component's runs."""
    held = None if ended else pauses_decide.applying(pauses, component)
    return held.reason if held is not None else None


def incident(i: TrackedIncident, pauses: Mapping[str, Pause] | None = None) -> out.IncidentOut:
    return out.IncidentOut.model_validate({**_incident_fields(i), "paused": _incident_paused(i, pauses)})


def incident_detail(
    i: TrackedIncident, runs: list[tuple[str, str]], pauses: Mapping[str, Pause] | None = None
) -> out.IncidentDetail:
    fields = {
        **_incident_fields(i),
        "runs": [out.IncidentRun(run_id=run_id, status=status) for run_id, status in runs],
        "paused": _incident_paused(i, pauses),
    }
    return out.IncidentDetail.model_validate(fields)


def _incident_paused(i: TrackedIncident, pauses: Mapping[str, Pause] | None) -> str | None:
    return paused_reason(pauses, i.component, ended=i.status == "resolved") if pauses else None


def _incident_fields(i: TrackedIncident) -> dict[str, object]:
    return {
        "incident_id": i.id,
        "fingerprint": i.fingerprint,
        "status": i.status,
        "error_type": i.error_type,
        "event_type": i.event_type,
        "component": i.component,
        "source": i.source,
        "title": i.title,
        "sample": i.sample,
        "count": i.count,
        "absorbed": i.absorbed,
        "first_seen": iso(i.first_seen),
        "last_seen": iso(i.last_seen),
        "resolved_at": iso(i.resolved_at),
        "last_run_id": i.last_run_id,
        "recurrences": i.recurrences,
        "resolved_by_run": i.resolved_by_run,
        "resolved_commit": i.resolved_commit,
        "last_resolved_at": iso(i.last_resolved_at),
        "regressions": i.regressions,
        "regressed_commit": i.regressed_commit,
    }


def _max_attempts(step: dict[str, object]) -> int:
    retry = step.get("retry")
    most = retry.get("max_attempts", 3) if isinstance(retry, dict) else 1
    return most if isinstance(most, int) and most > 0 else 1
