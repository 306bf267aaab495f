"""Trust score model: one number in [0, 1] per component, moved by what happens to it.

new = old + weight * (goal - old), where the goal is 0 for an incident or a failed verification and 1 for a
verified fix. The weights come from the settings (`TrustConfig` satisfies `TrustWeights`). Each move is kept with
its reason, so a score can be explained.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from mendloop.domain.records import NewEvent, TrustChange


class TrustReason(StrEnum):
    INCIDENT = "incident"
    VERIFIED_FIX = "verified_fix"
    FAILED_VERIFICATION = "failed_verification"


class TrustWeights(Protocol):
    @property
    def initial(self) -> float: ...
    @property
    def incident_weight(self) -> float: ...
    @property
    def verified_fix_weight(self) -> float: ...
    @property
    def failed_verification_weight(self) -> float: ...


@dataclass(frozen=True, slots=True)
class TrustMove:
    """What happened to a component; `move` turns it into the new score."""

    component: str
    reason: TrustReason


def next_score(old: float, reason: TrustReason, weights: TrustWeights) -> float:
    if reason is TrustReason.VERIFIED_FIX:
        goal, weight = 1.0, weights.verified_fix_weight
    elif reason is TrustReason.INCIDENT:
        goal, weight = 0.0, weights.incident_weight
    else:
        goal, weight = 0.0, weights.failed_verification_weight
    new = old + weight * (goal - old)
    # Rounded so the timeline's "0.75 → 0.88" and the stored value are the same number.
    return round(min(1.0, max(0.0, new)), 4)


def describe(old: float, new: float, reason: TrustReason) -> str:
    verb = "restored" if reason is TrustReason.VERIFIED_FIX else "lowered"
    return f"Trust {verb}: {old:.2f} → {new:.2f}"


def move(
    move: TrustMove, old: float | None, weights: TrustWeights, *, run_id: str | None, now: float
) -> tuple[TrustChange, list[NewEvent]]:
    """The new score of `move.component` (`old` is None when it has none yet) and the events that report it.
    An incident lowers trust silently: its own events already say what happened."""
    before = weights.initial if old is None else old
    new = next_score(before, move.reason, weights)
    change = TrustChange(
        component=move.component, old=before, new=new, reason=move.reason.value, run_id=run_id, created_at=now
    )
    if move.reason is TrustReason.INCIDENT:
        return change, []
    event = NewEvent(
        type="trust.updated",
        message=describe(before, new, move.reason),
        payload={"component": move.component, "old": before, "new": new, "reason": move.reason.value},
        run_id=run_id,
        component=move.component,
    )
    return change, [event]
