"""Trust score model: one number in [0, 1] per component, moved by what happens to it.

new = old + weight * (goal - old), where the goal is 0 for an incident, a recurrence or a failed verification and
1 for a verified fix. The weights come from the settings (`TrustConfig` satisfies `TrustWeights`). Each move is
kept with its reason, so a score can be explained.

A recurrence is an incident that comes back after it was resolved (by a verified fix, mostly): its run first
takes the plain incident move, then a recurrence move whose weight grows with the incident's recurrence count k:

    recurrence_weight(k) = min(MAX_RECURRENCE_WEIGHT, 1 - (1 - incident_weight) ** k)

so together they cost what k + 1 incidents in a row would, (1 - incident_weight) ** (k + 1) of the score left,
and never more than MAX_RECURRENCE_WEIGHT (0.9) in one recurrence move. With the default incident weight 0.25:
k = 1 → 0.25, k = 2 → 0.4375, k = 3 → 0.5781, ... capped at 0.9 from k = 9. A fix that keeps not holding loses
trust faster each time; a first failure costs the plain incident weight.

A regression is a recurrence after a run's *verified* code fix (domain/fix_memory.py): the patch's check passed
and the failure came back anyway, so the fix's verification is worth less than it claimed. It takes the place of
the recurrence move, one incident's worth heavier:

    regression_weight(k) = min(MAX_RECURRENCE_WEIGHT, 1 - (1 - incident_weight) ** (k + 1))

k = 1 → 0.4375 (a plain recurrence: 0.25), k = 2 → 0.5781, ... always at least the recurrence weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from mendloop.domain.records import NewEvent, TrustChange

# A recurrence move never takes more than this share of the score at once: a component stays distinguishable
# from one that never worked, and a verified fix can still bring it back.
MAX_RECURRENCE_WEIGHT = 0.9


class TrustReason(StrEnum):
    INCIDENT = "incident"
    RECURRENCE = "recurrence"
    REGRESSION = "regression"
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
    """What happened to a component; `move` turns it into the new score. `recurrences`: the incident's recurrence
    count, for a RECURRENCE move."""

    component: str
    reason: TrustReason
    recurrences: int = 0


def recurrence_weight(recurrences: int, incident_weight: float) -> float:
    """The weight of a recurrence move (see the module's docstring); 0 for a count below 1."""
    if recurrences < 1:
        return 0.0
    return min(MAX_RECURRENCE_WEIGHT, 1.0 - (1.0 - incident_weight) ** recurrences)


def regression_weight(recurrences: int, incident_weight: float) -> float:
    """The weight of a regression move (see the module's docstring); 0 for a count below 1."""
    if recurrences < 1:
        return 0.0
    return recurrence_weight(recurrences + 1, incident_weight)


def next_score(old: float, reason: TrustReason, weights: TrustWeights, recurrences: int = 0) -> float:
    if reason is TrustReason.VERIFIED_FIX:
        goal, weight = 1.0, weights.verified_fix_weight
    elif reason is TrustReason.INCIDENT:
        goal, weight = 0.0, weights.incident_weight
    elif reason is TrustReason.RECURRENCE:
        goal, weight = 0.0, recurrence_weight(recurrences, weights.incident_weight)
    elif reason is TrustReason.REGRESSION:
        goal, weight = 0.0, regression_weight(recurrences, weights.incident_weight)
    else:
        goal, weight = 0.0, weights.failed_verification_weight
    new = old + weight * (goal - old)
    # Rounded so the timeline's "0.75 → 0.88" and the stored value are the same number.
    return round(min(1.0, max(0.0, new)), 4)


def describe(old: float, new: float, reason: TrustReason, recurrences: int = 0) -> str:
    verb = "restored" if reason is TrustReason.VERIFIED_FIX else "lowered"
    why = {
        TrustReason.RECURRENCE: f" (recurrence {recurrences})",
        TrustReason.REGRESSION: f" (regression: recurrence {recurrences} after a verified fix)",
    }.get(reason, "")
    return f"Trust {verb}: {old:.2f} → {new:.2f}{why}"


def move(
    move: TrustMove, old: float | None, weights: TrustWeights, *, run_id: str | None, now: float
) -> tuple[TrustChange, list[NewEvent]]:
    """The new score of `move.component` (`old` is None when it has none yet) and the events that report it.
    An incident lowers trust silently: its own events already say what happened. A recurrence says it, because
    its drop is larger than the incident's and the timeline should show why."""
    before = weights.initial if old is None else old
    new = next_score(before, move.reason, weights, move.recurrences)
    change = TrustChange(
        component=move.component, old=before, new=new, reason=move.reason.value, run_id=run_id, created_at=now
    )
    if move.reason is TrustReason.INCIDENT:
        return change, []
    payload: dict[str, object] = {"component": move.component, "old": before, "new": new, "reason": move.reason.value}
    if move.reason in (TrustReason.RECURRENCE, TrustReason.REGRESSION):
        payload["recurrences"] = move.recurrences
    event = NewEvent(
        type="trust.updated",
        message=describe(before, new, move.reason, move.recurrences),
        payload=payload,
        run_id=run_id,
        component=move.component,
    )
    return change, [event]
