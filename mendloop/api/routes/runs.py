"""/patches/runs and /patches/trigger: playbook runs, a run's detail (steps, timeline, trust, work order), cancel,
and starting a run for an error type."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.access import actor_of
from mendloop.api.coalesce import shared_batch, shared_read
from mendloop.api.deps import AppDep, Cursor, Limit, Offset
from mendloop.api.responses import RunDetail, RunList, RunOut, TriggerOut
from mendloop.api.schemas import ERROR_RESPONSES, CancelRequest, DecisionRequest, RetryRequest, TriggerRequest
from mendloop.app import App
from mendloop.domain.records import EventRecord, Run
from mendloop.domain.states import RUN_SETTLED, RunStatus
from mendloop.errors import NotFound
from mendloop.storage.pages import RUNS_PAGE, cursor_of

router = APIRouter(prefix="/patches", tags=["runs"], responses=ERROR_RESPONSES)

RunStatusQ = Annotated[RunStatus | None, Query(description="Only runs in this status")]


@router.get("/runs", response_model=RunList)
async def list_runs(
    app: AppDep,
    request: Request,
    status: RunStatusQ = None,
    playbook_id: Annotated[str | None, Query(max_length=200, description="Only runs of this playbook")] = None,
    component: Annotated[str | None, Query(max_length=200, description="Only runs of this component")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
    cursor: Cursor = None,
) -> Response:
    """Newest first. Page by `cursor` (each answer's `next_cursor`); `offset` skips items after it."""
    after = cursor_of(RUNS_PAGE, cursor)

    def query() -> RunList:
        with app.store.db.read():  # one connection and one transaction for the page, its total and the pauses
            items, total, next_cursor = app.store.runs.page(
                status=status.value if status else None,
                playbook_id=playbook_id,
                component=component,
                after=after,
                limit=limit,
                offset=offset,
            )
            pauses = app.store.pauses.current()
        return RunList(
            runs=[views.run(r, pauses) for r in items],
            count=len(items),
            total=total.n,
            total_is_lower_bound=total.lower_bound,
            next_cursor=next_cursor,
        )

    return await shared_read(request, query)


def run_details(app: App, run_ids: list[str]) -> dict[str, RunDetail]:
    """The details of the runs found among `run_ids`, from one read of all of them (storage/run_details.py)."""
    return {
        run_id: views.run_detail(
            p.run,
            p.steps,
            p.events,
            trust_score=p.trust_score,
            trust_changes=p.trust_changes,
            wo=p.work_order,
            pauses=p.pauses,
        )
        for run_id, p in app.store.run_details.many(run_ids).items()
    }


def run_detail(app: App, run_id: str) -> RunDetail:
    found = run_details(app, [run_id])
    if run_id not in found:
        raise NotFound("run", run_id)
    return found[run_id]


@router.get("/runs/{run_id}", response_model=RunDetail)
async def get_run(app: AppDep, request: Request, run_id: str) -> Response:
    """Details asked for together (twenty dashboards on twenty runs) are read together."""
    answer = await shared_batch(request, "run detail", run_id, lambda ids: run_details(app, ids))
    if answer is None:
        raise NotFound("run", run_id)
    return answer


@router.post("/runs/{run_id}/cancel")
async def cancel_run(app: AppDep, request: Request, run_id: str, body: CancelRequest | None = None) -> RunOut:
    reason = app.redactor.text(body.reason) if body else f"cancelled by {actor_of(request)}"
    r = await run_in_threadpool(app.remediation.cancel_run, run_id, reason)
    return views.run(r)


@router.post("/runs/{run_id}/approve")
async def approve_run(app: AppDep, request: Request, run_id: str, body: DecisionRequest | None = None) -> RunOut:
    """Approve what a run in `awaiting_approval` waits for (an approval step, a trust gate), or the patch its
    work order holds for approval; the run goes on."""
    comment = app.redactor.text(body.comment) if body and body.comment else None
    return views.run(await run_in_threadpool(app.remediation.approve_run, run_id, comment, actor_of(request)))


@router.post("/runs/{run_id}/reject")
async def reject_run(app: AppDep, request: Request, run_id: str, body: DecisionRequest | None = None) -> RunOut:
    """Reject it: the run needs a human."""
    comment = app.redactor.text(body.comment) if body and body.comment else None
    return views.run(await run_in_threadpool(app.remediation.reject_run, run_id, comment, actor_of(request)))


@router.post("/runs/{run_id}/retry")
async def retry_run(app: AppDep, run_id: str, body: RetryRequest) -> RunOut:
    """Start a failed (needs_human, cancelled) run again from `from_step`, as a new run with the outputs of the
    steps before it; the old run's timeline links to it (`run.retried`), the new run's context names the old one
    (`retry_of`)."""
    return views.run(await run_in_threadpool(app.remediation.retry_run, run_id, body.from_step))


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
async def trigger(app: AppDep, body: TriggerRequest) -> TriggerOut:
    """Start the playbook routed for an error type; answers once the run escalated or finished, or after
    `wait_seconds`. Secrets in the request are masked before anything is stored (the error type and the
    playbook id name routes, so they are kept as sent)."""

    def start() -> tuple[Run, bool]:
        # The intake boundary for triggers: the run's description and context, its trigger event and any work
        # order rendered from them hold only the redacted values. One scan covers the whole request.
        clean = app.redactor.value(
            {
                "description": body.description,
                "file_path": body.file_path,
                "component": body.component,
                "context": body.context,
                "dedupe_key": body.dedupe_key,
            }
        )
        return app.remediation.trigger(
            error_type=body.error_type,
            description=clean["description"],
            file_path=clean["file_path"],
            component=clean["component"],
            context=clean["context"],
            playbook_id=body.playbook_id,
            dedupe_key=clean["dedupe_key"],
        )

    r, created = await run_in_threadpool(start)
    wait = app.settings.trigger_wait_seconds if body.wait_seconds is None else body.wait_seconds
    await wait_settled(app, r.id, wait)
    r = await run_in_threadpool(app.store.get_run, r.id)
    return TriggerOut(
        success=True,
        message=f"Playbook '{r.playbook_id}' triggered" if created else f"Run {r.id} already exists for this key",
        run_id=r.id,
        playbook_id=r.playbook_id,
        status=r.status.value,
        escalated_to_coding=r.escalated,
        work_order_id=r.coding_work_order_id,
        created=created,
    )
