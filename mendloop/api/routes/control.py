"""/pause, /resume, /pauses: an operator stops new runs of a component, or of all, and lets them go again."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.access import actor_of
from mendloop.api.deps import AppDep
from mendloop.api.responses import PauseList, PauseOut
from mendloop.api.schemas import ERROR_RESPONSES, PauseRequest, ResumeRequest

router = APIRouter(tags=["control"], responses=ERROR_RESPONSES)


@router.post("/pause")
async def pause(app: AppDep, request: Request, body: PauseRequest) -> PauseOut:
    """Pause a component (or all, without one): detections still open incidents and queue runs, but no queued
    run starts until it is resumed. Pausing again changes the reason."""
    reason = app.redactor.text(body.reason)
    return views.pause(await run_in_threadpool(app.remediation.pause, body.component, reason, actor_of(request)))


@router.post("/resume")
async def resume(app: AppDep, request: Request, body: ResumeRequest | None = None) -> PauseList:
    """Lift a component's pause, or every pause without one; answers what was lifted."""
    lifted = await run_in_threadpool(app.remediation.resume, body.component if body else None, actor_of(request))
    return PauseList(pauses=[views.pause(p) for p in lifted], count=len(lifted))


@router.get("/pauses")
async def list_pauses(app: AppDep) -> PauseList:
    found = await run_in_threadpool(app.store.pauses.current)
    items = [views.pause(p) for _, p in sorted(found.items())]
    return PauseList(pauses=items, count=len(items))
