"""A held patch, the run's side of it: a diff that came with a `complete` is checked, tested in a fresh
worktree and applied as one commit before the run deploys anything; if verification then fails, the commit is
reverted and the work order is marked failed (`verification_failed`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mendloop.agents import patch_pipeline, patch_safety
from mendloop.config import PatchPolicy, TargetConfig
from mendloop.domain import work_orders as decide
from mendloop.domain.records import NewEvent, Run
from mendloop.domain.states import WorkOrderStatus
from mendloop.errors import MendloopError, NotFound, PatchRejected
from mendloop.infra import git
from mendloop.playbooks.loader import CompiledPlaybook
from mendloop.storage.store import Store

log = logging.getLogger(__name__)


def constraints_for(policy: PatchPolicy) -> patch_safety.Constraints:
    return patch_safety.Constraints(
        allowed_paths=tuple(policy.allowed_paths),
        forbidden_paths=(*patch_safety.DEFAULT_FORBIDDEN, *policy.forbidden_paths),
        max_files=policy.max_files,
        max_changed_lines=policy.max_changed_lines,
        tests_may_change=policy.tests_may_change,
        test_config_allowed=tuple(policy.test_config_allowed),
    )


def on_patch_failure(pb: CompiledPlaybook) -> str:
    """The escalating step's `on_patch_failure`: `needs_human` (the default) or `fail`."""
    for cs in pb.steps:
        if cs.step.action == "escalate":
            return str(cs.step.params.get("on_patch_failure", "needs_human"))
    return "needs_human"


@dataclass(frozen=True, slots=True)
class Applied:
    output: dict[str, Any]
    events: list[NewEvent]


class HeldPatches:
    def __init__(self, *, store: Store, targets: Mapping[str, TargetConfig]) -> None:
        self.store = store
        self.targets = targets

    def _repo_and_target(self, run: Run) -> tuple[Path | None, TargetConfig | None]:
        target = self.targets.get(run.context.get("target") or "")
        wo = self.store.get_work_order(run.coding_work_order_id or "")
        repo = wo.repository or (target.repository if target else None)
        return (Path(repo) if repo else None), target

    def apply(self, run: Run) -> Applied:
        """Check, test and apply the held diff. Raises PatchRejected (the work order is then failed with the
        reason) when anything is unsafe or the tests fail; the repository is left untouched."""
        wo_id = run.coding_work_order_id or ""
        wo = self.store.get_work_order(wo_id)
        repo, target = self._repo_and_target(run)
        try:
            diff = self.store.get_diff(wo_id)
        except NotFound:
            raise PatchRejected("agent_error", f"work order {wo_id} has no stored diff") from None
        if repo is None or target is None:
            raise PatchRejected("unsafe_patch", f"no repository configured for target {run.context.get('target')!r}")
        constraints = constraints_for(target.patch)
        try:
            # The safety checks come first, before any shortcut: a diff with no content change (mode-only,
            # context-only hunks) reverse-applies to any tree and would otherwise count as applied and tested.
            patch_pipeline.check_patch(repo, diff, constraints)
            if patch_pipeline.is_applied(repo, diff):
                # A runner that applied its own verified patch sends the same diff: nothing to do twice, once the
                # test-runner configuration it touches is checked too (HEAD holds the patched side).
                patch_pipeline.check_patch(repo, diff, constraints, base="HEAD", applied=True)
                output: dict[str, Any] = {"commit": git.head(repo), "already_applied": True}
            else:
                result = patch_pipeline.apply_patch(
                    repo,
                    diff,
                    base_commit=wo.base_commit,
                    constraints=constraints,
                    test_command=target.test_command,
                    test_timeout=target.test_timeout,
                    message=f"{wo.description}\n\nApplied by mendloop for run {run.id}.",
                    trailers={"Work-Order": wo_id},
                )
                output = {
                    "commit": result.commit,
                    "files_changed": result.files_changed,
                    "files": list(result.summary.files),
                    "tests_passed": result.tests.passed if result.tests else None,
                    "tests_output": result.tests.output_tail if result.tests else None,
                }
        except PatchRejected as exc:
            self._overrule(wo_id, exc.reason, exc.message)
            raise
        except MendloopError as exc:
            # Not the patch's fault (a detached HEAD, an operation in progress): nothing was applied, and the held
            # work order must not wait forever for a pipeline that gave up; a human looks at the repository.
            self._overrule(wo_id, "needs_human", exc.message)
            raise
        self.store.work_orders.change(wo_id, lambda wo, _run, now: decide.settle(wo, applied=output, now=now))
        files = output.get("files_changed")
        events: list[NewEvent] = []
        if output.get("already_applied"):
            # The agent runner checked, tested and committed it itself; there was nothing left to test or apply.
            applied = f"Code patch already applied by the agent runner as commit {str(output['commit'])[:12]}"
        else:
            events.append(
                NewEvent(
                    type="coding_agent.tests_passed",
                    message=f"mendloop's own test run passed for {wo_id}"
                    if output.get("tests_passed")
                    else f"No test command configured for {run.context.get('target')}; applying {wo_id} untested",
                    payload={"work_order_id": wo_id, "tests_passed": output.get("tests_passed")},
                    run_id=run.id,
                    work_order_id=wo_id,
                    component=run.component,
                )
            )
            applied = f"Code patch applied as commit {str(output['commit'])[:12]}" + (
                f" ({files} file{'s' if files != 1 else ''} changed)" if files is not None else ""
            )
        events.append(
            NewEvent(
                type="self_healing.patch_applied",
                message=applied,
                payload={"work_order_id": wo_id, **output},
                run_id=run.id,
                work_order_id=wo_id,
                component=run.component,
            )
        )
        return Applied(output=output, events=events)

    def overrule(self, run: Run, reason: str) -> list[NewEvent]:
        """Verification failed after a patch: revert the commit mendloop applied and fail the work order."""
        wo_id = run.coding_work_order_id
        if not wo_id:
            return []
        events: list[NewEvent] = []
        applied = run.outputs.get("apply_patch") or {}
        commit = applied.get("commit")
        repo, _ = self._repo_and_target(run)
        if commit and repo is not None and not applied.get("reverted"):
            try:
                revert = patch_pipeline.revert(repo, str(commit), trailers={"Work-Order": wo_id})
                events.append(
                    NewEvent(
                        type="self_healing.patch_reverted",
                        message=f"Patch reverted (commit {revert[:12]} reverts {str(commit)[:12]}): {reason}",
                        payload={"work_order_id": wo_id, "commit": commit, "revert_commit": revert},
                        run_id=run.id,
                        work_order_id=wo_id,
                        component=run.component,
                    )
                )
            except MendloopError as exc:
                log.error("could not revert %s in %s: %s", commit, repo, exc.message)
                events.append(
                    NewEvent(
                        type="self_healing.patch_reverted",
                        message=f"Could not revert commit {str(commit)[:12]}: {exc.message}",
                        payload={"work_order_id": wo_id, "commit": commit, "error": exc.message},
                        run_id=run.id,
                        work_order_id=wo_id,
                        component=run.component,
                    )
                )
        self._overrule(wo_id, "verification_failed", reason)
        return events

    def _overrule(self, wo_id: str, reason: str, message: str) -> None:
        self.store.work_orders.change(
            wo_id,
            lambda wo, run, now: decide.overrule(wo, run, reason=reason, details={"message": message}, now=now),
        )

    def pending(self, run: Run) -> bool:
        """The run's work order holds a diff for the patch pipeline (`awaiting_apply`), not applied yet."""
        if not (run.escalated and run.coding_work_order_id) or "apply_patch" in run.outputs:
            return False
        return self.store.get_work_order(run.coding_work_order_id).status is WorkOrderStatus.AWAITING_APPLY


__all__: list[str] = ["Applied", "HeldPatches", "constraints_for", "on_patch_failure"]
