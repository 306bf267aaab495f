"""The one way a patch's tests are run and judged, by the agent runner and by the server alike.

The test command runs twice, each time in a fresh worktree through `Sandbox.run`: at the base commit, and at the
base with the patch applied. Each run writes a report of every test's outcome to a scratch directory *outside* the
worktree (the only place besides the worktree the sandbox lets it write), and `domain.test_verdict.judge` compares
the two: SWE-bench's FAIL_TO_PASS / PASS_TO_PASS rule. The base run is cached per (repository, base commit, test
argv, its extra environment and directory, report setting) in the repository's git directory, so a second work order
on the same base does not rerun it.

The command is a `domain.test_command.TestCommand`: the argv, the target's `test_env` (added to the environment the
caller gives) and `test_cwd` (the directory it runs in, relative to the worktree's root; one that does not exist
in the worktree is `test_env_error`).

Reports, by the test command (`plan`):

- pytest (`pytest ...`, `py.test ...`, `python -m pytest ...`, `python3.11 -m py.test ...`): `--junitxml=PATH` is
  inserted right after the program, before any `--`;
- stdlib unittest (`python -m unittest ...`): run through mendloop's `unittest_junit.py`, copied to the scratch
  directory and run under the same interpreter, which writes the same JUnit XML;
- anything else: the target's `report:` setting, `{format: junit, path_arg: "--junit-xml={path}"}` (the argument,
  `{path}` replaced, is appended), or `none`/unset: judged by the exit code alone, with no base run.

A run whose report is expected but missing or unreadable did not run its tests properly: rejected, never passed.
A command that cannot start (exit 126 or 127, or no such program) at either commit is `test_env_error`: the
environment is broken, not the patch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mendloop.agents import worktrees
from mendloop.agents.worktree_access import check_reachable, give_tree, make_traversable, restore_file
from mendloop.domain import test_verdict
from mendloop.domain.test_command import TestCommand
from mendloop.errors import InputError, MendloopError, PatchRejected
from mendloop.infra import git, process
from mendloop.infra.sandbox import Sandbox

log = logging.getLogger(__name__)

OUTPUT_TAIL_CHARS = process.DEFAULT_TAIL_CHARS
MAX_REPORT_BYTES = 16 << 20
MAX_TESTCASES = 200_000
# Exit codes of a shell (and of the sandbox's launcher) for a program that is not executable / not found.
ENV_ERROR_EXITS = frozenset({126, 127})
CACHE_DIR_NAME = "mendloop-test-base"
_CACHE_VERSION = 1

_PYTHON = re.compile(r"python(\d+(\.\d+)*)?")
_RUNNER_SCRIPT = Path(__file__).with_name("unittest_junit.py")
_HOSTILE_XML = (b"<!doctype", b"<!entity")

Kind = Literal["pytest", "unittest", "junit", "none"]


class Cancelled(MendloopError):
    """The test run was stopped by its cancel event."""


@dataclass(frozen=True, slots=True)
class ReportSetting:
    """The target's `report:`: "auto" (pytest and unittest recognised, else the exit code only), "junit" with
    `path_arg` (an argument holding `{path}`), or "none" (the exit code only)."""

    format: Literal["auto", "junit", "none"] = "auto"
    path_arg: str | None = None

    @classmethod
    def from_value(cls, value: Any) -> ReportSetting:
        """From the config or a work order's context: None, "none", or {format, path_arg}."""
        if value is None:
            return cls()
        if hasattr(value, "model_dump"):  # config.TestReportConfig
            value = value.model_dump()
        if value == "none":
            return cls("none")
        if isinstance(value, Mapping):
            fmt = value.get("format", "junit")
            path_arg = value.get("path_arg")
            if fmt == "none":
                return cls("none")
            if fmt == "junit" and isinstance(path_arg, str) and "{path}" in path_arg:
                return cls("junit", path_arg)
        raise InputError(
            "report must be none or {format: junit, path_arg: '...{path}...'}", field="report", value=repr(value)
        )

    def as_key(self) -> list[str | None]:
        return [self.format, self.path_arg]


@dataclass(frozen=True, slots=True)
class Plan:
    argv: list[str]
    kind: Kind
    report: Path | None


@dataclass(frozen=True)
class TestResult:
    """One judged test run: `passed` is the verdict (for "none" reports: exit code 0 in time)."""

    __test__ = False  # a result type, not a pytest test class

    passed: bool
    exit_code: int | None
    output_tail: str
    duration_seconds: float
    timed_out: bool
    report: str = "none"
    executed: int | None = None
    base_executed: int | None = None
    base_cached: bool = False
    message: str = ""


@dataclass(frozen=True, slots=True)
class _Run:
    completed: process.Completed
    kind: Kind
    outcomes: dict[str, str] | None
    report_error: str | None

    @property
    def tail(self) -> str:
        return self.completed.stdout_text(OUTPUT_TAIL_CHARS)


def plan(argv: Sequence[str], setting: ReportSetting, report: Path, runner_script: Path) -> Plan:
    """The argv to run and the kind of report it writes to `report`."""
    args = list(argv)
    if setting.format == "none":
        return Plan(args, "none", None)
    if setting.format == "junit" and setting.path_arg is not None:
        return Plan([*args, setting.path_arg.replace("{path}", str(report))], "junit", report)
    program = os.path.basename(args[0])
    if program in ("pytest", "py.test"):
        return Plan([args[0], f"--junitxml={report}", *args[1:]], "pytest", report)
    if _PYTHON.fullmatch(program) and len(args) >= 3 and args[1] == "-m":
        if args[2] in ("pytest", "py.test"):
            return Plan([*args[:3], f"--junitxml={report}", *args[3:]], "pytest", report)
        if args[2] == "unittest":
            return Plan([args[0], str(runner_script), "--junit-xml", str(report), *args[3:]], "unittest", report)
    return Plan(args, "none", None)


def parse_junit(data: bytes) -> dict[str, str]:
    """test id (`classname.name`) → passed | failed | error | skipped. Raises ValueError for a report that is too
    large, declares a DOCTYPE or entities (no entity expansion: a billion-laughs report is refused unread), or is
    not JUnit XML."""
    if len(data) > MAX_REPORT_BYTES:
        raise ValueError(f"the report is larger than {MAX_REPORT_BYTES} bytes")
    lowered = data.lower()
    if any(marker in lowered for marker in _HOSTILE_XML):
        raise ValueError("the report declares a DOCTYPE or entities")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"the report is not XML: {exc}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"the report's root is <{root.tag}>, not <testsuites> or <testsuite>")
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    outcomes: dict[str, str] = {}
    for i, case in enumerate(root.iter("testcase")):
        if i >= MAX_TESTCASES:
            raise ValueError(f"the report has more than {MAX_TESTCASES} test cases")
        name = case.get("name") or ""
        classname = case.get("classname") or ""
        test_id = f"{classname}.{name}" if classname else name
        tags = {child.tag for child in case}
        outcome = (
            "error"
            if "error" in tags
            else "failed"
            if "failure" in tags
            else "skipped"
            if "skipped" in tags
            else "passed"
        )
        # One test can appear twice (a failing call and an erroring teardown): the worst outcome counts.
        if rank[outcome] >= rank[outcomes.get(test_id, "passed")]:
            outcomes[test_id] = outcome
    return outcomes


def read_report(path: Path) -> bytes:
    """The report's bytes, read without following a symlink and only from a regular file (the tests wrote the
    directory it is in)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("the report is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_REPORT_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class Suite:
    """The test command of one repository, run through `sandbox` in worktrees under `workdir`. `argv`: a
    TestCommand, or a bare argv (no extra environment, run at the worktree's root)."""

    def __init__(
        self,
        repo: Path,
        argv: Sequence[str] | TestCommand,
        *,
        sandbox: Sandbox,
        timeout: float,
        env: Mapping[str, str],
        report: ReportSetting | None = None,
        workdir: Path | None = None,
        cache: bool = True,
        writable: Sequence[Path] = (),
    ) -> None:
        self.command = TestCommand.coerce(argv)
        if timeout <= 0:
            raise InputError("the test timeout must be positive", field="test_timeout")
        self.root = git.toplevel(repo)
        self.argv = list(self.command.argv)
        self.sandbox = sandbox
        self.timeout = timeout
        # The target's variables last: the reserved names (domain/test_command.py) cannot be among them.
        self.env = {**env, **self.command.environ}
        self.setting = report or ReportSetting()
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
        self.cache = cache
        # Besides its report directory: what the test command may write outside the worktree (nothing, normally).
        self.writable = list(writable)

    # -- the verdict ----------------------------------------------------------------------------------------

    def verify(
        self,
        base: str,
        patch: Callable[[Path], None],
        *,
        failing_tests: Sequence[str] = (),
        cancel: threading.Event | None = None,
    ) -> TestResult:
        """Run the tests at `base` (or take them from the cache) and in a worktree of `base` that `patch` has
        applied the change to; the accepted result, or PatchRejected (tests_failed, tests_regressed,
        tests_disabled, test_env_error). Raises Cancelled."""
        base_sha = git.resolve(self.root, base)
        base_outcomes, cached = self._base(base_sha, cancel)
        patched = self._run(base_sha, cancel, patch=patch)
        done = patched.completed
        if done.timed_out:
            raise _rejected("tests_failed", f"tests timed out after {done.duration:g}s", patched)
        if patched.kind == "none":
            passed = done.returncode == 0
            result = self._result(patched, passed, f"exit code {done.returncode}")
            if not passed:
                raise _rejected("tests_failed", f"tests failed with exit code {done.returncode}", patched)
            return result
        if patched.outcomes is None:
            raise _rejected(
                "tests_failed",
                f"the tests did not run properly: {patched.report_error} (exit code {done.returncode})",
                patched,
            )
        verdict = test_verdict.judge(base_outcomes, patched.outcomes, failing_tests, patched_exit=done.returncode)
        if not verdict.accepted:
            raise _rejected(verdict.reason or "tests_failed", verdict.message, patched, verdict=verdict)
        return self._result(
            patched,
            True,
            verdict.message,
            base_executed=verdict.counts.get("base_executed"),
            base_cached=cached,
        )

    def _result(self, run: _Run, passed: bool, message: str, **extra: Any) -> TestResult:
        done = run.completed
        return TestResult(
            passed=passed,
            exit_code=done.returncode,
            output_tail=run.tail,
            duration_seconds=done.duration,
            timed_out=done.timed_out,
            report=run.kind,
            executed=test_verdict.executed(run.outcomes) if run.outcomes is not None else None,
            message=message,
            **extra,
        )

    # -- the base run and its cache -------------------------------------------------------------------------

    def _base(self, base_sha: str, cancel: threading.Event | None) -> tuple[dict[str, str] | None, bool]:
        """The base's outcomes (None: nothing to compare with) and whether they came from the cache."""
        probe = plan(self.argv, self.setting, Path("report"), _RUNNER_SCRIPT)
        if probe.kind == "none":
            return None, False  # judged by the exit code alone: a base run would add nothing
        key = self._cache_key(base_sha)
        stored = self._cache_get(key)
        if stored is not None:
            return stored, True
        run = self._run(base_sha, cancel)
        if run.outcomes is None or run.completed.timed_out:
            # The tests cannot run at the base (a broken base, a report the runner does not write): the patched
            # run must then pass outright. Not cached: it may be the machine, not the commit.
            log.warning("no test report at base %s: %s", base_sha[:12], run.report_error or "timed out")
            return None, False
        self._cache_put(key, run.outcomes)
        return run.outcomes, False

    def _cache_key(self, base_sha: str) -> tuple[str, list[Any]]:
        key = [
            _CACHE_VERSION,
            os.path.realpath(self.root),
            base_sha,
            self.argv,
            self.setting.as_key(),
            # Another environment or directory can pass or fail other tests: another base run.
            self.command.as_key(),
        ]
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        return digest, key

    def _cache_file(self, digest: str) -> Path:
        return git.common_dir(self.root) / CACHE_DIR_NAME / f"{digest}.json"

    def _cache_get(self, key: tuple[str, list[Any]]) -> dict[str, str] | None:
        if not self.cache:
            return None
        digest, full = key
        try:
            data = json.loads(self._cache_file(digest).read_bytes()[:MAX_REPORT_BYTES])
        except (OSError, ValueError):
            return None
        outcomes = data.get("outcomes") if isinstance(data, dict) and data.get("key") == full else None
        if not isinstance(outcomes, dict) or not all(o in test_verdict.OUTCOMES for o in outcomes.values()):
            return None
        return {str(k): str(v) for k, v in outcomes.items()}

    def _cache_put(self, key: tuple[str, list[Any]], outcomes: dict[str, str]) -> None:
        if not self.cache:
            return
        digest, full = key
        path = self._cache_file(digest)
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"key": full, "outcomes": outcomes, "at": time.time()}), "utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not cache the base test run in %s: %s", path, exc)

    # -- one run --------------------------------------------------------------------------------------------

    def _run(
        self,
        commit: str,
        cancel: threading.Event | None,
        *,
        patch: Callable[[Path], None] | None = None,
    ) -> _Run:
        scratch = Path(tempfile.mkdtemp(prefix="mendloop-tests-", dir=self.workdir))
        try:
            home = scratch / "home"
            home.mkdir()
            script = scratch / _RUNNER_SCRIPT.name
            shutil.copyfile(_RUNNER_SCRIPT, script)
            os.chmod(script, 0o644)
            run_as = self.sandbox.run_as
            if run_as is not None:
                # The tests' user writes its report and its HOME here, and nowhere else outside the worktree.
                os.chown(scratch, *run_as)
                os.chown(home, *run_as)
            the_plan = plan(self.argv, self.setting, scratch / "report.xml", script)
            with worktrees.worktree(self.root, commit, parent=self.workdir) as tree:
                if patch is not None:
                    patch(tree)
                where = "at the base" if patch is None else "with the patch"
                done = self._start(the_plan, tree, run_dir(tree, self.command.cwd, where), home, scratch, cancel)
            if done.cancelled:
                raise Cancelled("the test run was cancelled")
            if done.returncode in ENV_ERROR_EXITS:
                raise PatchRejected(
                    "test_env_error",
                    f"the test command {self.argv[0]!r} could not start {where} (exit code {done.returncode}): "
                    f"the environment is broken, not the patch; output tail:\n{done.stdout_text(OUTPUT_TAIL_CHARS)}",
                    exit_code=done.returncode,
                    output_tail=done.stdout_text(OUTPUT_TAIL_CHARS),
                )
            outcomes: dict[str, str] | None = None
            error: str | None = None
            if the_plan.report is not None:
                try:
                    outcomes = parse_junit(read_report(the_plan.report))
                except FileNotFoundError:
                    error = "the test command wrote no report"
                except (OSError, ValueError) as exc:
                    error = f"the report cannot be read: {exc}"
            return _Run(done, the_plan.kind, outcomes, error)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _start(
        self, the_plan: Plan, tree: Path, cwd: Path, home: Path, scratch: Path, cancel: threading.Event | None
    ) -> process.Completed:
        env = dict(self.env)
        if self.sandbox.run_as is not None:
            env["HOME"] = str(home)
        return run_in(
            self.sandbox,
            the_plan.argv,
            tree,
            env=env,
            timeout=self.timeout,
            writable=[scratch, *self.writable],
            cancel=cancel,
            cwd=cwd,
        )


def run_dir(tree: Path, cwd: str | None, where: str = "") -> Path:
    """The directory `cwd` (relative, checked at config load) names in the worktree `tree`: PatchRejected
    `test_env_error` when it is not a directory there, or resolves (through a symlink) outside the tree."""
    if cwd is None:
        return tree
    real_tree = Path(os.path.realpath(tree))
    found = Path(os.path.realpath(tree / cwd))
    if not found.is_relative_to(real_tree) or not found.is_dir():
        raise PatchRejected(
            "test_env_error",
            f"the test directory {cwd!r} (test_cwd) is not a directory in the worktree{' ' + where if where else ''}:"
            " the test setup is broken, not the patch",
            test_cwd=cwd,
        )
    return found


def run_in(
    sandbox: Sandbox,
    argv: Sequence[str],
    tree: Path,
    *,
    env: Mapping[str, str],
    timeout: float,
    writable: Sequence[Path],
    cancel: threading.Event | None = None,
    cwd: Path | None = None,
) -> process.Completed:
    """Run one test process in the worktree `tree` through `sandbox`, in `cwd` (a directory inside it; default:
    its root): the tree handed to the sandbox's user for the run (when it drops to one) and taken back after, its
    `.git` file put back as it was. A command that cannot start is PatchRejected `test_env_error`."""
    run_as = sandbox.run_as
    start_in = cwd or tree
    if run_as is not None:
        _check_program(argv[0], start_in, env, run_as)
    dotgit = tree / ".git"
    saved_dotgit = dotgit.read_bytes() if dotgit.is_file() else None
    if run_as is not None:
        give_tree(tree, run_as)
        make_traversable(tree.parent)
        check_reachable(tree, run_as)
    try:
        return sandbox.run(
            argv,
            cwd=start_in,
            env=env,
            timeout=timeout,
            # The whole tree stays writable when the tests start in a sub-directory of it.
            writable=[tree, *writable] if start_in != tree else list(writable),
            network=False,
            cancel=cancel,
            # A few bytes more than the tail needs, so a character cut at the start only costs one "?".
            keep_bytes=OUTPUT_TAIL_CHARS * 4,
            merge_stderr=True,
            readonly=_visible(tree, argv),
        )
    except process.CannotStart as exc:
        raise PatchRejected(
            "test_env_error",
            f"cannot start the test command {argv[0]!r}: {exc.strerror}; the environment is broken, not the patch",
        ) from exc
    finally:
        if run_as is not None:
            give_tree(tree, (os.getuid(), os.getgid()))
        if saved_dotgit is not None:
            # The tests ran the patched code: git must not follow a .git they rewrote when removing the tree.
            restore_file(dotgit, saved_dotgit)


def _check_program(program: str, cwd: Path, env: Mapping[str, str], run_as: tuple[int, int]) -> None:
    """An interpreter the tests' user cannot reach (a venv under /root, 0700) is test_env_error before anything
    runs: started anyway it fails as an exit code the tests' own failures also use."""
    found = program if os.sep in program else shutil.which(program, path=env.get("PATH") or os.defpath)
    if found is None:
        return  # the sandbox reports it (CannotStart)
    target = Path(os.path.realpath(os.path.join(cwd, found)))
    if not target.is_file():
        return
    blocked = process.blocked_for(target, run_as, file=True)
    if blocked is not None:
        raise PatchRejected(
            "test_env_error",
            f"the test command {program!r} ({target}) cannot be started by uid {run_as[0]}: {blocked} is not "
            "searchable or executable for it; the environment is broken, not the patch",
        )


def _visible(tree: Path, argv: Sequence[str]) -> list[Path]:
    """What bubblewrap's private /tmp must not hide: the git directory the worktree's `.git` points into, and the
    files the argv names by absolute path (the test program, a script in a temp directory)."""
    seen: list[Path] = []
    try:
        seen.append(git.common_dir(tree))
    except MendloopError:
        pass
    seen += [Path(a) for a in argv if os.path.isabs(a) and os.path.isfile(a)]
    return seen


def _rejected(reason: str, what: str, run: _Run, *, verdict: test_verdict.Verdict | None = None) -> PatchRejected:
    done = run.completed
    fields: dict[str, Any] = {
        "exit_code": done.returncode,
        "timed_out": done.timed_out,
        "duration_seconds": done.duration,
        "output_tail": run.tail,
    }
    if verdict is not None:
        fields.update(
            regressed=list(verdict.regressed),
            disappeared=list(verdict.disappeared),
            new_failures=list(verdict.new_failures),
            unfixed=list(verdict.unfixed),
            counts=verdict.counts,
        )
    return PatchRejected(reason, f"{what}; output tail:\n{run.tail}", **fields)


__all__ = [
    "ENV_ERROR_EXITS",
    "Cancelled",
    "Plan",
    "ReportSetting",
    "Suite",
    "TestResult",
    "parse_junit",
    "plan",
    "run_dir",
    "run_in",
]
