"""Advances one leased run, step by step. Each step's outcome is committed before the next step starts; a step
that was in flight when its worker died runs again with the same idempotency key (`run_id:step_id:attempt`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from mendloop.agents import context as agent_context
from mendloop.agents.redact import Redactor
from mendloop.config import TargetConfig, WorkOrderPolicy
from mendloop.domain.records import NewEvent, Run
from mendloop.domain.states import RunStatus, StepStatus
from mendloop.engine.patching import Patching
from mendloop.errors import ActionError, PatchRejected
from mendloop.playbooks.actions.base import ActionContext
from mendloop.playbooks.actions.capability import Capabilities
from mendloop.playbooks.actions.registry import ACTIONS
from mendloop.playbooks.loader import CompiledCache, CompiledPlaybook, CompiledStep
from mendloop.playbooks.templates import TemplateRenderError
from mendloop.storage.store import StepOutcome, Store, TrustMove
from mendloop.trust import TrustReason

log = logging.getLogger(__name__)

# A goto loop is stopped after this many jumps in one run.
MAX_GOTOS = 20


@dataclass
class RunnerDeps:
    store: Store
    capabilities: Capabilities
    compiled: CompiledCache
    http: httpx.Client
    lease_seconds: float
    clock: Callable[[], float]
    rnd: random.Random
    targets: Mapping[str, TargetConfig]
    redactor: Redactor
    patching: Patching


class Runner:
    def __init__(self, deps: RunnerDeps) -> None:
        self.d = deps

    def advance(self, run: Run, owner: str) -> None:
        """Run steps until the run finishes, parks (escalation, sleep, backoff) or the lease is lost."""
        pb = self.d.compiled.get(run.playbook_id, run.playbook_version, run.playbook)
        current: Run | None = run
        while current is not None and current.status in (RunStatus.RUNNING, RunStatus.VERIFYING):
            if _patch_pending(current):
                current = self._apply_patch(current, pb, owner)
                continue
            current = self._step(current, pb, owner)

    def _apply_patch(self, run: Run, pb: CompiledPlaybook, owner: str) -> Run | None:
        """The agent's diff, checked, tested and committed before the playbook deploys anything."""
        started = self.d.clock()
        key = f"{run.id}:apply_patch:1"

        def outcome(status: StepStatus, output: dict[str, Any], error: str | None) -> StepOutcome:
            return StepOutcome(run.step_index, "apply_patch", "apply_patch", 1, status, started, output, error, key)

        try:
            applied = self.d.patching.apply(run)
        except PatchRejected as exc:
            status = RunStatus.FAILED if _on_patch_failure(pb) == "fail" else RunStatus.NEEDS_HUMAN
            return self._finish(
                run,
                owner,
                status,
                f"patch rejected ({exc.reason}): {exc.message}",
                outcome(StepStatus.FAILED, {"reason": exc.reason}, exc.message),
                changes={"outputs": {**run.outputs, "apply_patch": {"rejected": exc.reason, "message": exc.message}}},
            )
        return self.d.store.advance(
            run,
            owner,
            outcome=outcome(StepStatus.SUCCEEDED, applied.output, None),
            changes={"outputs": {**run.outputs, "apply_patch": applied.output}},
            events=applied.events,
            lease_seconds=self.d.lease_seconds,
        )

    # -- one step -------------------------------------------------------------------------------------------

    def _step(self, run: Run, pb: CompiledPlaybook, owner: str) -> Run | None:
        if run.step_index >= len(pb.steps):
            return self._finish(run, owner, RunStatus.COMPLETED, None, None)
        cs = pb.steps[run.step_index]
        step = cs.step
        attempt = run.attempt + 1
        key = f"{run.id}:{step.id}:{attempt}"
        started = self.d.clock()
        scope = self._scope(run)
        try:
            if cs.when is not None and not cs.when(scope):
                return self._advance_to(
                    run,
                    owner,
                    pb,
                    run.step_index + 1,
                    _outcome(cs, run, attempt, started, key, StepStatus.SKIPPED, {}, None),
                    {},
                )
            if step.action == "escalate":
                return self._escalate(run, owner, cs, attempt, started, key, scope, failure=None)
            if step.action == "sleep":
                return self._sleep(run, owner, pb, cs, attempt, started, key, scope)
            params = cs.params(scope)
            ctx = ActionContext(
                run_id=run.id,
                step_id=step.id,
                attempt=attempt,
                idempotency_key=key,
                timeout=step.timeout,
                target=run.context.get("target"),
                http=self.d.http,
            )
            if step.action == "verify":
                output = self._verify(cs, params, ctx, scope)
            elif step.action == "capability":
                output = self.d.capabilities.call(str(params["name"]), params.get("args") or {}, ctx, step.timeout)
            else:
                output = ACTIONS[step.action](params, ctx)
        except (ActionError, TemplateRenderError) as exc:
            err = exc if isinstance(exc, ActionError) else ActionError(str(exc), retryable=False)
            return self._failed(run, owner, pb, cs, attempt, started, key, scope, err)
        trust = None
        events: list[NewEvent] = []
        if step.action == "verify" and run.component:
            trust = TrustMove(run.component, TrustReason.VERIFIED_FIX)
        return self._advance_to(
            run,
            owner,
            pb,
            run.step_index + 1,
            _outcome(cs, run, attempt, started, key, StepStatus.SUCCEEDED, output, None),
            {"outputs": {**run.outputs, step.id: output}, "pending": {}},
            events=events,
            trust=trust,
        )

    def _verify(
        self, cs: CompiledStep, params: dict[str, Any], ctx: ActionContext, scope: dict[str, Any]
    ) -> dict[str, Any]:
        check = params["check"]
        try:
            if "capability" in check:
                result = self.d.capabilities.call(
                    str(check["capability"]), check.get("args") or {}, ctx, cs.step.timeout
                )
            elif "http" in check:
                result = ACTIONS["http"](dict(check["http"]), ctx)
            else:
                result = ACTIONS["command"](dict(check["command"]), ctx)
        except ActionError as exc:
            # A check that answered (an exit code, a status) is judged by the criteria; one that could not run
            # at all (refused connection, missing program) is a failure to check, not a failed verification.
            if not exc.output:
                raise ActionError(f"verification check failed: {exc.message}", retryable=exc.retryable) from exc
            result = exc.output
        assert cs.expect is not None
        passed = cs.expect({**scope, "result": result})
        output = {"passed": bool(passed), "result": result}
        if not passed:
            raise ActionError(
                f"verification failed: {params.get('describe') or 'success criteria not met'}", output=output
            )
        return output

    def _sleep(
        self,
        run: Run,
        owner: str,
        pb: CompiledPlaybook,
        cs: CompiledStep,
        attempt: int,
        started: float,
        key: str,
        scope: dict[str, Any],
    ) -> Run | None:
        now = self.d.clock()
        until = run.pending.get("sleep_until")
        if until is None:
            seconds = float(cs.params(scope)["seconds"])
            until = now + max(0.0, seconds)
            if until > now:
                # Park without holding a thread; the worker that picks the run up after `until` finishes the step.
                return self.d.store.advance(
                    run,
                    owner,
                    outcome=None,
                    changes={
                        "status": RunStatus.QUEUED.value,
                        "pending": {"sleep_until": until},
                        "next_run_at": until,
                    },
                    lease_seconds=self.d.lease_seconds,
                )
        elif now < float(until):
            return self.d.store.advance(
                run,
                owner,
                outcome=None,
                changes={"status": RunStatus.QUEUED.value, "next_run_at": float(until)},
                lease_seconds=self.d.lease_seconds,
            )
        output = {"slept_until": until}
        return self._advance_to(
            run,
            owner,
            pb,
            run.step_index + 1,
            _outcome(cs, run, attempt, started, key, StepStatus.SUCCEEDED, output, None),
            {"outputs": {**run.outputs, cs.step.id: output}, "pending": {}},
        )

    def _escalate(
        self,
        run: Run,
        owner: str,
        cs: CompiledStep,
        attempt: int,
        started: float,
        key: str,
        scope: dict[str, Any],
        failure: ActionError | None,
    ) -> Run | None:
        params = cs.params(scope) if cs.step.action == "escalate" else {}
        error_type = run.error_type or "unknown"
        description = str(params.get("description") or f"Code patch required for: {error_type}")
        target_name = run.context.get("target")
        target = self.d.targets.get(target_name) if target_name else None
        failed = {"id": cs.step.id, "error": failure.message, "output": failure.output} if failure is not None else None
        context, repository, base_commit = agent_context.build(
            run=run,
            extra=dict(params.get("context") or {}),
            target_name=target_name,
            target=target,
            events=self.d.store.run_events(run.id),
            redactor=self.d.redactor,
            failure=failed,
        )
        policy = target.work_orders if target else WorkOrderPolicy()
        outcome = _outcome(cs, run, attempt, started, key, StepStatus.SUCCEEDED, {}, None)
        result = self.d.store.escalate(
            run,
            owner,
            outcome=outcome,
            next_index=run.step_index + 1,
            description=description,
            context=context,
            estimated_complexity=str(params.get("complexity", "medium")),
            priority=str(params.get("priority", "normal")),
            repository=repository,
            base_commit=base_commit,
            max_attempts=policy.max_attempts,
            deadline_at=self.d.clock() + policy.deadline_seconds if policy.deadline_seconds else None,
        )
        return result[0] if result else None

    def _failed(
        self,
        run: Run,
        owner: str,
        pb: CompiledPlaybook,
        cs: CompiledStep,
        attempt: int,
        started: float,
        key: str,
        scope: dict[str, Any],
        exc: ActionError,
    ) -> Run | None:
        step = cs.step
        outcome = _outcome(cs, run, attempt, started, key, StepStatus.FAILED, exc.output, exc.message)
        retry = step.retry
        if exc.retryable and retry is not None and attempt < retry.max_attempts:
            delay = retry.delay(attempt, self.d.rnd)
            return self.d.store.advance(
                run,
                owner,
                outcome=outcome,
                changes={
                    "status": RunStatus.QUEUED.value,
                    "attempt": attempt,
                    "next_run_at": self.d.clock() + delay,
                },
                lease_seconds=self.d.lease_seconds,
            )
        # Only a check that answered and was judged lowers trust; one that could not run says nothing about the fix.
        verify_failed = step.action == "verify" and "passed" in exc.output
        trust = TrustMove(run.component, TrustReason.FAILED_VERIFICATION) if verify_failed and run.component else None
        policy = step.on_failure
        if policy == "continue":
            return self._advance_to(
                run,
                owner,
                pb,
                run.step_index + 1,
                outcome,
                {"outputs": {**run.outputs, step.id: exc.output}},
                trust=trust,
            )
        if policy.startswith("goto:"):
            gotos = int(run.pending.get("gotos", 0)) + 1
            if gotos <= MAX_GOTOS:
                return self._advance_to(
                    run,
                    owner,
                    pb,
                    pb.model.step_index(policy[5:]),
                    outcome,
                    {"outputs": {**run.outputs, step.id: exc.output}, "pending": {"gotos": gotos}},
                    trust=trust,
                )
            exc = ActionError(f"{exc.message} (stopped after {MAX_GOTOS} goto jumps)")
        if policy == "escalate" and not run.escalated:
            self.d.store.advance(
                run, owner, outcome=outcome, changes={}, trust=trust, lease_seconds=self.d.lease_seconds
            )
            refreshed = self.d.store.get_run(run.id)
            return self._escalate(refreshed, owner, cs, attempt, started, key + ":escalate", scope, failure=exc)
        status = RunStatus.NEEDS_HUMAN if policy in ("needs_human", "escalate") else RunStatus.FAILED
        events: list[NewEvent] = []
        if verify_failed and run.escalated:
            # The agent's completion was a claim; verification overrules it.
            events = self.d.patching.overrule(run, exc.message)
        return self._finish(
            run, owner, status, f"step {step.id!r} failed: {exc.message}", outcome, trust=trust, events=events
        )

    # -- transitions ----------------------------------------------------------------------------------------

    def _advance_to(
        self,
        run: Run,
        owner: str,
        pb: CompiledPlaybook,
        index: int,
        outcome: StepOutcome,
        changes: dict[str, Any],
        *,
        events: list[NewEvent] | None = None,
        trust: TrustMove | None = None,
    ) -> Run | None:
        if index >= len(pb.steps):
            return self._finish(
                run, owner, RunStatus.COMPLETED, None, outcome, changes=changes, trust=trust, events=events
            )
        nxt = pb.steps[index].step
        status = RunStatus.VERIFYING if nxt.action == "verify" else RunStatus.RUNNING
        return self.d.store.advance(
            run,
            owner,
            outcome=outcome,
            changes={**changes, "step_index": index, "attempt": 0, "status": status.value},
            events=events or (),
            trust=trust,
            lease_seconds=self.d.lease_seconds,
        )

    def _finish(
        self,
        run: Run,
        owner: str,
        status: RunStatus,
        error: str | None,
        outcome: StepOutcome | None,
        *,
        changes: dict[str, Any] | None = None,
        trust: TrustMove | None = None,
        events: list[NewEvent] | None = None,
    ) -> Run | None:
        if status is RunStatus.COMPLETED:
            message = f"Run {run.id} completed: {run.playbook_id} finished" + (
                " after the coding agent's patch" if run.escalated else " without escalation"
            )
        elif status is RunStatus.NEEDS_HUMAN:
            message = f"Run {run.id} needs a human: {error}"
        else:
            message = f"Run {run.id} failed: {error}"
        done = NewEvent(
            type="self_healing.completed",
            message=message,
            payload={"status": status.value, "playbook_id": run.playbook_id, "escalated": run.escalated},
            run_id=run.id,
            work_order_id=run.coding_work_order_id,
            component=run.component,
        )
        return self.d.store.advance(
            run,
            owner,
            outcome=outcome,
            changes={**(changes or {}), "status": status.value, "error": error},
            events=[*(events or []), done],
            trust=trust,
            lease_seconds=self.d.lease_seconds,
        )

    def _scope(self, run: Run) -> dict[str, Any]:
        return {
            "event": run.context.get("event", {}),
            "context": run.context,
            "steps": run.outputs,
            "error_type": run.error_type,
            "description": run.description,
            "run": {
                "id": run.id,
                "escalated": run.escalated,
                "work_order_id": run.coding_work_order_id,
                "patch": run.outputs.get("patch"),
                "component": run.component,
                "playbook_id": run.playbook_id,
            },
            "target": self.d.capabilities.target_vars(run.context.get("target")),
        }


def _outcome(
    cs: CompiledStep,
    run: Run,
    attempt: int,
    started: float,
    key: str,
    status: StepStatus,
    output: dict[str, Any],
    error: str | None,
) -> StepOutcome:
    return StepOutcome(
        step_index=run.step_index,
        step_id=cs.step.id,
        action=cs.step.action,
        attempt=attempt,
        status=status,
        started_at=started,
        output=output,
        error=error,
        idempotency_key=key,
    )


def _patch_pending(run: Run) -> bool:
    held = run.outputs.get("patch")
    return bool(
        run.escalated and isinstance(held, dict) and held.get("pending_apply") and "apply_patch" not in run.outputs
    )


def _on_patch_failure(pb: CompiledPlaybook) -> str:
    for cs in pb.steps:
        if cs.step.action == "escalate":
            return str(cs.step.params.get("on_patch_failure", "needs_human"))
    return "needs_human"
