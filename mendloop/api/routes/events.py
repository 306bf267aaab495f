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
from mendloop.api.schemas import ERROR_RESPONSES

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
