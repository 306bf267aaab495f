"""/health, /playbooks, /trust."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from mendloop import __version__
from mendloop.api import views
from mendloop.api.access import known_caller
from mendloop.api.deps import AppDep
from mendloop.api.responses import (
    ComponentTrust,
    Handles,
    HealthOut,
    NotifyTargetOut,
    PlaybookList,
    PlaybookOut,
    PlaybookStep,
    ProcessesOut,
    TrustList,
    TrustScore,
)
from mendloop.api.routes.stats import storm_out
from mendloop.api.schemas import ERROR_RESPONSES

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/health", tags=["system"], responses={503: {"model": HealthOut, "description": "Not ready"}})
async def health(app: AppDep, request: Request, response: Response) -> HealthOut:
    """From memory only: the write probe (a thread, `health:`) keeps the database's state and the storm counters,
    so this answers at once however busy the database and the thread pool are. Degraded (503) while the last
    write failed or is older than `health.max_write_age_seconds`, or the App is not open. It needs no token;
    without one (on a server that asks for tokens) the operators' words are left out: a notification's last
    error (it names hosts) and a pause's reason."""
    told = known_caller(app, request)
    probe = app.health
    parts = app.parts()  # with `processes:` over 1, the first process's, whichever process answers
    problem = probe.problem() if probe is not None else "error: the write probe is not running"
    db = problem or "ok"
    ok = problem is None and app.ready and parts.stale is None
    response.status_code = 200 if ok else 503
    state = probe.state() if probe is not None else None
    age = probe.last_write_age() if probe is not None else None
    return HealthOut(
        status="ok" if ok else "degraded",
        database=db,
        dialect=app.store.engine.dialect.name,
        workers=parts.workers,
        playbooks=len(app.playbooks.by_id),
        version=__version__,
        watchers={name: st.as_dict() for name, st in parts.watchers.items()},
        last_write_age_seconds=round(age, 3) if age is not None else None,
        storm=storm_out(state.storm) if state is not None and state.storm is not None else None,
        notifications={
            name: NotifyTargetOut(
                delivered=st.delivered,
                failed=st.failed,
                dropped=st.dropped,
                pending=st.pending,
                last_error=st.last_error if told else None,
                last_delivered_at=st.last_delivered_at,
                next_attempt_at=st.next_attempt_at,
            )
            for name, st in parts.notifications.items()
        },
        paused=[views.pause(p, reason=told) for p in state.pauses] if state is not None else [],
        processes=ProcessesOut(
            count=parts.processes, restarts=parts.restarts, serving=parts.serving, primary=parts.stale or "ok"
        ),
    )


@router.get("/playbooks", tags=["playbooks"])
async def playbooks(app: AppDep) -> PlaybookList:
    routing = app.routing.table()
    items = []
    for pb in sorted(app.playbooks.by_id.values(), key=lambda p: p.id):
        m = pb.model
        items.append(
            PlaybookOut(
                id=m.id,
                type=m.type,
                description=m.description,
                version=pb.version,
                target=m.target,
                handles=Handles(
                    error_types=sorted({*m.handles.error_types, *(e for e, p in routing.items() if p == m.id)}),
                    event_types=m.handles.event_types,
                ),
                steps=[PlaybookStep(id=s.id, name=s.title, action=s.action, when=s.when) for s in m.steps],
                source=pb.source,
            )
        )
    return PlaybookList(playbooks=items, count=len(items), routing=routing)


@router.get("/trust", tags=["trust"])
async def trust(app: AppDep) -> TrustList:
    scores = await run_in_threadpool(app.store.trust_scores)
    return TrustList(components=[TrustScore(component=c, score=s) for c, s in sorted(scores.items())])


@router.get("/trust/{component}", tags=["trust"])
async def trust_component(
    app: AppDep,
    component: str,
    limit: Annotated[int, Query(ge=1, le=1000, description="The newest this many changes (oldest first)")] = 100,
) -> ComponentTrust:
    """The score and its most recent changes, oldest first: a component's history grows with every run."""
    score = await run_in_threadpool(app.store.trust_score, component)
    history = await run_in_threadpool(lambda: app.store.trust_history(component=component, last=limit))
    return ComponentTrust(component=component, score=score, history=[views.trust_change(c) for c in history])
