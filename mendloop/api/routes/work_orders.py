"""/patches/work-orders: coding agent work orders, the pull API (claim, heartbeat, complete, fail), the operator's
approve/merged/reject, and /patches/diffs: a work order's stored diff."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.access import credential_of
from mendloop.api.coalesce import shared_read
from mendloop.api.deps import AppDep, Cursor, Limit, Offset
from mendloop.api.responses import ClaimOut, CompleteOut, HeartbeatOut, WorkOrderList, WorkOrderOut
from mendloop.api.schemas import (
    ERROR_RESPONSES,
    JSON_ERROR_RESPONSES,
    ClaimRequest,
    CompleteRequest,
    FailRequest,
    HeartbeatRequest,
    RejectRequest,
)
from mendloop.domain.records import EventRecord
from mendloop.domain.roles import Action
from mendloop.domain.states import WorkOrderStatus
from mendloop.domain.stats import work_order_counts
from mendloop.errors import Forbidden
from mendloop.storage.pages import WORK_ORDERS_PAGE, cursor_of

router = APIRouter(prefix="/patches", tags=["work orders"], responses=ERROR_RESPONSES)


class DiffResponse(PlainTextResponse):
    media_type = "text/x-diff"


WorkOrderStatusQ = Annotated[WorkOrderStatus | None, Query(description="Only work orders in this status")]
_WAKE_ON = ("coding_agent.work_order_created", "coding_agent.work_order_updated")


@router.get("/work-orders", response_model=WorkOrderList)
async def list_work_orders(
    app: AppDep,
    request: Request,
    status: WorkOrderStatusQ = None,
    self_healing_run_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 20,
    offset: Offset = 0,
    cursor: Cursor = None,
) -> Response:
    """Newest first. Page by `cursor` (each answer's `next_cursor`); `offset` skips items after it. An agent token
    naming repositories sees only the work orders of those repositories."""
    after = cursor_of(WORK_ORDERS_PAGE, cursor)
    credential = credential_of(request)
    scope = credential.claim_scope() if credential is not None else None

    def query() -> WorkOrderList:
        with app.store.db.read():  # one connection and one transaction for the page, its total, stats and pauses
            items, total, next_cursor = app.store.work_orders.page(
                status=status.value if status else None,
                run_id=self_healing_run_id,
                after=after,
                limit=limit,
                offset=offset,
                repositories=scope,
            )
            pauses = app.store.pauses.current()
            return WorkOrderList(
                work_orders=[views.work_order(w, pauses) for w in items],
                count=len(items),
                total=total.n,
                total_is_lower_bound=total.lower_bound,
                # A scoped agent sees no other repository's work orders, counted or listed.
                stats=app.store.work_order_stats()
                if scope is None
                else work_order_counts(app.store.work_orders.counts_in_scope(scope)),
                next_cursor=next_cursor,
            )

    return await shared_read(request, query)


@router.get("/work-orders/{work_order_id}", response_model=WorkOrderOut)
async def get_work_order(app: AppDep, request: Request, work_order_id: str) -> Response:
    def query() -> WorkOrderOut:
        with app.store.db.read():  # the work order and the pauses in one transaction
            return views.work_order(app.store.get_work_order(work_order_id), app.store.pauses.current())

    return await shared_read(request, query)


@router.post("/work-orders/{work_order_id}/complete")
async def complete_work_order(
    app: AppDep,
    work_order_id: str,
    body: CompleteRequest,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=300)] = None,
) -> CompleteOut:
    # What an agent posts is data from outside: its summary, its agent description and its diff's URL are
    # redacted before they are stored. The diff itself is not: masking would break the patch, and the safety
    # checks and tests judge it as sent (a diff that adds a secret is the operator's to reject at review).
    r = app.redactor
    extra: dict[str, Any] = {}
    if body.base_commit:
        extra["base_commit"] = body.base_commit
    if body.agent:
        extra["agent"] = r.value(body.agent.model_dump(exclude_none=True))
    if body.applied_commit:
        extra["applied_commit"] = body.applied_commit
    if body.approval_required:
        extra["approval_required"] = True
    answer = await run_in_threadpool(
        lambda: app.remediation.complete_work_order(
            work_order_id,
            tests_passed=body.tests_passed,
            files_changed=body.files_changed,
            diff_url=r.text(body.diff_url) if body.diff_url else body.diff_url,
            diff=body.diff,
            summary=r.text(body.summary) if body.summary else body.summary,
            extra=extra,
            idempotency_key=idempotency_key,
            lease_id=body.lease_id,
            approval_required=body.approval_required,
            branch=body.branch,
        )
    )
    return CompleteOut.model_validate(answer)


@router.post("/work-orders/{work_order_id}/approve")
async def approve_work_order(app: AppDep, work_order_id: str) -> CompleteOut:
    """Apply a verified patch held for approval (`--apply approval`); the run resumes."""
    return CompleteOut.model_validate(await run_in_threadpool(app.remediation.approve, work_order_id))


@router.post("/work-orders/{work_order_id}/merged")
async def merged_work_order(app: AppDep, work_order_id: str) -> CompleteOut:
    """Mark a review branch (`--apply branch`) merged; the run resumes to deploy and verify."""
    return CompleteOut.model_validate(await run_in_threadpool(app.remediation.merged, work_order_id))


@router.post("/work-orders/{work_order_id}/reject")
async def reject_work_order(app: AppDep, work_order_id: str, body: RejectRequest | None = None) -> WorkOrderOut:
    reason = app.redactor.text(body.reason) if body else "rejected"
    wo = await run_in_threadpool(app.remediation.reject, work_order_id, reason)
    return views.work_order(wo)


@router.post(
    "/work-orders/claim",
    response_model=ClaimOut,
    responses={204: {"description": "No work within wait_seconds"}},
)
async def claim_work_order(app: AppDep, request: Request, body: ClaimRequest) -> ClaimOut | Response:
    """Lease the oldest queued work order to an agent; long-polls up to `wait_seconds` for one to appear. An agent
    token naming repositories is handed only work orders of those repositories."""
    credential = credential_of(request)
    scope = credential.claim_scope() if credential is not None else None
    if credential is not None and body.repository is not None and not credential.works_for(body.repository):
        raise Forbidden(
            f"this agent token does not work for repository {body.repository}",
            field="Authorization",
            role=credential.role.value,
            action=Action.CLAIM.value,
            repository=body.repository,
        )
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()

    def on_event(event: EventRecord) -> None:
        if event.type in _WAKE_ON:
            loop.call_soon_threadsafe(arrived.set)

    unsubscribe = app.bus.subscribe(on_event)
    try:
        deadline = loop.time() + body.wait_seconds
        while True:
            arrived.clear()
            wo = await run_in_threadpool(app.remediation.claim_work_order, body.agent_id, body.repository, scope)
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
    return ClaimOut(
        work_order=views.work_order(wo),
        lease_id=wo.lease_id,
        lease_expires_at=views.iso(wo.lease_expires_at),
        heartbeat_interval_seconds=max(1.0, round(lease / 3, 1)),
    )


@router.post("/work-orders/{work_order_id}/heartbeat")
async def heartbeat(app: AppDep, work_order_id: str, body: HeartbeatRequest) -> HeartbeatOut:
    note = app.redactor.text(body.note) if body.note else body.note
    wo = await run_in_threadpool(app.remediation.heartbeat, work_order_id, body.lease_id, note)
    cancel = wo.cancel_requested or wo.status is WorkOrderStatus.CANCELLED
    return HeartbeatOut(lease_expires_at=views.iso(wo.lease_expires_at), cancel_requested=cancel)


@router.post("/work-orders/{work_order_id}/fail")
async def fail_work_order(app: AppDep, work_order_id: str, body: FailRequest) -> WorkOrderOut:
    wo = await run_in_threadpool(
        lambda: app.remediation.fail_work_order(
            work_order_id,
            lease_id=body.lease_id,
            reason=body.reason,
            retryable=body.retryable,
            details=app.redactor.value(body.details),  # an agent's output tail, its error: data from outside
        )
    )
    return views.work_order(wo)


@router.get(
    "/diffs/{work_order_id}.diff",
    response_class=DiffResponse,
    responses={
        **JSON_ERROR_RESPONSES,
        200: {"description": "The work order's diff", "content": {"text/x-diff": {"schema": {"type": "string"}}}},
    },
)
async def get_diff(app: AppDep, work_order_id: str) -> DiffResponse:
    text = await run_in_threadpool(app.store.get_diff, work_order_id)
    return DiffResponse(text)
