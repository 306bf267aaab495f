"""Storm control for detected events (watchers, webhooks). An operator's explicit trigger is not subject to it.

- An open incident whose run is still in progress absorbs its repeats.
- `once_within_seconds`: at most one new run per incident (fingerprint) in that window.
- A circuit breaker stops auto-remediation of a component after `breaker_failures` failed runs within
  `breaker_window_seconds`: the new run goes straight to needs_human.
- The per-component mutex and the global cap on concurrent runs are applied when workers claim runs
  (see Store.claim_run): they queue runs, never drop them.
Dedup never drops data: every detection is counted on its incident.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mendloop.config import StormConfig


class Verdict(StrEnum):
    RUN = "run"
    ABSORBED_IN_PROGRESS = "absorbed_in_progress"
    ABSORBED_THROTTLED = "absorbed_throttled"
    BREAKER_OPEN = "breaker_open"
    NO_PLAYBOOK = "no_playbook"


@dataclass(frozen=True, slots=True)
class Situation:
    has_playbook: bool
    run_in_progress: bool
    last_run_at: float | None
    recent_failures: int
    now: float


def decide(s: Situation, config: StormConfig) -> Verdict:
    if not s.has_playbook:
        return Verdict.NO_PLAYBOOK
    if s.run_in_progress:
        return Verdict.ABSORBED_IN_PROGRESS
    if s.last_run_at is not None and s.now - s.last_run_at < config.once_within_seconds:
        return Verdict.ABSORBED_THROTTLED
    if s.recent_failures >= config.breaker_failures:
        return Verdict.BREAKER_OPEN
    return Verdict.RUN
