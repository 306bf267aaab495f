"""What each page shows, read through the stores and views the API uses (one query per thing shown, none of
them a second implementation): each function returns the template's context."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mendloop.api import views
from mendloop.api.routes.runs import run_detail
from mendloop.app import App
from mendloop.dashboard import trust_chart
from mendloop.domain import roles
from mendloop.domain.pauses import Pause
from mendloop.domain.records import RunSummary, WorkOrder
from mendloop.domain.roles import Action, Credential, Role
from mendloop.domain.states import RUN_FINAL, WORK_ORDER_OPEN, RunStatus, WorkOrderStatus
from mendloop.errors import NotFound
from mendloop.storage.pages import INCIDENTS_PAGE, RUNS_PAGE, WORK_ORDERS_PAGE, cursor_of

PAGE_SIZE = 25
FEED_SIZE = 15
# The event types the Co-Pilot feed and the live pages listen for (EventSource hears named events only).
LIVE_TYPES = (
    "self_healing.triggered",
    "self_healing.trigger_requested",
    "self_healing.escalated",
    "self_healing.completed",
    "self_healing.step_failed",
    "self_healing.step_cancelled",
    "self_healing.patch_applied",
    "self_healing.patch_reverted",
    "self_healing.circuit_open",
    "coding_agent.work_order_created",
    "coding_agent.work_order_updated",
    "coding_agent.patch_generated",
    "coding_agent.tests_passed",
    "run.escalated",
    "run.retried",
    "run.approval_requested",
    "run.approved",
    "run.rejected",
    "run.approval_timed_out",
    "run.autonomous",
    "run.cancelled",
    "trust.updated",
    "incident.opened",
    "incident.resolved",
    "incident.reopened",
    "control.paused",
    "control.resumed",
)


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who looks: their name and role, and the actions their role may take (roles.ALLOWED, the one source)."""

    name: str
    role: Role
    open: bool  # a server without tokens (loopback): no login, no logout

    def may(self, action: Action) -> bool:
        return roles.allows(self.role, action)


def viewer_of(credential: Credential | None, *, is_open: bool) -> Viewer:
    if credential is None:
        return Viewer("anonymous", Role.ADMIN if is_open else Role.VIEWER, is_open)
    return Viewer(credential.name, credential.role, is_open)


def feed(app: App) -> dict[str, Any]:
    events, _ = app.store.events.recent_page(limit=FEED_SIZE)
    return {"feed": [views.event(e) for e in events], "feed_after": max((e.id for e in events), default=0)}


def error_types(app: App) -> list[str]:
    """The error types a trigger may name: the ones the trigger route itself would accept."""
    return sorted(app.remediation.known_error_types())


def workflow(app: App) -> dict[str, Any]:
    stats = app.store.statistics()
    by_status = stats.runs_by_status
    _, open_incidents, _ = app.incidents.page(status="open", limit=1)
    in_flight = sum(
        by_status.get(s.value, 0)
        for s in (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.VERIFYING, RunStatus.AWAITING_APPROVAL)
    )
    escalated_open = sum(stats.work_orders.get(s.value, 0) for s in WORK_ORDER_OPEN)
    stages = [
        ("Error detection", open_incidents, "open incidents", "/ui/incidents"),
        ("Playbook execution", in_flight, "runs in flight", "/ui/runs"),
        ("Code escalation", escalated_open, "work orders open", "/ui/patches"),
        ("Trust restoration", by_status.get(RunStatus.COMPLETED.value, 0), "runs healed", "/ui/trust"),
    ]
    escalations, _ = app.store.events.recent_page(event_type="self_healing.escalated", limit=10)
    return {
        "stages": stages,
        "escalations": [views.event(e) for e in escalations],
        "error_types": error_types(app),
        "total_runs": stats.overall.runs,
    }


def _run_row(r: RunSummary) -> dict[str, Any]:
    end = r.finished_at if r.status in RUN_FINAL else None
    return {"run": views.run(r), "started": r.created_at, "duration": (end - r.created_at) if end else None}


def runs(
    app: App, *, status: str | None, playbook: str | None, component: str | None, cursor: str | None
) -> dict[str, Any]:
    after = cursor_of(RUNS_PAGE, cursor)
    # No count of the matching runs: it is the one read that grows with history, and keyset pages need none.
    items, next_cursor = app.store.runs.newest(
        status=status, playbook_id=playbook, component=component, after=after, limit=PAGE_SIZE
    )
    return {
        "rows": [_run_row(r) for r in items],
        "next_cursor": next_cursor,
        "filters": {"status": status or "", "playbook": playbook or "", "component": component or ""},
        "statuses": [s.value for s in RunStatus],
        "playbooks": sorted(app.playbooks.by_id),
        "filtered": bool(status or playbook or component or cursor),
    }


def _patch_row(wo: WorkOrder, pauses: Mapping[str, Pause] | None = None) -> dict[str, Any]:
    result = wo.patch_result or {}
    agent = result.get("agent") if isinstance(result.get("agent"), dict) else {}
    return {
        "wo": views.work_order(wo, pauses),
        "agent": (agent or {}).get("name") or wo.lease_owner or "—",
        "tests": result.get("tests_passed"),
        "files": result.get("files_changed"),
        "time_to_patch": (wo.completed_at - wo.created_at) if wo.completed_at else None,
    }


def patches(app: App, *, status: str | None, cursor: str | None) -> dict[str, Any]:
    after = cursor_of(WORK_ORDERS_PAGE, cursor)
    items, total, next_cursor = app.store.work_orders.page(status=status, after=after, limit=PAGE_SIZE)
    return {
        "rows": [_patch_row(w) for w in items],
        "total": total,
        "next_cursor": next_cursor,
        "status": status or "",
        "statuses": [s.value for s in WorkOrderStatus],
        "filtered": bool(status or cursor),
    }


def patch(app: App, work_order_id: str) -> dict[str, Any]:
    wo = app.store.get_work_order(work_order_id)
    try:
        diff = app.store.get_diff(work_order_id)
    except NotFound:
        diff = None
    result = dict(wo.patch_result or {})
    applied = result.get("applied") if isinstance(result.get("applied"), dict) else None
    tests_output = (applied or {}).get("tests_output") or result.get("tests_output")
    return {
        **_patch_row(wo, app.store.pauses.current()),
        "diff": diff,
        "result": result,
        "applied": applied,
        "tests_output": tests_output,
        "held": wo.status in (WorkOrderStatus.AWAITING_APPROVAL, WorkOrderStatus.AWAITING_MERGE),
    }


def run(app: App, run_id: str) -> dict[str, Any]:
    detail = run_detail(app, run_id)
    r = app.store.get_run(run_id)
    incident = None
    if r.incident_id:
        try:
            incident = views.incident(app.incidents.get(r.incident_id))
        except NotFound:
            incident = None
    log_lines = r.context.get("log_lines") or (r.context.get("event") or {}).get("log_context")
    if not isinstance(log_lines, dict):
        lines = (r.context.get("event") or {}).get("lines")
        log_lines = {"lines": lines} if isinstance(lines, list) else None
    declared = {s.get("id"): s for s in r.playbook.get("steps", []) if isinstance(s, dict)}
    verify_ids = [s for s, st in declared.items() if st.get("action") == "verify"]
    verification = [s for s in detail.steps if s.step_id in verify_ids]
    return {
        "detail": detail,
        "declared": declared,
        "incident": incident,
        "log_lines": log_lines,
        "verification": verification,
        "step_ids": [s.get("id") for s in r.playbook.get("steps", []) if isinstance(s, dict)],
        "final": r.status in RUN_FINAL,
        "retryable": r.status in (RunStatus.NEEDS_HUMAN, RunStatus.CANCELLED, RunStatus.FAILED),
        "held_patch": bool(
            detail.work_order
            and detail.work_order.status
            in (WorkOrderStatus.AWAITING_APPROVAL.value, WorkOrderStatus.AWAITING_MERGE.value)
        ),
    }


def incidents(app: App, *, status: str | None, cursor: str | None) -> dict[str, Any]:
    after = cursor_of(INCIDENTS_PAGE, cursor)
    items, total, next_cursor = app.incidents.page(status=status, after=after, limit=PAGE_SIZE)
    return {
        "rows": [{"incident": views.incident(i), "runs": app.incidents.runs_of(i.id)[-10:]} for i in items],
        "total": total,
        "next_cursor": next_cursor,
        "status": status or "",
        "filtered": bool(status or cursor),
    }


def trust(app: App) -> dict[str, Any]:
    scores = app.store.trust_scores()
    history = {c: app.store.trust_history(component=c, last=200) for c in scores}
    series = trust_chart.series_of(scores, history)
    return {"series": series, "chart": trust_chart.svg(series)}
