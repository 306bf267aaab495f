"""/audit: the audit log, newest first (admin only, see domain/roles.py); the same as `mendloop audit list`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.deps import AppDep, Limit
from mendloop.api.responses import AuditEntryOut, AuditList
from mendloop.api.schemas import ERROR_RESPONSES
from mendloop.storage.audit import AuditEntry

router = APIRouter(tags=["audit"], responses=ERROR_RESPONSES)


def audit_out(r: AuditEntry) -> AuditEntryOut:
    return AuditEntryOut(
        id=int(r.id or 0),
        at=views.iso(r.at),
        actor_id=r.actor_id,
        actor_name=r.actor_name,
        role=r.role,
        action=r.action,
        method=r.method,
        path=r.path,
        target_id=r.target_id,
        client=r.client,
        status=r.status,
    )


@router.get("/audit")
async def audit(
    app: AppDep,
    limit: Limit = 50,
    actor: Annotated[str | None, Query(max_length=200, description="A token's name or id")] = None,
    action: Annotated[str | None, Query(max_length=64, description="e.g. runs.trigger, tokens.create")] = None,
) -> AuditList:
    rows = await run_in_threadpool(lambda: app.audit.list(limit=limit, actor=actor, action=action))
    entries = [audit_out(r) for r in rows]
    return AuditList(entries=entries, count=len(entries))
