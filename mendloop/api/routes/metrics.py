"""/metrics: Prometheus' text exposition format (see api/metrics.py for what is exposed and where it comes from).

Behind the same bearer tokens as every other read (Prometheus sends one with `authorization: {credentials: ...}`
in its scrape config)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.concurrency import run_in_threadpool

from mendloop.api.schemas import JSON_ERROR_RESPONSES

router = APIRouter(tags=["metrics"])


class MetricsResponse(Response):
    # The format generate_latest() writes, which every Prometheus reads.
    media_type = CONTENT_TYPE_PLAIN_0_0_4


@router.get(
    "/metrics",
    response_class=MetricsResponse,
    responses={
        **JSON_ERROR_RESPONSES,
        200: {"description": "Prometheus text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}},
    },
)
async def metrics(request: Request) -> MetricsResponse:
    registry: CollectorRegistry = request.app.state.metrics
    # The database is read in a thread: a scrape never holds the event loop.
    return MetricsResponse(await run_in_threadpool(generate_latest, registry))
