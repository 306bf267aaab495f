"""/events: recent events, and the live stream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from mendloop.api import auth, views
from mendloop.api.deps import AppDep
from mendloop.api.responses import (
    AlertOutcome,
    AlertsPublished,
    EventList,
    EventOutcome,
    PublishedBatch,
    PublishedEvent,
)
from mendloop.api.schemas import ERROR_RESPONSES, JSON_ERROR_RESPONSES, EventIn
from mendloop.app import App
from mendloop.domain.records import Detection
from mendloop.errors import AuthError, InputError
from mendloop.intake.service import aggregate, records_of

router = APIRouter(prefix="/events", tags=["events"], responses=ERROR_RESPONSES)


@router.get("/recent")
async def recent(
    app: AppDep,
    event_type: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    since: Annotated[float | None, Query(description="Only events at or after this Unix time", ge=0)] = None,
) -> EventList:
    events = await run_in_threadpool(lambda: app.store.recent_events(event_type=event_type, limit=limit, since=since))
    return EventList(events=[views.event(e) for e in events], count=len(events))


_EVENT_BODY = {
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/EventIn"},
                        {
                            "type": "object",
                            "properties": {
                                "events": {"type": "array", "items": {"$ref": "#/components/schemas/EventIn"}}
                            },
                            "required": ["events"],
                        },
                        {"type": "array", "items": {"type": "object"}},
                    ]
                }
            }
        },
        "required": True,
    }
}


def _check_intake_auth(app: App, request: Request, raw: bytes) -> None:
    s = app.settings
    if not (s.api_tokens or s.intake_tokens or s.webhook_hmac_secret):
        return
    if auth.token_accepted(request.headers.get("authorization"), (*s.api_tokens, *s.intake_tokens)):
        return
    if auth.signature_accepted(request.headers.get("x-mendloop-signature"), s.webhook_hmac_secret, raw):
        return
    raise AuthError("a valid intake token (Authorization: Bearer) or X-Mendloop-Signature is required")


def _parse(raw: bytes, content_type: str) -> Any:
    text = raw.decode("utf-8", errors="replace")
    if "ndjson" in content_type or ("\n" in text.strip() and not text.lstrip().startswith(("[", '{"events"'))):
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            pass
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"body: not valid JSON ({exc})", field="body") from exc


def _event_in(item: Any, where: str) -> EventIn:
    try:
        return EventIn.model_validate(item)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        field = f"{where}.{loc}" if where else loc
        raise InputError(f"{field}: {first['msg']}", field=field) from exc


@router.post("", status_code=202, openapi_extra=_EVENT_BODY)
async def publish(app: AppDep, request: Request) -> PublishedEvent | PublishedBatch:
    """Publish events: one `{event_type, payload, event_id?}`, a batch `{"events": [...]}`, or the JSON array
    (or NDJSON) of log records that Fluent Bit's and Vector's HTTP outputs send, matched against the configured
    patterns. An `event_id` makes a retried event a no-op. Detected errors open or count on incidents and start
    runs as storm control allows."""
    raw = await request.body()
    _check_intake_auth(app, request, raw)
    body = _parse(raw, request.headers.get("content-type", ""))
    intake = app.intake
    detections: list[Detection] = []
    single = False
    if isinstance(body, dict) and "events" in body:
        items = body["events"]
        if not isinstance(items, list):
            raise InputError("events: must be a list", field="events")
        if len(items) > 10_000:
            raise InputError("events: at most 10000 per batch", field="events")
        events = [_event_in(item, f"events.{i}") for i, item in enumerate(items)]
    elif isinstance(body, dict):
        events = [_event_in(body, "")]
        single = True
    elif isinstance(body, list):
        if body and all(isinstance(x, dict) and "event_type" in x for x in body):
            events = [_event_in(item, f"{i}") for i, item in enumerate(body)]
        else:
            events = []
            detections = await run_in_threadpool(app.log_intake.detect_records, records_of(body), "http")
    else:
        raise InputError("body: expected an event object, {events: [...]}, or an array of records", field="body")
    for e in events:
        d = intake.from_event(
            event_type=e.event_type,
            payload=e.payload,
            source=e.source,
            message=e.message,
            component=e.component,
            event_id=e.event_id,
            fingerprint_hint=e.fingerprint,
        )
        # An aggregated event (a forwarder's) counts every line it stands for.
        detections.append(dataclasses.replace(d, count=e.count) if e.count != 1 else d)
    if single:
        # Group commit: committed (durable) before the 2xx, in one transaction shared with concurrent requests.
        outcomes = [await app.batcher.submit(detections[0])]
    else:
        outcomes = await run_in_threadpool(intake.ingest, detections if events else aggregate(detections))
    answers = [
        EventOutcome(
            event_id=o.event_id, incident_id=o.incident_id, run_id=o.run_id, verdict=o.verdict, duplicate=o.duplicate
        )
        for o in outcomes
    ]
    if single:
        d = detections[0]
        one = answers[0]
        routed = app.routing.for_detection(d.error_type, d.event_type) if one.run_id else None
        return PublishedEvent(
            accepted=True,
            event_id=one.event_id,
            incident_id=one.incident_id,
            run_id=one.run_id,
            verdict=one.verdict,
            duplicate=one.duplicate,
            playbook_id=routed.id if routed is not None else None,
        )
    return PublishedBatch(
        accepted=sum(1 for a in answers if not a.duplicate),
        duplicates=sum(1 for a in answers if a.duplicate),
        events=answers,
    )


@router.post("/alertmanager", status_code=202)
async def alertmanager(app: AppDep, request: Request) -> AlertsPublished:
    """Prometheus Alertmanager webhook (v4): each alert is its own event; `resolved` closes its incident."""
    raw = await request.body()
    _check_intake_auth(app, request, raw)
    body = _parse(raw, "application/json")
    if not isinstance(body, dict) or not isinstance(body.get("alerts"), list):
        raise InputError("alerts: an Alertmanager webhook body has a list of alerts", field="alerts")
    detections = app.intake.from_alertmanager(body)
    outcomes = await run_in_threadpool(app.intake.ingest, detections)
    return AlertsPublished(
        accepted=len(outcomes),
        events=[
            AlertOutcome(event_id=o.event_id, incident_id=o.incident_id, run_id=o.run_id, verdict=o.verdict)
            for o in outcomes
        ],
    )


_STREAM: dict[int | str, dict[str, Any]] = {
    **JSON_ERROR_RESPONSES,
    200: {"description": "Server-sent events", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
}


@router.get("/stream", response_class=EventSourceResponse, responses=_STREAM)
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
                yield {"event": event.type, "id": str(event.id), "data": json.dumps(views.event(event).model_dump())}
        finally:
            unsubscribe()

    return EventSourceResponse(gen(), ping=15)
