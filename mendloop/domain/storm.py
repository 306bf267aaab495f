"""Storm control for detected events (watchers, webhooks). An operator's explicit trigger is not subject to it.

- An open incident whose run is still in progress absorbs its repeats.
- `once_within_seconds`: at most one new run per incident (fingerprint) in that window.
- A circuit breaker stops auto-remediation of a component after `breaker_failures` failed runs within
  `breaker_window_seconds`: the new run goes straight to needs_human.
- The per-component mutex and the global cap on concurrent runs are applied when workers claim runs
  (see storage/runs.py, RunStore.claim): they queue runs, never drop them.
Dedup never drops data: every detection is counted on its incident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from mendloop.domain.records import Detection, NewEvent
from mendloop.domain.states import RunStatus


class Verdict(StrEnum):
    RUN = "run"
    ABSORBED_IN_PROGRESS = "absorbed_in_progress"
    ABSORBED_THROTTLED = "absorbed_throttled"
    BREAKER_OPEN = "breaker_open"
    NO_PLAYBOOK = "no_playbook"


class StormLimits(Protocol):
    """The settings' `StormConfig` satisfies it."""

    @property
    def once_within_seconds(self) -> float: ...
    @property
    def breaker_failures(self) -> int: ...
    @property
    def breaker_window_seconds(self) -> float: ...
    @property
    def mutex_per_component(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Situation:
    """What the decision needs to know. The two that cost a query are asked for only when they decide: most
    detections of a storm are absorbed without either."""

    has_playbook: bool
    last_run_at: float | None
    now: float
    run_in_progress: Callable[[], bool]
    # Failed runs of the component within `breaker_window_seconds`.
    recent_failures: Callable[[], int]


def decide(s: Situation, config: StormLimits) -> tuple[Verdict, int]:
    """The verdict, and the failures counted when the breaker was what decided (0 otherwise)."""
    if not s.has_playbook:
        return Verdict.NO_PLAYBOOK, 0
    if s.run_in_progress():
        return Verdict.ABSORBED_IN_PROGRESS, 0
    if s.last_run_at is not None and s.now - s.last_run_at < config.once_within_seconds:
        return Verdict.ABSORBED_THROTTLED, 0
    failures = s.recent_failures()
    if failures >= config.breaker_failures:
        return Verdict.BREAKER_OPEN, failures
    return Verdict.RUN, failures


@dataclass(frozen=True, slots=True)
class RunStart:
    """How a run that storm control lets through starts."""

    status: RunStatus
    mutex_key: str | None
    error: str | None


def run_start(d: Detection, verdict: Verdict, failures: int, config: StormLimits) -> RunStart:
    breaker = verdict is Verdict.BREAKER_OPEN
    return RunStart(
        # The breaker keeps the run (its data is not lost) but hands it straight to a human.
        status=RunStatus.NEEDS_HUMAN if breaker else RunStatus.QUEUED,
        mutex_key=d.component if config.mutex_per_component and d.component else None,
        error=breaker_error(d.component, failures, config) if breaker else None,
    )


def detection_event(d: Detection, incident_id: str | None) -> NewEvent:
    """The event a detection is stored as, whatever the verdict: dedup never drops data."""
    payload = {**d.payload, "fingerprint": d.fingerprint, "incident_id": incident_id, "severity": d.severity}
    if d.count != 1:
        payload["count"] = d.count
    if d.error_type:
        payload.setdefault("error_type", d.error_type)
    return NewEvent(
        type=d.event_type, message=d.message[:4000], source=d.source, payload=payload, component=d.component
    )


def breaker_error(component: str | None, failures: int, config: StormLimits) -> str:
    return (
        f"circuit breaker open for {component}: {failures} failed runs in the last "
        f"{config.breaker_window_seconds:g} s; auto-remediation stopped"
    )


def circuit_open_event(component: str | None, run_id: str, failures: int, incident_id: str) -> NewEvent:
    return NewEvent(
        type="self_healing.circuit_open",
        message=f"Circuit breaker open for {component}: run {run_id} needs a human",
        payload={"failures": failures, "incident_id": incident_id},
        run_id=run_id,
        component=component,
    )
