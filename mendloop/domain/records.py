"""What the store hands out: frozen snapshots of rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mendloop.domain.states import RunStatus, StepStatus, WorkOrderStatus


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    type: str
    source: str
    message: str
    payload: dict[str, Any]
    created_at: float
    run_id: str | None = None
    work_order_id: str | None = None
    component: str | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to store in the same transaction as the change it reports."""

    type: str
    message: str
    source: str = "mendloop"
    payload: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    work_order_id: str | None = None
    component: str | None = None


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    playbook_id: str
    playbook_version: str
    playbook_type: str
    playbook: dict[str, Any]
    status: RunStatus
    component: str | None
    error_type: str | None
    description: str
    context: dict[str, Any]
    step_index: int
    attempt: int
    outputs: dict[str, Any]
    pending: dict[str, Any]
    escalated: bool
    coding_work_order_id: str | None
    lease_owner: str | None
    lease_expires_at: float | None
    next_run_at: float
    created_at: float
    updated_at: float
    finished_at: float | None
    error: str | None
    trigger_event_id: int | None
    dedupe_key: str | None
    incident_id: str | None = None
    mutex_key: str | None = None
    # Claims since the run last committed progress (this one included): a run whose claims keep crashing the
    # worker is stopped after a bounded number (the step loop decides), instead of being re-claimed forever.
    stalled_claims: int = 0


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a list shows of a run: its playbook snapshot stands as its step ids, and its context and outputs are
    left out (a page of runs would otherwise decode all three for every row, and show none of them)."""

    id: str
    playbook_id: str
    playbook_version: str
    playbook_type: str
    status: RunStatus
    component: str | None
    error_type: str | None
    description: str
    step_index: int
    step_ids: tuple[str, ...]
    pending: dict[str, Any]
    escalated: bool
    coding_work_order_id: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Incident:
    id: str
    fingerprint: str
    status: str
    error_type: str | None
    event_type: str
    component: str | None
    source: str
    title: str
    sample: str
    count: int
    first_seen: float
    last_seen: float
    resolved_at: float | None
    last_run_id: str | None
    last_run_at: float | None
    absorbed: int


@dataclass(frozen=True, slots=True)
class StepRecord:
    id: int
    run_id: str
    step_index: int
    step_id: str
    action: str
    attempt: int
    status: StepStatus
    started_at: float
    finished_at: float
    output: dict[str, Any]
    error: str | None
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class WorkOrder:
    id: str
    type: str
    description: str
    context: dict[str, Any]
    status: WorkOrderStatus
    self_healing_run_id: str | None
    playbook_id: str | None
    component: str | None
    estimated_complexity: str
    priority: str
    created_at: float
    updated_at: float
    completed_at: float | None
    patch_result: dict[str, Any] | None
    attempts: int
    fail_reason: str | None
    lease_id: str | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    max_attempts: int = 3
    deadline_at: float | None = None
    cancel_requested: bool = False
    repository: str | None = None
    base_commit: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class TrustChange:
    component: str
    old: float
    new: float
    reason: str
    run_id: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Detection:
    """Something a watcher or a webhook saw: counted on its incident, and maybe the start of a run."""

    event_type: str
    source: str
    message: str
    fingerprint: str
    error_type: str | None = None
    component: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    count: int = 1
    event_id: str | None = None
    title: str | None = None
    resolved: bool = False
    severity: str = "error"


@dataclass(frozen=True, slots=True)
class DetectionOutcome:
    event_id: int | None
    incident_id: str | None
    run_id: str | None
    verdict: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class PlaybookRef:
    """What a new run needs of its playbook: the document it keeps, so a parked run survives an edit."""

    id: str
    version: str
    document: dict[str, Any]
