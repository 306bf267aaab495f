"""The short commands the API and CLI give: trigger a run, complete or fail a work order, approve, reject,
cancel a run. Each is one transaction; none runs a step (workers do). The decisions are `domain`'s: this module
finds what they need and hands them to storage."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from mendloop.config import Settings
from mendloop.domain import approvals, pauses, runs
from mendloop.domain import work_orders as decide
from mendloop.domain.bounded import MAX_CONTEXT_DEPTH, nesting
from mendloop.domain.pauses import Pause
from mendloop.domain.records import NewEvent, PlaybookRef, Run, WorkOrder
from mendloop.domain.states import FAIL_REASONS, WORK_ORDER_OPERATOR_HOLDS, RunStatus, WorkOrderStatus
from mendloop.domain.work_orders import Completion
from mendloop.engine.held_patch import on_patch_failure
from mendloop.errors import ConfigError, Conflict, InputError, NotFound, UnknownErrorType
from mendloop.playbooks.loader import CompiledCache, CompiledPlaybook, PlaybookSet
from mendloop.rules.routing import Routing
from mendloop.storage.store import Store


def _digest(claim: Completion) -> str:
    """What an Idempotency-Key is bound to: the request's content, whatever its field order."""
    body = json.dumps(dataclasses.asdict(claim), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


class Remediation:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        playbooks: PlaybookSet,
        compiled: CompiledCache,
        router: Routing,
        wake: Callable[[], None],
        stop_step: Callable[[str], object] = lambda _run_id: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.playbooks = playbooks
        self.compiled = compiled
        self.router = router
        self._wake = wake
        # A cancel made here stops the run's step at once when this process runs it; any other process's worker
        # pool learns of the cancel from the database within `cancel_poll_seconds`.
        self._stop_step = stop_step
        for pb in playbooks.by_id.values():
            compiled.put(pb)
            if pb.model.target and pb.model.target not in settings.targets:
                raise ConfigError(f"{pb.source}: target {pb.model.target!r} is not among the config's targets")

    def known_error_types(self) -> list[str]:
        return self.router.known_error_types()

    def playbook_for(self, error_type: str) -> CompiledPlaybook:
        ref = self.router.for_error_type(error_type)
        pb = self.playbooks.get(ref.id) if ref is not None else None
        if pb is None:
            raise UnknownErrorType(error_type, self.known_error_types())
        return pb

    def trigger(
        self,
        *,
        error_type: str,
        description: str,
        file_path: str | None = None,
        component: str | None = None,
        context: dict[str, Any] | None = None,
        playbook_id: str | None = None,
        dedupe_key: str | None = None,
        source: str = "api",
        event_type: str = "self_healing.trigger_requested",
        event_payload: dict[str, Any] | None = None,
        event_message: str | None = None,
    ) -> tuple[Run, bool]:
        if context is not None and nesting(context) >= MAX_CONTEXT_DEPTH:
            raise InputError(f"context is nested deeper than {MAX_CONTEXT_DEPTH} levels", field="context")
        if playbook_id is not None:
            found = self.playbooks.get(playbook_id)
            if found is None:
                raise InputError(
                    f"unknown playbook {playbook_id!r}; known: {', '.join(self.playbooks.ids())}",
                    field="playbook_id",
                )
            pb = found
        else:
            pb = self.playbook_for(error_type)
        payload = {
            "error_type": error_type,
            "description": description,
            **({"file_path": file_path} if file_path else {}),
            **(event_payload or {}),
        }
        columns = runs.plan(
            PlaybookRef(pb.id, pb.version, pb.document),
            error_type=error_type,
            description=description,
            component=component,
            context={**(context or {}), **({"file_path": file_path} if file_path else {})},
            event=payload,
            targets=self.settings.targets,
            default_target=self.settings.target_for(None),
            dry_run=self.settings.control.dry_run,
        )
        trigger = NewEvent(
            type=event_type,
            message=event_message or f"Self-healing detected {error_type.replace('_', ' ')}: {description}",
            source=source,
            payload=payload,
            component=columns["component"],
        )
        run, created = self.store.create_run(**columns, trigger=trigger, dedupe_key=dedupe_key)
        if created:
            self._wake()
        return run, created

    # -- work orders ----------------------------------------------------------------------------------------

    def complete_work_order(
        self,
        wo_id: str,
        *,
        tests_passed: bool,
        files_changed: int | None,
        diff_url: str | None,
        diff: str | None = None,
        summary: str | None = None,
        extra: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        lease_id: str | None = None,
        approval_required: bool = False,
        branch: str | None = None,
        release_hold: bool = False,
    ) -> dict[str, Any]:
        """The agent's claim. It is never proof: with tests passed the run is requeued to deploy, rerun and verify,
        and verification decides. With tests failed the work order fails and the run stops as its playbook says."""
        wo = self.store.get_work_order(wo_id)
        claim = Completion(
            tests_passed=tests_passed,
            files_changed=files_changed,
            diff_url=diff_url,
            diff=diff,
            summary=summary,
            extra=dict(extra or {}),
            lease_id=lease_id,
            approval_required=approval_required,
            branch=branch,
            release_hold=release_hold,
        )
        # Without a repository to apply it to, a diff is kept and the claim goes to verification as it is.
        has_repository = self._repository_of(wo) is not None
        on_failure = self._patch_failure_status(wo)
        transition, _ = self.store.work_orders.change(
            wo_id,
            lambda wo, run, now: decide.complete(
                wo, run, claim, has_repository=has_repository, on_failure=on_failure, now=now
            ),
            idempotency_key=idempotency_key,
            request=_digest(claim),
        )
        if transition.changed and tests_passed:
            self._wake()
        assert transition.answer is not None
        return transition.answer

    def approve(self, wo_id: str) -> dict[str, Any]:
        """An operator approves a held, verified patch: it goes through the patch pipeline and the run resumes."""
        wo = self._held(wo_id, WorkOrderStatus.AWAITING_APPROVAL, "approval")
        result = wo.patch_result or {}
        try:
            diff: str | None = self.store.get_diff(wo_id)
        except NotFound:
            diff = None
        return self.complete_work_order(
            wo_id,
            tests_passed=True,
            files_changed=result.get("files_changed"),
            diff_url=result.get("diff_url"),
            diff=diff,
            extra={"approved": True},
            release_hold=True,
        )

    def merged(self, wo_id: str) -> dict[str, Any]:
        """An operator merged the review branch: the run resumes to deploy and verify, and verification decides."""
        wo = self._held(wo_id, WorkOrderStatus.AWAITING_MERGE, "a merge")
        result = wo.patch_result or {}
        return self.complete_work_order(
            wo_id,
            tests_passed=True,
            files_changed=result.get("files_changed"),
            diff_url=result.get("diff_url"),
            extra={"merged": True, "branch": result.get("branch")},
            release_hold=True,
        )

    def reject(self, wo_id: str, reason: str) -> WorkOrder:
        self._held(wo_id, None, "an operator")
        return self._change(wo_id, lambda wo, run, now: decide.reject(wo, run, reason=reason, now=now))

    def _held(self, wo_id: str, status: WorkOrderStatus | None, what: str) -> WorkOrder:
        wo = self.store.get_work_order(wo_id)
        held = wo.status in WORK_ORDER_OPERATOR_HOLDS if status is None else wo.status is status
        if not held:
            raise Conflict(f"work order {wo_id} is not waiting for {what}", id=wo_id, status=str(wo.status))
        return wo

    def _repository_of(self, wo: WorkOrder) -> str | None:
        if wo.repository:
            return wo.repository
        target = self.settings.targets.get(wo.component or "")
        return target.repository if target else None

    def _change(self, wo_id: str, decision: Callable[[WorkOrder, Run | None, float], decide.Transition]) -> WorkOrder:
        return self.store.work_orders.change(wo_id, decision)[1]

    # -- the pull API -----------------------------------------------------------------------------------------

    def claim_work_order(
        self, agent_id: str, repository: str | None, repositories: Sequence[str] | None = None
    ) -> WorkOrder | None:
        """`repositories`: the claiming token's scope (None: any repository)."""
        return self.store.work_orders.claim(
            agent_id,
            repository=repository,
            lease_seconds=self.settings.agent_lease_seconds,
            repositories=repositories,
        )

    def heartbeat(self, wo_id: str, lease_id: str, note: str | None) -> WorkOrder:
        return self.store.work_orders.heartbeat(
            wo_id, lease_id, note=note, lease_seconds=self.settings.agent_lease_seconds
        )

    def fail_work_order(
        self, wo_id: str, *, lease_id: str | None, reason: str, retryable: bool, details: dict[str, Any]
    ) -> WorkOrder:
        if reason not in FAIL_REASONS:
            raise InputError(f"unknown reason {reason!r}; known: {', '.join(FAIL_REASONS)}", field="reason")
        wo = self.store.get_work_order(wo_id)
        if wo.status not in (WorkOrderStatus.QUEUED, WorkOrderStatus.IN_PROGRESS):
            raise Conflict(f"work order {wo_id} is {wo.status}; it cannot fail", id=wo_id, status=str(wo.status))
        run_status = self._patch_failure_status(wo)
        return self._change(
            wo_id,
            lambda wo, run, now: decide.give_up(
                wo,
                run,
                lease_id=lease_id,
                reason=reason,
                retryable=retryable,
                details=details,
                run_status=run_status,
                now=now,
            ),
        )

    def reap(self) -> list[str]:
        return self.store.work_orders.reap(
            lambda wo, run, now: decide.reap(wo, run, run_status=RunStatus.NEEDS_HUMAN, now=now)
        )

    def _patch_failure_status(self, wo: WorkOrder) -> RunStatus:
        """What the escalating step says to do when the patch fails (`with.on_patch_failure`): `fail`, or a
        human (the default)."""
        if not wo.self_healing_run_id:
            return RunStatus.NEEDS_HUMAN
        try:
            run = self.store.get_run(wo.self_healing_run_id)
        except NotFound:
            return RunStatus.NEEDS_HUMAN
        pb = self.compiled.get(run.playbook_id, run.playbook_version, run.playbook)
        return RunStatus.FAILED if on_patch_failure(pb) == "fail" else RunStatus.NEEDS_HUMAN

    # -- approvals of runs -------------------------------------------------------------------------------------

    def approve_run(self, run_id: str, comment: str | None = None, by: str = "operator") -> Run:
        """Approve what the run waits for: its approval step or trust gate, or the patch its work order holds for
        approval (the work order's own approve)."""
        wo_id = self._held_patch_of(run_id)
        if wo_id is not None:
            self.approve(wo_id)
            return self.store.get_run(run_id)
        run = self.store.approvals.decide(
            run_id, lambda run, now: approvals.decide(run, approved=True, by=by, comment=comment, now=now)
        )
        self._wake()
        return run

    def reject_run(self, run_id: str, comment: str | None = None, by: str = "operator") -> Run:
        wo_id = self._held_patch_of(run_id)
        if wo_id is not None:
            self.reject(wo_id, comment or "rejected")
            return self.store.get_run(run_id)
        run = self.store.approvals.decide(
            run_id, lambda run, now: approvals.decide(run, approved=False, by=by, comment=comment, now=now)
        )
        self._drop_held_patch(run, comment or "rejected")
        return run

    def _drop_held_patch(self, run: Run, why: str) -> None:
        """A run stopped at the trust gate of its patch apply: its work order's diff will never be applied, so the
        work order fails too (left `awaiting_apply`, it would look open for ever)."""
        if run.status not in (RunStatus.NEEDS_HUMAN, RunStatus.FAILED) or not run.coding_work_order_id:
            return
        if self.store.get_work_order(run.coding_work_order_id).status is not WorkOrderStatus.AWAITING_APPLY:
            return
        self._change(
            run.coding_work_order_id,
            lambda wo, run, now: decide.overrule(
                wo, run, reason="needs_human", details={"message": f"its apply was not approved: {why}"}, now=now
            ),
        )

    def _held_patch_of(self, run_id: str) -> str | None:
        run = self.store.get_run(run_id)
        if run.status is RunStatus.AWAITING_PATCH and run.coding_work_order_id:
            wo = self.store.get_work_order(run.coding_work_order_id)
            if wo.status is WorkOrderStatus.AWAITING_APPROVAL:
                return wo.id
        return None

    def reap_approvals(self) -> list[str]:
        """Approvals past their deadline: each run's `on_timeout` decides."""
        due = self.store.approvals.due()
        for run_id in due:
            run = self.store.approvals.decide(run_id, lambda run, now: approvals.time_out(run, now=now))
            self._drop_held_patch(run, "no decision before the deadline")
        if due:
            self._wake()
        return due

    # -- pauses ---------------------------------------------------------------------------------------------

    def pause(self, component: str | None, reason: str, by: str = "operator") -> Pause:
        """No queued run of the component (None: of any) is claimed until it is resumed; detections still open
        incidents and queue their runs, so nothing is lost."""
        return self.store.pauses.pause(pauses.scope_of(component), reason, by)

    def resume(self, component: str | None, by: str = "operator") -> list[Pause]:
        """Lift the component's pause (None: every pause); the held runs start."""
        lifted = self.store.pauses.resume(pauses.scope_of(component) if component is not None else None, by)
        if lifted:
            self._wake()
        return lifted

    def retry_run(self, run_id: str, from_step: str) -> Run:
        """A new run of a failed one from a chosen step, with the earlier steps' outputs; the workers take it."""
        run = self.store.retry_run(run_id, from_step)
        self._wake()
        return run

    def cancel_run(self, run_id: str, reason: str = "cancelled by an operator") -> Run:
        cancelled = self.store.cancel_run(run_id, reason)
        self._stop_step(run_id)
        return cancelled


__all__ = ["Remediation"]
