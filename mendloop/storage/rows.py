"""Rows → the frozen records of `domain.records` that storage hands out."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row

from mendloop.domain.records import EventRecord, Run, RunSummary, StepRecord, TrustChange, WorkOrder
from mendloop.domain.runs import step_ids
from mendloop.domain.states import RunStatus, StepStatus, WorkOrderStatus
from mendloop.storage import schema as t


def event_of(r: Row[Any]) -> EventRecord:
    return EventRecord(
        id=int(r.id),
        type=r.type,
        source=r.source,
        message=r.message,
        payload=dict(r.payload or {}),
        created_at=float(r.created_at),
        run_id=r.run_id,
        work_order_id=r.work_order_id,
        component=r.component,
    )


def run_of(r: Row[Any] | dict[str, Any]) -> Run:
    d = dict(r._mapping) if isinstance(r, Row) else r
    return Run(
        id=d["id"],
        playbook_id=d["playbook_id"],
        playbook_version=d["playbook_version"],
        playbook_type=d["playbook_type"],
        playbook=dict(d["playbook"]),
        status=RunStatus(d["status"]),
        component=d["component"],
        error_type=d["error_type"],
        description=d["description"],
        context=dict(d["context"] or {}),
        step_index=int(d["step_index"]),
        attempt=int(d["attempt"]),
        outputs=dict(d["outputs"] or {}),
        pending=dict(d["pending"] or {}),
        escalated=bool(d["escalated"]),
        coding_work_order_id=d["coding_work_order_id"],
        lease_owner=d["lease_owner"],
        lease_expires_at=d["lease_expires_at"],
        next_run_at=float(d["next_run_at"]),
        created_at=float(d["created_at"]),
        updated_at=float(d["updated_at"]),
        finished_at=d["finished_at"],
        error=d["error"],
        trigger_event_id=d["trigger_event_id"],
        dedupe_key=d["dedupe_key"],
        incident_id=d.get("incident_id"),
        mutex_key=d.get("mutex_key"),
        stalled_claims=int(d.get("stalled_claims") or 0),
    )


# What a list reads of a run (`RunSummary`), in this order: not the context or outputs, and the playbook as text,
# whose step ids `_step_ids` decodes once per distinct snapshot.
SUMMARY_COLUMNS = (
    *(
        t.runs.c[name]
        for name in (
            "id",
            "playbook_id",
            "playbook_version",
            "playbook_type",
            "status",
            "component",
            "error_type",
            "description",
            "step_index",
            "pending",
            "escalated",
            "coding_work_order_id",
            "created_at",
            "updated_at",
            "finished_at",
            "error",
        )
    ),
    sa.cast(t.runs.c.playbook, sa.Text).label("playbook_text"),
)


def run_summary_of(r: Sequence[Any]) -> RunSummary:
    """A row of `SUMMARY_COLUMNS`, unpacked by position (a page has fifty; by name, each field is a lookup)."""
    (
        run_id,
        playbook_id,
        playbook_version,
        playbook_type,
        status,
        component,
        error_type,
        description,
        step_index,
        pending,
        escalated,
        coding_work_order_id,
        created_at,
        updated_at,
        finished_at,
        error,
        playbook_text,
    ) = r
    return RunSummary(
        id=run_id,
        playbook_id=playbook_id,
        playbook_version=playbook_version,
        playbook_type=playbook_type,
        status=RunStatus(status),
        component=component,
        error_type=error_type,
        description=description,
        step_index=int(step_index),
        step_ids=_step_ids(playbook_text),
        pending=dict(pending or {}),
        escalated=bool(escalated),
        coding_work_order_id=coding_work_order_id,
        created_at=float(created_at),
        updated_at=float(updated_at),
        finished_at=finished_at,
        error=error,
    )


@functools.lru_cache(maxsize=512)
def _step_ids(playbook_text: str) -> tuple[str, ...]:
    # The runs of one playbook version share its snapshot's text: a page decodes each distinct one once, not the
    # whole document for every row (it was most of a runs page's CPU).
    return step_ids(json.loads(playbook_text))


def step_of(r: Row[Any]) -> StepRecord:
    return StepRecord(
        id=int(r.id),
        run_id=r.run_id,
        step_index=int(r.step_index),
        step_id=r.step_id,
        action=r.action,
        attempt=int(r.attempt),
        status=StepStatus(r.status),
        started_at=float(r.started_at),
        finished_at=float(r.finished_at),
        output=dict(r.output or {}),
        error=r.error,
        idempotency_key=r.idempotency_key,
    )


def work_order_of(r: Row[Any] | dict[str, Any]) -> WorkOrder:
    d = dict(r._mapping) if isinstance(r, Row) else r
    return WorkOrder(
        id=d["id"],
        type=d["type"],
        description=d["description"],
        context=dict(d["context"] or {}),
        status=WorkOrderStatus(d["status"]),
        self_healing_run_id=d["self_healing_run_id"],
        playbook_id=d["playbook_id"],
        component=d["component"],
        estimated_complexity=d["estimated_complexity"],
        priority=d["priority"],
        created_at=float(d["created_at"]),
        updated_at=float(d["updated_at"]),
        completed_at=d["completed_at"],
        patch_result=dict(d["patch_result"]) if d["patch_result"] is not None else None,
        attempts=int(d["attempts"]),
        fail_reason=d["fail_reason"],
        lease_id=d.get("lease_id"),
        lease_owner=d.get("lease_owner"),
        lease_expires_at=d.get("lease_expires_at"),
        max_attempts=int(d.get("max_attempts") or 3),
        deadline_at=d.get("deadline_at"),
        cancel_requested=bool(d.get("cancel_requested")),
        repository=d.get("repository"),
        base_commit=d.get("base_commit"),
        note=d.get("note"),
    )


def trust_change_of(r: Row[Any]) -> TrustChange:
    return TrustChange(
        component=r.component, old=r.old, new=r.new, reason=r.reason, run_id=r.run_id, created_at=r.created_at
    )
