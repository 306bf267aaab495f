"""/patches: work orders, runs, trigger, stats, diffs (the spec's Patches API)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.deps import AppDep
from mendloop.api.schemas import (
    ERROR_RESPONSES,
    CancelRequest,
    ClaimRequest,
    CompleteRequest,
    FailRequest,
    HeartbeatRequest,
    RejectRequest,
    TriggerRequest,
)
from mendloop.app import App
from mendloop.domain.records import EventRecord
from mendloop.domain.states import RUN_SETTLED, RunStatus, WorkOrderStatus

router = APIRouter(prefix="/patches", tags=["patches"], responses=ERROR_RESPONSES)

RunStatusQ = Annotated[RunStatus | None, Query(description="Only runs in this status")]
WorkOrderStatusQ = Annotated[WorkOrderStatus | None, Query(description="Only work orders in this status")]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]


@router.get("/work-orders")
async def list_work_orders(
    app: AppDep,
    status: WorkOrderStatusQ = None,
    self_healing_run_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 20,
    offset: Offset = 0,
) -> dict[str, Any]:
    def query() -> dict[str, Any]:
        items, total = app.store.list_work_orders(
            status=status.value if status else None, run_id=self_healing_run_id, limit=limit, offset=offset
        )
        return {
            "work_orders": [views.work_order(w) for w in items],
            "count": len(items),
            "total": total,
            "stats": app.store.work_order_stats(),
        }

    return await run_in_threadpool(query)


@router.get("/work-orders/{work_order_id}")
async def get_work_order(app: AppDep, work_order_id: str) -> dict[str, Any]:
    wo = await run_in_threadpool(app.store.get_work_order, work_order_id)
    return views.work_order(wo)


@router.post("/work-orders/{work_order_id}/complete")
async def complete_work_order(
    app: AppDep,
    work_order_id: str,
    body: CompleteRequest,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=300)] = None,
) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if body.base_commit:
        extra["base_commit"] = body.base_commit
    if body.agent:
        extra["agent"] = body.agent.model_dump(exclude_none=True)
    if body.applied_commit:
        extra["applied_commit"] = body.applied_commit
    if body.approval_required:
        extra["approval_required"] = True
    return await run_in_threadpool(
        lambda: app.remediation.complete_work_order(
            work_order_id,
            tests_passed=body.tests_passed,
            files_changed=body.files_changed,
            diff_url=body.diff_url,
            diff=body.diff,
            summary=body.summary,
            extra=extra,
            idempotency_key=idempotency_key,
            lease_id=body.lease_id,
            approval_required=body.approval_required,
            branch=body.branch,
        )
    )


@router.post("/work-orders/{work_order_id}/approve")
async def approve_work_order(app: AppDep, work_order_id: str) -> dict[str, Any]:
    """Apply a verified patch held for approval (`--apply approval`); the run resumes."""
    return await run_in_threadpool(app.remediation.approve, work_order_id)


@router.post("/work-orders/{work_order_id}/merged")
async def merged_work_order(app: AppDep, work_order_id: str) -> dict[str, Any]:
    """Mark a review branch (`--apply branch`) merged; the run resumes to deploy and verify."""
    return await run_in_threadpool(app.remediation.merged, work_order_id)


@router.post("/work-orders/{work_order_id}/reject")
async def reject_work_order(app: AppDep, work_order_id: str, body: RejectRequest | None = None) -> dict[str, Any]:
    wo = await run_in_threadpool(app.remediation.reject, work_order_id, body.reason if body else "rejected")
    return views.work_order(wo)


@router.post("/work-orders/claim", responses={204: {"description": "No work within wait_seconds"}})
async def claim_work_order(app: AppDep, body: ClaimRequest) -> Response:
    """Lease the oldest queued work order to an agent; long-polls up to `wait_seconds` for one to appear."""
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()

    def on_event(event: EventRecord) -> None:
        if event.type in ("coding_agent.work_order_created", "coding_agent.work_order_updated"):
            loop.call_soon_threadsafe(arrived.set)

    unsubscribe = app.bus.subscribe(on_event)
    try:
        deadline = loop.time() + body.wait_seconds
        while True:
            arrived.clear()
            wo = await run_in_threadpool(app.remediation.claim_work_order, body.agent_id, body.repository)
            remaining = deadline - loop.time()
            if wo is not None or remaining <= 0:
                break
            try:
                await asyncio.wait_for(arrived.wait(), min(0.5, remaining))
            except TimeoutError:
                pass
    finally:
        unsubscribe()
    if wo is None:
        return Response(status_code=204)
    lease = app.settings.agent_lease_seconds
    return JSONResponse(
        {
            "work_order": views.work_order(wo),
            "lease_id": wo.lease_id,
            "lease_expires_at": views.iso(wo.lease_expires_at),
            "heartbeat_interval_seconds": max(1.0, round(lease / 3, 1)),
        }
    )


@router.post("/work-orders/{work_order_id}/heartbeat")
async def heartbeat(app: AppDep, work_order_id: str, body: HeartbeatRequest) -> dict[str, Any]:
    wo = await run_in_threadpool(app.remediation.heartbeat, work_order_id, body.lease_id, body.note)
    cancel = wo.cancel_requested or wo.status is WorkOrderStatus.CANCELLED
    return {"lease_expires_at": views.iso(wo.lease_expires_at), "cancel_requested": cancel}


@router.post("/work-orders/{work_order_id}/fail")
async def fail_work_order(app: AppDep, work_order_id: str, body: FailRequest) -> dict[str, Any]:
    wo = await run_in_threadpool(
        lambda: app.remediation.fail_work_order(
            work_order_id, lease_id=body.lease_id, reason=body.reason, retryable=body.retryable, details=body.details
        )
    )
    return views.work_order(wo)


@router.get("/runs")
async def list_runs(app: AppDep, status: RunStatusQ = None, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    def query() -> dict[str, Any]:
        items, total = app.store.list_runs(status=status.value if status else None, limit=limit, offset=offset)
        return {"runs": [views.run(r) for r in items], "count": len(items), "total": total}

    return await run_in_threadpool(query)


def run_detail(app: App, run_id: str) -> dict[str, Any]:
    r = app.store.get_run(run_id)
    steps = app.store.run_steps(run_id)
    events = app.store.run_events(run_id)
    body = views.run(r)
    body["steps"] = [views.step(s) for s in steps]
    body["timeline"] = views.timeline(r, steps, events)
    body["context"] = r.context
    body["trust"] = {
        "component": r.component,
        "score": app.store.trust_score(r.component) if r.component else None,
        "changes": [views.trust_change(c) for c in app.store.trust_history(run_id=run_id)],
    }
    body["work_order"] = (
        views.work_order(app.store.get_work_order(r.coding_work_order_id)) if r.coding_work_order_id else None
    )
    return body


@router.get("/runs/{run_id}")
async def get_run(app: AppDep, run_id: str) -> dict[str, Any]:
    return await run_in_threadpool(run_detail, app, run_id)


@router.post("/runs/{run_id}/cancel")
async def cancel_run(app: AppDep, run_id: str, body: CancelRequest | None = None) -> dict[str, Any]:
    reason = body.reason if body else "cancelled by an operator"
    r = await run_in_threadpool(app.remediation.cancel_run, run_id, reason)
    return views.run(r)


async def wait_settled(app: App, run_id: str, timeout: float) -> RunStatus:
    """Until the run escalates or finishes, or `timeout` passes. Woken by the bus; the periodic check covers
    workers in other processes, whose events this process does not see."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_event(event: EventRecord) -> None:
        if event.run_id == run_id:
            loop.call_soon_threadsafe(changed.set)

    unsubscribe = app.bus.subscribe(on_event)
    try:
        deadline = loop.time() + timeout
        while True:
            changed.clear()
            status = await run_in_threadpool(app.store.run_status, run_id)
            remaining = deadline - loop.time()
            if status in RUN_SETTLED or remaining <= 0:
                return status
            try:
                await asyncio.wait_for(changed.wait(), min(0.5, remaining))
            except TimeoutError:
                pass
    finally:
        unsubscribe()


@router.post("/trigger")
async def trigger(app: AppDep, body: TriggerRequest) -> dict[str, Any]:
    r, created = await run_in_threadpool(
        lambda: app.remediation.trigger(
            error_type=body.error_type,
            description=body.description,
            file_path=body.file_path,
            component=body.component,
            context=body.context,
            playbook_id=body.playbook_id,
            dedupe_key=body.dedupe_key,
        )
    )
    wait = app.settings.trigger_wait_seconds if body.wait_seconds is None else body.wait_seconds
    await wait_settled(app, r.id, wait)
    r = await run_in_threadpool(app.store.get_run, r.id)
    return {
        "success": True,
        "message": f"Playbook '{r.playbook_id}' triggered" if created else f"Run {r.id} already exists for this key",
        "run_id": r.id,
        "playbook_id": r.playbook_id,
        "status": r.status.value,
        "escalated_to_coding": r.escalated,
        "work_order_id": r.coding_work_order_id,
        "created": created,
    }


@router.get("/stats")
async def stats(app: AppDep) -> dict[str, Any]:
    def query() -> dict[str, Any]:
        runs = app.store.run_stats()
        patch_seconds = runs["average_patch_seconds"]
        return {
            "total_playbook_runs": runs["total"],
            "work_orders": app.store.work_order_stats(),
            "escalation_rate": round(runs["escalated"] / runs["total"], 4) if runs["total"] else 0.0,
            "auto_fix_rate": round(runs["auto_fixed"] / runs["finished"], 4) if runs["finished"] else 0.0,
            "average_patch_time_minutes": round(patch_seconds / 60, 2) if patch_seconds is not None else None,
            "runs_by_status": runs["by_status"],
            "definitions": {
                "escalation_rate": "escalated runs / all runs",
                "auto_fix_rate": "runs completed without escalation / finished runs",
                "average_patch_time_minutes": "mean of (completed_at - created_at) over completed work orders",
            },
        }

    return await run_in_threadpool(query)


@router.get("/diffs/{work_order_id}.diff", response_class=PlainTextResponse)
async def get_diff(app: AppDep, work_order_id: str) -> PlainTextResponse:
    text = await run_in_threadpool(app.store.get_diff, work_order_id)
    return PlainTextResponse(text, media_type="text/x-diff")
