"""Storm control for detected events (watchers, webhooks). An operator's explicit trigger is not subject to it.

- An open incident whose run is still in progress absorbs its repeats.
- `once_within_seconds`: at most one new run per incident (fingerprint) in that window, while the incident stays
  open. A detection that reopens a resolved incident is a new failure after a heal, not a repeat of the old one:
  it starts a run however soon it came (a flapping fault is healed each time it breaks; the caps, the breaker and
  the recurrence's trust move bound that).
- A circuit breaker stops auto-remediation of a component after `breaker_failures` failed runs within
  `breaker_window_seconds`: the new run goes straight to needs_human.
- Caps on new runs per fixed window of `new_runs_window_seconds`: `max_new_runs_per_window` for all components,
  `max_new_runs_per_component` for one. A storm of distinct errors (each its own fingerprint, so none throttled)
  would otherwise start a run, and soon a work order, per error. Past a cap the detection is `rate_limited`: its
  incident is recorded and counted, with no run; its next repeat after the window may start one.
- The per-component mutex and the global cap on concurrent runs are applied when workers claim runs
  (see storage/runs.py, RunStore.claim): they queue runs, never drop them.
Dedup never drops data: every detection is counted on its incident.
"""

from __future__ import annotations

import math
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
    RATE_LIMITED = "rate_limited"


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
    @property
    def new_runs_window_seconds(self) -> float: ...
    @property
    def max_new_runs_per_window(self) -> int: ...
    @property
    def max_new_runs_per_component(self) -> int: ...


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """New runs detections started in the current window: all of them, and the detection's component's."""

    total: int
    component: int


def window_start(now: float, config: StormLimits) -> float:
    """The start of the fixed window `now` falls in; windows are aligned on the epoch so every process agrees."""
    width = config.new_runs_window_seconds
    return math.floor(now / width) * width


def full_cap(counts: WindowCounts, has_component: bool, config: StormLimits) -> str | None:
    """The setting whose cap this window has reached (None: a new run fits). 0 disables a cap; a detection
    without a component counts only against the global one."""
    if config.max_new_runs_per_window and counts.total >= config.max_new_runs_per_window:
        return "storm.max_new_runs_per_window"
    if has_component and config.max_new_runs_per_component and counts.component >= config.max_new_runs_per_component:
        return "storm.max_new_runs_per_component"
    return None


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
    # New runs started in this window; asked only once a run would otherwise start (it locks the window's counter).
    window_counts: Callable[[], WindowCounts] = lambda: WindowCounts(0, 0)
    has_component: bool = False
    # This detection reopens an incident that was resolved: the throttle of `once_within_seconds` does not hold it.
    reopens: bool = False


def decide(s: Situation, config: StormLimits) -> tuple[Verdict, int]:
    """The verdict, and the failures counted when the breaker was what decided (0 otherwise)."""
    if not s.has_playbook:
        return Verdict.NO_PLAYBOOK, 0
    if s.run_in_progress():
        return Verdict.ABSORBED_IN_PROGRESS, 0
    if not s.reopens and s.last_run_at is not None and s.now - s.last_run_at < config.once_within_seconds:
        return Verdict.ABSORBED_THROTTLED, 0
    # Before the breaker: a run the breaker hands to a human is a run all the same, and a storm must not make
    # thousands of them.
    if (config.max_new_runs_per_window or config.max_new_runs_per_component) and full_cap(
        s.window_counts(), s.has_component, config
    ):
        return Verdict.RATE_LIMITED, 0
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
