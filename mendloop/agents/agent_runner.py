"""The agent runner: claims work orders through the pull API and drives a coding agent on each, trusting
nothing the agent says.

For one work order:

1. a git worktree at the work order's base commit (HEAD when it names none or one the repository lacks);
2. the prompt, the work order as JSON and the result file in a scratch directory *outside* the worktree;
3. the adapter's argv run in the worktree with stdin closed, a minimal environment (never `MENDLOOP_*`), its own
   process group, a hard timeout, and - when the runner is root - as an unprivileged user; heartbeats go out in a
   background thread meanwhile (`LeaseKeeper`, until the report is answered), and a cancel request or a lost
   lease stops the agent;
4. the diff computed by the runner from the worktree (`patch_pipeline.diff_worktree`), never taken from the agent;
5. the patch safety checks (`patch_pipeline.check_patch`, `patch_safety.check_paths_in_worktree`);
6. the test command at the base and with the diff applied, each in a fresh worktree (`test_suite`, the server's
   implementation too): no test that passed at the base may fail or vanish, the named failing tests must pass;
7. apply: `commit` (one commit on the checked-out branch with a `Work-Order:` trailer), `branch` (a commit on
   `mendloop/<work order id>` left for review) or `approval` (nothing applied; the verified diff is sent for an
   operator to approve);
8. `complete` with the runner's own figures, or `fail` with the reason.

Worktrees and the scratch directory are always removed; every agent process group is killed when the runner
exits. `AgentRunner` runs in a thread (`start`/`stop`) inside another process as well as from `mendloop agent`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mendloop.agents import patch_pipeline, patch_safety, test_suite, worktrees
from mendloop.agents.adapters import AgentTask, build_prompt, relevant_files
from mendloop.agents.lease_keeper import LeaseKeeper
from mendloop.agents.runner_options import APPLY_MODES, NOBODY, ApplyMode, Outcome, RunnerOptions, default_workdir
from mendloop.agents.test_suite import ReportSetting, TestResult
from mendloop.agents.work_order_input import (
    commit_message,
    constraints_of,
    read_result,
    safe_name,
    summary_text,
)
from mendloop.agents.worktree_access import check_reachable, give_tree, make_traversable, restore_file
from mendloop.domain.states import RETRYABLE_FAIL_REASONS
from mendloop.domain.test_command import TestCommand
from mendloop.domain.test_verdict import failing_tests_of
from mendloop.errors import AgentError, Conflict, InputError, MendloopError, NotFound, PatchRejected
from mendloop.infra import git, process
from mendloop.infra.api_client import AgentClient, Claim
from mendloop.infra.sandbox import Sandbox, detect

__all__ = ["APPLY_MODES", "NOBODY", "AgentRunner", "ApplyMode", "Outcome", "RunnerOptions", "running"]

log = logging.getLogger(__name__)

OUTPUT_TAIL_CHARS = process.DEFAULT_TAIL_CHARS
_AGENT_GITCONFIG = "[user]\n\tname = mendloop agent\n\temail = agent@mendloop.invalid\n[safe]\n\tdirectory = *\n"

# What an agent or a test command inherits from the runner's environment, besides the adapter's own keys.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")


class _Cancelled(Exception):
    """The agent was stopped: a cancel request, a lost lease or the runner shutting down."""


# -- the runner -----------------------------------------------------------------------------------------------


class AgentRunner:
    def __init__(self, client: AgentClient, options: RunnerOptions, *, sandbox: Sandbox | None = None) -> None:
        self.client = client
        self.options = options
        self.adapter = options.adapter
        self.repo = Path(options.repo).resolve()
        self.workdir = options.workdir or default_workdir()
        self.agent_id = options.agent_id or f"{socket.gethostname()}:{os.getpid()}:{self.adapter.name}"
        self._environ = dict(os.environ if options.environ is None else options.environ)
        if options.run_as == "auto":
            self.run_as: tuple[int, int] | None = NOBODY if os.geteuid() == 0 else None
        else:
            self.run_as = options.run_as
        if self.run_as is not None and os.geteuid() != 0:
            raise MendloopError("running the agent as another user needs root; use run_as=None")
        # Where the agent's processes run: bubblewrap when this machine allows it (MENDLOOP_SANDBOX, `sandbox:`),
        # else the uid drop above, with a warning logged once.
        self.sandbox = sandbox if sandbox is not None else detect(self.run_as, environ=self._environ)
        self._stop = threading.Event()
        self._current_cancel: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.outcomes: list[Outcome] = []
        self._prepared = False

    # -- lifecycle ------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        if self._prepared:
            return
        if not git.is_repo(self.repo):
            raise MendloopError(f"{self.repo}: not a git repository")
        try:
            # An apply of ours (apply=commit) a crash interrupted is finished first; then the dead worktrees go.
            outcome = patch_pipeline.recover(self.repo, worktree_parent=self.workdir)
        except MendloopError as exc:
            log.warning("could not check %s after a restart: %s", self.repo, exc.message)
        else:
            if outcome:
                log.warning("%s: an apply interrupted by a crash was %s", self.repo, outcome)
        self._prepared = True

    def run(self, *, once: bool = False) -> int:
        """Claim and process work orders until stopped (or one claim round with `once`); returns how many."""
        self.prepare()
        done = 0
        while not self._stop.is_set():
            wait = self.options.wait_seconds if once else min(self.options.wait_seconds, 5.0)
            try:
                outcome = self.process_next(wait_seconds=wait)
            except MendloopError as exc:
                if once:
                    raise
                log.warning("claim failed: %s; retrying", exc.message)
                self._stop.wait(2.0)
                continue
            if outcome is not None:
                done += 1
            if once:
                break
        return done

    def start(self) -> AgentRunner:
        """Run in a background thread (embedded use); `stop()` ends it."""
        self.prepare()
        self._thread = threading.Thread(target=self._run_logged, name=f"agent-runner-{self.agent_id}", daemon=True)
        self._thread.start()
        return self

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("agent runner stopped by an error")

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop claiming, stop the current agent (its process group is killed), wait for the thread."""
        self._stop.set()
        if self._current_cancel is not None:
            self._current_cancel.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- one work order -------------------------------------------------------------------------------------

    def process_next(self, *, wait_seconds: float) -> Outcome | None:
        claim = self.client.claim(self.agent_id, repository=str(self.repo), wait_seconds=wait_seconds)
        if claim is None:
            return None
        outcome = self.handle(claim)
        self.outcomes.append(outcome)
        return outcome

    def handle(self, claim: Claim) -> Outcome:
        wo_id = claim.work_order_id
        log.info("work order %s claimed (lease %s)", wo_id, claim.lease_id)
        cancel = threading.Event()
        self._current_cancel = cancel
        if self._stop.is_set():
            cancel.set()
        beat = LeaseKeeper(self.client, claim, cancel)
        beat.start()
        try:
            outcome = self._attempt(claim, cancel, beat)
            # The lease is kept alive until the server has answered the report: building and sending it takes
            # time (the agent's version comes from running its CLI, seconds on a loaded machine), and a lease
            # that lapsed meanwhile would have the work order reaped (failed, once its attempts are used up) and
            # the report refused with 409.
            if beat.begin_reporting():
                return self._lost(claim, outcome, "the lease was lost while working")
            return self._report(claim, outcome, beat)
        finally:
            beat.stop()

    def _attempt(self, claim: Claim, cancel: threading.Event, beat: LeaseKeeper) -> Outcome:
        """Work on the claimed work order; every way it can end becomes an Outcome (never an exception)."""
        wo_id = claim.work_order_id
        scratch = Path(tempfile.mkdtemp(prefix=f"mendloop-agent-{safe_name(wo_id)}-", dir=self.workdir))
        try:
            return self._work(claim, scratch, cancel, beat)
        except _Cancelled:
            return Outcome(wo_id, "failed", "agent_error", "stopped: " + self._why_stopped(beat), stopped=True)
        except (AgentError, PatchRejected) as exc:
            outcome = Outcome(wo_id, "failed", exc.reason, exc.message)
            tail = exc.fields.get("output_tail")
            if tail:
                outcome.output_tail = str(tail)[-OUTPUT_TAIL_CHARS:]
            return outcome
        except MendloopError as exc:
            return Outcome(wo_id, "failed", "agent_error", f"runner error: {exc.message}")
        except Exception as exc:  # a bug here must not leave the work order leased until the lease lapses
            log.exception("work order %s: unexpected error", wo_id)
            return Outcome(wo_id, "failed", "agent_error", f"runner error: {type(exc).__name__}: {exc}")
        finally:
            self._current_cancel = None
            shutil.rmtree(scratch, ignore_errors=True)

    def _why_stopped(self, beat: LeaseKeeper) -> str:
        if beat.cancel_requested:
            return "cancel requested by the server"
        if beat.lease_lost:
            return "lease lost"
        return "the runner is shutting down"

    def _work(self, claim: Claim, scratch: Path, cancel: threading.Event, beat: LeaseKeeper) -> Outcome:
        wo_id = claim.work_order_id
        ctx = claim.context
        self._check_repository(ctx)
        constraints = constraints_of(ctx)
        test_command = self.options.tests_for(ctx)
        if not test_command:
            raise AgentError(
                "needs_human",
                "no test command: the runner judges a patch by its own test run; "
                "pass --test-command or set the target's test_command",
            )
        base = self._base_commit(ctx)
        os.chmod(scratch, 0o711)
        home = scratch / "home"
        home.mkdir()
        # An identity in the agent's throwaway HOME: an agent CLI that finds none writes one into the repository's
        # config (aider does), which is read-only to it (it is the operator's).
        (home / ".gitconfig").write_text(_AGENT_GITCONFIG, "utf-8")
        result_file = scratch / "result.json"
        (scratch / "work_order.json").write_text(json.dumps(claim.work_order, indent=2, default=str), "utf-8")
        if self.run_as is not None:
            for p in (scratch, home, home / ".gitconfig", scratch / "work_order.json"):
                os.chown(p, *self.run_as)

        beat.note = f"{self.adapter.name} working"
        with worktrees.worktree(self.repo, base, parent=self.workdir) as wt:
            files = relevant_files(ctx, wt)
            prompt = build_prompt(
                claim.work_order,
                files=files,
                test_command=test_command,
                constraints=ctx.get("constraints") or {},
            )
            prompt_file = scratch / "prompt.md"
            prompt_file.write_text(prompt, encoding="utf-8")
            task = AgentTask(
                work_order_id=wo_id,
                work_order=claim.work_order,
                worktree=wt,
                prompt_file=prompt_file,
                work_order_file=scratch / "work_order.json",
                result_file=result_file,
                scratch=scratch,
                timeout=self.options.agent_timeout,
                files=tuple(files),
            )
            self._run_agent(task, cancel, home)
            claims = read_result(result_file)
            diff = patch_pipeline.diff_worktree(wt, base=base)
            if not diff.strip():
                raise AgentError("agent_error", "agent exited 0 with no change")
            # The diff's text, the repository's hooks directory and the test-runner sections, against `base`.
            summary = patch_pipeline.check_patch(wt, diff, constraints, base=base)
            patch_safety.check_paths_in_worktree(wt, summary.files)

        if cancel.is_set():
            raise _Cancelled()
        beat.note = "running the tests"
        tests = self._run_tests(base, diff, summary, test_command, scratch, cancel, ctx=ctx, claims=claims)
        if cancel.is_set():
            raise _Cancelled()

        beat.note = f"applying ({self.options.apply})"
        outcome = Outcome(
            wo_id, "completed", diff=diff, files=list(summary.files), tests=tests, base_commit=base, agent_claims=claims
        )
        message = commit_message(claim, claims)
        if self.options.apply == "commit":
            applied = patch_pipeline.apply_patch(
                self.repo,
                diff,
                base_commit=base,
                constraints=constraints,
                test_command=None,  # already run above, as the unprivileged user
                test_timeout=self.options.test_timeout,
                message=message,
                trailers={"Work-Order": wo_id},
                checked_at_base=True,  # paths and `git apply --check` at `base`, in the test worktree above
            )
            outcome.commit = applied.commit
        elif self.options.apply == "branch":
            outcome.commit, outcome.branch = self._commit_on_branch(wo_id, base, diff, message)
        outcome.message = summary_text(self.adapter.name, outcome, summary)
        return outcome

    # -- steps ----------------------------------------------------------------------------------------------

    def _check_repository(self, ctx: Mapping[str, Any]) -> None:
        named = ctx.get("repository")
        if named and Path(str(named)).resolve() != self.repo:
            raise AgentError("out_of_scope", f"work order is for repository {named}, this runner serves {self.repo}")

    def _base_commit(self, ctx: Mapping[str, Any]) -> str:
        base = ctx.get("base_commit")
        if isinstance(base, str) and re.fullmatch(r"[0-9a-fA-F]{7,64}", base):
            if git.has_commit(self.repo, base):
                return base
            log.warning("base commit %s is not in %s; using HEAD", base, self.repo)
        return git.head(self.repo)

    def _environment(self, home: Path, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: self._environ[k] for k in _INHERITED if k in self._environ}
        env.setdefault("PATH", os.defpath)
        env.setdefault("LANG", "C.UTF-8")
        if self.run_as is not None:
            env["HOME"] = str(home)
            # The worktree is the agent's, its gitdir is not: let the agent's own git calls read it.
            env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="safe.directory", GIT_CONFIG_VALUE_0="*")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update(extra)
        return {k: v for k, v in env.items() if not k.startswith("MENDLOOP_")}

    def _run_agent(self, task: AgentTask, cancel: threading.Event, home: Path) -> None:
        wt = task.worktree
        existed = self.adapter.existing_leftovers(wt)
        if self.adapter.in_process:
            answer = self.adapter.run(task, cancel)
            log.info("work order %s: %s answered (%d chars)", task.work_order_id, self.adapter.name, len(answer.output))
            if cancel.is_set():
                raise _Cancelled()
            self.adapter.remove_leftovers(wt, existed)
            return
        invocation = self.adapter.build(task)
        env = self._environment(home, {**self.adapter.passthrough_env(self._environ), **task.variables()})
        env.update(invocation.env)
        env = {k: v for k, v in env.items() if not k.startswith("MENDLOOP_")}
        if self.sandbox.confined:
            # The operator's HOME is read-only in the sandbox; agent CLIs write their state there.
            env["HOME"] = str(home)
        dotgit = wt / ".git"
        saved_dotgit = dotgit.read_bytes()
        if self.run_as is not None:
            give_tree(wt, self.run_as)
            make_traversable(wt.parent)
            os.chown(task.prompt_file, *self.run_as)
            check_reachable(wt, self.run_as)
        log.info("work order %s: running %s", task.work_order_id, invocation.argv[0])
        try:
            result = self._run_process(
                invocation.argv,
                cwd=wt,
                env=env,
                timeout=task.timeout,
                cancel=cancel,
                writable=[task.scratch],  # its home, the result file, the CLIs' history files
                network=self.adapter.needs_network,
            )
        finally:
            if self.run_as is not None:
                give_tree(wt, (os.getuid(), os.getgid()))
            # The agent could have pointed .git elsewhere (a config with hooks the runner's git would run).
            restore_file(dotgit, saved_dotgit)
        if result.cancelled:
            raise _Cancelled()
        tail = result.stdout_text(OUTPUT_TAIL_CHARS)
        if result.timed_out:
            raise AgentError(
                "timeout",
                f"agent did not finish within {task.timeout:g}s; its process group was killed",
                output_tail=tail,
            )
        self.adapter.remove_leftovers(wt, existed)
        if result.returncode != 0:
            raise AgentError(
                "agent_error",
                f"agent exited with {result.returncode}; output tail:\n{tail}",
                output_tail=tail,
            )

    def _run_process(
        self,
        argv: list[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout: float,
        cancel: threading.Event,
        writable: list[Path] | None = None,
        network: bool = False,
        readonly: list[Path] | None = None,
    ) -> process.Completed:
        """An agent or test process, through the sandbox: stdin closed, output merged and kept as a tail, run as
        `run_as`, only `cwd` and `writable` writable, the network only with `network`; its group killed when it
        exits, times out or `cancel` is set, and when the runner dies (even by `kill -9`)."""
        if not argv:
            raise AgentError("agent_error", "empty argv")
        room = list(writable or [])
        home = env.get("HOME")
        if home and Path(home).is_relative_to(self.workdir):
            room.append(Path(home))  # a throwaway home the runner made in its scratch directory
        try:
            return self.sandbox.run(
                argv,
                cwd=cwd,
                env=env,
                timeout=timeout,
                cancel=cancel,
                merge_stderr=True,
                keep_bytes=OUTPUT_TAIL_CHARS * 4,
                writable=room,
                network=network,
                readonly=[*(readonly or []), *self._visible(argv)],
            )
        except process.CannotStart as exc:
            raise AgentError("agent_error", f"cannot start {argv[0]!r}: {exc.strerror}") from exc

    def _visible(self, argv: list[str]) -> list[Path]:
        """What the sandbox's private /tmp must not hide: the repository's git directory (the worktree's `.git`
        points into it) and the files an argv names by absolute path (a script in a temp directory)."""
        seen = [self.repo / ".git"]
        seen += [Path(a) for a in argv if os.path.isabs(a) and os.path.isfile(a)]
        return seen

    def _run_tests(
        self,
        base: str,
        diff: str,
        summary: patch_safety.PatchSummary,
        argv: TestCommand,
        scratch: Path,
        cancel: threading.Event,
        *,
        ctx: Mapping[str, Any],
        claims: Mapping[str, Any],
    ) -> TestResult:
        """The tests at `base` and with the diff (`test_suite`, the server's implementation too); PatchRejected
        when the patched run is worse than the base's, or the named failing tests still fail."""
        try:
            report = ReportSetting.from_value(ctx.get("test_report"))
        except InputError as exc:
            raise AgentError("needs_human", f"the work order's test report setting is invalid: {exc.message}") from exc
        suite = test_suite.Suite(
            self.repo,
            argv,
            sandbox=self.sandbox,
            timeout=self.options.test_timeout,
            env=self._environment(scratch, {}),
            report=report,
            workdir=self.workdir,
        )
        try:
            return suite.verify(
                base, patch_pipeline.patcher(diff, summary), failing_tests=failing_tests_of(ctx), cancel=cancel
            )
        except test_suite.Cancelled:
            raise _Cancelled() from None
        except PatchRejected as exc:
            if claims.get("tests_passed") is not True or exc.reason == "test_env_error":
                raise
            fields = {k: v for k, v in exc.fields.items() if k != "reason"}
            note = "(the agent said the tests passed; the runner's own run overrules it) "
            raise PatchRejected(exc.reason, note + exc.message, **fields) from exc

    def _commit_on_branch(self, wo_id: str, base: str, diff: str, message: str) -> tuple[str, str]:
        branch = f"mendloop/{safe_name(wo_id)}"
        git.run(self.repo, "check-ref-format", "--branch", branch)
        with worktrees.worktree(self.repo, base, parent=self.workdir) as bwt:
            patch_pipeline.apply(bwt, diff)
            git.run(bwt, "add", "-A")
            sha = patch_pipeline.commit(bwt, message, trailers={"Work-Order": wo_id})
        git.run(self.repo, "branch", "--force", branch, sha)
        return sha, branch

    # -- reporting ------------------------------------------------------------------------------------------

    def _report(self, claim: Claim, outcome: Outcome, beat: LeaseKeeper) -> Outcome:
        wo_id = claim.work_order_id
        try:
            if outcome.status == "completed":
                outcome.answer = self._with_retries(
                    lambda: self.client.complete(
                        wo_id, self._complete_body(claim, outcome), idempotency_key=f"{wo_id}:{claim.lease_id}"
                    )
                )
                log.info("work order %s completed: %s", wo_id, outcome.message)
            else:
                reason = outcome.reason or "agent_error"
                details: dict[str, Any] = {"message": outcome.message[-8000:], "agent": self._agent_info()}
                if outcome.agent_claims:
                    details["agent_claims"] = outcome.agent_claims
                if outcome.output_tail:
                    details["output_tail"] = outcome.output_tail
                # Cancelled by the server: never again. Stopped because this runner shuts down: another may.
                retryable = False if beat.cancel_requested else outcome.stopped or reason in RETRYABLE_FAIL_REASONS
                outcome.answer = self._with_retries(
                    lambda: self.client.fail(
                        wo_id, lease_id=claim.lease_id, reason=reason, retryable=retryable, details=details
                    )
                )
                log.warning("work order %s failed (%s): %s", wo_id, reason, outcome.message.splitlines()[0])
        except (Conflict, NotFound) as exc:
            return self._lost(claim, outcome, f"the server refused the report: {exc.message}")
        return outcome

    def _complete_body(self, claim: Claim, outcome: Outcome) -> dict[str, Any]:
        body: dict[str, Any] = {
            "lease_id": claim.lease_id,
            "tests_passed": bool(outcome.tests and outcome.tests.passed),
            "files_changed": len(outcome.files),
            "diff": outcome.diff,
            "base_commit": outcome.base_commit,
            "summary": outcome.message[:20_000],
            "agent": self._agent_info(),
        }
        if outcome.commit:
            body["applied_commit"] = outcome.commit
        if self.options.apply == "branch" and outcome.branch:
            # Nothing is on the checked-out branch: the server parks the run until an operator marks it merged.
            body["branch"] = outcome.branch
        elif self.options.apply in ("branch", "approval"):
            # The server holds the verified patch until an operator approves it.
            body["approval_required"] = True
        return {k: v for k, v in body.items() if v is not None}

    def _agent_info(self) -> dict[str, str]:
        info = {"name": self.adapter.name}
        version = self.adapter.version()
        if version:
            info["version"] = version
        if self.adapter.model:
            info["model"] = self.adapter.model
        return info

    def _with_retries(self, call: Any) -> dict[str, Any]:
        delay = 0.5
        for attempt in range(4):
            try:
                answer: dict[str, Any] = call()
                return answer
            except (Conflict, NotFound):
                raise
            except MendloopError as exc:
                if attempt == 3:
                    raise
                log.warning("report failed (%s); retrying in %.1fs", exc.message, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _lost(self, claim: Claim, outcome: Outcome, why: str) -> Outcome:
        """The work order is no longer ours: undo a commit made for it, report nothing."""
        log.warning("work order %s: %s", claim.work_order_id, why)
        if outcome.commit and outcome.branch is None and self.options.apply == "commit":
            try:
                revert = patch_pipeline.revert(self.repo, outcome.commit, trailers={"Work-Order": claim.work_order_id})
                log.warning("reverted %s with %s", outcome.commit[:12], revert[:12])
            except MendloopError as exc:
                log.error("could not revert %s: %s", outcome.commit[:12], exc.message)
        return Outcome(
            claim.work_order_id,
            "lost",
            outcome.reason,
            f"{why}; {outcome.message}",
            diff=outcome.diff,
            files=outcome.files,
            commit=outcome.commit,
            branch=outcome.branch,
            tests=outcome.tests,
        )


@contextmanager
def running(runner: AgentRunner) -> Iterator[AgentRunner]:
    """`with running(runner):` starts it in a thread and always stops it."""
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()
