"""The engine's step loop: advances one leased run, step by step. Each step's outcome is committed before the next
step starts; a step that was in flight when its worker died runs again with the same idempotency key
(`run_id:step_id:attempt`).

No error can loop a run forever. Any exception while a step runs (an ActionError, or anything else: a git error, a
RecursionError) ends that step as failed, and its `on_failure` decides what follows. A run whose claims keep
crashing the worker outside a step (a bug here, a process killed mid-step) goes to needs_human after
MAX_STALLED_CLAIMS tries, naming the last error.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from mendloop.agents import context as agent_context
from mendloop.agents.test_suite import Cancelled
from mendloop.config import ControlConfig, TargetConfig, WorkOrderPolicy
from mendloop.domain import approvals
from mendloop.domain.records import NewEvent, Run
from mendloop.domain.states import RunStatus, StepStatus
from mendloop.domain.trust import TrustMove, TrustReason
from mendloop.engine.held_patch import HeldPatches, on_patch_failure
from mendloop.errors import ActionError, PatchRejected, StepCancelled, StorageError
from mendloop.infra.redact import Redactor
from mendloop.playbooks.actions.base import ActionContext, glimpse, storable
from mendloop.playbooks.actions.capability import Capabilities
from mendloop.playbooks.actions.diagnose import diagnose
from mendloop.playbooks.actions.registry import ACTIONS
from mendloop.playbooks.loader import CompiledCache, CompiledPlaybook, CompiledStep
from mendloop.playbooks.model import duration_seconds
from mendloop.playbooks.templates import TemplateRenderError
from mendloop.storage.store import StepOutcome, Store

log = logging.getLogger(__name__)

# A goto loop is stopped after this many jumps in one run.
MAX_GOTOS = 20
# A run claimed this many times in a row without committing progress (each claim crashed the worker or the worker
# died) goes to needs_human at the next claim. A constant rather than a setting: 3 tries tell a crash that repeats
# from a one-off (a deploy, an OOM kill), and no operator needs to tune that.
MAX_STALLED_CLAIMS = 3
# Recorded error messages of unexpected exceptions are cut to this many characters.
MAX_ERROR_CHARS = 500


def describe_error(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """`Type: message`, bounded; never raises (some exceptions fail in their own str())."""
    try:
        text = str(exc)
    except Exception:
        text = "(the error's message could not be read)"
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class UnexpectedError(ActionError):
    """An exception a step's action did not turn into an ActionError; the step fails with it, not the worker."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(describe_error(exc), retryable=False)
        self.type_name = type(exc).__name__


@dataclass
class StepLoopDeps:
    store: Store
    capabilities: Capabilities
    compiled: CompiledCache
    http: httpx.Client
    lease_seconds: float
    clock: Callable[[], float]
    rnd: random.Random
    targets: Mapping[str, TargetConfig]
    redactor: Redactor
    patches: HeldPatches
    control: ControlConfig = dataclasses.field(default_factory=ControlConfig)
    # A dry run's steps as they would run (`playbooks/dry_run.py` `plan`, with the settings `app.py` holds).
    planner: Callable[[CompiledPlaybook, Run], list[dict[str, Any]]] | None = None


class StepLoop:
    def __init__(self, deps: StepLoopDeps) -> None:
        self.d = deps
        # Set by the worker pool while it shuts down: the step in flight finishes, no further step starts.
        self.stopping: Callable[[], bool] = lambda: False

    def advance(self, run: Run, owner: str, cancel: threading.Event | None = None) -> None:
        """Run steps until the run finishes, parks (escalation, sleep, backoff) or the lease is lost.

        `cancel` is set by the worker pool when the run was cancelled (or its lease lost) while it runs here: the
        step in flight is stopped (its program killed, its waits and retries cut), recorded as `cancelled`, and
        no further step starts. Raises only when the loop itself fails (the database, a bug); the worker then
        records the crash on the run, and the claim after MAX_STALLED_CLAIMS such crashes hands the run to a
        human."""
        cancel = cancel if cancel is not None else threading.Event()
        if run.stalled_claims > MAX_STALLED_CLAIMS:
            self._give_up(run, owner)
            return
        pb = self.d.compiled.get(run.playbook_id, run.playbook_version, run.playbook)
        if run.context.get("dry_run"):
            self._dry_run(run, pb, owner)
            return
        current: Run | None = run
        while current is not None and current.status in (RunStatus.RUNNING, RunStatus.VERIFYING):
            if self.stopping():
                return  # the worker pool hands the run back (releases its lease) for another worker
            if cancel.is_set():
                return  # cancelled between two steps: the cancel already ended the run and took its lease
            if self.d.patches.pending(current):
                parked = self._trust_gate(current, owner, approvals.APPLY_PATCH)
                current = parked if parked is not False else self._apply_patch(current, pb, owner, cancel)
                continue
            current = self._step(current, pb, owner, cancel)

    def _apply_patch(self, run: Run, pb: CompiledPlaybook, owner: str, cancel: threading.Event) -> Run | None:
        """The agent's diff, checked, tested and committed before the playbook deploys anything."""
        started = self.d.clock()
        key = f"{run.id}:apply_patch:1"

        def outcome(status: StepStatus, output: dict[str, Any], error: str | None) -> StepOutcome:
            return StepOutcome(run.step_index, "apply_patch", "apply_patch", 1, status, started, output, error, key)

        try:
            applied = self.d.patches.apply(run, cancel)
        except Cancelled:
            # The cancel stopped the tests of the held diff (their process group killed): nothing landed.
            return self._cancelled(run, outcome(StepStatus.CANCELLED, {}, "its tests were stopped; nothing applied"))
        except PatchRejected as exc:
            exc.message = self.d.redactor.text(exc.message)  # it may quote the tests' output
            status = RunStatus.FAILED if on_patch_failure(pb) == "fail" else RunStatus.NEEDS_HUMAN
            return self._finish(
                run,
                owner,
                status,
                f"patch rejected ({exc.reason}): {exc.message}",
                outcome(StepStatus.FAILED, {"reason": exc.reason}, exc.message),
                changes={"outputs": {**run.outputs, "apply_patch": {"rejected": exc.reason, "message": exc.message}}},
            )
        except StorageError:
            raise
        except Exception as exc:
            if cancel.is_set():
                # Cancelled while the pipeline ran (its last check before the commit refused it): nothing landed.
                return self._cancelled(
                    run, outcome(StepStatus.CANCELLED, {}, f"nothing was applied: {describe_error(exc)}")
                )
            # Not the patch's fault: the repository cannot take it now (a detached HEAD, an operation in progress)
            # or the pipeline broke. Nothing was applied; a human looks at the repository.
            log.warning("run %s: the patch pipeline failed", run.id, exc_info=True)
            error = self.d.redactor.text(describe_error(exc))
            status = RunStatus.FAILED if on_patch_failure(pb) == "fail" else RunStatus.NEEDS_HUMAN
            return self._finish(
                run,
                owner,
                status,
                f"patch pipeline failed: {error}",
                outcome(StepStatus.FAILED, {"error_type": type(exc).__name__}, error),
                changes={"outputs": {**run.outputs, "apply_patch": {"failed": type(exc).__name__, "message": error}}},
                events=[_step_failed_event(run, "apply_patch", exc, error)],
            )
        redact = self.d.redactor
        output = redact.value(storable(applied.output))
        return self.d.store.advance(
            run,
            owner,
            outcome=outcome(StepStatus.SUCCEEDED, output, None),
            changes={"outputs": {**run.outputs, "apply_patch": output}, "pending": {}},
            # Their payloads quote the tests' output.
            events=[
                dataclasses.replace(e, message=redact.text(e.message), payload=redact.value(e.payload))
                for e in applied.events
            ],
            lease_seconds=self.d.lease_seconds,
        )

    # -- one step -------------------------------------------------------------------------------------------

    def _step(self, run: Run, pb: CompiledPlaybook, owner: str, cancel: threading.Event) -> Run | None:
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
            if step.destructive:
                parked = self._trust_gate(run, owner, step.id)
                if parked is not False:
                    return parked
            if step.action == "approval":
                return self._approval(run, owner, cs, scope)
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
                cancel=cancel,
            )
            missing = self._unbound_optional(step.optional, step.action, params, ctx.target)
            if missing is not None:
                # The service has no such thing, and the playbook said that is fine: skipped, and why.
                return self._advance_to(
                    run,
                    owner,
                    pb,
                    run.step_index + 1,
                    _outcome(cs, run, attempt, started, key, StepStatus.SKIPPED, {"skipped": missing}, None),
                    {},
                )
            if step.action == "verify":
                output = self._verify(cs, params, ctx, scope)
            elif step.action == "capability":
                output = self.d.capabilities.call(str(params["name"]), params.get("args") or {}, ctx, step.timeout)
            elif step.action == "diagnose":
                output = diagnose(
                    params,
                    ctx,
                    event=scope["event"],
                    repository=self._repository(ctx.target),
                    capabilities=self.d.capabilities,
                )
            else:
                output = ACTIONS[step.action](params, ctx)
        except (ActionError, TemplateRenderError) as exc:
            err = exc if isinstance(exc, ActionError) else ActionError(str(exc), retryable=False)
            if cancel.is_set():
                # Whatever the action made of being stopped (a killed program, a wait cut short, a request that
                # failed meanwhile): the step was cancelled, not failed, and is never retried.
                return self._cancelled(
                    run, _outcome(cs, run, attempt, started, key, StepStatus.CANCELLED, err.output, err.message)
                )
            return self._failed(run, owner, pb, cs, attempt, started, key, scope, err)
        except StorageError:
            # The database, not the step: the claim is retried (and bounded by MAX_STALLED_CLAIMS).
            raise
        except Exception as exc:
            # Anything else an action raised (a git error, a RecursionError, a bug) fails this step, not the
            # worker: left to escape, the run would be re-claimed every lease, forever.
            log.warning("run %s: step %r raised %s", run.id, step.id, type(exc).__name__, exc_info=True)
            if cancel.is_set():
                return self._cancelled(
                    run, _outcome(cs, run, attempt, started, key, StepStatus.CANCELLED, {}, describe_error(exc))
                )
            return self._failed(run, owner, pb, cs, attempt, started, key, scope, UnexpectedError(exc))
        if cancel.is_set():
            # It ended by itself just as the cancel came (a step that checks the cancel stops instead): its output
            # is kept, and the run does not go on.
            done = "it finished after the run was cancelled; the run does not go on"
            return self._cancelled(run, _outcome(cs, run, attempt, started, key, StepStatus.CANCELLED, output, done))
        # A step's output is data from outside (a command's stdout, an HTTP body): redacted before it is stored.
        output = self.d.redactor.value(storable(output))
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

    def _cancelled(self, run: Run, outcome: StepOutcome) -> Run | None:
        """The step the cancel stopped, kept as `cancelled` (its output and what stopped it redacted) with a
        timeline event. The run is not advanced: the cancel already ended it and released its lease (or the lease
        went to another worker, which runs the step again with the same key; then nothing is kept here)."""
        detail = self.d.redactor.text(outcome.error or "stopped by the run's cancel")
        kept = dataclasses.replace(
            outcome,
            status=StepStatus.CANCELLED,
            output=self.d.redactor.value(storable(outcome.output)),
            error=detail,
        )
        event = NewEvent(
            type="self_healing.step_cancelled",
            message=f"Run {run.id}: step {outcome.step_id!r} ({outcome.action}) was stopped by the cancel: {detail}",
            payload={"step_id": outcome.step_id, "action": outcome.action, "attempt": outcome.attempt},
            run_id=run.id,
            work_order_id=run.coding_work_order_id,
            component=run.component,
        )
        if not self.d.store.record_cancelled_step(run.id, kept, [event]):
            log.info("run %s: step %r stopped: the run's lease went to another worker", run.id, outcome.step_id)
        return None

    def _dry_run(self, run: Run, pb: CompiledPlaybook, owner: str) -> Run | None:
        """Render every step, record it as skipped with what it would have done, execute none, and end the run as
        `dry_run`. Each step's record commits on its own: a crash resumes at the next step, as a real run does."""
        assert self.d.planner is not None, "a dry run needs the planner app.py gives the step loop"
        planned = self.d.planner(pb, run)
        current: Run | None = run
        while current is not None and current.step_index < len(pb.steps):
            index = current.step_index
            cs = pb.steps[index]
            key = f"{run.id}:{cs.step.id}:dry_run"
            output = self.d.redactor.value(storable({"dry_run": True, **planned[index]}))
            outcome = _outcome(cs, current, 1, self.d.clock(), key, StepStatus.SKIPPED, output, None)
            current = self.d.store.advance(
                current,
                owner,
                outcome=outcome,
                changes={"step_index": index + 1, "attempt": 0, "status": RunStatus.RUNNING.value},
                lease_seconds=self.d.lease_seconds,
            )
        if current is None:
            return None
        summary = {"steps": len(pb.steps), "would_fail": [p["id"] for p in planned if p["status"] == "would fail"]}
        return self._finish(
            current, owner, RunStatus.DRY_RUN, None, None, changes={"outputs": {**current.outputs, "dry_run": summary}}
        )

    def _approval(self, run: Run, owner: str, cs: CompiledStep, scope: dict[str, Any]) -> Run | None:
        """Park the run until an operator decides, or the deadline passes (`approvals.time_out`, by the reaper)."""
        params = cs.params(scope)
        now = self.d.clock()
        timeout = params.get("timeout")
        decision = approvals.request(
            run,
            kind="step",
            step_id=cs.step.id,
            rule=approvals.Rule("approval_step"),
            message=self.d.redactor.text(str(params["message"])) if params.get("message") else None,
            deadline_at=now + duration_seconds(timeout) if timeout is not None else None,
            on_timeout=params.get("on_timeout", "reject"),
            now=now,
        )
        return self._park(run, owner, decision)

    def _trust_gate(self, run: Run, owner: str, step_id: str) -> Run | Literal[False] | None:
        """In front of a destructive step or a patch apply: False to go on (no gate, trust at or above it, or an
        operator approved this very step), else the run parked for approval (None: the lease was lost)."""
        if run.pending.get("approved") == step_id or not run.component:
            return False
        gate = self.d.control.gate_for(run.component)
        rule = approvals.trust_gate(self.d.store.trust_score(run.component), gate) if gate is not None else None
        if rule is None:
            return False
        if not approvals.needs_approval(rule):
            # Its own short transaction: the timeline says why no one was asked, whatever the step then does.
            self.d.store.publish([approvals.autonomous_event(run, step_id, rule)])
            return False
        now = self.d.clock()
        timeout = self.d.control.approval_timeout_seconds
        decision = approvals.request(
            run,
            kind="gate",
            step_id=step_id,
            rule=rule,
            message=None,
            deadline_at=now + timeout if timeout else None,
            on_timeout="reject",
            now=now,
        )
        return self._park(run, owner, decision)

    def _park(self, run: Run, owner: str, decision: approvals.Decision) -> Run | None:
        return self.d.store.advance(
            run, owner, outcome=None, changes=decision.run, events=decision.events, lease_seconds=self.d.lease_seconds
        )

    def _repository(self, target: str | None) -> Path | None:
        cfg = self.d.targets.get(target or "")
        return Path(cfg.repository) if cfg is not None and cfg.repository else None

    def _unbound_optional(self, optional: bool, action: str, params: dict[str, Any], target: str | None) -> str | None:
        """Why an optional step is skipped (its capability is not bound for the target), or None to run it."""
        if not optional:
            return None
        name = params["name"] if action == "capability" else (params.get("check") or {}).get("capability")
        if name is None or self.d.capabilities.is_bound(target, str(name)):
            return None
        return f"optional capability {str(name)!r} is not bound for target {target!r}"

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
        except StepCancelled:
            raise  # a killed check answered nothing to judge
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
            # What was expected and what was seen: "the pipeline finishes within its timeout" alone reads as a pass.
            wanted = params.get("describe")
            expected = f"{wanted} ({cs.step.params['expect']})" if wanted else str(cs.step.params["expect"])
            raise ActionError(f"expected {expected}; saw {glimpse(result)}", output=output)
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
        # Rendered from the run's (redacted) data, but a template may join pieces into a secret's shape again.
        description = self.d.redactor.text(str(params.get("description") or f"Code patch required for: {error_type}"))
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
            recall=lambda frames: self.d.store.fixes.recall(
                incident_id=run.incident_id, frames=frames, exclude_run=run.id
            ),
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
        # A failed step's output and message quote what the command or service said: redacted before they are
        # stored, and before an escalation hands them to the agent.
        exc.message = self.d.redactor.text(exc.message)
        failed_output = self.d.redactor.value(storable(exc.output))
        outcome = _outcome(cs, run, attempt, started, key, StepStatus.FAILED, failed_output, exc.message)
        # An unexpected error is reported as an event of its own, whatever on_failure then does.
        reported = [_step_failed_event(run, step.id, exc, exc.message)] if isinstance(exc, UnexpectedError) else []
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
                events=reported,
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
                {"outputs": {**run.outputs, step.id: failed_output}},
                events=reported,
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
                    {"outputs": {**run.outputs, step.id: failed_output}, "pending": {"gotos": gotos}},
                    events=reported,
                    trust=trust,
                )
            exc = ActionError(f"{exc.message} (stopped after {MAX_GOTOS} goto jumps)")
        if policy == "escalate" and not run.escalated:
            kept = self.d.store.advance(
                run,
                owner,
                outcome=outcome,
                changes={},
                events=reported,
                trust=trust,
                lease_seconds=self.d.lease_seconds,
            )
            if kept is None:
                return None
            refreshed = self.d.store.get_run(run.id)
            try:
                return self._escalate(refreshed, owner, cs, attempt, started, key + ":escalate", scope, failure=exc)
            except StorageError:
                raise
            except Exception as esc:
                # The escalation itself failed (e.g. a context that cannot be built): a human takes over.
                log.warning("run %s: escalating step %r failed", run.id, step.id, exc_info=True)
                return self._finish(
                    refreshed,
                    owner,
                    RunStatus.NEEDS_HUMAN,
                    f"step {step.id!r} failed: {exc.message}; escalating failed: {describe_error(esc)}",
                    None,
                )
        status = RunStatus.NEEDS_HUMAN if policy in ("needs_human", "escalate") else RunStatus.FAILED
        events: list[NewEvent] = list(reported)
        if verify_failed and run.escalated:
            # The agent's completion was a claim; verification overrules it.
            events += self.d.patches.overrule(run, exc.message)
        error = (
            f"verification failed at step {step.id!r}: {exc.message}"
            if verify_failed
            else f"step {step.id!r} failed: {exc.message}"
        )
        return self._finish(run, owner, status, error, outcome, trust=trust, events=events)

    def _give_up(self, run: Run, owner: str) -> Run | None:
        """The run's last claims all ended without committing anything: stop it, naming the last recorded error."""
        tries = run.stalled_claims - 1
        error = run.error or "the worker stopped while it held the run (killed, or a crash it could not record)"
        step_id, action = _current_step(run, pending_patch=self.d.patches.pending(run))
        attempt = run.attempt + 1
        outcome = StepOutcome(
            step_index=run.step_index,
            step_id=step_id,
            action=action,
            attempt=attempt,
            status=StepStatus.FAILED,
            started_at=self.d.clock(),
            output={"stalled_claims": tries},
            error=error,
            idempotency_key=f"{run.id}:{step_id}:{attempt}",
        )
        stalled = NewEvent(
            type="self_healing.step_failed",
            message=f"Run {run.id}: step {step_id!r} crashed the worker {tries} times in a row: {error}",
            payload={"step_id": step_id, "error": error, "stalled_claims": tries},
            run_id=run.id,
            work_order_id=run.coding_work_order_id,
            component=run.component,
        )
        return self._finish(
            run,
            owner,
            RunStatus.NEEDS_HUMAN,
            f"gave up after {tries} claims in a row crashed the worker: {error}",
            outcome,
            events=[stalled],
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
        if status is RunStatus.DRY_RUN:
            message = f"Run {run.id} dry run done: {len(run.playbook.get('steps', []))} steps rendered, none executed"
        elif status is RunStatus.COMPLETED:
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


def _step_failed_event(run: Run, step_id: str, exc: BaseException, error: str) -> NewEvent:
    type_name = exc.type_name if isinstance(exc, UnexpectedError) else type(exc).__name__
    return NewEvent(
        type="self_healing.step_failed",
        message=f"Run {run.id}: step {step_id!r} failed with an unexpected error: {error}",
        payload={"step_id": step_id, "error_type": type_name, "error": error},
        run_id=run.id,
        work_order_id=run.coding_work_order_id,
        component=run.component,
    )


def _current_step(run: Run, *, pending_patch: bool) -> tuple[str, str]:
    """The id and action of the step the run stands at, read from its document without compiling it (the
    document may be what crashes)."""
    if pending_patch:
        return "apply_patch", "apply_patch"
    try:
        step = run.playbook["steps"][run.step_index]
        return str(step["id"]), str(step["action"])
    except (KeyError, IndexError, TypeError):
        return f"step_{run.step_index}", "unknown"
