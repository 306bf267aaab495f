"""The statistics' arithmetic: which measures a state change moves, and the rates read back from their sums.

Each state change that a statistic counts adds delta rows in its own transaction (storage/stats.py), keyed by
(playbook, component, measure); a housekeeping job folds them into one total per key. Only changes that happen
once per run or work order are counted this way: a run's creation, its escalation, its arrival in a final state,
and a work order's creation and its moves between final states. How many runs or work orders are *live* (queued,
running ...) is counted from their tables, over the status indexes: that is bounded by what is in flight, never
by history, and it spares the claim, the hottest write, a delta row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mendloop.domain.states import RUN_FINAL, WORK_ORDER_FINAL, RunStatus, WorkOrderStatus

# A run without a component is kept under this key (a primary key column can't be NULL); it is left out of the
# per-component figures.
NO_COMPONENT = ""

RUNS = "runs"  # runs created
RUNS_ESCALATED = "runs.escalated"
RUNS_AUTO_FIXED = "runs.auto_fixed"  # completed without escalation
HEAL_SECONDS = "runs.heal_seconds"  # sum of (finished_at - created_at) over completed runs
WORK_ORDERS = "work_orders"  # work orders created
PATCH_SECONDS = "work_orders.patch_seconds"  # sum of (completed_at - created_at) over completed work orders


def run_status_measure(status: RunStatus) -> str:
    return f"runs.{status.value}"


def work_order_status_measure(status: WorkOrderStatus) -> str:
    return f"work_orders.{status.value}"


@dataclass(frozen=True, slots=True)
class Delta:
    playbook: str
    component: str
    measure: str
    delta: float


def _key(playbook: str | None, component: str | None) -> tuple[str, str]:
    return playbook or "", component or NO_COMPONENT


def run_created(
    playbook: str, component: str | None, status: RunStatus, *, escalated: bool, seconds: float
) -> list[Delta]:
    """A new run; one created already final (a circuit breaker's needs_human) is finished at once."""
    pb, comp = _key(playbook, component)
    deltas = [Delta(pb, comp, RUNS, 1)]
    if status in RUN_FINAL:
        deltas += run_finished(playbook, component, status, escalated=escalated, seconds=seconds)
    return deltas


def run_escalated(playbook: str, component: str | None) -> list[Delta]:
    """A run escalated to a coding agent: the run counts as escalated, and its work order is created."""
    pb, comp = _key(playbook, component)
    return [Delta(pb, comp, RUNS_ESCALATED, 1), Delta(pb, comp, WORK_ORDERS, 1)]


def run_finished(
    playbook: str, component: str | None, status: RunStatus, *, escalated: bool, seconds: float
) -> list[Delta]:
    """A run reached a final state (once: final states have no way out); `seconds` from its creation."""
    pb, comp = _key(playbook, component)
    deltas = [Delta(pb, comp, run_status_measure(status), 1)]
    if status is RunStatus.COMPLETED:
        deltas.append(Delta(pb, comp, HEAL_SECONDS, max(0.0, seconds)))
        if not escalated:
            deltas.append(Delta(pb, comp, RUNS_AUTO_FIXED, 1))
    return deltas


def run_moved(
    playbook: str, component: str | None, old: RunStatus, new: RunStatus, *, escalated: bool, seconds: float
) -> list[Delta]:
    if old in RUN_FINAL or new not in RUN_FINAL:
        return []
    return run_finished(playbook, component, new, escalated=escalated, seconds=seconds)


def work_order_moved(
    playbook: str | None,
    component: str | None,
    old: WorkOrderStatus,
    new: WorkOrderStatus,
    *,
    old_seconds: float | None,
    new_seconds: float | None,
) -> list[Delta]:
    """A work order changed status. Final states are counted; a completion later overruled by verification
    (completed → failed) moves its count and its patch time out of `completed`."""
    if old == new:
        return []
    pb, comp = _key(playbook, component)
    deltas: list[Delta] = []
    if old in WORK_ORDER_FINAL:
        deltas.append(Delta(pb, comp, work_order_status_measure(old), -1))
        if old is WorkOrderStatus.COMPLETED and old_seconds is not None:
            deltas.append(Delta(pb, comp, PATCH_SECONDS, -old_seconds))
    if new in WORK_ORDER_FINAL:
        deltas.append(Delta(pb, comp, work_order_status_measure(new), 1))
        if new is WorkOrderStatus.COMPLETED and new_seconds is not None:
            deltas.append(Delta(pb, comp, PATCH_SECONDS, new_seconds))
    return deltas


# -- reading them back -------------------------------------------------------------------------------------------

Sums = Mapping[str, float]  # measure -> sum


@dataclass(frozen=True, slots=True)
class Rates:
    runs: int
    finished: int
    escalated: int
    auto_fixed: int
    completed: int
    escalation_rate: float
    auto_fix_rate: float
    mean_time_to_heal_seconds: float | None


def rates(sums: Sums) -> Rates:
    """The rates of one key (everything, a playbook, a component), with the spec's definitions."""
    runs = int(sums.get(RUNS, 0))
    # A dry run fixed nothing and failed at nothing: it is left out of the rates' denominator.
    finished = int(sum(sums.get(run_status_measure(s), 0) for s in RUN_FINAL if s is not RunStatus.DRY_RUN))
    escalated = int(sums.get(RUNS_ESCALATED, 0))
    auto_fixed = int(sums.get(RUNS_AUTO_FIXED, 0))
    completed = int(sums.get(run_status_measure(RunStatus.COMPLETED), 0))
    heal = sums.get(HEAL_SECONDS, 0.0)
    dry_runs = int(sums.get(run_status_measure(RunStatus.DRY_RUN), 0))
    return Rates(
        runs=runs,
        finished=finished,
        escalated=escalated,
        auto_fixed=auto_fixed,
        completed=completed,
        # Nor in the escalation rate's: it could not have escalated.
        escalation_rate=round(escalated / real, 4) if (real := runs - dry_runs) > 0 else 0.0,
        auto_fix_rate=round(auto_fixed / finished, 4) if finished else 0.0,
        mean_time_to_heal_seconds=round(heal / completed, 3) if completed else None,
    )


def group(rows: Iterable[tuple[str, str, str, float]], by: str) -> dict[str, dict[str, float]]:
    """(playbook, component, measure, sum) rows → key → measure → sum; `by` is "all", "playbook" or
    "component" (runs without a component are left out of the last)."""
    out: dict[str, dict[str, float]] = {}
    for playbook, component, measure, value in rows:
        if by == "component" and component == NO_COMPONENT:
            continue
        key = "" if by == "all" else playbook if by == "playbook" else component
        sums = out.setdefault(key, {})
        sums[measure] = sums.get(measure, 0.0) + value
    return out


@dataclass(frozen=True, slots=True)
class Summary:
    """GET /patches/stats' figures: the spec's, and the same rates per playbook and per component."""

    overall: Rates
    runs_by_status: dict[str, int]
    work_orders: dict[str, int]  # total_work_orders, and one count per status
    average_patch_seconds: float | None
    by_playbook: dict[str, Rates]
    by_component: dict[str, Rates]


def summarize(
    rows: Iterable[tuple[str, str, str, float]], live_runs: Mapping[str, int], live_work_orders: Mapping[str, int]
) -> Summary:
    rows = list(rows)
    sums = group(rows, "all").get("", {})
    by_status = {s.value: int(sums.get(run_status_measure(s), 0)) for s in RunStatus if s in RUN_FINAL}
    by_status.update({s: int(n) for s, n in live_runs.items()})
    wo_counts = {
        s.value: int(sums.get(work_order_status_measure(s), 0)) for s in WorkOrderStatus if s in WORK_ORDER_FINAL
    }
    wo_counts.update({s: int(n) for s, n in live_work_orders.items()})
    work_orders = {"total_work_orders": int(sums.get(WORK_ORDERS, 0))}
    work_orders.update({s.value: wo_counts.get(s.value, 0) for s in WorkOrderStatus})
    completed = work_orders[WorkOrderStatus.COMPLETED.value]
    return Summary(
        overall=rates(sums),
        # Only the statuses some run has, as a GROUP BY over the runs gave them.
        runs_by_status={s.value: by_status[s.value] for s in RunStatus if by_status.get(s.value)},
        work_orders=work_orders,
        average_patch_seconds=sums.get(PATCH_SECONDS, 0.0) / completed if completed else None,
        by_playbook={k: rates(v) for k, v in sorted(group(rows, "playbook").items())},
        by_component={k: rates(v) for k, v in sorted(group(rows, "component").items())},
    )


def ended_and_escalated(
    rows: Iterable[tuple[str, str, str, float]],
) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """From the aggregates' (playbook, component, measure, value) rows: runs ended by (playbook, final status), and
    runs escalated by playbook, summed over components. Counters for /metrics that pruning never lowers."""
    ended: dict[tuple[str, str], int] = {}
    escalated: dict[str, int] = {}
    finals = {run_status_measure(s): s.value for s in RUN_FINAL}
    for playbook, _component, measure, value in rows:
        if measure in finals:
            key = (playbook, finals[measure])
            ended[key] = ended.get(key, 0) + int(value)
        elif measure == RUNS_ESCALATED:
            escalated[playbook] = escalated.get(playbook, 0) + int(value)
    return {k: v for k, v in ended.items() if v}, {k: v for k, v in escalated.items() if v}


def work_order_counts(by_status: Mapping[str, int]) -> dict[str, int]:
    """The work orders list's `stats` (total_work_orders, one count per status) from counts by status: an agent
    token's scope, which no aggregate keeps, is counted from its rows."""
    counts = {"total_work_orders": sum(int(n) for n in by_status.values())}
    counts.update({s.value: int(by_status.get(s.value, 0)) for s in WorkOrderStatus})
    return counts
