"""/patches/stats: how often runs escalate, how often they heal by themselves, how long patches take; overall,
per playbook and per component. Read from the aggregates (storage/stats.py), never by counting history."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from mendloop.api.coalesce import shared_read
from mendloop.api.deps import AppDep
from mendloop.api.responses import RatesOut, StatsOut, StormOut
from mendloop.api.schemas import ERROR_RESPONSES
from mendloop.domain.stats import Rates
from mendloop.storage.incidents import StormCounts

router = APIRouter(prefix="/patches", tags=["stats"], responses=ERROR_RESPONSES)

DEFINITIONS = {
    "escalation_rate": "escalated runs / all runs",
    "auto_fix_rate": "runs completed without escalation / finished runs",
    "average_patch_time_minutes": "mean of (completed_at - created_at) over completed work orders",
    "mean_time_to_heal_seconds": "mean of (finished_at - created_at) over completed runs",
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


def rates_out(r: Rates) -> RatesOut:
    return RatesOut(
        runs=r.runs,
        escalation_rate=r.escalation_rate,
        auto_fix_rate=r.auto_fix_rate,
        mean_time_to_heal_seconds=r.mean_time_to_heal_seconds,
    )


@router.get("/stats", response_model=StatsOut)
async def stats(app: AppDep, request: Request) -> Response:
    def query() -> StatsOut:
        s = app.store.statistics()
        patch_seconds = s.average_patch_seconds
        return StatsOut(
            total_playbook_runs=s.overall.runs,
            work_orders=s.work_orders,
            escalation_rate=s.overall.escalation_rate,
            auto_fix_rate=s.overall.auto_fix_rate,
            average_patch_time_minutes=round(patch_seconds / 60, 2) if patch_seconds is not None else None,
            runs_by_status=s.runs_by_status,
            definitions=dict(DEFINITIONS),
            storm=storm_out(app.incidents.storm_counts()),
            by_playbook={k: rates_out(v) for k, v in s.by_playbook.items()},
            by_component={k: rates_out(v) for k, v in s.by_component.items()},
        )

    return await shared_read(request, query)
