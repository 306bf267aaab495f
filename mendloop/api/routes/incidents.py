"""/incidents: repeats of one error grouped, with their counts and runs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.coalesce import shared_read
from mendloop.api.deps import AppDep, Cursor, Limit, Offset
from mendloop.api.responses import IncidentDetail, IncidentHistory, IncidentList
from mendloop.api.schemas import ERROR_RESPONSES
from mendloop.app import App
from mendloop.storage.pages import INCIDENTS_PAGE, cursor_of

router = APIRouter(prefix="/incidents", tags=["incidents"], responses=ERROR_RESPONSES)


@router.get("", response_model=IncidentList)
async def list_incidents(
    app: AppDep,
    request: Request,
    status: Annotated[Literal["open", "resolved"] | None, Query()] = None,
    fingerprint: Annotated[str | None, Query(max_length=64)] = None,
    error_type: Annotated[str | None, Query(max_length=200)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
    cursor: Cursor = None,
) -> Response:
    """Most recently seen first. Page by `cursor` (each answer's `next_cursor`); `offset` skips items after it."""
    after = cursor_of(INCIDENTS_PAGE, cursor)

    def query() -> IncidentList:
        with app.store.db.read():  # one connection and one transaction for the page, its total and the pauses
            items, total, next_cursor = app.incidents.page(
                status=status, fingerprint=fingerprint, error_type=error_type, after=after, limit=limit, offset=offset
            )
            pauses = app.store.pauses.current()
            return IncidentList(
                incidents=[views.incident(i, pauses) for i in items],
                count=len(items),
                total=total.n,
                total_is_lower_bound=total.lower_bound,
                next_cursor=next_cursor,
            )

    return await shared_read(request, query)


def _detail(app: App, incident_id: str) -> IncidentDetail:
    with app.store.db.read():  # one connection and one transaction
        return views.incident_detail(
            app.incidents.get(incident_id), app.incidents.runs_of(incident_id), app.store.pauses.current()
        )


@router.get("/{incident_id}", response_model=IncidentDetail)
async def get_incident(app: AppDep, request: Request, incident_id: str) -> Response:
    return await shared_read(request, lambda: _detail(app, incident_id))


@router.get("/{incident_id}/history")
async def incident_history(app: AppDep, incident_id: Annotated[str, Path(max_length=64)]) -> IncidentHistory:
    """What was done about it and whether it held: its own fixes (commit, diff summary, verified, how long each
    lasted) and the most relevant fixes of other incidents with the same fingerprint or traceback frames."""
    return IncidentHistory.model_validate(await run_in_threadpool(app.store.fixes.history, incident_id))


@router.post("/{incident_id}/resolve")
async def resolve_incident(app: AppDep, incident_id: str) -> IncidentDetail:
    await run_in_threadpool(app.incidents.resolve, incident_id)
    return await run_in_threadpool(_detail, app, incident_id)
