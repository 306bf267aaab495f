"""Answer bodies: what every route returns, so `/openapi.json` describes every answer.

The field names and their order are the spec's JSON shapes (plus a few more); `views.py` builds them from records.
Statuses are plain strings: the states are the domain's (`domain/states.py`), and that list grows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mendloop.domain.states import RunStatus, WorkOrderStatus


class _Answer(BaseModel):
    # forbid: a field a view adds without declaring it here fails loudly instead of vanishing from the answer.
    model_config = ConfigDict(extra="forbid")


def _one_of(states: type[RunStatus] | type[WorkOrderStatus]) -> str:
    return "One of the domain's states, at the time of writing: " + ", ".join(s.value for s in states) + "."


Timestamp = str | None  # ISO 8601 in UTC, milliseconds: 2024-05-01T12:00:00.123Z (timeline lines: seconds)

# -- work orders -------------------------------------------------------------------------------------------------


class WorkOrderOut(_Answer):
    work_order_id: str
    type: str
    description: str
    context: dict[str, Any]
    status: str = Field(description=_one_of(WorkOrderStatus))
    self_healing_run_id: str | None
    estimated_complexity: str
    priority: str
    created_at: Timestamp
    patch_result: dict[str, Any] | None
    playbook_id: str | None
    component: str | None
    updated_at: Timestamp
    completed_at: Timestamp
    attempts: int
    max_attempts: int
    fail_reason: str | None
    repository: str | None
    base_commit: str | None
    leased_to: str | None
    lease_expires_at: Timestamp
    deadline_at: Timestamp
    cancel_requested: bool
    note: str | None
    paused: str | None = Field(
        default=None,
        description="Not yet ended while its component (or all) is paused: the pause's reason. An agent may still "
        "work on it; the run waiting on its patch goes on only once the pause is lifted.",
    )


class WorkOrderList(_Answer):
    work_orders: list[WorkOrderOut]
    count: int
    total: int
    total_is_lower_bound: bool = Field(
        default=False,
        description="True when `total` is a lower bound: a filter combination the counts don't keep, counted up to "
        "1,000 matching items",
    )
    stats: dict[str, int] = Field(description="total_work_orders, and the number of work orders in each status")
    next_cursor: str | None = Field(
        default=None, description="The `cursor` of the next page (keyset paging); null on the last page"
    )


class CompleteOut(BaseModel):
    """What completing (or approving, or merging) a work order answers; a replay with the same Idempotency-Key
    answers the same."""

    model_config = ConfigDict(extra="allow")  # the engine writes this answer; a newer field passes through

    success: bool
    work_order_id: str
    status: str = Field(description=_one_of(WorkOrderStatus))
    self_healing_run_id: str | None
    patch_result: dict[str, Any] | None
    message: str


class ClaimOut(_Answer):
    work_order: WorkOrderOut
    lease_id: str | None
    lease_expires_at: Timestamp
    heartbeat_interval_seconds: float


class HeartbeatOut(_Answer):
    lease_expires_at: Timestamp
    cancel_requested: bool


# -- runs --------------------------------------------------------------------------------------------------------


class RunOut(_Answer):
    run_id: str
    playbook_id: str
    playbook_type: str
    playbook_version: str
    status: str = Field(description=_one_of(RunStatus))
    component: str | None
    error_type: str | None
    description: str
    escalated_to_coding: bool
    coding_work_order_id: str | None
    steps_completed: int
    steps_total: int
    current_step: str | None
    created_at: Timestamp
    updated_at: Timestamp
    finished_at: Timestamp
    error: str | None
    approval: dict[str, Any] | None = Field(
        default=None,
        description="In awaiting_approval: what it waits for (step_id, rule, score, gate, deadline_at, on_timeout).",
    )
    paused: str | None = Field(
        default=None, description="Not yet ended while its component (or all) is paused: the pause's reason."
    )


class RunList(_Answer):
    runs: list[RunOut]
    count: int
    total: int
    total_is_lower_bound: bool = Field(
        default=False,
        description="True when `total` is a lower bound: a filter combination the counts don't keep, counted up to "
        "1,000 matching items",
    )
    next_cursor: str | None = Field(
        default=None, description="The `cursor` of the next page (keyset paging); null on the last page"
    )


class StepOut(_Answer):
    step_index: int
    step_id: str
    action: str
    attempt: int
    status: str
    started_at: Timestamp
    finished_at: Timestamp
    duration_ms: float
    output: dict[str, Any]
    error: str | None
    idempotency_key: str


class EventLine(_Answer):
    time: Timestamp
    kind: Literal["event"]
    event_type: str
    message: str


class StepLine(_Answer):
    time: Timestamp
    kind: Literal["step"]
    step_id: str
    message: str


TimelineItem = Annotated[EventLine | StepLine, Field(discriminator="kind")]


class TrustChangeOut(_Answer):
    component: str
    old: float
    new: float
    reason: str
    run_id: str | None
    time: Timestamp


class RunTrust(_Answer):
    component: str | None
    score: float | None
    changes: list[TrustChangeOut]


class RunDetail(RunOut):
    steps: list[StepOut]
    timeline: list[TimelineItem]
    context: dict[str, Any]
    trust: RunTrust
    work_order: WorkOrderOut | None


class TriggerOut(_Answer):
    success: bool
    message: str
    run_id: str
    playbook_id: str
    status: str = Field(description=_one_of(RunStatus))
    escalated_to_coding: bool
    work_order_id: str | None
    created: bool


class StormOut(_Answer):
    """The caps on new runs that detections start: this window's counts, and what overflowed."""

    window_seconds: float
    window_started_at: float
    new_runs_in_window: int
    rate_limited_in_window: int
    rate_limited: int = Field(description="Detections recorded as incidents without a run, all time.")
    max_new_runs_per_window: int
    max_new_runs_per_component: int


class RatesOut(_Answer):
    runs: int
    escalation_rate: float
    auto_fix_rate: float
    mean_time_to_heal_seconds: float | None = Field(description="mean of (finished_at - created_at), completed runs")


class StatsOut(_Answer):
    total_playbook_runs: int
    work_orders: dict[str, int]
    escalation_rate: float
    auto_fix_rate: float
    average_patch_time_minutes: float | None
    runs_by_status: dict[str, int]
    definitions: dict[str, str]
    storm: StormOut | None = None
    by_playbook: dict[str, RatesOut] = Field(default_factory=dict)
    by_component: dict[str, RatesOut] = Field(default_factory=dict, description="runs without a component left out")


# -- events ------------------------------------------------------------------------------------------------------


class EventOut(_Answer):
    id: int
    event_type: str
    source: str
    message: str
    payload: dict[str, Any]
    run_id: str | None
    work_order_id: str | None
    component: str | None
    timestamp: Timestamp
    created_at: float = Field(description="Unix time, for `since`")


class EventList(_Answer):
    events: list[EventOut]
    count: int
    next_cursor: str | None = Field(
        default=None, description="The `cursor` of the next page (keyset paging); null on the last page"
    )


class EventOutcome(_Answer):
    event_id: int | None
    incident_id: str | None
    run_id: str | None
    verdict: str
    duplicate: bool


class PublishedEvent(_Answer):
    """One event published."""

    accepted: Literal[True]
    event_id: int | None
    incident_id: str | None
    run_id: str | None
    verdict: str
    duplicate: bool
    playbook_id: str | None
    # The caller's `fingerprint` was not used (not a forwarder token, and trust_caller_fingerprint is off).
    fingerprint_ignored: bool = False


class PublishedBatch(_Answer):
    """A batch, or log records, published."""

    accepted: int
    duplicates: int
    events: list[EventOutcome]
    fingerprints_ignored: int = 0


class AlertOutcome(_Answer):
    event_id: int | None
    incident_id: str | None
    run_id: str | None
    verdict: str


class AlertsPublished(_Answer):
    accepted: int
    events: list[AlertOutcome]


# -- incidents ---------------------------------------------------------------------------------------------------


class IncidentOut(_Answer):
    incident_id: str
    fingerprint: str
    status: str
    error_type: str | None
    event_type: str
    component: str | None
    source: str
    title: str
    sample: str
    count: int
    absorbed: int
    first_seen: Timestamp
    last_seen: Timestamp
    resolved_at: Timestamp
    last_run_id: str | None
    recurrences: int = Field(description="Times it came back after it was resolved (each reopened it).")
    resolved_by_run: str | None = Field(description="The run whose verified fix resolved it (None: not by a run).")
    resolved_commit: str | None = Field(description="The commit of the patch that run applied, if any.")
    last_resolved_at: Timestamp = Field(description="When it was resolved before it last reopened.")
    regressions: int = Field(default=0, description="Recurrences after a run's verified fix: the fix did not hold.")
    regressed_commit: str | None = Field(
        default=None, description="The commit of the verified fix that did not hold, at the latest regression."
    )
    paused: str | None = Field(default=None, description="While its component (or all) is paused: the reason.")


class IncidentRun(_Answer):
    run_id: str
    status: str


class PauseOut(_Answer):
    scope: str = Field(description="The paused component, or `*` for all of them.")
    reason: str
    paused_at: Timestamp


class PauseList(_Answer):
    pauses: list[PauseOut]
    count: int


class IncidentDetail(IncidentOut):
    runs: list[IncidentRun]


class PastFixDiff(_Answer):
    files: list[str]
    added: int | None
    removed: int | None


class PastFix(_Answer):
    """A past fix as a work order's context (`past_fixes`) and an incident's history show it."""

    run_id: str
    incident_id: str | None
    work_order_id: str | None
    matched: Literal["own", "same_fingerprint", "same_code"] = Field(
        description="Why it is shown: the incident's own fix, the same fingerprint under an earlier incident, or "
        "a traceback through the same files and functions."
    )
    shared_frames: int = Field(description="Traceback frames (file, function) it shares with this one.")
    what_was_done: str
    commit: str | None
    diff: PastFixDiff
    verified: bool = Field(description="Its verification passed.")
    reverted: bool = Field(description="Verification failed after it was applied, and mendloop reverted it.")
    fixed_at: float
    recurred_at: float | None = Field(description="When its incident came back (None: it has not).")
    held_seconds: float | None = Field(
        description="How long it held: until it recurred, or until now. None when it never held."
    )
    still_holding: bool


class IncidentHistory(_Answer):
    incident_id: str
    fingerprint: str
    recurrences: int
    regressions: int
    regressed_commit: str | None
    fixes: list[PastFix] = Field(description="The incident's own fixes, newest first.")
    related: list[PastFix] = Field(description="The most relevant fixes of other incidents (at most 5).")


class IncidentList(_Answer):
    incidents: list[IncidentOut]
    count: int
    total: int
    total_is_lower_bound: bool = Field(
        default=False,
        description="True when `total` is a lower bound: a filter combination the counts don't keep, counted up to "
        "1,000 matching items",
    )
    next_cursor: str | None = Field(
        default=None, description="The `cursor` of the next page (keyset paging); null on the last page"
    )


# -- system ------------------------------------------------------------------------------------------------------


class NotifyTargetOut(_Answer):
    """A notification target's deliveries, from the notifier's last round (counters of every process)."""

    delivered: int
    failed: int = Field(description="Failed delivery attempts (each retry counts).")
    dropped: int = Field(description="Events given up after notify_settings.max_attempts.")
    pending: int = Field(description="Events the target wants and has not been sent yet (at most 500).")
    last_error: str | None = Field(description="Why the last attempt failed (redacted).")
    last_delivered_at: float | None
    next_attempt_at: float | None = Field(description="When a failed delivery is tried again.")


class ProcessesOut(_Answer):
    count: int = Field(description="Processes answering the API on one socket (`processes:`; 1 by default).")
    restarts: int = Field(description="API-only processes started again after they died.")
    serving: int = Field(
        description="Of `count`, the processes accepting connections now: an API-only process that is starting "
        "(or starting again after it died) is not yet."
    )
    primary: str = Field(
        description="`ok`, or (in an API-only process) why the first process's report of its workers, watchers "
        "and notifications is missing or late: the answer is then degraded."
    )


class HealthOut(_Answer):
    paused: list[PauseOut] = Field(
        default_factory=list, description="Paused components (`*`: all), as the write probe last read them."
    )
    status: Literal["ok", "degraded"]
    database: str
    dialect: str
    workers: int
    playbooks: int
    version: str
    watchers: dict[str, dict[str, Any]]
    last_write_age_seconds: float | None = Field(
        default=None, description="Seconds since the write probe last wrote to the database (None: never)."
    )
    storm: StormOut | None = None
    notifications: dict[str, NotifyTargetOut] = Field(
        default_factory=dict, description="Each `notify:` target's deliveries (empty without targets or workers)."
    )
    processes: ProcessesOut | None = None


class Handles(_Answer):
    error_types: list[str]
    event_types: list[str]


class PlaybookStep(_Answer):
    id: str
    name: str
    action: str
    when: str | None


class PlaybookOut(_Answer):
    id: str
    type: str
    description: str
    version: str
    target: str | None
    handles: Handles
    steps: list[PlaybookStep]
    source: str


class PlaybookList(_Answer):
    playbooks: list[PlaybookOut]
    count: int
    routing: dict[str, str] = Field(description="error type → playbook id")


class TrustScore(_Answer):
    component: str
    score: float


class TrustList(_Answer):
    components: list[TrustScore]


class ComponentTrust(_Answer):
    component: str
    score: float
    history: list[TrustChangeOut]


class ErrorOut(BaseModel):
    """Every error answer: `detail` says what went wrong; `field` names the input at fault, where one is."""

    model_config = ConfigDict(extra="allow")

    detail: Any
    field: str | None = None
    error: str | None = None


# -- tokens and the audit log ------------------------------------------------------------------------------------


class TokenOut(_Answer):
    """A stored token: never the token itself, nor its digest."""

    id: str
    name: str
    role: str
    repositories: list[str]
    created_at: Timestamp
    revoked_at: Timestamp


class TokenCreated(TokenOut):
    token: str = Field(description="The token: shown this once, kept only as a digest.")


class TokenList(_Answer):
    tokens: list[TokenOut]
    count: int


class AuditEntryOut(_Answer):
    id: int
    at: Timestamp
    actor_id: str | None = Field(description="db:<token id>, config:<name>, process:agent, or anonymous")
    actor_name: str | None
    role: str | None
    action: str
    method: str
    path: str
    target_id: str | None
    client: str | None
    status: int


class AuditList(_Answer):
    entries: list[AuditEntryOut]
    count: int
