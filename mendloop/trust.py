"""Trust score model: one number in [0, 1] per component, moved by what happens to it.

new = old + weight * (goal - old), where the goal is 0 for an incident or a failed verification and 1 for a
verified fix. The weights come from `TrustConfig`. Each move is kept with its reason, so a score can be explained.
"""

from __future__ import annotations

from enum import StrEnum

from mendloop.config import TrustConfig


class TrustReason(StrEnum):
    INCIDENT = "incident"
    VERIFIED_FIX = "verified_fix"
    FAILED_VERIFICATION = "failed_verification"


def next_score(old: float, reason: TrustReason, config: TrustConfig) -> float:
    if reason is TrustReason.VERIFIED_FIX:
        goal, weight = 1.0, config.verified_fix_weight
    elif reason is TrustReason.INCIDENT:
        goal, weight = 0.0, config.incident_weight
    else:
        goal, weight = 0.0, config.failed_verification_weight
    new = old + weight * (goal - old)
    # Rounded so the timeline's "0.75 → 0.88" and the stored value are the same number.
    return round(min(1.0, max(0.0, new)), 4)


def describe(old: float, new: float, reason: TrustReason) -> str:
    verb = "restored" if reason is TrustReason.VERIFIED_FIX else "lowered"
    return f"Trust {verb}: {old:.2f} → {new:.2f}"
