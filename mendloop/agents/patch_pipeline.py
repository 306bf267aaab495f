"""The patch pipeline: a diff that passed the patch safety checks is applied with `git apply` that never skips
silently, tested against the base in fresh worktrees (`test_suite`: no test that passed at the base may fail or vanish,
the named failing tests must pass), and committed as one commit with trailers on the
repository's branch; nothing is left behind when a step fails, and a landed commit can be reverted.

Every git call goes through `mendloop.infra.git` (its environment policy: no repository hooks, filters or external
diff drivers, not even on the commits onto the operator's branch, because a patch may have edited a hook) and every
test command through `mendloop.infra.sandbox` (`test_suite`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import posixpath
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mendloop.agents import landing, test_suite, worktrees
from mendloop.agents.patch_safety import (
    Constraints,
    PatchSummary,
    check_config_sections,
    check_diff,
    check_paths_in_worktree,
)
from mendloop.agents.test_suite import ReportSetting, TestResult
from mendloop.agents.worktrees import is_within
from mendloop.domain.test_command import TestCommand
from mendloop.errors import InputError, MendloopError, PatchRejected
from mendloop.infra import failpoints, git, process
from mendloop.infra.git import CHECKOUT_TIMEOUT
from mendloop.infra.sandbox import Sandbox, detect

LOCK_TIMEOUT = 120.0
OUTPUT_TAIL_CHARS = process.DEFAULT_TAIL_CHARS

_LOCK_NAME = "mendloop-apply.lock"
_TRAILER_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_IN_PROGRESS = ("MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD", "rebase-merge", "rebase-apply", "sequencer")

# What a test command inherits from mendloop's environment: enough to find programs, never mendloop's secrets.
_TEST_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


@dataclass(frozen=True)
class ApplyResult:
    commit: str
    files_changed: int
    summary: PatchSummary
    tests: TestResult | None


# With core.hooksPath ".", the hooks are files at the top of the repository.
_HOOK_NAMES = (
    "applypatch-msg",
    "pre-applypatch",
    "post-applypatch",
    "pre-commit",
    "pre-merge-commit",
    "prepare-commit-msg",
    "commit-msg",
    "post-commit",
    "pre-rebase",
    "post-checkout",
    "post-merge",
    "pre-push",
    "post-rewrite",
    "reference-transaction",
    "push-to-checkout",
    "pre-auto-gc",
    "fsmonitor-watchman",
    "post-index-change",
)


def check_patch(
    repo: Path, diff: str, constraints: Constraints, *, base: str | None = None, applied: bool = False
) -> PatchSummary:
    """Every safety check that needs the repository but no worktree; the first thing done with any diff.

    `check_diff`, with the repository's own `core.hooksPath` added to the forbidden paths; then, with `base`, the
    test-runner sections of pyproject.toml, setup.cfg and package.json compared between `base` and the patched
    tree (read through a scratch index, so nothing is checked out). `applied`: `base` already contains the diff
    (a commit the agent runner made), so the other side is computed by applying it in reverse.
    """
    root = git.toplevel(repo)
    summary = check_diff(diff, hooks_forbidden(root, constraints))
    if base is not None and summary.sectioned:
        _check_sections(root, git.resolve(root, base), diff, summary, applied=applied)
    return summary


def hooks_forbidden(root: Path, constraints: Constraints) -> Constraints:
    """`constraints` with the repository's configured hooks directory forbidden, when it lies inside the
    repository (`.git/hooks`, `.githooks/` and `.husky/` are in the default list already)."""
    configured = git.configured_hooks_path(root)
    if not configured:
        return constraints
    if os.path.isabs(configured):
        real_root = os.path.realpath(root)
        real = os.path.realpath(configured)
        if not is_within(Path(real), Path(real_root)):
            return constraints  # outside the repository: no patch can write there
        rel = os.path.relpath(real, real_root).replace(os.sep, "/")
    else:
        rel = posixpath.normpath(configured.replace("\\", "/"))
        if rel == ".." or rel.startswith("../"):
            return constraints
    if rel in ("", "."):
        extra = tuple(f"/{name}" for name in _HOOK_NAMES)
    else:
        extra = (f"/{rel}", f"/{rel}/**")
    return dataclasses.replace(constraints, forbidden_paths=(*constraints.forbidden_paths, *extra))


def _check_sections(root: Path, base: str, diff: str, summary: PatchSummary, *, applied: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="mendloop-index-") as scratch:
        env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        git.run(root, "read-tree", base, env=env)
        at_base = {path: _blob(root, f"{base}:{path}") for path in summary.sectioned}
        flags = ["--cached", *(["--reverse"] if applied else [])]
        proc = git.run(root, "apply", *flags, input=_diff_bytes(diff), env=env, check=False)
        if proc.returncode != 0:
            detail = process.tail(git.text(proc.stderr).strip(), 2000)
            raise PatchRejected("unsafe_patch", f"does not apply at {base[:12]}: {detail}")
        other = {path: _blob(root, f":{path}", env) for path in summary.sectioned}
    before, after = (other, at_base) if applied else (at_base, other)
    for path in summary.sectioned:
        check_config_sections(path, before[path], after[path])


def _blob(root: Path, spec: str, env: Mapping[str, str] | None = None) -> str | None:
    proc = git.run(root, "cat-file", "blob", spec, env=env, check=False)
    return git.text(proc.stdout) if proc.returncode == 0 else None


def apply_check(worktree: Path, diff: str, *, expected: PatchSummary | None = None) -> None:
    """Reject a diff that `git apply` would not apply completely at the worktree's root.

    With `expected` (check_diff's summary), also reject a diff git reads differently from check_diff: a path
    git would touch that the summary lacks, or different line counts, means the two parsers disagree.
    """
    root = git.toplevel(worktree)
    _apply(root, diff, "--check")
    if expected is not None:
        _cross_check(root, diff, expected)


def apply(worktree: Path, diff: str) -> None:
    """Apply to the worktree's files (not its index); checked first, so it is all or nothing."""
    root = git.toplevel(worktree)
    _apply(root, diff, "--check")
    _apply(root, diff)


def diff_worktree(worktree: Path, *, base: str) -> str:
    """Everything in the worktree that differs from `base`, new untracked files included, as a git diff.

    Computed here rather than taken from the agent, and with --binary, so symlinks, executables, binaries
    and nested repositories show up for check_diff to reject instead of vanishing from the diff.
    """
    root = git.toplevel(worktree)
    base_sha = git.resolve(root, base)
    git.run(root, "-c", "core.fileMode=true", "add", "-A", timeout=CHECKOUT_TIMEOUT)
    proc = git.run(
        root,
        "diff",
        "--cached",
        "--binary",
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        "--no-relative",
        "--ignore-submodules=none",
        "--find-renames",
        # Explicit prefixes: diff.noprefix or diff.mnemonicPrefix in the user's config would change them.
        "--src-prefix=a/",
        "--dst-prefix=b/",
        base_sha,
        timeout=CHECKOUT_TIMEOUT,
    )
    try:
        return proc.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise PatchRejected("unsafe_patch", "the change contains text that is not valid UTF-8") from None


def committed_diff(repo: Path, base: str, commit: str) -> str:
    """`git diff base..commit`, made like `diff_worktree`'s (binary, renames, fixed prefixes, no external
    drivers): what a commit that is already on the branch really changes, whatever diff came with it."""
    root = git.toplevel(repo)
    proc = git.run(
        root,
        "diff",
        "--binary",
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        "--no-relative",
        "--find-renames",
        "--src-prefix=a/",
        "--dst-prefix=b/",
        git.resolve(root, base),
        git.resolve(root, commit),
        timeout=CHECKOUT_TIMEOUT,
    )
    try:
        return proc.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise PatchRejected("unsafe_patch", "the change contains text that is not valid UTF-8") from None


def commit(
    repo_or_worktree: Path,
    message: str,
    *,
    trailers: Mapping[str, str],
    paths: Sequence[str] | None = None,
) -> str:
    """Commit with `trailers` appended to `message`; return the new commit's sha.

    With `paths`, exactly those paths are committed (`git commit --only`) and anything else already staged
    stays staged; without, whatever is staged is committed. The repository's hooks never run: the patch being
    committed may have edited one (an existing file under `core.hooksPath`), and it would run with mendloop's
    rights; the repository's policy is enforced by its CI and by the operator, not inside mendloop's commit.
    """
    root = git.toplevel(repo_or_worktree)
    text = _with_trailers(message, trailers)
    args = ["commit", "--quiet", "--cleanup=whitespace", "-m", text]
    if paths is not None:
        if not paths:
            raise InputError("commit: paths must not be empty", field="paths")
        args = ["--literal-pathspecs", *args, "--only", "--", *paths]
    git.run(root, *git.identity_flags(root), *args, timeout=CHECKOUT_TIMEOUT)
    return git.head(root)


def revert(repo: Path, sha: str, *, trailers: Mapping[str, str]) -> str:
    """Revert `sha` on the current branch as a new commit carrying `trailers`; return that commit's sha.
    Like `commit`, it runs none of the repository's hooks."""
    root = git.toplevel(repo)
    _require_branch(root)
    target = git.resolve(root, sha)
    _with_trailers("check", trailers)  # refuse bad trailers before anything changes
    before = git.head(root)
    identity = git.identity_flags(root)
    proc = git.run(root, *identity, "revert", "--no-edit", target, check=False, timeout=CHECKOUT_TIMEOUT)
    if proc.returncode != 0:
        git.run(root, "revert", "--abort", check=False)
        raise MendloopError(
            f"cannot revert {target[:12]}: {process.tail(git.text(proc.stderr) or git.text(proc.stdout))}",
            commit=target,
        )
    original = git.text(git.run(root, "log", "-1", "--format=%B", "HEAD").stdout)
    amend = git.run(
        root,
        *identity,
        "commit",
        "--amend",
        "--only",  # rewrite the message only, never sweep in whatever else is staged
        "--quiet",
        "--cleanup=whitespace",
        "-m",
        _with_trailers(original, trailers),
        check=False,
        timeout=CHECKOUT_TIMEOUT,
    )
    if amend.returncode != 0:
        # --keep moves HEAD back and keeps unrelated local changes: the caller gets an error, not half a revert.
        git.run(root, "reset", "--quiet", "--keep", before, check=False)
        raise MendloopError(
            f"cannot add trailers to the revert of {target[:12]}: {process.tail(git.text(amend.stderr))}"
        )
    return git.head(root)


def is_applied(repo: Path, diff: str) -> bool:
    """True when HEAD already contains `diff`, i.e. it reverse-applies to HEAD's tree.

    Checked against a scratch index read from HEAD, so neither the working tree nor the real index matters.
    """
    root = git.toplevel(repo)
    with tempfile.TemporaryDirectory(prefix="mendloop-index-") as scratch:
        env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        git.run(root, "read-tree", "HEAD", env=env)
        proc = git.run(
            root, "apply", "--cached", "--check", "--reverse", "-v", input=_diff_bytes(diff), env=env, check=False
        )
    return proc.returncode == 0 and not _skipped(proc)


def test_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a server-side test command sees: a few of mendloop's variables (never its secrets) plus `env`."""
    child_env = process.pick_env(_TEST_INHERITED)
    child_env.update({str(k): str(v) for k, v in (env or {}).items()})
    return child_env


def run_tests(
    worktree: Path,
    argv: list[str],
    *,
    timeout: float,
    env: Mapping[str, str],
    sandbox: Sandbox | None = None,
    writable: Sequence[Path] = (),
) -> TestResult:
    """Run the test command once in `worktree`, judged by its exit code alone (no report, no base: `apply_patch`
    does the full comparison through `test_suite.Suite`). Through `sandbox` (default: the best this machine has,
    as mendloop's user); `writable`: what it may write besides the worktree.

    Output goes to a file, not a pipe, so a background child holding the pipe cannot stall the wait; the whole
    process group is killed when the command exits or times out, so nothing it started outlives it. A command
    that cannot start is PatchRejected `test_env_error`.
    """
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise InputError("the test command must be a non-empty list of strings", field="test_command")
    if timeout <= 0:
        raise InputError("the test timeout must be positive", field="test_timeout")
    with tempfile.TemporaryDirectory(prefix="mendloop-tests-") as scratch:
        done = test_suite.run_in(
            sandbox or detect(None),
            argv,
            worktree,
            env=test_environment(env),
            timeout=timeout,
            writable=[Path(scratch), *writable],
        )
    return TestResult(
        passed=done.returncode == 0,
        exit_code=done.returncode,
        output_tail=done.stdout_text(OUTPUT_TAIL_CHARS),
        duration_seconds=done.duration,
        timed_out=done.timed_out,
    )


def patcher(diff: str, summary: PatchSummary) -> Callable[[Path], None]:
    """What makes a fresh worktree of the base the patched tree: the path checks, `git apply --check` with
    git's reading cross-checked against `summary`, then the apply."""

    def patch(tree: Path) -> None:
        check_paths_in_worktree(tree, summary.files)
        apply_check(tree, diff, expected=summary)
        apply(tree, diff)

    return patch


def apply_patch(
    repo: Path,
    diff: str,
    *,
    base_commit: str | None,
    constraints: Constraints,
    test_command: Sequence[str] | TestCommand | None,
    test_timeout: float,
    message: str,
    trailers: dict[str, str],
    env: Mapping[str, str] | None = None,
    worktree_parent: Path | None = None,
    checked_at_base: bool = False,
    sandbox: Sandbox | None = None,
    report: ReportSetting | None = None,
    failing_tests: Sequence[str] = (),
    still_wanted: Callable[[], None] | None = None,
    cancel: threading.Event | None = None,
) -> ApplyResult:
    """Validate, test against the base in fresh worktrees, then commit `diff` on the repository's current branch.

    The tests (`test_suite.Suite.verify`, through `sandbox`, default: none) run at `base_commit` and with the
    patch (`test_command`: a bare argv, or a TestCommand with the target's test_env and test_cwd); no test that
    passed at the base may fail or vanish, `failing_tests` must pass. `report`: how the test
    command reports its tests (the target's `report:`). `checked_at_base`: the caller has already checked the
    paths and `git apply --check`ed the diff in a checkout of `base_commit` (the agent runner, in its test
    worktree); without a test command there is then nothing a fresh worktree at the base would add. A branch that
    has moved since is checked where the patch lands as usual.

    PatchRejected (unsafe_patch, tests_failed, tests_regressed, tests_disabled, test_env_error) when the patch
    or the test environment is at fault; MendloopError when the repository
    is not in a state to take it (detached HEAD, local changes in the touched files, a git failure). Either
    way the repository's branch, index and working tree are as they were. `still_wanted` is called under the
    repository's lock right before the commit lands and raises to stop it (the run was cancelled while the
    tests ran). `cancel` stops the tests themselves (their process group killed; `test_suite.Cancelled`).
    """
    summary = check_patch(repo, diff, constraints)
    _with_trailers(message, trailers)
    root = git.toplevel(repo)
    _require_branch(root)
    base = git.resolve(root, base_commit or "HEAD")
    if summary.sectioned:
        _check_sections(root, base, diff, summary, applied=False)

    tests: TestResult | None = None
    if test_command is not None:
        suite = test_suite.Suite(
            root,
            test_command,
            sandbox=sandbox or detect(None),
            timeout=test_timeout,
            env=test_environment(env),
            report=report,
            workdir=worktree_parent,
        )
        tests = suite.verify(base, patcher(diff, summary), failing_tests=failing_tests, cancel=cancel)
    elif not checked_at_base:
        with worktrees.worktree(root, base, parent=worktree_parent) as tree:
            patcher(diff, summary)(tree)

    with _repo_lock(root):
        landing.recover(root)  # an apply a crash interrupted (in another process) is finished first
        current = git.head(root)
        if current != base:
            # The tests ran on base; the branch has moved since, so the patch must still apply where it lands.
            with worktrees.worktree(root, current, parent=worktree_parent) as tree:
                check_paths_in_worktree(tree, summary.files)
                apply_check(tree, diff, expected=summary)
        if still_wanted is not None:
            still_wanted()
        sha = _apply_and_commit(root, diff, summary, message, trailers)
    failpoints.reach("apply.landed")  # the commit is on the branch; the run has not recorded it yet
    return ApplyResult(commit=sha, files_changed=len(summary.files), summary=summary, tests=tests)


def _apply_and_commit(root: Path, diff: str, summary: PatchSummary, message: str, trailers: Mapping[str, str]) -> str:
    _require_branch(root)
    _require_no_operation_in_progress(root)
    check_paths_in_worktree(root, summary.files)
    dirty = _status(root, summary.files)
    if dirty:
        raise MendloopError(
            "the repository has local changes in files the patch touches: " + ", ".join(dirty),
            paths=dirty,
        )
    # --index: the patch must match both the index and the files (a check only: the landing never applies in
    # the checkout before its commit exists, see agents/landing.py).
    _apply(root, diff, "--check", "--index")
    return landing.land(root, _diff_bytes(diff), summary.files, _with_trailers(message, trailers))


def recover(repo: Path, *, worktree_parent: Path | None = None) -> str | None:
    """At start-up: finish an apply a crash interrupted (agents/landing.py) and remove the worktrees dead
    processes left behind. Returns what became of the interrupted apply, None when there was none."""
    root = git.toplevel(repo)
    with _repo_lock(root):
        outcome = landing.recover(root)
    worktrees.prune_stale(root, parent=worktree_parent)
    return outcome


def _apply(root: Path, diff: str, *flags: str) -> None:
    proc = git.run(root, "apply", "-v", *flags, input=_diff_bytes(diff), check=False)
    skipped = _skipped(proc)
    if proc.returncode != 0 or skipped:
        detail = "; ".join(skipped) if skipped else process.tail(git.text(proc.stderr).strip(), 2000)
        raise PatchRejected("unsafe_patch", f"does not apply: {detail}")


def _skipped(proc: git.Completed) -> list[str]:
    # git apply leaves out files outside the directory it runs in and still exits 0: a partial apply.
    lines = (git.text(proc.stdout) + "\n" + git.text(proc.stderr)).splitlines()
    return [line for line in lines if line.startswith("Skipped patch")]


def _cross_check(root: Path, diff: str, expected: PatchSummary) -> None:
    proc = git.run(root, "apply", "--numstat", "-z", input=_diff_bytes(diff), check=False)
    if proc.returncode != 0:
        raise PatchRejected(
            "unsafe_patch", f"git cannot read the diff: {process.tail(git.text(proc.stderr).strip(), 2000)}"
        )
    records = git.nul_split(proc.stdout)
    seen: list[str] = []
    added = removed = 0
    i = 0
    while i < len(records):
        plus, minus, path = [*records[i].split("\t", 2), "", ""][:3]
        i += 1
        if path:
            seen.append(path)
        else:  # a rename or copy is written as "added\tremoved\t\0old\0new"
            seen.extend(records[i : i + 2])
            i += 2
        if not (plus.isdigit() and minus.isdigit()):
            raise PatchRejected("unsafe_patch", f"git reads {seen[-1] if seen else '?'!r} as a binary change")
        added += int(plus)
        removed += int(minus)
    unknown = sorted(set(seen) - set(expected.files))
    if unknown:
        raise PatchRejected("unsafe_patch", f"git reads paths the safety check did not see: {', '.join(unknown)}")
    if (added, removed) != (expected.added, expected.removed):
        raise PatchRejected(
            "unsafe_patch",
            f"git counts +{added}/-{removed} lines, the safety check +{expected.added}/-{expected.removed}",
        )


def _status(root: Path, paths: Sequence[str]) -> list[str]:
    proc = git.run(
        root,
        "--literal-pathspecs",
        "status",
        "--porcelain=v1",
        "-z",
        "--untracked-files=all",
        "--ignored=matching",
        "--",
        *paths,
        env={"GIT_OPTIONAL_LOCKS": "0"},
    )
    return [entry[3:] for entry in git.nul_split(proc.stdout) if len(entry) > 3]


def _require_branch(root: Path) -> None:
    proc = git.run(root, "symbolic-ref", "--quiet", "HEAD", check=False)
    if proc.returncode != 0:
        raise MendloopError(f"{root}: HEAD is detached; mendloop commits only onto a checked-out branch")


def _require_no_operation_in_progress(root: Path) -> None:
    git_dir = Path(git.text(git.run(root, "rev-parse", "--absolute-git-dir").stdout).strip())
    busy = [name for name in _IN_PROGRESS if (git_dir / name).exists()]
    if busy:
        raise MendloopError(f"{root}: a git operation is in progress ({', '.join(busy)})")


@contextmanager
def _repo_lock(root: Path) -> Iterator[None]:
    # Two workers applying to one repository must not interleave their dirty-check, apply and commit.
    fd = os.open(git.common_dir(root) / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MendloopError(f"{root}: another patch is being applied; gave up waiting") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _with_trailers(message: str, trailers: Mapping[str, str]) -> str:
    body = message.strip()
    if not body:
        raise InputError("the commit message is empty", field="message")
    lines = []
    for key, value in trailers.items():
        if not _TRAILER_KEY.fullmatch(key):
            raise InputError(f"invalid trailer key {key!r}", field="trailers")
        if not value or value != value.strip() or any(ch in value for ch in "\r\n\x00"):
            raise InputError(f"invalid value for trailer {key!r}: {value!r}", field="trailers")
        lines.append(f"{key}: {value}")
    return body + "\n\n" + "\n".join(lines) + "\n" if lines else body + "\n"


def _diff_bytes(diff: str) -> bytes:
    # git apply calls a last line without its newline a corrupt patch.
    return (diff if diff.endswith("\n") else diff + "\n").encode("utf-8")
