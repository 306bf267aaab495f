"""The short commands the API and CLI give: trigger a run, complete or fail a work order, cancel a run.
Each is one transaction; none runs a step (workers do)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mendloop.config import Settings
from mendloop.domain.records import NewEvent, Run, WorkOrder
from mendloop.domain.states import FAIL_REASONS, RunStatus, WorkOrderStatus
from mendloop.errors import ConfigError, Conflict, InputError, NotFound, UnknownErrorType
from mendloop.playbooks.loader import CompiledCache, CompiledPlaybook, PlaybookSet
from mendloop.storage.queue import WorkOrderQueue
from mendloop.storage.store import APPROVAL_OWNER, MERGE_OWNER, Store


class Remediation:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        playbooks: PlaybookSet,
        compiled: CompiledCache,
        wake: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = WorkOrderQueue(store)
        self.playbooks = playbooks
        self.compiled = compiled
        self._wake = wake
        self.routing = settings.routing_table()
        missing = {e: p for e, p in self.routing.items() if playbooks.get(p) is None}
        if missing:
            error_type, missing_id = next(iter(missing.items()))
            raise ConfigError(
                f"routing.{error_type}: no playbook {missing_id!r} is loaded", field=f"routing.{error_type}"
            )
        for pb in playbooks.by_id.values():
            compiled.put(pb)
            if pb.model.target and pb.model.target not in settings.targets:
                raise ConfigError(f"{pb.source}: target {pb.model.target!r} is not among the config's targets")

    def known_error_types(self) -> list[str]:
        return sorted(self.routing)

    def playbook_for(self, error_type: str) -> CompiledPlaybook:
        pb_id = self.routing.get(error_type)
        if pb_id is None:
            raise UnknownErrorType(error_type, self.known_error_types())
        pb = self.playbooks.get(pb_id)
        assert pb is not None  # checked at construction
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
        target = self._target(pb, component)
        component = component or target
        payload = {
            "error_type": error_type,
            "description": description,
            **({"file_path": file_path} if file_path else {}),
            **(event_payload or {}),
        }
        run_context: dict[str, Any] = {
            **(context or {}),
            "error_type": error_type,
            "description": description,
            "target": target,
            "event": payload,
        }
        if file_path:
            run_context["file_path"] = file_path
        trigger = NewEvent(
            type=event_type,
            message=event_message or f"Self-healing detected {error_type.replace('_', ' ')}: {description}",
            source=source,
            payload=payload,
            component=component,
        )
        run, created = self.store.create_run(
            playbook=pb.document,
            playbook_version=pb.version,
            component=component,
            error_type=error_type,
            description=description,
            context=run_context,
            trigger=trigger,
            dedupe_key=dedupe_key,
            message=f"Running playbook: {pb.id}",
        )
        if created:
            self._wake()
        return run, created

    def _target(self, pb: CompiledPlaybook, component: str | None) -> str | None:
        if component and component in self.settings.targets:
            return component
        return pb.model.target or self.settings.target_for(None)

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
        if wo.status in (WorkOrderStatus.FAILED, WorkOrderStatus.CANCELLED):
            raise Conflict(
                f"work order {wo_id} is {wo.status}; it cannot be completed", id=wo_id, status=str(wo.status)
            )
        patch_result: dict[str, Any] = {
            "tests_passed": tests_passed,
            "files_changed": files_changed,
            "diff_url": diff_url or (f"/patches/diffs/{wo_id}.diff" if diff else None),
            **({"summary": summary} if summary else {}),
            **(extra or {}),
        }
        on_failure = self._patch_failure_status(wo)
        # A diff is checked, tested and applied by the run's patch pipeline before anything is deployed; without
        # a repository to apply it to, it is kept and the agent's claim goes to verification as it is.
        hold = bool(diff) and tests_passed and self._repository_of(wo) is not None
        # A patch waiting for an operator (approval, or a review branch to merge) parks the work order; the run
        # stays parked too until the operator acts.
        hold_owner = None
        if tests_passed and not release_hold:
            if branch:
                hold_owner, hold = MERGE_OWNER, False
                patch_result["branch"] = branch
            elif approval_required:
                hold_owner, hold = APPROVAL_OWNER, False

        def events(updated: WorkOrder, run: Run | None) -> list[NewEvent]:
            common: dict[str, Any] = {
                "run_id": updated.self_healing_run_id,
                "work_order_id": wo_id,
                "component": updated.component,
            }
            files = (
                f"{files_changed} file{'s' if files_changed != 1 else ''} changed"
                if files_changed is not None
                else "files changed: not reported"
            )
            if tests_passed:
                out = [
                    NewEvent(
                        type="coding_agent.work_order_updated",
                        message=f"Work order {wo_id} completed by the coding agent ({files})",
                        payload={"status": updated.status.value, "patch_result": patch_result},
                        **common,
                    ),
                ]
                if diff:
                    out.append(
                        NewEvent(
                            type="coding_agent.patch_generated",
                            message=f"Patch for {wo_id} stored ({files})",
                            payload={"diff_url": patch_result["diff_url"]},
                            **common,
                        )
                    )
                out.append(
                    NewEvent(
                        type="coding_agent.tests_passed",
                        message=f"Coding agent reports tests passed for {wo_id}",
                        payload={"files_changed": files_changed},
                        **common,
                    )
                )
                if run is not None:
                    out.append(
                        NewEvent(
                            type="self_healing.patch_applied",
                            message=f"Code patch applied ({files}). Running verification...",
                            payload={"work_order_id": wo_id, "files_changed": files_changed},
                            **common,
                        )
                    )
                return out
            out = [
                NewEvent(
                    type="coding_agent.work_order_updated",
                    message=f"Work order {wo_id} failed: the coding agent's tests did not pass",
                    payload={"status": updated.status.value, "patch_result": patch_result},
                    **common,
                )
            ]
            if run is not None:
                out.append(
                    NewEvent(
                        type="self_healing.completed",
                        message=f"Run {run.id} → {on_failure.value}: work order {wo_id} failed (tests failed)",
                        payload={
                            "status": on_failure.value,
                            "playbook_id": run.playbook_id,
                            "escalated": True,
                        },
                        **common,
                    )
                )
            return out

        def answer(updated: WorkOrder) -> dict[str, Any]:
            return {
                "success": True,
                "work_order_id": updated.id,
                "status": updated.status.value,
                "self_healing_run_id": updated.self_healing_run_id,
                "patch_result": updated.patch_result,
                "message": _complete_message(updated, on_failure),
            }

        response, changed = self.store.finish_work_order(
            wo_id,
            succeeded=tests_passed,
            patch_result=patch_result,
            fail_reason=None if tests_passed else "tests_failed",
            run_status_on_failure=on_failure,
            diff=diff,
            events=events,
            idempotency_key=idempotency_key,
            answer=answer,
            lease_id=lease_id,
            hold_for_patch=hold,
            hold_owner=hold_owner,
            release_hold=release_hold,
        )
        if changed and tests_passed:
            self._wake()
        return response

    def approve(self, wo_id: str) -> dict[str, Any]:
        """An operator approves a held, verified patch: it goes through the patch pipeline and the run resumes."""
        wo = self._held(wo_id, APPROVAL_OWNER, "approval")
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
        wo = self._held(wo_id, MERGE_OWNER, "a merge")
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
        return self.queue.fail(
            wo_id,
            lease_id=None,
            reason="needs_human",
            retryable=False,
            details={"message": f"rejected by an operator: {reason}"},
            run_status=RunStatus.NEEDS_HUMAN,
        )

    def _held(self, wo_id: str, owner: str | None, what: str) -> WorkOrder:
        wo = self.store.get_work_order(wo_id)
        held = wo.lease_owner in (APPROVAL_OWNER, MERGE_OWNER) if owner is None else wo.lease_owner == owner
        if wo.status is not WorkOrderStatus.IN_PROGRESS or not held:
            raise Conflict(f"work order {wo_id} is not waiting for {what}", id=wo_id, status=str(wo.status))
        return wo

    def _repository_of(self, wo: WorkOrder) -> str | None:
        if wo.repository:
            return wo.repository
        target = self.settings.targets.get(wo.component or "")
        return target.repository if target else None

    # -- the pull API -----------------------------------------------------------------------------------------

    def claim_work_order(self, agent_id: str, repository: str | None) -> WorkOrder | None:
        return self.queue.claim(agent_id, repository=repository, lease_seconds=self.settings.agent_lease_seconds)

    def heartbeat(self, wo_id: str, lease_id: str, note: str | None) -> WorkOrder:
        return self.queue.heartbeat(wo_id, lease_id, note=note, lease_seconds=self.settings.agent_lease_seconds)

    def fail_work_order(
        self, wo_id: str, *, lease_id: str | None, reason: str, retryable: bool, details: dict[str, Any]
    ) -> WorkOrder:
        if reason not in FAIL_REASONS:
            raise InputError(f"unknown reason {reason!r}; known: {', '.join(FAIL_REASONS)}", field="reason")
        wo = self.store.get_work_order(wo_id)
        if wo.status not in (WorkOrderStatus.QUEUED, WorkOrderStatus.IN_PROGRESS):
            raise Conflict(f"work order {wo_id} is {wo.status}; it cannot fail", id=wo_id, status=str(wo.status))
        return self.queue.fail(
            wo_id,
            lease_id=lease_id,
            reason=reason,
            retryable=retryable,
            details=details,
            run_status=self._patch_failure_status(wo),
        )

    def reap(self) -> list[str]:
        return self.queue.reap()

    def _patch_failure_status(self, wo: WorkOrder) -> RunStatus:
        """What the escalating step says to do when the patch fails (`with.on_patch_failure`): `fail`, or a
        human (the default)."""
        if not wo.self_healing_run_id:
            return RunStatus.NEEDS_HUMAN
        try:
            run = self.store.get_run(wo.self_healing_run_id)
        except Exception:
            return RunStatus.NEEDS_HUMAN
        pb = self.compiled.get(run.playbook_id, run.playbook_version, run.playbook)
        for cs in pb.steps:
            if cs.step.action == "escalate" and cs.step.params.get("on_patch_failure") == "fail":
                return RunStatus.FAILED
        return RunStatus.NEEDS_HUMAN

    def cancel_run(self, run_id: str, reason: str = "cancelled by an operator") -> Run:
        return self.store.cancel_run(run_id, reason)


def _complete_message(wo: WorkOrder, on_failure: RunStatus) -> str:
    run = wo.self_healing_run_id
    if wo.lease_owner == APPROVAL_OWNER:
        return f"Work order {wo.id}: verified patch held until an operator approves it (run {run} waits)"
    if wo.lease_owner == MERGE_OWNER:
        return f"Work order {wo.id}: review branch waits until an operator marks it merged (run {run} waits)"
    if wo.status is WorkOrderStatus.IN_PROGRESS:
        return f"Work order {wo.id}: patch received; run {run} checks, tests and applies it, then deploys and verifies"
    if wo.status is WorkOrderStatus.COMPLETED:
        return f"Work order {wo.id} completed; run {run} resumes to deploy and verify"
    return f"Work order {wo.id} failed; run {run} → {on_failure.value}"
