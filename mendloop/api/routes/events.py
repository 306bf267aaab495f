"""/events: recent events, and the live stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.deps import AppDep
from mendloop.api.schemas import ERROR_RESPONSES, EventIn

router = APIRouter(prefix="/events", tags=["events"], responses=ERROR_RESPONSES)


@router.get("/recent")
async def recent(
    app: AppDep,
    event_type: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    since: Annotated[float | None, Query(description="Only events at or after this Unix time", ge=0)] = None,
) -> dict[str, Any]:
    events = await run_in_threadpool(lambda: app.store.recent_events(event_type=event_type, limit=limit, since=since))
    return {"events": [views.event(e) for e in events], "count": len(events)}


@router.post("", status_code=202)
async def publish(app: AppDep, body: EventIn) -> dict[str, Any]:
    """Publish an event (e.g. `pipeline.timeout` from a watcher). An event that stands for a known error type
    starts the playbook routed for it."""
    event_id, run = await run_in_threadpool(
        lambda: app.remediation.ingest_event(
            event_type=body.event_type,
            source=body.source,
            payload=body.payload,
            message=body.message,
            component=body.component,
            dedupe_key=body.dedupe_key,
        )
    )
    return {
        "accepted": True,
        "event_id": event_id,
        "run_id": run.id if run else None,
        "playbook_id": run.playbook_id if run else None,
    }


@router.get("/stream")
async def stream(request: Request, app: AppDep) -> EventSourceResponse:
    """Server-sent events: every event as it is committed, newest state first for a reconnecting client."""
    loop = asyncio.get_running_loop()
    queue, unsubscribe = app.bus.async_queue(loop)

    async def gen() -> AsyncIterator[dict[str, str]]:
        try:
            while not await request.is_disconnected():
                try:
                    event = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    continue
                yield {"event": event.type, "id": str(event.id), "data": json.dumps(views.event(event))}
        finally:
            unsubscribe()

    return EventSourceResponse(gen(), ping=15)
