"""The agent runner: claims work orders through the pull API and drives a coding agent on each, trusting
nothing the agent says.

For one work order:

1. a git worktree at the work order's base commit (HEAD when it names none or one the repository lacks);
2. the prompt, the work order as JSON and the result file in a scratch directory *outside* the worktree;
3. the adapter's argv run in the worktree with stdin closed, a minimal environment (never `MENDLOOP_*`), its own
   process group, a hard timeout, and - when the runner is root - as an unprivileged user; heartbeats go out in a
   background thread meanwhile, and a cancel request or a lost lease stops the agent;
4. the diff computed by the runner from the worktree (`git.diff_worktree`), never taken from the agent;
5. the patch safety checks (`patch.check_diff`, `patch.check_paths_in_worktree`);
6. the test command in a fresh worktree with the diff applied, judged by its exit code alone;
7. apply: `commit` (one commit on the checked-out branch with a `Work-Order:` trailer), `branch` (a commit on
   `mendloop/<work order id>` left for review) or `approval` (nothing applied; the verified diff is sent for an
   operator to approve);
8. `complete` with the runner's own figures, or `fail` with the reason.

Worktrees and the scratch directory are always removed; every agent process group is killed when the runner
exits. `AgentRunner` runs in a thread (`start`/`stop`) inside another process as well as from `mendloop agent`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mendloop.agents import git, patch
from mendloop.agents.adapters import Adapter, AgentTask, build_prompt, relevant_files
from mendloop.agents.client import AgentClient, Claim
from mendloop.errors import AgentError, Conflict, MendloopError, NotFound, PatchRejected

log = logging.getLogger(__name__)

ApplyMode = Literal["commit", "branch", "approval"]
APPLY_MODES: tuple[str, ...] = ("commit", "branch", "approval")
NOBODY = (65534, 65534)
OUTPUT_TAIL_CHARS = 4000
MAX_RESULT_BYTES = 64 * 1024

# What an agent or a test command inherits from the runner's environment, besides the adapter's own keys.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")

# Retry policy per fail reason: may another attempt (by this or another runner) do better?
_RETRYABLE = {
    "agent_error": True,
    "timeout": True,
    "tests_failed": True,
    "unsafe_patch": False,
    "out_of_scope": False,
    "needs_human": True,
    "cannot_reproduce": False,
    "verification_failed": False,
}

# Started between fork and exec of every agent and test process: it asks the kernel to SIGTERM it when the
# runner thread that started it dies, then runs the real program as its child; on that SIGTERM it kills the
# whole process group. So a runner killed with -9 takes its agents with it.
_SHIM = r"""
import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
def die(*_):
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, die)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
except Exception:
    pass
if os.getppid() != parent:
    die()
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"cannot start {argv[0]!r}: {exc.strerror}\n")
        os._exit(127)
while True:
    try:
        _, status = os.waitpid(pid, 0)
        break
    except InterruptedError:
        continue
code = os.waitstatus_to_exitcode(status)
os._exit(128 - code if code < 0 else code)
"""


# -- process groups that must die with the runner -----------------------------------------------------------

_live_lock = threading.Lock()
_live_groups: set[int] = set()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_live_groups() -> None:
    """Kill every agent and test process group still running (registered with atexit)."""
    with _live_lock:
        groups = list(_live_groups)
    for pgid in groups:
        _kill_group(pgid)


atexit.register(kill_live_groups)


@dataclass(frozen=True)
class ProcessResult:
    exit_code: int | None
    output_tail: str
    duration_seconds: float
    timed_out: bool
    cancelled: bool


def run_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    cancel: threading.Event | None = None,
    run_as: tuple[int, int] | None = None,
    output: Path,
) -> ProcessResult:
    """Run `argv` (no shell) with stdin closed in its own session; kill its whole process group when it exits,
    times out or `cancel` is set. Its output goes to the file `output` (never a pipe a child could hold)."""
    if not argv:
        raise AgentError("agent_error", "empty argv")
    started = time.monotonic()
    kwargs: dict[str, Any] = {}
    if run_as is not None:
        kwargs.update(user=run_as[0], group=run_as[1], extra_groups=[])
    shim = _shim_interpreter(run_as)
    full = [shim, "-c", _SHIM, str(os.getpid()), *argv] if shim else list(argv)
    with output.open("wb") as out:
        try:
            proc = subprocess.Popen(
                full,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                **kwargs,
            )
        except OSError as exc:
            raise AgentError("agent_error", f"cannot start {argv[0]!r}: {exc.strerror}") from exc
    with _live_lock:
        _live_groups.add(proc.pid)
    timed_out = cancelled = False
    deadline = started + timeout
    try:
        while True:
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                timed_out = True
                break
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
    finally:
        # Always: whatever the program left running in its group dies with it.
        _kill_group(proc.pid)
        proc.wait()
        with _live_lock:
            _live_groups.discard(proc.pid)
    exited = not (timed_out or cancelled)
    return ProcessResult(
        exit_code=proc.returncode if exited else None,
        output_tail=_read_tail(output),
        duration_seconds=round(time.monotonic() - started, 3),
        timed_out=timed_out,
        cancelled=cancelled,
    )


def _shim_interpreter(run_as: tuple[int, int] | None) -> str | None:
    """A Python the (possibly unprivileged) user can start, for the shim; None runs the program directly."""
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if candidate and os.path.isfile(candidate):
            if run_as is None or _blocked_for(Path(os.path.realpath(candidate)), run_as, file=True) is None:
                return candidate
    return None


def _read_tail(path: Path, limit: int = OUTPUT_TAIL_CHARS) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit * 4))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return text if len(text) <= limit else "…" + text[-limit:]


# -- configuration and results --------------------------------------------------------------------------------


@dataclass
class RunnerOptions:
    """How a runner works. `run_as`: "auto" drops to uid/gid 65534 when the runner is root; None never drops;
    a (uid, gid) pair drops to that user."""

    repo: Path
    adapter: Adapter
    agent_id: str | None = None
    test_command: list[str] | None = None
    test_timeout: float = 600.0
    agent_timeout: float = 1800.0
    apply: ApplyMode = "commit"
    wait_seconds: float = 20.0
    run_as: tuple[int, int] | Literal["auto"] | None = "auto"
    environ: Mapping[str, str] | None = None
    # Where worktrees and scratch directories go; None: a tmpfs when there is one (checking out a large
    # repository twice per work order is most of the runner's own time on a disk), else the system's temp dir.
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.apply not in APPLY_MODES:
            raise ValueError(f"apply must be one of {', '.join(APPLY_MODES)}, got {self.apply!r}")
        if self.agent_timeout <= 0 or self.test_timeout <= 0:
            raise ValueError("timeouts must be positive")


@dataclass
class Outcome:
    """What the runner did with one work order, as reported to the server."""

    work_order_id: str
    status: Literal["completed", "failed", "lost"]
    reason: str | None = None
    message: str = ""
    diff: str | None = None
    files: list[str] = field(default_factory=list)
    commit: str | None = None
    branch: str | None = None
    tests: git.TestResult | None = None
    base_commit: str | None = None
    agent_claims: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False
    output_tail: str | None = None
    answer: dict[str, Any] | None = None


class _Cancelled(Exception):
    pass


class _Heartbeat(threading.Thread):
    """Heartbeats every `interval` seconds; sets `cancel` when the server asks to stop or the lease is gone."""

    def __init__(self, client: AgentClient, claim: Claim, cancel: threading.Event) -> None:
        super().__init__(name=f"heartbeat-{claim.work_order_id}", daemon=True)
        self.client = client
        self.claim = claim
        self.cancel = cancel
        self.interval = max(0.2, claim.heartbeat_interval_seconds)
        self.note = "claimed"
        self.lease_lost = False
        self.cancel_requested = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                beat = self.client.heartbeat(self.claim.work_order_id, self.claim.lease_id, self.note)
            except Conflict as exc:
                log.warning("work order %s: lease lost (%s); stopping the agent", self.claim.work_order_id, exc)
                self.lease_lost = True
                self.cancel.set()
                return
            except MendloopError as exc:
                log.warning("work order %s: heartbeat failed: %s", self.claim.work_order_id, exc.message)
                continue
            if beat.cancel_requested:
                log.warning("work order %s: cancel requested; stopping the agent", self.claim.work_order_id)
                self.cancel_requested = True
                self.cancel.set()
                return

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5)


# -- the runner -----------------------------------------------------------------------------------------------


class AgentRunner:
    def __init__(self, client: AgentClient, options: RunnerOptions) -> None:
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
            removed = git.prune_stale(self.repo, parent=self.workdir)
        except MendloopError as exc:
            log.warning("could not prune stale worktrees of %s: %s", self.repo, exc.message)
        else:
            if removed:
                log.info("removed %d stale worktree(s) of %s", removed, self.repo)
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
        beat = _Heartbeat(self.client, claim, cancel)
        beat.start()
        scratch = Path(tempfile.mkdtemp(prefix=f"mendloop-agent-{_safe(wo_id)}-", dir=self.workdir))
        outcome: Outcome
        try:
            outcome = self._work(claim, scratch, cancel, beat)
        except _Cancelled:
            outcome = Outcome(wo_id, "failed", "agent_error", "stopped: " + self._why_stopped(beat), stopped=True)
        except (AgentError, PatchRejected) as exc:
            outcome = Outcome(wo_id, "failed", exc.reason, exc.message)
            tail = exc.fields.get("output_tail")
            if tail:
                outcome.output_tail = str(tail)[-OUTPUT_TAIL_CHARS:]
        except MendloopError as exc:
            outcome = Outcome(wo_id, "failed", "agent_error", f"runner error: {exc.message}")
        except Exception as exc:  # a bug here must not leave the work order leased until the lease lapses
            log.exception("work order %s: unexpected error", wo_id)
            outcome = Outcome(wo_id, "failed", "agent_error", f"runner error: {type(exc).__name__}: {exc}")
        finally:
            beat.stop()
            self._current_cancel = None
            shutil.rmtree(scratch, ignore_errors=True)
        if beat.lease_lost:
            return self._lost(claim, outcome, "the lease was lost while working")
        return self._report(claim, outcome, beat)

    def _why_stopped(self, beat: _Heartbeat) -> str:
        if beat.cancel_requested:
            return "cancel requested by the server"
        if beat.lease_lost:
            return "lease lost"
        return "the runner is shutting down"

    def _work(self, claim: Claim, scratch: Path, cancel: threading.Event, beat: _Heartbeat) -> Outcome:
        wo_id = claim.work_order_id
        ctx = claim.context
        self._check_repository(ctx)
        constraints = _constraints(ctx)
        test_command = self.options.test_command or _argv(ctx.get("test_command"))
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
        result_file = scratch / "result.json"
        (scratch / "work_order.json").write_text(json.dumps(claim.work_order, indent=2, default=str), "utf-8")
        if self.run_as is not None:
            for p in (scratch, home, scratch / "work_order.json"):
                os.chown(p, *self.run_as)

        beat.note = f"{self.adapter.name} working"
        with git.worktree(self.repo, base, parent=self.workdir) as wt:
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
            claims = _read_result(result_file)
            diff = git.diff_worktree(wt, base=base)
            if not diff.strip():
                raise AgentError("agent_error", "agent exited 0 with no change")
            summary = patch.check_diff(diff, constraints)
            patch.check_paths_in_worktree(wt, summary.files)

        if cancel.is_set():
            raise _Cancelled()
        beat.note = "running the tests"
        tests = self._run_tests(base, diff, summary, test_command, scratch, cancel)
        if cancel.is_set():
            raise _Cancelled()
        if not tests.passed:
            what = (
                f"tests timed out after {tests.duration_seconds:g}s"
                if tests.timed_out
                else f"tests failed with exit code {tests.exit_code}"
            )
            claimed = claims.get("tests_passed")
            if claimed is True:
                what += " (the agent said they passed; the runner's own run overrules it)"
            raise PatchRejected("tests_failed", f"{what}; output tail:\n{tests.output_tail}")

        beat.note = f"applying ({self.options.apply})"
        outcome = Outcome(
            wo_id, "completed", diff=diff, files=list(summary.files), tests=tests, base_commit=base, agent_claims=claims
        )
        message = _commit_message(claim, claims)
        if self.options.apply == "commit":
            applied = git.apply_patch(
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
        outcome.message = _summary_text(self, outcome, summary)
        return outcome

    # -- steps ----------------------------------------------------------------------------------------------

    def _check_repository(self, ctx: Mapping[str, Any]) -> None:
        named = ctx.get("repository")
        if named and Path(str(named)).resolve() != self.repo:
            raise AgentError("out_of_scope", f"work order is for repository {named}, this runner serves {self.repo}")

    def _base_commit(self, ctx: Mapping[str, Any]) -> str:
        base = ctx.get("base_commit")
        if isinstance(base, str) and re.fullmatch(r"[0-9a-fA-F]{7,64}", base):
            check = subprocess.run(
                ["git", "-C", str(self.repo), "cat-file", "-e", f"{base}^{{commit}}"],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
            if check.returncode == 0:
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
        dotgit = wt / ".git"
        saved_dotgit = dotgit.read_bytes()
        if self.run_as is not None:
            _give_tree(wt, self.run_as)
            _make_traversable(wt.parent)
            os.chown(task.prompt_file, *self.run_as)
            _check_reachable(wt, self.run_as)
        log.info("work order %s: running %s", task.work_order_id, invocation.argv[0])
        try:
            result = run_process(
                invocation.argv,
                cwd=wt,
                env=env,
                timeout=task.timeout,
                cancel=cancel,
                run_as=self.run_as,
                output=task.scratch / "agent-output.log",
            )
        finally:
            if self.run_as is not None:
                _give_tree(wt, (os.getuid(), os.getgid()))
            # The agent could have pointed .git elsewhere (a config with hooks the runner's git would run).
            _restore_file(dotgit, saved_dotgit)
        if result.cancelled:
            raise _Cancelled()
        if result.timed_out:
            raise AgentError(
                "timeout",
                f"agent did not finish within {task.timeout:g}s; its process group was killed",
                output_tail=result.output_tail,
            )
        self.adapter.remove_leftovers(wt, existed)
        if result.exit_code != 0:
            raise AgentError(
                "agent_error",
                f"agent exited with {result.exit_code}; output tail:\n{result.output_tail}",
                output_tail=result.output_tail,
            )

    def _run_tests(
        self,
        base: str,
        diff: str,
        summary: patch.PatchSummary,
        argv: list[str],
        scratch: Path,
        cancel: threading.Event,
    ) -> git.TestResult:
        home = scratch / "test-home"
        home.mkdir(exist_ok=True)
        with git.worktree(self.repo, base, parent=self.workdir) as twt:
            patch.check_paths_in_worktree(twt, summary.files)
            git.apply_check(twt, diff, expected=summary)
            git.apply(twt, diff)
            dotgit = twt / ".git"
            saved_dotgit = dotgit.read_bytes()
            if self.run_as is not None:
                os.chown(home, *self.run_as)
                _give_tree(twt, self.run_as)
                _make_traversable(twt.parent)
                _check_reachable(twt, self.run_as)
            try:
                result = run_process(
                    argv,
                    cwd=twt,
                    env=self._environment(home, {}),
                    timeout=self.options.test_timeout,
                    cancel=cancel,
                    run_as=self.run_as,
                    output=scratch / "tests-output.log",
                )
            finally:
                # The tests ran the patched code: git must not follow a .git they rewrote when removing the tree.
                _restore_file(dotgit, saved_dotgit)
        if result.cancelled:
            raise _Cancelled()
        return git.TestResult(
            passed=result.exit_code == 0,
            exit_code=result.exit_code,
            output_tail=result.output_tail,
            duration_seconds=result.duration_seconds,
            timed_out=result.timed_out,
        )

    def _commit_on_branch(self, wo_id: str, base: str, diff: str, message: str) -> tuple[str, str]:
        branch = f"mendloop/{_safe(wo_id)}"
        _git(self.repo, "check-ref-format", "--branch", branch)
        with git.worktree(self.repo, base, parent=self.workdir) as bwt:
            git.apply(bwt, diff)
            _git(bwt, "add", "-A")
            sha = git.commit(bwt, message, trailers={"Work-Order": wo_id})
        _git(self.repo, "branch", "--force", branch, sha)
        return sha, branch

    # -- reporting ------------------------------------------------------------------------------------------

    def _report(self, claim: Claim, outcome: Outcome, beat: _Heartbeat) -> Outcome:
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
                retryable = False if beat.cancel_requested else outcome.stopped or _RETRYABLE.get(reason, False)
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
                revert = git.revert(self.repo, outcome.commit, trailers={"Work-Order": claim.work_order_id})
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


# -- helpers --------------------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100] or "wo"


def _argv(value: Any) -> list[str] | None:
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return list(value)
    return None


def _constraints(ctx: Mapping[str, Any]) -> patch.Constraints:
    given = ctx.get("constraints")
    data = dict(given) if isinstance(given, Mapping) else {}
    known = {f.name for f in fields(patch.Constraints)}
    data = {k: v for k, v in data.items() if k in known and v is not None}
    # The target's forbidden paths add to the built-in list; they never replace it.
    data["forbidden_paths"] = [*patch.DEFAULT_FORBIDDEN, *(data.get("forbidden_paths") or [])]
    try:
        return patch.Constraints.from_mapping(data)
    except ValueError as exc:
        raise AgentError("needs_human", f"the work order's constraints are invalid: {exc}") from exc


def _read_result(path: Path) -> dict[str, Any]:
    """The agent's own report, if any: a small JSON object, read without following a symlink. Only claims."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        data = os.read(fd, MAX_RESULT_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RESULT_BYTES:
        return {"error": "result file too large"}
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {"error": "result file is not JSON"}
    if not isinstance(parsed, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(parsed.get("summary"), str):
        out["summary"] = parsed["summary"][:4000]
    if isinstance(parsed.get("tests_passed"), bool):
        out["tests_passed"] = parsed["tests_passed"]
    return out


def _commit_message(claim: Claim, claims: Mapping[str, Any]) -> str:
    title = str(claim.work_order.get("description") or f"Fix for {claim.work_order_id}").splitlines()[0][:200]
    body = str(claims.get("summary") or "").strip()
    return f"{title}\n\n{body}\n" if body else f"{title}\n"


def _summary_text(runner: AgentRunner, outcome: Outcome, summary: patch.PatchSummary) -> str:
    parts = [
        f"{runner.adapter.name} changed {len(summary.files)} file(s) (+{summary.added}/-{summary.removed}): "
        + ", ".join(summary.files),
    ]
    if outcome.tests is not None:
        parts.append(f"mendloop's own test run passed in {outcome.tests.duration_seconds:g}s")
    if outcome.commit and outcome.branch:
        parts.append(f"committed {outcome.commit[:12]} on branch {outcome.branch} for review (not merged)")
    elif outcome.commit:
        parts.append(f"applied as commit {outcome.commit[:12]}")
    else:
        parts.append("held for approval: nothing applied")
    if outcome.agent_claims.get("summary"):
        parts.append(f"agent's summary: {outcome.agent_claims['summary']}")
    return "; ".join(parts)


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(cwd), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")}, "LC_ALL": "C"},
    )
    if proc.returncode != 0:
        raise MendloopError(f"git {args[0]} failed: {(proc.stderr or proc.stdout).strip()[:500]}")
    return proc.stdout


def _give_tree(root: Path, owner: tuple[int, int]) -> None:
    """chown -R without following symlinks."""
    uid, gid = owner
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            try:
                os.lchown(os.path.join(dirpath, name), uid, gid)
            except FileNotFoundError:
                pass


def _make_traversable(directory: Path) -> None:
    mode = directory.stat().st_mode
    os.chmod(directory, stat.S_IMODE(mode) | 0o111)


def _blocked_for(path: Path, owner: tuple[int, int], *, file: bool = False) -> Path | None:
    """The first directory on the way to `path` that `owner` cannot search (or `path` itself when `file` and it
    cannot execute it); None when nothing blocks."""
    uid, gid = owner

    def allowed(st: os.stat_result) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid == gid:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    resolved = path.resolve()
    for parent in reversed(resolved.parents):
        if not allowed(parent.stat()):
            return parent
    if (file or resolved.is_dir()) and not allowed(resolved.stat()):
        return resolved
    return None


def _check_reachable(path: Path, owner: tuple[int, int]) -> None:
    """The worktree must be reachable by the agent's user, or the agent cannot even start there."""
    blocked = _blocked_for(path, owner)
    if blocked is not None:
        raise AgentError(
            "agent_error",
            f"{blocked} is not searchable by uid {owner[0]}: the agent cannot reach its worktree; "
            "set TMPDIR to a directory others can enter, or run without dropping privileges",
        )


def _restore_file(path: Path, content: bytes) -> None:
    try:
        if path.is_symlink() or path.is_file():
            if path.read_bytes() == content and not path.is_symlink():
                return
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    except OSError:
        pass
    path.write_bytes(content)


@contextmanager
def running(runner: AgentRunner) -> Iterator[AgentRunner]:
    """`with running(runner):` starts it in a thread and always stops it."""
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def default_workdir(min_free_bytes: int = 2 << 30) -> Path:
    """A tmpfs (/dev/shm) when it is writable and has room, else the system's temp directory."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize >= min_free_bytes:
                return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())
