"""/incidents: repeats of one error grouped, with their counts and runs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.deps import AppDep
from mendloop.api.responses import IncidentDetail, IncidentList
from mendloop.api.schemas import ERROR_RESPONSES
from mendloop.app import App

router = APIRouter(prefix="/incidents", tags=["incidents"], responses=ERROR_RESPONSES)


@router.get("")
async def list_incidents(
    app: AppDep,
    status: Annotated[Literal["open", "resolved"] | None, Query()] = None,
    fingerprint: Annotated[str | None, Query(max_length=64)] = None,
    error_type: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> IncidentList:
    def query() -> IncidentList:
        items, total = app.incidents.find(
            status=status, fingerprint=fingerprint, error_type=error_type, limit=limit, offset=offset
        )
        pauses = app.store.pauses.current()
        return IncidentList(incidents=[views.incident(i, pauses) for i in items], count=len(items), total=total)

    return await run_in_threadpool(query)


def _detail(app: App, incident_id: str) -> IncidentDetail:
    return views.incident_detail(
        app.incidents.get(incident_id), app.incidents.runs_of(incident_id), app.store.pauses.current()
    )


@router.get("/{incident_id}")
async def get_incident(app: AppDep, incident_id: str) -> IncidentDetail:
    return await run_in_threadpool(_detail, app, incident_id)


@router.post("/{incident_id}/resolve")
async def resolve_incident(app: AppDep, incident_id: str) -> IncidentDetail:
    await run_in_threadpool(app.incidents.resolve, incident_id)
    return await run_in_threadpool(_detail, app, incident_id)
