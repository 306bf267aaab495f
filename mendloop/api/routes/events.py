"""/events: recent events, and the live stream."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Connection
from sse_starlette import ServerSentEvent
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from mendloop.api import auth, errors, views
from mendloop.api.access import credential_of, still_admitted
from mendloop.api.coalesce import shared_read
from mendloop.api.deps import AppDep, Cursor, Offset, route_path
from mendloop.api.responses import (
    AlertOutcome,
    AlertsPublished,
    EventList,
    EventOutcome,
    PublishedBatch,
    PublishedEvent,
)
from mendloop.api.schemas import ERROR_RESPONSES, JSON_ERROR_RESPONSES, EventIn
from mendloop.api.streams import HeldStream, StreamSlots
from mendloop.app import App
from mendloop.domain import roles
from mendloop.domain.event_cursor import event_filter, parse_cursor, resume
from mendloop.domain.records import Detection, DetectionOutcome
from mendloop.errors import AuthError, Conflict, InputError
from mendloop.intake.service import aggregate, records_of
from mendloop.storage import schema as t
from mendloop.storage.event_feed import EventFeed
from mendloop.storage.pages import EVENTS_PAGE, cursor_of

router = APIRouter(prefix="/events", tags=["events"], responses=ERROR_RESPONSES)


@router.get("/recent", response_model=EventList)
async def recent(
    app: AppDep,
    request: Request,
    event_type: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    since: Annotated[float | None, Query(description="Only events at or after this Unix time", ge=0)] = None,
    offset: Offset = 0,
    cursor: Cursor = None,
) -> Response:
    """Newest first. Page by `cursor` (each answer's `next_cursor`); `offset` skips items after it."""
    after = cursor_of(EVENTS_PAGE, cursor)

    def query() -> EventList:
        events, next_cursor = app.store.events.recent_page(
            event_type=event_type, limit=limit, since=since, after=after, offset=offset
        )
        return EventList(events=[views.event(e) for e in events], count=len(events), next_cursor=next_cursor)

    return await shared_read(request, query)


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


def _check_intake_auth(app: App, request: Request, raw: bytes) -> auth.Signature | None:
    """None when the caller needs no credentials or showed a token that may post events (the access middleware
    resolved it); the verified signature of a signed webhook. Raises AuthError naming the header (or the part of
    it) that is missing or wrong."""
    credential = credential_of(request)
    if credential is not None and roles.allows(credential.role, roles.Action.INTAKE):
        return None
    s = app.settings
    if app.keyring.is_open() and not (s.intake_tokens or s.forwarder_tokens or s.webhook_hmac_secret):
        return None
    authorization = request.headers.get("authorization")
    signature = request.headers.get(auth.SIGNATURE_HEADER)
    if signature is not None or (s.webhook_hmac_secret and not authorization):
        return auth.verify_signature(
            signature, s.webhook_hmac_secret, raw, now=app.clock(), tolerance=s.webhook_tolerance_seconds
        )
    raise AuthError(
        f"a valid intake token (Authorization: Bearer) or a signed request ({auth.SIGNATURE_HEADER}) is required",
        field="Authorization",
    )


# -- replayed webhooks ---------------------------------------------------------------------------------------------
#
# A signed request's signature is claimed (an `idempotency` row) inside the transaction that stores its events
# (`Intake.ingest(also=...)`): a replay, or a concurrent copy, cannot claim it again, its transaction rolls back
# with nothing stored, and it gets the first request's answer. The answer itself is written just after that
# commit (the `also` hook does not see the outcomes); in the moment between, a copy waits for it (`_WAIT`) and
# then gets 409 "retry". Rows are pruned once no timestamp they could match is within the tolerance.

_SIGNED_SCOPE = "webhook:signature"
_WAIT = 2.0
_PRUNE_EVERY = 60.0
_pruned_at: dict[str, float] = {}  # by database URL: when this process last pruned expired claims (monotonic)


class _Replayed(Exception):
    """The signature was claimed first by another request: raised in the ingest transaction to roll it back."""


@dataclasses.dataclass(slots=True)
class _Guard:
    app: App
    signature: auth.Signature
    path: str
    kind: str = ""
    claimed: bool = False

    def _where(self) -> sa.ColumnElement[bool]:
        c = t.idempotency.c
        return sa.and_(c.scope == _SIGNED_SCOPE, c.key == self.signature.digest)

    def stored(self) -> dict[str, Any] | None:
        """The answer kept for this signature; None when it was never accepted. Waits (briefly) for an answer
        that another request is writing."""
        deadline = time.monotonic() + _WAIT
        while True:
            with self.app.store.db.read() as conn:
                kept = conn.execute(sa.select(t.idempotency.c.response).where(self._where())).scalar()
            if kept is None:
                return None
            if kept.get("path") not in (None, self.path):
                raise AuthError(
                    f"{auth.SIGNATURE_HEADER}: this signature was already used for {kept['path']}",
                    field=auth.SIGNATURE_HEADER,
                )
            if "answer" in kept:
                return dict(kept)
            if time.monotonic() >= deadline:
                raise Conflict(
                    f"{auth.SIGNATURE_HEADER}: this signed request was accepted and its answer is being recorded; "
                    "retry it",
                    field=auth.SIGNATURE_HEADER,
                )
            time.sleep(0.02)

    def claim(self, conn: Connection) -> None:
        """In the transaction storing the events: claim the signature, or roll everything back (`_Replayed`)."""
        db = self.app.store.db
        now = self.app.clock()
        row = {
            "scope": _SIGNED_SCOPE,
            "key": self.signature.digest,
            "response": {"path": self.path, "kind": self.kind, "timestamp": self.signature.timestamp},
            "created_at": now,
        }
        won = conn.execute(
            db.insert(t.idempotency).values(**row).on_conflict_do_nothing().returning(t.idempotency.c.key)
        ).first()
        if won is None:
            raise _Replayed
        self.claimed = True
        if time.monotonic() - _pruned_at.get(db.url, -_PRUNE_EVERY) >= _PRUNE_EVERY:
            _pruned_at[db.url] = time.monotonic()
            # A claim made at `created_at` matched a timestamp at most one tolerance away, which is accepted for at
            # most one more tolerance: after that no request can match it.
            horizon = now - 2 * self.app.settings.webhook_tolerance_seconds - _PRUNE_EVERY
            conn.execute(
                sa.delete(t.idempotency).where(
                    t.idempotency.c.scope == _SIGNED_SCOPE, t.idempotency.c.created_at < horizon
                )
            )

    def keep(self, answer: BaseModel) -> None:
        """After the commit: the answer a replay of this signature gets."""
        if not self.claimed:
            return  # nothing was stored (no detections), so a replay stores nothing either
        response = {
            "path": self.path,
            "kind": self.kind,
            "timestamp": self.signature.timestamp,
            "answer": answer.model_dump(mode="json"),
        }
        with self.app.store.db.write() as tx:
            tx.conn.execute(sa.update(t.idempotency).where(self._where()).values(response=response))


def _guard(app: App, request: Request, raw: bytes) -> _Guard | None:
    signature = _check_intake_auth(app, request, raw)
    return None if signature is None else _Guard(app, signature, route_path(request.scope))


async def _kept(guard: _Guard | None, response: Response) -> dict[str, Any] | None:
    """What this signature was answered before (`kind`, `answer`), marked on `response` as replayed; None: new."""
    if guard is None:
        return None
    kept = await run_in_threadpool(guard.stored)
    if kept is not None:
        response.headers["Idempotent-Replayed"] = "true"
    return kept


async def _ingest(app: App, guard: _Guard | None, detections: list[Detection]) -> list[DetectionOutcome] | None:
    """Record the detections (with the signature's claim in the same transaction); None: a replay, nothing stored."""
    also: Callable[[Connection], None] | None = guard.claim if guard is not None else None
    try:
        return await run_in_threadpool(functools.partial(app.intake.ingest, detections, also=also))
    except _Replayed:
        return None


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
async def publish(app: AppDep, request: Request, response: Response) -> PublishedEvent | PublishedBatch:
    """Publish events: one `{event_type, payload, event_id?}`, a batch `{"events": [...]}`, or the JSON array
    (or NDJSON) of log records that Fluent Bit's and Vector's HTTP outputs send, matched against the configured
    patterns. An `event_id` makes a retried event a no-op. Detected errors open or count on incidents and start
    runs as storm control allows. A signed request (`X-Mendloop-Signature`) seen before gets its first answer
    again and stores nothing."""
    raw = await request.body()
    guard = _guard(app, request, raw)
    kept = await _kept(guard, response)
    if kept is not None:
        return _published(kept)
    body = _parse(raw, request.headers.get("content-type", ""))
    intake = app.intake
    detections: list[Detection] = []
    single = False
    # A caller's own fingerprint is used only from a forwarder (or when the operator trusts every caller); else
    # the server computes it, and the answer says it ignored one.
    own_fingerprints = auth.fingerprint_trusted(
        request.headers.get("authorization"),
        app.settings.forwarder_tokens,
        trust_everyone=app.settings.trust_caller_fingerprint,
    )
    ignored = 0
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
        ignored += e.fingerprint is not None and not own_fingerprints
        d = intake.from_event(
            event_type=e.event_type,
            payload=e.payload,
            source=e.source,
            message=e.message,
            component=e.component,
            event_id=e.event_id,
            fingerprint_hint=e.fingerprint if own_fingerprints else None,
        )
        # An aggregated event (a forwarder's) counts every line it stands for.
        detections.append(dataclasses.replace(d, count=e.count) if e.count != 1 else d)
    if guard is not None:
        # A signed request is recorded with its signature's claim, in its own transaction (not group commit).
        guard.kind = "event" if single else "batch"
        recorded = await _ingest(app, guard, detections if events else aggregate(detections))
        if recorded is None:
            kept = await _kept(guard, response)
            if kept is None:  # pragma: no cover - a claim is never removed within the tolerance
                raise Conflict("this signed request was already accepted; retry it", field=auth.SIGNATURE_HEADER)
            return _published(kept)
        outcomes = recorded
    elif single:
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
    answer: PublishedEvent | PublishedBatch
    if single:
        d = detections[0]
        one = answers[0]
        routed = app.routing.for_detection(d.error_type, d.event_type) if one.run_id else None
        answer = PublishedEvent(
            accepted=True,
            event_id=one.event_id,
            incident_id=one.incident_id,
            run_id=one.run_id,
            verdict=one.verdict,
            duplicate=one.duplicate,
            playbook_id=routed.id if routed is not None else None,
            fingerprint_ignored=bool(ignored),
        )
    else:
        answer = PublishedBatch(
            accepted=sum(1 for a in answers if not a.duplicate),
            duplicates=sum(1 for a in answers if a.duplicate),
            events=answers,
            fingerprints_ignored=ignored,
        )
    if guard is not None:
        await run_in_threadpool(guard.keep, answer)
    return answer


def _published(kept: dict[str, Any]) -> PublishedEvent | PublishedBatch:
    if kept.get("kind") == "event":
        return PublishedEvent.model_validate(kept["answer"])
    return PublishedBatch.model_validate(kept["answer"])


@router.post("/alertmanager", status_code=202)
async def alertmanager(app: AppDep, request: Request, response: Response) -> AlertsPublished:
    """Prometheus Alertmanager webhook (v4): each alert is its own event; `resolved` closes its incident. A signed
    request (`X-Mendloop-Signature`) seen before gets its first answer again and stores nothing."""
    raw = await request.body()
    guard = _guard(app, request, raw)
    kept = await _kept(guard, response)
    if kept is not None:
        return AlertsPublished.model_validate(kept["answer"])
    body = _parse(raw, "application/json")
    if not isinstance(body, dict) or not isinstance(body.get("alerts"), list):
        raise InputError("alerts: an Alertmanager webhook body has a list of alerts", field="alerts")
    detections = app.intake.from_alertmanager(body)
    if guard is not None:
        guard.kind = "alerts"
    recorded = await _ingest(app, guard, detections)
    if recorded is None:
        kept = await _kept(guard, response)
        if kept is None:  # pragma: no cover - a claim is never removed within the tolerance
            raise Conflict("this signed request was already accepted; retry it", field=auth.SIGNATURE_HEADER)
        return AlertsPublished.model_validate(kept["answer"])
    answer = AlertsPublished(
        accepted=len(recorded),
        events=[
            AlertOutcome(event_id=o.event_id, incident_id=o.incident_id, run_id=o.run_id, verdict=o.verdict)
            for o in recorded
        ],
    )
    if guard is not None:
        await run_in_threadpool(guard.keep, answer)
    return answer


_STREAM: dict[int | str, dict[str, Any]] = {
    **JSON_ERROR_RESPONSES,
    200: {"description": "Server-sent events", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    429: {"description": "Too many open streams (limits.max_sse_streams, limits.max_sse_streams_per_client)"},
}


@router.get("/stream", response_class=EventSourceResponse, responses=_STREAM)
async def stream(
    request: Request,
    app: AppDep,
    event_type: Annotated[
        list[str] | None,
        Query(
            alias="type",
            description="Event types (repeat it, or a comma list); `prefix.*` matches a family, e.g. `coding_agent.*`",
        ),
    ] = None,
    component: Annotated[list[str] | None, Query(description="Components (repeat it, or a comma list)")] = None,
    after: Annotated[
        str | None,
        Query(description="Replay the events after this id (as Last-Event-ID, which wins when both are sent)"),
    ] = None,
) -> Response:
    """Server-sent events out of the durable events table: with `Last-Event-ID` (or `?after=`) every event after
    that id, then every new one as it is committed, each exactly once (ids are in order; an event's `id:` is the
    cursor to resume from). Without either, from now on. A cursor older than the oldest event kept gets an
    `event: reset` with the oldest id first. A `: keepalive` comment every `limits.sse_keepalive_seconds`. At most
    `limits.max_sse_streams` open streams, `limits.max_sse_streams_per_client` per client: over one, a 429."""
    types = event_type or []
    components = component or []
    event_filter(types, components)  # a bad filter is a 422 before the stream opens
    last_id = request.headers.get("last-event-id")
    start = parse_cursor(last_id, "Last-Event-ID") if last_id and last_id.strip() else parse_cursor(after, "after")
    slots: StreamSlots = request.app.state.streams
    client = slots.client_of(request)
    refused = slots.acquire(client)
    if refused is not None:
        body = errors.limit_body(field="stream", message=refused.message, limit=refused.setting, value=refused.value)
        return JSONResponse(body, status_code=429, headers={"Retry-After": "5"})
    feed = event_feed(request)
    loop = asyncio.get_running_loop()
    # The bus only wakes the stream; what it sends is read from the table through the cursor, so a reconnect
    # neither misses nor repeats an event, and events committed by other processes arrive too (by the poll).
    wake = asyncio.Event()

    def on_event(_event: Any) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    async def gen() -> AsyncIterator[dict[str, str]]:
        # Subscribed here, not before: a generator that never starts (the client left at once) runs no `finally`.
        unsubscribe = app.bus.subscribe(on_event)
        try:
            if start is None:
                cursor = await run_in_threadpool(feed.head)
            else:
                where = resume(start, await run_in_threadpool(feed.oldest))
                cursor = where.after
                if where.reset:
                    # Its id is the new cursor: a client that reconnects after it is not reset again.
                    data = {"requested": start, "oldest_id": cursor + 1, "message": "events were pruned"}
                    yield {"event": "reset", "id": str(cursor), "data": json.dumps(data)}
            checked = time.monotonic()
            while not await request.is_disconnected():
                wake.clear()
                if time.monotonic() - checked >= _RECHECK_SECONDS:
                    # A revoked token or an ended dashboard session ends its open streams too.
                    checked = time.monotonic()
                    if not await run_in_threadpool(still_admitted, app, request):
                        break
                events, cursor = await run_in_threadpool(
                    functools.partial(feed.read_after, cursor, limit=_PAGE, types=types, components=components)
                )
                for e in events:
                    yield {"event": e.type, "id": str(e.id), "data": json.dumps(views.event(e).model_dump())}
                if len(events) >= _PAGE:
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), _POLL_SECONDS)
                except TimeoutError:
                    pass
        finally:
            unsubscribe()

    return HeldStream(
        gen(),
        release=lambda: slots.release(client),
        ping=app.settings.limits.sse_keepalive_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive"),
    )


# A stream reads at most this many events at a time, and looks at the table at least this often: events written by
# another process (a `mendloop worker`) reach no bus here, and a horizon held back by a writer moves on by itself.
_PAGE = 500
_POLL_SECONDS = 1.0
# How often a stream checks that its caller's token (and dashboard session) still stands.
_RECHECK_SECONDS = 1.0


def event_feed(request: Request) -> EventFeed:
    """The process's one feed (its horizon is shared by every stream), made on first use."""
    feed: EventFeed | None = getattr(request.app.state, "event_feed", None)
    if feed is None:
        feed = EventFeed(request.app.state.mendloop.store.db)
        request.app.state.event_feed = feed
    return feed
