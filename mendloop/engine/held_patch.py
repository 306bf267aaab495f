"""A held patch, the run's side of it: a diff that came with a `complete` is checked, tested against the base in
fresh worktrees (through the server's sandbox) and applied as one commit before the run deploys anything; if
verification then fails, the commit is reverted and the work order is marked failed (`verification_failed`).

A change the agent runner already committed (`applied_commit` in its completion) is judged on what that commit
changes, `git diff base..commit`, never on the diff the completion carries."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mendloop.agents import patch_pipeline, patch_safety
from mendloop.agents.test_suite import Cancelled, ReportSetting
from mendloop.config import PatchPolicy, TargetConfig
from mendloop.domain import work_orders as decide
from mendloop.domain.records import NewEvent, Run
from mendloop.domain.states import WorkOrderStatus
from mendloop.domain.test_command import TestCommand
from mendloop.domain.test_verdict import failing_tests_of
from mendloop.errors import Conflict, MendloopError, NotFound, PatchRejected
from mendloop.infra import git
from mendloop.infra.redact import Redactor
from mendloop.infra.sandbox import Sandbox
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


_SHA = re.compile(r"[0-9a-fA-F]{7,64}")


class HeldPatches:
    """`sandbox`: what the tests run in, or a function that finds it on first use (app.py passes
    `sandbox.detect` for uid 65534 when the server is root); None: `apply_patch`'s default, the best sandbox for
    the server's own user."""

    def __init__(
        self,
        *,
        store: Store,
        targets: Mapping[str, TargetConfig],
        sandbox: Sandbox | Callable[[], Sandbox] | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.store = store
        self.targets = targets
        self._sandbox = sandbox
        # The tests' output and a rejection's message quote what the patched code printed: redacted before the
        # work order stores them.
        self.redactor = redactor or Redactor()

    @property
    def sandbox(self) -> Sandbox | None:
        if callable(self._sandbox):
            self._sandbox = self._sandbox()
        return self._sandbox

    def _repo_and_target(self, run: Run) -> tuple[Path | None, TargetConfig | None]:
        target = self.targets.get(run.context.get("target") or "")
        wo = self.store.get_work_order(run.coding_work_order_id or "")
        repo = wo.repository or (target.repository if target else None)
        return (Path(repo) if repo else None), target

    def apply(self, run: Run, cancel: threading.Event | None = None) -> Applied:
        """Check, test and apply the held diff. Raises PatchRejected (the work order is then failed with the
        reason) when anything is unsafe or the tests fail; the repository is left untouched. `cancel` (the run's)
        stops the tests and raises test_suite.Cancelled: nothing lands, and the cancel has decided the work
        order already."""
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
            output: dict[str, Any]
            applied_commit = (wo.patch_result or {}).get("applied_commit")
            if isinstance(applied_commit, str) and applied_commit:
                output = self._judge_commit(repo, wo_id, applied_commit, constraints)
            elif patch_pipeline.is_applied(repo, diff):
                # A runner that applied its own verified patch sends the same diff: nothing to do twice, once the
                # test-runner configuration it touches is checked too (HEAD holds the patched side).
                patch_pipeline.check_patch(repo, diff, constraints, base="HEAD", applied=True)
                output = {"commit": git.head(repo), "already_applied": True}
            else:
                result = patch_pipeline.apply_patch(
                    repo,
                    diff,
                    base_commit=wo.base_commit,
                    constraints=constraints,
                    test_command=(
                        TestCommand.of(target.test_command, target.test_env, target.test_cwd)
                        if target.test_command
                        else None
                    ),
                    test_timeout=target.test_timeout,
                    message=f"{wo.description}\n\nApplied by mendloop for run {run.id}.",
                    trailers={"Work-Order": wo_id},
                    sandbox=self.sandbox,
                    report=ReportSetting.from_value(target.report),
                    failing_tests=failing_tests_of(wo.context, target.failing_tests),
                    still_wanted=lambda: self._still_held(wo_id),
                    cancel=cancel,
                )
                output = {
                    "commit": result.commit,
                    "files_changed": result.files_changed,
                    "files": list(result.summary.files),
                    "tests_passed": result.tests.passed if result.tests else None,
                    "tests_output": result.tests.output_tail if result.tests else None,
                    "tests_message": result.tests.message if result.tests else None,
                }
        except PatchRejected as exc:
            self._overrule(wo_id, exc.reason, exc.message)
            raise
        except (Conflict, Cancelled):
            raise  # decided elsewhere while the tests ran (cancelled): nothing landed, nothing to overrule
        except MendloopError as exc:
            # Not the patch's fault (a detached HEAD, an operation in progress): nothing was applied, and the held
            # work order must not wait forever for a pipeline that gave up; a human looks at the repository.
            self._overrule(wo_id, "needs_human", exc.message)
            raise
        output = self.redactor.value(output)
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

    def _judge_commit(
        self, repo: Path, wo_id: str, commit: str, constraints: patch_safety.Constraints
    ) -> dict[str, Any]:
        """The agent runner says it committed the change as `commit`: it must be on the checked-out branch and
        carry this work order's trailer, and what it changes, `git diff base..commit` with base its parent (the
        work order's base, unless the branch had moved before it landed: then the other commits are not its
        change), passes the same checks as any diff."""
        if not _SHA.fullmatch(commit) or not git.has_commit(repo, commit):
            raise PatchRejected("unsafe_patch", f"the applied commit {commit[:64]!r} is not in {repo}")
        sha = git.resolve(repo, commit)
        on_branch = git.run(repo, "merge-base", "--is-ancestor", sha, "HEAD", check=False).returncode == 0
        if not on_branch:
            raise PatchRejected("unsafe_patch", f"the applied commit {sha[:12]} is not on the checked-out branch")
        trailers = git.text(git.run(repo, "log", "-1", "--format=%(trailers:key=Work-Order,valueonly)", sha).stdout)
        if wo_id not in trailers.split():
            raise PatchRejected("unsafe_patch", f"the applied commit {sha[:12]} is not mendloop's for {wo_id}")
        parent = git.resolve(repo, f"{sha}^")
        judged = patch_pipeline.committed_diff(repo, parent, sha)
        summary = patch_pipeline.check_patch(repo, judged, constraints, base=parent)
        return {
            "commit": sha,
            "already_applied": True,
            "judged": f"{parent[:12]}..{sha[:12]}",
            "files": list(summary.files),
        }

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

    def _still_held(self, wo_id: str) -> None:
        """Right before the commit lands: the work order must still wait for it. Cancelled (or decided otherwise)
        while its tests ran, nothing lands."""
        status = self.store.get_work_order(wo_id).status
        if status is not WorkOrderStatus.AWAITING_APPLY:
            raise Conflict(f"work order {wo_id} is {status} now; its patch was not applied", id=wo_id)

    def _overrule(self, wo_id: str, reason: str, message: str) -> None:
        message = self.redactor.text(message)
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
