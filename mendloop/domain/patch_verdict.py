"""What became of a submitted patch, in one word and a sentence: the answer an agent gets for its ticket.

A pure reading of a work order and its run as the API shows them (their JSON), so every face answers the same:
the patch is being checked and tested, was rejected (with the reason), failed the tests (with their report), was
applied and awaits verification, then verified or not. `stage` orders the way there, for progress notifications.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mendloop.domain.states import RUN_FINAL, RunStatus, WorkOrderStatus

# The way a patch goes when all is well; `stage` is an index into it.
STAGES = ("submitted", "testing", "applied", "verified")
# The fail reasons that mean mendloop's own test run judged the patch.
TEST_FAILURES = frozenset({"tests_failed", "tests_regressed", "tests_disabled", "test_env_error"})
_FINAL_RUN = frozenset(s.value for s in RUN_FINAL)


@dataclass(frozen=True, slots=True)
class Verdict:
    """`state`: no_patch, testing, held, rejected, tests_failed, applied, verified, not_verified,
    verification_failed, failed or cancelled. `final`: nothing more will happen to this patch."""

    ticket: str
    state: str
    final: bool
    stage: int
    message: str
    reason: str | None = None
    report: str | None = None
    commit: str | None = None
    run_id: str | None = None
    run_status: str | None = None
    verification: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _verification(run: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    steps = run.get("steps") if run else None
    if not isinstance(steps, list):
        return []
    return [
        {"step_id": s.get("step_id"), "status": s.get("status"), "error": s.get("error")}
        for s in steps
        if isinstance(s, Mapping) and s.get("action") == "verify"
    ]


def verdict(work_order: Mapping[str, Any], run: Mapping[str, Any] | None) -> Verdict:
    """The verdict on the patch of `work_order` (the API's work order JSON), given its run's (None: no run)."""
    wo_id = str(work_order.get("work_order_id") or "")
    status = str(work_order.get("status") or "")
    result = _mapping(work_order.get("patch_result"))
    failure = _mapping(result.get("failure"))
    applied = _mapping(result.get("applied"))
    run_status = str(run.get("status")) if run and run.get("status") else None
    common: dict[str, Any] = {
        "ticket": wo_id,
        "run_id": _text(work_order.get("self_healing_run_id")),
        "run_status": run_status,
        "verification": _verification(run),
        "commit": _text(applied.get("commit")),
    }
    if status in (WorkOrderStatus.QUEUED, WorkOrderStatus.IN_PROGRESS):
        return Verdict(state="no_patch", final=False, stage=0, message="no patch was submitted yet", **common)
    if status == WorkOrderStatus.AWAITING_APPLY:
        message = "patch received: mendloop checks it, runs the tests at the base and with it, then applies it"
        return Verdict(state="testing", final=False, stage=1, message=message, **common)
    if status in (WorkOrderStatus.AWAITING_APPROVAL, WorkOrderStatus.AWAITING_MERGE):
        message = f"held ({status.replace('_', ' ')}): an operator decides before anything is applied"
        return Verdict(state="held", final=False, stage=1, message=message, **common)
    if status == WorkOrderStatus.CANCELLED:
        return Verdict(state="cancelled", final=True, stage=0, message="the work order was cancelled", **common)
    if status == WorkOrderStatus.FAILED:
        reason = _text(work_order.get("fail_reason")) or _text(failure.get("reason")) or "failed"
        detail = _text(failure.get("message"))
        if reason == "unsafe_patch":
            message = f"rejected: {detail or 'the patch failed a safety check'}"
            return Verdict(state="rejected", final=True, stage=1, message=message, reason=detail, **common)
        if reason in TEST_FAILURES:
            message = f"mendloop's test run failed ({reason}); nothing was applied"
            return Verdict(
                state="tests_failed", final=True, stage=1, message=message, reason=reason, report=detail, **common
            )
        if reason == "verification_failed":
            message = f"applied, then verification failed and the commit was reverted: {detail or reason}"
            return Verdict(state="verification_failed", final=True, stage=2, message=message, reason=detail, **common)
        message = f"the work order failed ({reason})" + (f": {detail}" if detail else "")
        return Verdict(state="failed", final=True, stage=0, message=message, reason=reason, **common)
    # Completed: applied (by mendloop, or by the agent's own account); the run's verification decides.
    if run_status == RunStatus.COMPLETED:
        message = "applied and verified: the run completed"
        return Verdict(state="verified", final=True, stage=3, message=message, **common)
    if run_status in _FINAL_RUN:
        error = _text(run.get("error")) if run else None
        message = f"applied, but the run ended {run_status}" + (f": {error}" if error else "")
        return Verdict(state="not_verified", final=True, stage=2, message=message, reason=error, **common)
    commit = common["commit"]
    where = f" as commit {commit[:12]}" if commit else ""
    message = f"applied{where}; the run deploys and verifies it"
    return Verdict(state="applied", final=False, stage=2, message=message, **common)


__all__ = ["STAGES", "TEST_FAILURES", "Verdict", "verdict"]
