"""The patch pipeline's git side: throwaway worktrees, `git apply` that never skips silently, tests judged by
exit code, and one commit with trailers on the repository's branch; nothing is left behind when a step fails.

Every git call is an argv list run as `git -C <dir>` with stdin closed (or carrying the diff), no terminal
prompts, the C locale (its messages are parsed) and a timeout that kills the whole process group.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mendloop.agents.patch import Constraints, PatchSummary, check_diff, check_paths_in_worktree
from mendloop.errors import InputError, MendloopError, PatchRejected

WORKTREE_PREFIX = "mendloop-wt-"
GIT_TIMEOUT = 120.0
# A checkout of a large repository, or a repository's own hooks, can take a while.
CHECKOUT_TIMEOUT = 600.0
LOCK_TIMEOUT = 120.0
OUTPUT_TAIL_CHARS = 4000

_FALLBACK_IDENTITY = (("user.name", "mendloop"), ("user.email", "mendloop@localhost"))
_OWNER_MARKER = "mendloop-repo"
_LOCK_NAME = "mendloop-apply.lock"
_TRAILER_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_IN_PROGRESS = ("MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD", "rebase-merge", "rebase-apply", "sequencer")

# Inherited variables that would point git at another repository or index, or change what a diff looks like.
_DROPPED_GIT_ENV = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_PREFIX",
        "GIT_QUARANTINE_PATH",
        "GIT_EXTERNAL_DIFF",
        "GIT_DIFF_OPTS",
        "GIT_LITERAL_PATHSPECS",
        "GIT_GLOB_PATHSPECS",
        "GIT_NOGLOB_PATHSPECS",
        "GIT_ICASE_PATHSPECS",
        "GIT_REPLACE_REF_BASE",
        "GIT_SHALLOW_FILE",
        "LANGUAGE",
    }
)

# What a test command inherits from mendloop's environment: enough to find programs, never mendloop's secrets.
_TEST_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # a result type, not a pytest test class

    passed: bool
    exit_code: int | None
    output_tail: str
    duration_seconds: float
    timed_out: bool


@dataclass(frozen=True)
class ApplyResult:
    commit: str
    files_changed: int
    summary: PatchSummary
    tests: TestResult | None


def head(repo: Path) -> str:
    proc = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    if proc.returncode != 0:
        _toplevel(repo)  # the clearer error when repo is no repository at all
        raise MendloopError(f"{repo}: HEAD does not name a commit (no commits yet?)", repository=str(repo))
    return _text(proc.stdout).strip()


def is_repo(path: Path) -> bool:
    """True when `path` is inside a git working tree (bare repositories have none to patch)."""
    if not Path(path).is_dir():
        return False
    try:
        proc = _git(path, "rev-parse", "--is-inside-work-tree", check=False)
    except MendloopError:
        return False
    return proc.returncode == 0 and _text(proc.stdout).strip() == "true"


@contextmanager
def worktree(repo: Path, commit: str, *, parent: Path | None = None) -> Iterator[Path]:
    """A detached worktree at `commit` in a fresh directory outside the repository, always removed on exit."""
    root = _toplevel(repo)
    sha = _resolve(root, commit)
    container = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    base = Path(tempfile.mkdtemp(prefix=WORKTREE_PREFIX, dir=container)).resolve()
    path = base / "worktree"
    try:
        if _is_within(base, root.resolve()):
            raise MendloopError(f"worktree directory {base} is inside the repository {root}")
        # prune_stale removes only directories that say which repository they belong to.
        (base / _OWNER_MARKER).write_text(str(_common_dir(root)))
        _git(root, "worktree", "add", "--detach", str(path), sha, timeout=CHECKOUT_TIMEOUT)
        yield path
    finally:
        _remove_worktree(root, path, base)


def prune_stale(repo: Path, *, max_age_hours: float = 24.0, parent: Path | None = None) -> int:
    """Remove mendloop's worktrees of `repo` older than `max_age_hours` (left by a crash or a kill -9),
    and forget registrations whose directories are gone. Returns how many directories were removed."""
    root = _toplevel(repo)
    common = str(_common_dir(root))
    cutoff = time.time() - max_age_hours * 3600
    _git(root, "worktree", "prune")
    removed: set[Path] = set()
    for path in _linked_worktrees(root):
        base = path.parent
        if base.name.startswith(WORKTREE_PREFIX) and _mtime(base) < cutoff:
            _remove_worktree(root, path, base)
            removed.add(base)
    container = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    for base in container.glob(WORKTREE_PREFIX + "*"):
        if base in removed or base.is_symlink() or not base.is_dir() or _mtime(base) >= cutoff:
            continue
        try:
            owner = (base / _OWNER_MARKER).read_text()
        except OSError:
            continue  # not recognisably ours: leave it alone
        if owner == common:
            _force_rmtree(base)
            removed.add(base)
    _git(root, "worktree", "prune")
    return len(removed)


def apply_check(worktree: Path, diff: str, *, expected: PatchSummary | None = None) -> None:
    """Reject a diff that `git apply` would not apply completely at the worktree's root.

    With `expected` (check_diff's summary), also reject a diff git reads differently from check_diff: a path
    git would touch that the summary lacks, or different line counts, means the two parsers disagree.
    """
    root = _toplevel(worktree)
    _apply(root, diff, "--check")
    if expected is not None:
        _cross_check(root, diff, expected)


def apply(worktree: Path, diff: str) -> None:
    """Apply to the worktree's files (not its index); checked first, so it is all or nothing."""
    root = _toplevel(worktree)
    _apply(root, diff, "--check")
    _apply(root, diff)


def diff_worktree(worktree: Path, *, base: str) -> str:
    """Everything in the worktree that differs from `base`, new untracked files included, as a git diff.

    Computed here rather than taken from the agent, and with --binary, so symlinks, executables, binaries
    and nested repositories show up for check_diff to reject instead of vanishing from the diff.
    """
    root = _toplevel(worktree)
    base_sha = _resolve(root, base)
    _git(root, "-c", "core.fileMode=true", "add", "-A", timeout=CHECKOUT_TIMEOUT)
    proc = _git(
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


def commit(
    repo_or_worktree: Path,
    message: str,
    *,
    trailers: Mapping[str, str],
    paths: Sequence[str] | None = None,
) -> str:
    """Commit with `trailers` appended to `message`; return the new commit's sha.

    With `paths`, exactly those paths are committed (`git commit --only`) and anything else already staged
    stays staged; without, whatever is staged is committed.
    """
    root = _toplevel(repo_or_worktree)
    text = _with_trailers(message, trailers)
    args = ["commit", "--quiet", "--cleanup=whitespace", "-m", text]
    if paths is not None:
        if not paths:
            raise InputError("commit: paths must not be empty", field="paths")
        args = ["--literal-pathspecs", *args, "--only", "--", *paths]
    _git(root, *_identity(root), *args, timeout=CHECKOUT_TIMEOUT)
    return head(root)


def revert(repo: Path, sha: str, *, trailers: Mapping[str, str]) -> str:
    """Revert `sha` on the current branch as a new commit carrying `trailers`; return that commit's sha."""
    root = _toplevel(repo)
    _require_branch(root)
    target = _resolve(root, sha)
    _with_trailers("check", trailers)  # refuse bad trailers before anything changes
    before = head(root)
    identity = _identity(root)
    proc = _git(root, *identity, "revert", "--no-edit", target, check=False, timeout=CHECKOUT_TIMEOUT)
    if proc.returncode != 0:
        _git(root, "revert", "--abort", check=False)
        raise MendloopError(
            f"cannot revert {target[:12]}: {_tail(_text(proc.stderr) or _text(proc.stdout))}",
            commit=target,
        )
    original = _text(_git(root, "log", "-1", "--format=%B", "HEAD").stdout)
    amend = _git(
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
        _git(root, "reset", "--quiet", "--keep", before, check=False)
        raise MendloopError(f"cannot add trailers to the revert of {target[:12]}: {_tail(_text(amend.stderr))}")
    return head(root)


def is_applied(repo: Path, diff: str) -> bool:
    """True when HEAD already contains `diff`, i.e. it reverse-applies to HEAD's tree.

    Checked against a scratch index read from HEAD, so neither the working tree nor the real index matters.
    """
    root = _toplevel(repo)
    with tempfile.TemporaryDirectory(prefix="mendloop-index-") as scratch:
        env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        _git(root, "read-tree", "HEAD", env_extra=env)
        proc = _git(
            root, "apply", "--cached", "--check", "--reverse", "-v", input=_diff_bytes(diff), env_extra=env, check=False
        )
    return proc.returncode == 0 and not _skipped(proc)


def run_tests(worktree: Path, argv: list[str], *, timeout: float, env: Mapping[str, str]) -> TestResult:
    """Run the test command in `worktree`; passed means exit code 0 within `timeout`, nothing else.

    Output goes to a file, not a pipe, so a background child holding the pipe cannot stall the wait; the whole
    process group is killed when the command exits or times out, so nothing it started outlives it.
    """
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise InputError("the test command must be a non-empty list of strings", field="test_command")
    if timeout <= 0:
        raise InputError("the test timeout must be positive", field="test_timeout")
    child_env = {k: os.environ[k] for k in _TEST_INHERITED if k in os.environ}
    child_env.update({str(k): str(v) for k, v in env.items()})
    started = time.monotonic()
    with tempfile.TemporaryFile(prefix="mendloop-tests-") as output:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=worktree,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            # The configured command is broken, not the patch: not a test failure to blame on the agent.
            raise MendloopError(f"cannot start test command {argv[0]!r}: {exc.strerror}") from exc
        exited = _wait_then_kill_group(proc, timeout)
        duration = time.monotonic() - started
        tail = _read_tail(output)
    exit_code = proc.returncode if exited else None
    return TestResult(
        passed=exited and exit_code == 0,
        exit_code=exit_code,
        output_tail=tail,
        duration_seconds=round(duration, 3),
        timed_out=not exited,
    )


def apply_patch(
    repo: Path,
    diff: str,
    *,
    base_commit: str | None,
    constraints: Constraints,
    test_command: list[str] | None,
    test_timeout: float,
    message: str,
    trailers: dict[str, str],
    env: Mapping[str, str] | None = None,
    worktree_parent: Path | None = None,
    checked_at_base: bool = False,
) -> ApplyResult:
    """Validate, test in a fresh worktree, then commit `diff` on the repository's current branch.

    `checked_at_base`: the caller has already checked the paths and `git apply --check`ed the diff in a checkout
    of `base_commit` (the agent runner, in its test worktree); without a test command there is then nothing a
    fresh worktree at the base would add. A branch that has moved since is checked where the patch lands as usual.

    PatchRejected (unsafe_patch, tests_failed) when the patch is at fault; MendloopError when the repository
    is not in a state to take it (detached HEAD, local changes in the touched files, a git failure). Either
    way the repository's branch, index and working tree are as they were.
    """
    summary = check_diff(diff, constraints)
    _with_trailers(message, trailers)
    root = _toplevel(repo)
    _require_branch(root)
    base = _resolve(root, base_commit or "HEAD")

    tests: TestResult | None = None
    if test_command is not None or not checked_at_base:
        with worktree(root, base, parent=worktree_parent) as tree:
            check_paths_in_worktree(tree, summary.files)
            apply_check(tree, diff, expected=summary)
            apply(tree, diff)
            if test_command is not None:
                tests = run_tests(tree, test_command, timeout=test_timeout, env=env or {})
                if not tests.passed:
                    raise _tests_failed(tests)

    with _repo_lock(root):
        current = head(root)
        if current != base:
            # The tests ran on base; the branch has moved since, so the patch must still apply where it lands.
            with worktree(root, current, parent=worktree_parent) as tree:
                check_paths_in_worktree(tree, summary.files)
                apply_check(tree, diff, expected=summary)
        sha = _apply_and_commit(root, diff, summary, message, trailers)
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
    # --index: the patch must match both the index and the files, and only the touched paths get staged.
    _apply(root, diff, "--check", "--index")
    new_dirs = {d for rel in summary.files for d in (root / rel).parents if _is_within(d, root) and not d.exists()}
    try:
        _apply(root, diff, "--index")
        return commit(root, message, trailers=trailers, paths=summary.files)
    except BaseException:
        _restore(root, summary.files, new_dirs)
        raise


def _restore(root: Path, paths: Sequence[str], new_dirs: set[Path]) -> None:
    """Put `paths` back as HEAD has them (they were clean before the patch, so that is exactly how they were)
    and remove the directories the patch created."""
    tracked = set(
        _nul_split(_git(root, "--literal-pathspecs", "ls-tree", "-r", "-z", "--name-only", "HEAD", "--", *paths).stdout)
    )
    if tracked:
        _git(root, "--literal-pathspecs", "checkout", "HEAD", "--", *sorted(tracked), check=False)
    for rel in paths:
        if rel in tracked:
            continue
        _git(root, "--literal-pathspecs", "rm", "--quiet", "--cached", "--ignore-unmatch", "--", rel, check=False)
        target = root / rel
        if target.is_file() or target.is_symlink():
            target.unlink()
    for directory in sorted(new_dirs, key=lambda d: len(d.parts), reverse=True):
        try:
            directory.rmdir()  # only ever removes an empty directory
        except OSError:
            pass


def _tests_failed(tests: TestResult) -> PatchRejected:
    if tests.timed_out:
        what = f"tests timed out after {tests.duration_seconds:g}s"
    else:
        what = f"tests failed with exit code {tests.exit_code}"
    return PatchRejected(
        "tests_failed",
        f"{what}; output tail:\n{tests.output_tail}",
        exit_code=tests.exit_code,
        timed_out=tests.timed_out,
        duration_seconds=tests.duration_seconds,
        output_tail=tests.output_tail,
    )


def _apply(root: Path, diff: str, *flags: str) -> None:
    proc = _git(root, "apply", "-v", *flags, input=_diff_bytes(diff), check=False)
    skipped = _skipped(proc)
    if proc.returncode != 0 or skipped:
        detail = "; ".join(skipped) if skipped else _tail(_text(proc.stderr).strip(), 2000)
        raise PatchRejected("unsafe_patch", f"does not apply: {detail}")


def _skipped(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    # git apply leaves out files outside the directory it runs in and still exits 0: a partial apply.
    lines = (_text(proc.stdout) + "\n" + _text(proc.stderr)).splitlines()
    return [line for line in lines if line.startswith("Skipped patch")]


def _cross_check(root: Path, diff: str, expected: PatchSummary) -> None:
    proc = _git(root, "apply", "--numstat", "-z", input=_diff_bytes(diff), check=False)
    if proc.returncode != 0:
        raise PatchRejected("unsafe_patch", f"git cannot read the diff: {_tail(_text(proc.stderr).strip(), 2000)}")
    records = _nul_split(proc.stdout)
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
    proc = _git(
        root,
        "--literal-pathspecs",
        "status",
        "--porcelain=v1",
        "-z",
        "--untracked-files=all",
        "--ignored=matching",
        "--",
        *paths,
        env_extra={"GIT_OPTIONAL_LOCKS": "0"},
    )
    return [entry[3:] for entry in _nul_split(proc.stdout) if len(entry) > 3]


def _require_branch(root: Path) -> None:
    proc = _git(root, "symbolic-ref", "--quiet", "HEAD", check=False)
    if proc.returncode != 0:
        raise MendloopError(f"{root}: HEAD is detached; mendloop commits only onto a checked-out branch")


def _require_no_operation_in_progress(root: Path) -> None:
    git_dir = Path(_text(_git(root, "rev-parse", "--absolute-git-dir").stdout).strip())
    busy = [name for name in _IN_PROGRESS if (git_dir / name).exists()]
    if busy:
        raise MendloopError(f"{root}: a git operation is in progress ({', '.join(busy)})")


@contextmanager
def _repo_lock(root: Path) -> Iterator[None]:
    # Two workers applying to one repository must not interleave their dirty-check, apply and commit.
    fd = os.open(_common_dir(root) / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
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


def _identity(root: Path) -> list[str]:
    flags: list[str] = []
    for key, fallback in _FALLBACK_IDENTITY:
        proc = _git(root, "config", "--get", key, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            flags += ["-c", f"{key}={fallback}"]
    return flags


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


def _toplevel(path: Path) -> Path:
    proc = _git(path, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        raise MendloopError(f"{path}: not inside a git working tree", repository=str(path))
    return Path(_text(proc.stdout).rstrip("\n"))


def _common_dir(root: Path) -> Path:
    out = _text(_git(root, "rev-parse", "--git-common-dir").stdout).rstrip("\n")
    return (root / out).resolve()


def _resolve(root: Path, rev: str) -> str:
    if not rev or rev.startswith("-") or any(ch.isspace() or ord(ch) < 32 for ch in rev):
        raise InputError(f"not a commit: {rev!r}", field="commit")
    proc = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
    if proc.returncode != 0:
        raise MendloopError(f"{root}: unknown commit {rev!r}", commit=rev)
    return _text(proc.stdout).strip()


def _linked_worktrees(root: Path) -> list[Path]:
    out = _text(_git(root, "worktree", "list", "--porcelain").stdout)
    paths = [Path(line[len("worktree ") :]) for line in out.splitlines() if line.startswith("worktree ")]
    return [p for p in paths if p.resolve() != root.resolve()]


def _remove_worktree(root: Path, path: Path, base: Path) -> None:
    # Each step may fail on its own (dir half-created, registration missing); the next one covers for it.
    if path.exists():
        _git(root, "worktree", "remove", "--force", "--force", str(path), check=False, timeout=CHECKOUT_TIMEOUT)
    _force_rmtree(base)
    _git(root, "worktree", "prune", check=False)


def _force_rmtree(path: Path) -> None:
    def retry_writable(func: Callable[..., Any], failed: str, _exc: Any) -> None:
        # Tests may leave read-only directories behind; make the parent writable and try once more.
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)
        except OSError:
            pass

    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=retry_writable)


def _wait_then_kill_group(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to `timeout` for `proc`; kill its process group either way; True if it exited by itself."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    exited = False
    while True:
        try:
            # WNOWAIT leaves the exited leader a zombie, so its pid (the group id) cannot be reused before killpg.
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                exited = True
                break
        except ChildProcessError:
            exited = True
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.1)
    _kill_group(proc.pid)
    proc.wait()
    return exited


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_tail(output: Any) -> str:
    output.seek(0, os.SEEK_END)
    size = output.tell()
    # Read a few bytes more than needed so a multi-byte character cut at the start only costs one "?".
    output.seek(max(0, size - OUTPUT_TAIL_CHARS * 4))
    return _tail(output.read().decode("utf-8", errors="replace"))


def _git(
    cwd: Path,
    *args: str,
    input: bytes | None = None,
    check: bool = True,
    timeout: float = GIT_TIMEOUT,
    env_extra: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    argv = ["git", "-C", str(cwd), *args]
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_GIT_ENV}
    env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", GIT_EDITOR="true", GIT_PAGER="cat")
    env.update(env_extra or {})
    try:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise MendloopError(f"cannot run git: {exc.strerror}") from exc
    command = _describe(args)
    with proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # a descendant escaped the group and holds the pipes; closing them is all that is left
            raise MendloopError(f"{command} timed out after {timeout:g}s") from None
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        detail = _tail(_text(err).strip() or _text(out).strip(), 2000)
        raise MendloopError(f"{command} failed (exit {proc.returncode}): {detail}", exit_code=proc.returncode)
    return result


def _describe(args: Sequence[str]) -> str:
    """`git <subcommand>` for messages, without the global options in front of it."""
    words = list(args)
    while words and words[0].startswith("-"):
        words = words[2:] if words[0] == "-c" else words[1:]
    return "git " + " ".join(words[:1])


def _diff_bytes(diff: str) -> bytes:
    # git apply calls a last line without its newline a corrupt patch.
    return (diff if diff.endswith("\n") else diff + "\n").encode("utf-8")


def _nul_split(data: bytes) -> list[str]:
    return [part for part in _text(data).split("\0") if part]


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _tail(text: str, limit: int = OUTPUT_TAIL_CHARS) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
