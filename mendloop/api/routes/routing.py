"""/routing: the one routing table, error types and event types to playbooks, and where each route comes from
(a playbook's `handles`, or the config's `routing:`)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from mendloop.api.deps import AppDep
from mendloop.api.schemas import ERROR_RESPONSES

router = APIRouter(tags=["playbooks"], responses=ERROR_RESPONSES)


class RouteOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["error_type", "event_type"]
    key: str = Field(description="the error type or event type")
    playbook: str = Field(description="the id of the playbook it runs")
    source: Literal["handles", "routing"] = Field(description="the playbook's `handles`, or the config's `routing:`")


class RoutingOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[RouteOut]
    count: int


@router.get("/routing")
async def routing(app: AppDep) -> RoutingOut:
    rows = [RouteOut(kind=r.kind, key=r.key, playbook=r.playbook, source=r.source) for r in app.routing.rows()]
    return RoutingOut(routes=rows, count=len(rows))
