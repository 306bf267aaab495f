"""/patches/stats: how often runs escalate, how often they heal by themselves, how long patches take."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from mendloop.api.deps import AppDep
from mendloop.api.responses import StatsOut, StormOut
from mendloop.api.schemas import ERROR_RESPONSES
from mendloop.storage.incidents import StormCounts

router = APIRouter(prefix="/patches", tags=["stats"], responses=ERROR_RESPONSES)

DEFINITIONS = {
    "escalation_rate": "escalated runs / all runs",
    "auto_fix_rate": "runs completed without escalation / finished runs",
    "average_patch_time_minutes": "mean of (completed_at - created_at) over completed work orders",
    "storm.rate_limited": "detections recorded as incidents without a run because a cap on new runs was full",
}


def storm_out(c: StormCounts) -> StormOut:
    return StormOut(
        window_seconds=c.window_seconds,
        window_started_at=c.window_started_at,
        new_runs_in_window=c.new_runs_in_window,
        rate_limited_in_window=c.rate_limited_in_window,
        rate_limited=c.rate_limited_total,
        max_new_runs_per_window=c.max_new_runs_per_window,
        max_new_runs_per_component=c.max_new_runs_per_component,
    )


@router.get("/stats")
async def stats(app: AppDep) -> StatsOut:
    def query() -> StatsOut:
        runs = app.store.run_stats()
        patch_seconds = runs["average_patch_seconds"]
        return StatsOut(
            total_playbook_runs=runs["total"],
            work_orders=app.store.work_order_stats(),
            escalation_rate=round(runs["escalated"] / runs["total"], 4) if runs["total"] else 0.0,
            auto_fix_rate=round(runs["auto_fixed"] / runs["finished"], 4) if runs["finished"] else 0.0,
            average_patch_time_minutes=round(patch_seconds / 60, 2) if patch_seconds is not None else None,
            runs_by_status=runs["by_status"],
            definitions=dict(DEFINITIONS),
            storm=storm_out(app.incidents.storm_counts()),
        )

    return await run_in_threadpool(query)
