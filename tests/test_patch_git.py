"""The patch pipeline against real git repositories: worktrees, apply, tests, commit with trailers, revert,
and the guarantee that a failure at any step leaves the repository exactly as it was."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mendloop.agents.patch_pipeline import (
    apply,
    apply_check,
    apply_patch,
    commit,
    diff_worktree,
    is_applied,
    revert,
    run_tests,
)
from mendloop.agents.patch_safety import Constraints, PatchSummary, check_diff
from mendloop.agents.worktrees import prune_stale, worktree
from mendloop.errors import MendloopError, PatchRejected
from mendloop.infra import git as infra_git
from mendloop.infra.git import head, is_repo
from mendloop.infra.sandbox import Sandbox

# Passes only when the patch below has been applied: tests judge the patched tree, not the original.
CHECK_VALUE = [sys.executable, "-c", "import app, sys; print('value', app.VALUE); sys.exit(0 if app.VALUE == 2 else 1)"]
FIX = (
    "diff --git a/app.py b/app.py\nindex 1111111..2222222 100644\n--- a/app.py\n+++ b/app.py\n"
    "@@ -1,2 +1,2 @@\n-VALUE = 1\n+VALUE = 2\n NAME = 'app'\n"
)


def git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
    done = subprocess.run(["git", "-C", str(repo), *identity, *args], check=True, capture_output=True, text=True)
    return done.stdout


def write(repo: Path, rel: str, text: str) -> None:
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    (repo / rel).write_text(text)


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture(autouse=True)
def isolated_git_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user or system git config: the identity and settings in play are the ones the tests set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    write(path, "app.py", "VALUE = 1\nNAME = 'app'\n")
    write(path, "README.md", "readme\n")
    write(path, "src/lib.py", "def f():\n    return 1\n")
    commit_all(path, "initial")
    return path


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """Where worktrees go, so tests can see that none is left behind."""
    path = tmp_path / "worktrees"
    path.mkdir()
    return path


def run_apply(repo: Path, diff: str, parent: Path, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "base_commit": None,
        "constraints": Constraints(),
        "test_command": CHECK_VALUE,
        "test_timeout": 60,
        "message": "Fix VALUE\n\nThe service expects 2.",
        "trailers": {"Work-Order": "wo_x"},
        "worktree_parent": parent,
    }
    options.update(overrides)
    return apply_patch(repo, diff, **options)


def assert_untouched(repo: Path, head_before: str, parent: Path) -> None:
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert git(repo, "rev-parse", "HEAD").strip() == head_before
    assert_no_worktrees(repo, parent)


def assert_no_worktrees(repo: Path, parent: Path) -> None:
    listed = [
        line for line in git(repo, "worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")
    ]
    assert listed == [f"worktree {repo}"]
    assert list(parent.iterdir()) == []


# --- apply_patch -------------------------------------------------------------------------------------------------


def test_apply_patch_commits_on_the_branch_with_trailer(repo: Path, parent: Path) -> None:
    before = head(repo)
    result = run_apply(repo, FIX, parent)

    assert result.commit == head(repo) == git(repo, "rev-parse", "main").strip()
    assert git(repo, "rev-parse", "HEAD~1").strip() == before
    assert (repo / "app.py").read_text() == "VALUE = 2\nNAME = 'app'\n"
    assert git(repo, "log", "-1", "--format=%B") == "Fix VALUE\n\nThe service expects 2.\n\nWork-Order: wo_x\n\n"
    assert git(repo, "log", "-1", "--format=%(trailers:key=Work-Order,valueonly)").strip() == "wo_x"
    # No identity configured anywhere: mendloop's own is used.
    assert git(repo, "log", "-1", "--format=%cn <%ce>").strip() == "mendloop <mendloop@localhost>"
    assert result.files_changed == 1
    assert result.summary == PatchSummary(("app.py",), 1, 1, (), ())
    assert result.tests is not None and result.tests.passed and result.tests.exit_code == 0
    assert "value 2" in result.tests.output_tail
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert_no_worktrees(repo, parent)


def test_apply_patch_uses_the_repository_identity(repo: Path, parent: Path) -> None:
    git(repo, "config", "user.name", "Operator")
    git(repo, "config", "user.email", "ops@example.com")
    run_apply(repo, FIX, parent)
    assert git(repo, "log", "-1", "--format=%an <%ae>").strip() == "Operator <ops@example.com>"


def test_failing_tests_reject_and_leave_repo_untouched(repo: Path, parent: Path) -> None:
    before = head(repo)
    failing = FIX.replace("+VALUE = 2", "+VALUE = 3")
    with pytest.raises(PatchRejected, match="tests failed with exit code 1") as caught:
        run_apply(repo, failing, parent)
    assert caught.value.reason == "tests_failed"
    assert "value 3" in caught.value.message
    assert "value 3" in caught.value.fields["output_tail"]
    assert caught.value.fields["exit_code"] == 1
    assert (repo / "app.py").read_text() == "VALUE = 1\nNAME = 'app'\n"
    assert_untouched(repo, before, parent)


def test_diff_that_does_not_apply_is_rejected(repo: Path, parent: Path) -> None:
    before = head(repo)
    stale = FIX.replace("-VALUE = 1", "-VALUE = 7")
    with pytest.raises(PatchRejected, match="does not apply") as caught:
        run_apply(repo, stale, parent)
    assert caught.value.reason == "unsafe_patch"
    assert_untouched(repo, before, parent)


def test_unsafe_diff_never_reaches_git(repo: Path, parent: Path) -> None:
    before = head(repo)
    with pytest.raises(PatchRejected, match="forbidden path"):
        run_apply(repo, FIX.replace("app.py", ".github/workflows/ci.yml"), parent)
    assert_untouched(repo, before, parent)


def test_header_name_smuggling_is_rejected(repo: Path, parent: Path) -> None:
    write(repo, ".env", "SECRET=1\n")
    before = commit_all(repo, "a secret the repo should not have")
    smuggled = (
        "diff --git a/app.py b/app.py\nindex 1111111..2222222 100644\n--- a/.env\n+++ b/app.py\n"
        "@@ -1 +1 @@\n-SECRET=1\n+SECRET=1 # now in app.py\n"
    )
    # The danger is real: plain git takes the --- line as a rename of .env onto app.py.
    checked = subprocess.run(
        ["git", "-C", str(repo), "apply", "--check", "-v"], input=smuggled, capture_output=True, text=True
    )
    assert checked.returncode == 0 and ".env => app.py" in checked.stderr
    with pytest.raises(PatchRejected, match="file names do not match"):
        run_apply(repo, smuggled, parent, test_command=None)
    assert (repo / ".env").read_text() == "SECRET=1\n"
    assert_untouched(repo, before, parent)


def test_patch_creating_and_deleting_files(repo: Path, parent: Path) -> None:
    diff = (
        "diff --git a/pkg/new.py b/pkg/new.py\nnew file mode 100644\nindex 0000000..1111111\n--- /dev/null\n"
        "+++ b/pkg/new.py\n@@ -0,0 +1 @@\n+NEW = True\n"
        "diff --git a/src/lib.py b/src/lib.py\ndeleted file mode 100644\nindex 1111111..0000000\n--- a/src/lib.py\n"
        "+++ /dev/null\n@@ -1,2 +0,0 @@\n-def f():\n-    return 1\n"
    )
    result = run_apply(repo, diff, parent, test_command=None)
    assert result.tests is None
    assert (repo / "pkg/new.py").read_text() == "NEW = True\n"
    assert not (repo / "src/lib.py").exists()
    assert git(repo, "show", "--name-status", "--format=", "HEAD").split() == ["A", "pkg/new.py", "D", "src/lib.py"]
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_head_moved_since_base_still_applies_on_top(repo: Path, parent: Path) -> None:
    base = head(repo)
    write(repo, "other.py", "OTHER = 1\n")
    moved = commit_all(repo, "unrelated work")
    result = run_apply(repo, FIX, parent, base_commit=base)
    assert git(repo, "rev-parse", f"{result.commit}~1").strip() == moved
    assert (repo / "other.py").exists()
    assert (repo / "app.py").read_text() == "VALUE = 2\nNAME = 'app'\n"
    assert_no_worktrees(repo, parent)


def test_head_moved_in_conflict_is_rejected(repo: Path, parent: Path) -> None:
    base = head(repo)
    write(repo, "app.py", "VALUE = 5\nNAME = 'app'\n")
    moved = commit_all(repo, "conflicting work")
    with pytest.raises(PatchRejected, match="does not apply"):
        run_apply(repo, FIX, parent, base_commit=base)
    assert_untouched(repo, moved, parent)


def test_local_changes_in_touched_files_are_refused(repo: Path, parent: Path) -> None:
    before = head(repo)
    write(repo, "app.py", "VALUE = 9  # operator's hotfix\nNAME = 'app'\n")
    with pytest.raises(MendloopError, match=r"local changes in files the patch touches: app\.py") as caught:
        run_apply(repo, FIX, parent)
    assert not isinstance(caught.value, PatchRejected)
    assert (repo / "app.py").read_text() == "VALUE = 9  # operator's hotfix\nNAME = 'app'\n"
    assert git(repo, "rev-parse", "HEAD").strip() == before
    assert_no_worktrees(repo, parent)


def test_local_changes_elsewhere_are_kept_out_of_the_commit(repo: Path, parent: Path) -> None:
    write(repo, "README.md", "edited, not staged\n")
    write(repo, "staged.txt", "staged by the operator\n")
    git(repo, "add", "staged.txt")
    result = run_apply(repo, FIX, parent)
    assert git(repo, "show", "--name-only", "--format=", result.commit).split() == ["app.py"]
    assert sorted(git(repo, "status", "--porcelain").splitlines()) == [" M README.md", "A  staged.txt"]


def test_failed_commit_rolls_back_the_apply(repo: Path, parent: Path) -> None:
    before = head(repo)
    # A commit git itself refuses (signing with a program that fails); hooks can't refuse it: they never run.
    git(repo, "config", "commit.gpgSign", "true")
    git(repo, "config", "gpg.program", "false")
    (repo / "empty_before").mkdir()  # untracked and empty: invisible to git status, and must survive
    diff = FIX + (
        "diff --git a/pkg/deep/new.py b/pkg/deep/new.py\nnew file mode 100644\nindex 0000000..1111111\n"
        "--- /dev/null\n+++ b/pkg/deep/new.py\n@@ -0,0 +1 @@\n+NEW = True\n"
        "diff --git a/empty_before/x.py b/empty_before/x.py\nnew file mode 100644\nindex 0000000..1111111\n"
        "--- /dev/null\n+++ b/empty_before/x.py\n@@ -0,0 +1 @@\n+X = 1\n"
    )
    with pytest.raises(MendloopError, match="failed to sign"):
        run_apply(repo, diff, parent)
    assert not (repo / "pkg").exists()
    assert (repo / "empty_before").is_dir() and not any((repo / "empty_before").iterdir())
    assert (repo / "app.py").read_text() == "VALUE = 1\nNAME = 'app'\n"
    assert_untouched(repo, before, parent)


def test_detached_head_is_refused(repo: Path, parent: Path) -> None:
    git(repo, "checkout", "-q", "--detach")
    before = head(repo)
    with pytest.raises(MendloopError, match="HEAD is detached"):
        run_apply(repo, FIX, parent)
    assert_untouched(repo, before, parent)


def test_tests_see_the_given_environment_only(repo: Path, parent: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDLOOP_SECRET", "s3cret")
    probe = [
        sys.executable,
        "-c",
        "import os, sys; sys.exit(0 if os.environ.get('FLAG') == 'on' and 'MENDLOOP_SECRET' not in os.environ else 1)",
    ]
    result = run_apply(repo, FIX, parent, test_command=probe, env={"FLAG": "on"})
    assert result.tests is not None and result.tests.passed


# --- worktrees, apply, diff -------------------------------------------------------------------------------------


def test_worktree_is_removed_even_on_error(repo: Path, parent: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), worktree(repo, "HEAD", parent=parent) as tree:
        assert (tree / "app.py").read_text() == "VALUE = 1\nNAME = 'app'\n"
        assert not tree.is_relative_to(repo)
        (tree / "scratch").mkdir()
        (tree / "scratch/file").write_text("x")
        (tree / "scratch").chmod(0o500)  # a read-only directory must not defeat the cleanup
        raise RuntimeError("boom")
    assert not tree.exists()
    assert_no_worktrees(repo, parent)


def test_apply_check_uses_the_worktree_root_from_a_subdirectory(repo: Path, parent: Path) -> None:
    # From a subdirectory, plain `git apply --check` skips app.py and says yes (RECIPES.md).
    with worktree(repo, "HEAD", parent=parent) as tree:
        with pytest.raises(PatchRejected, match="does not apply"):
            apply_check(tree / "src", FIX.replace("-VALUE = 1", "-VALUE = 7"))
        apply(tree / "src", FIX)
        assert (tree / "app.py").read_text() == "VALUE = 2\nNAME = 'app'\n"


def test_apply_check_rejects_paths_the_summary_does_not_know(repo: Path, parent: Path) -> None:
    with worktree(repo, "HEAD", parent=parent) as tree:
        apply_check(tree, FIX, expected=check_diff(FIX, Constraints()))
        with pytest.raises(PatchRejected, match=r"git reads paths the safety check did not see: app\.py"):
            apply_check(tree, FIX, expected=PatchSummary(("other.py",), 1, 1, (), ()))
        with pytest.raises(PatchRejected, match=r"git counts \+1/-1 lines"):
            apply_check(tree, FIX, expected=PatchSummary(("app.py",), 2, 1, (), ()))


def test_diff_worktree_includes_untracked_files(repo: Path, parent: Path) -> None:
    base = head(repo)
    with worktree(repo, base, parent=parent) as tree:
        write(tree, "app.py", "VALUE = 2\nNAME = 'app'\n")
        write(tree, "pkg/new_module.py", "NEW = True\n")
        diff = diff_worktree(tree, base=base)
    assert "diff --git a/pkg/new_module.py b/pkg/new_module.py\nnew file mode 100644\n" in diff
    assert "+++ b/pkg/new_module.py\n@@ -0,0 +1 @@\n+NEW = True\n" in diff
    summary = check_diff(diff, Constraints())
    assert summary.files == ("app.py", "pkg/new_module.py")
    assert summary.created == ("pkg/new_module.py",)
    # The runner's diff goes through the same pipeline.
    run_apply(repo, diff, parent, base_commit=base)
    assert (repo / "pkg/new_module.py").read_text() == "NEW = True\n"


def _make_symlink(tree: Path) -> None:
    os.symlink("app.py", tree / "link.py")


def _make_executable(tree: Path) -> None:
    (tree / "app.py").chmod(0o755)


def _make_binary(tree: Path) -> None:
    (tree / "blob.bin").write_bytes(bytes(range(256)))


def _make_nested_repo(tree: Path) -> None:
    nested = tree / "vendored"
    nested.mkdir()
    git(nested, "init", "-q", "-b", "main")
    write(nested, "x.txt", "x\n")
    commit_all(nested, "nested")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_make_symlink, r"symlink \(mode 120000\)"),
        (_make_executable, r"made executable \(mode 100755\)"),
        (_make_binary, r"binary file"),
        (_make_nested_repo, r"submodule \(mode 160000\)"),
    ],
    ids=["symlink", "chmod_x", "binary", "nested_repo"],
)
def test_diff_worktree_shows_what_check_diff_rejects(repo: Path, parent: Path, change: Any, expected: str) -> None:
    base = head(repo)
    with worktree(repo, base, parent=parent) as tree:
        change(tree)
        diff = diff_worktree(tree, base=base)
    with pytest.raises(PatchRejected, match=expected):
        check_diff(diff, Constraints())
    assert_no_worktrees(repo, parent)


_HOLD_WORKTREE = """
import sys, time
from pathlib import Path
from mendloop.agents.worktrees import worktree
with worktree(Path(sys.argv[1]), "HEAD", parent=Path(sys.argv[2])) as tree:
    print(tree, flush=True)
    time.sleep(600)
"""


def test_prune_stale_removes_a_dead_process_worktree_at_once(repo: Path, parent: Path) -> None:
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLD_WORKTREE, str(repo), str(parent)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        dead_tree, live_tree = (Path(h.stdout.readline().strip()) for h in holders if h.stdout)
        holders[0].kill()  # a kill -9: the worktree stays, its lock goes with the process
        holders[0].wait()
        assert dead_tree.exists()
        # Fresh (not 24 hours old), yet gone at once: its process is dead. The live process's stays.
        assert prune_stale(repo, max_age_hours=24, parent=parent) == 1
        assert not dead_tree.parent.exists()
        assert live_tree.exists()
        assert f"worktree {dead_tree}\n" not in git(repo, "worktree", "list", "--porcelain")
    finally:
        for h in holders:
            h.kill()
            h.wait()
            if h.stdout:
                h.stdout.close()
    prune_stale(repo, max_age_hours=24, parent=parent)
    assert_no_worktrees(repo, parent)


def test_prune_stale_removes_old_mendloop_worktrees(repo: Path, parent: Path) -> None:
    # Simulate a crash of a version without the live lock: enter the context, never leave it, drop the lock file.
    leaked = worktree(repo, "HEAD", parent=parent)
    tree = leaked.__enter__()
    (tree.parent / "mendloop-live.lock").unlink()
    old = time.time() - 48 * 3600
    os.utime(tree.parent, (old, old))
    fresh = worktree(repo, "HEAD", parent=parent)
    fresh_tree = fresh.__enter__()
    stranger = parent / "mendloop-wt-not-ours"
    stranger.mkdir()
    os.utime(stranger, (old, old))
    try:
        assert prune_stale(repo, max_age_hours=24, parent=parent) == 1
        assert not tree.exists()
        assert fresh_tree.exists()
        assert stranger.exists()  # no owner marker: not provably mendloop's, left alone
        listed = git(repo, "worktree", "list", "--porcelain")
        assert f"worktree {tree}\n" not in listed
        assert f"worktree {fresh_tree}\n" in listed
    finally:
        fresh.__exit__(None, None, None)
        leaked.__exit__(None, None, None)
        stranger.rmdir()
    assert_no_worktrees(repo, parent)


# --- commit, revert, is_applied ---------------------------------------------------------------------------------


def test_revert_restores_the_content(repo: Path, parent: Path) -> None:
    applied = run_apply(repo, FIX, parent).commit
    reverted = revert(repo, applied, trailers={"Work-Order": "wo_x", "Mendloop-Run": "run_1"})
    assert reverted == head(repo)
    assert git(repo, "rev-parse", "HEAD~1").strip() == applied
    assert (repo / "app.py").read_text() == "VALUE = 1\nNAME = 'app'\n"
    message = git(repo, "log", "-1", "--format=%B")
    assert message.startswith('Revert "Fix VALUE"')
    assert f"This reverts commit {applied}." in message
    assert message.rstrip().endswith("Work-Order: wo_x\nMendloop-Run: run_1")
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_revert_that_conflicts_leaves_repo_untouched(repo: Path, parent: Path) -> None:
    applied = run_apply(repo, FIX, parent).commit
    write(repo, "app.py", "VALUE = 4\nNAME = 'app'\n")
    later = commit_all(repo, "later change on the same line")
    with pytest.raises(MendloopError, match="cannot revert"):
        revert(repo, applied, trailers={"Work-Order": "wo_x"})
    assert_untouched(repo, later, parent)


def test_is_applied(repo: Path, parent: Path) -> None:
    assert not is_applied(repo, FIX)
    applied = run_apply(repo, FIX, parent).commit
    assert is_applied(repo, FIX)
    # HEAD's tree decides, not the working tree.
    write(repo, "app.py", "VALUE = 1\nNAME = 'app'\n")
    assert is_applied(repo, FIX)
    git(repo, "checkout", "--", "app.py")
    revert(repo, applied, trailers={"Work-Order": "wo_x"})
    assert not is_applied(repo, FIX)


def test_commit_only_given_paths(repo: Path) -> None:
    write(repo, "app.py", "VALUE = 3\nNAME = 'app'\n")
    write(repo, "README.md", "changed\n")
    git(repo, "add", "app.py", "README.md")
    sha = commit(repo, "Only app", trailers={"Work-Order": "wo_y"}, paths=["app.py"])
    assert git(repo, "show", "--name-only", "--format=", sha).split() == ["app.py"]
    assert git(repo, "status", "--porcelain").splitlines() == ["M  README.md"]
    with pytest.raises(MendloopError, match="invalid trailer key"):
        commit(repo, "x", trailers={"Bad Key": "v"})


def test_head_and_is_repo(repo: Path, tmp_path: Path) -> None:
    assert head(repo) == git(repo, "rev-parse", "HEAD").strip()
    assert is_repo(repo) and is_repo(repo / "src")
    assert not is_repo(tmp_path / "missing")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert not is_repo(plain)
    with pytest.raises(MendloopError, match="not inside a git working tree"):
        head(plain)


# --- running tests -----------------------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


# The process-group tests watch host pids: outside bubblewrap's pid namespace (it has its own tests), through the
# same Sandbox.run.
UNCONFINED = Sandbox(kind="none", reason="tests of the process group handling")


@pytest.fixture
def child_script(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A shell script that starts `sleep 60` in the background, records its pid, then behaves per $1."""
    script = tmp_path / "tests.sh"
    pidfile = tmp_path / "child.pid"
    script.write_text(
        '#!/bin/sh\nsleep 60 &\necho $! > "$2"\necho started\nif [ "$1" = hang ]; then wait; fi\nexit 0\n'
    )
    yield script, pidfile
    if pidfile.exists():  # never leave a sleeper behind, even when an assertion failed
        try:
            os.kill(int(pidfile.read_text()), 9)
        except (ProcessLookupError, ValueError):
            pass


def test_hanging_tests_are_killed_with_their_children(
    repo: Path, tmp_path: Path, child_script: tuple[Path, Path]
) -> None:
    script, pidfile = child_script
    started = time.monotonic()
    result = run_tests(repo, ["sh", str(script), "hang", str(pidfile)], timeout=1.0, env={}, sandbox=UNCONFINED)
    assert time.monotonic() - started < 10
    assert result.timed_out and not result.passed
    assert result.exit_code is None
    assert "started" in result.output_tail
    assert _wait_gone(int(pidfile.read_text()))


def test_background_children_do_not_outlive_passing_tests(repo: Path, child_script: tuple[Path, Path]) -> None:
    script, pidfile = child_script
    started = time.monotonic()
    result = run_tests(repo, ["sh", str(script), "exit", str(pidfile)], timeout=30, env={}, sandbox=UNCONFINED)
    assert time.monotonic() - started < 10  # the sleeper holds no pipe we wait on
    assert result.passed and result.exit_code == 0 and not result.timed_out
    assert _wait_gone(int(pidfile.read_text()))


def test_hanging_tests_reject_the_patch(repo: Path, parent: Path, child_script: tuple[Path, Path]) -> None:
    script, pidfile = child_script
    before = head(repo)
    with pytest.raises(PatchRejected, match="tests timed out") as caught:
        run_apply(
            repo,
            FIX,
            parent,
            test_command=["sh", str(script), "hang", str(pidfile)],
            test_timeout=1.0,
            sandbox=UNCONFINED,
        )
    assert caught.value.reason == "tests_failed"
    assert caught.value.fields["timed_out"] is True
    assert _wait_gone(int(pidfile.read_text()))
    assert_untouched(repo, before, parent)


def test_output_tail_keeps_the_end(repo: Path) -> None:
    argv = [sys.executable, "-c", "import sys\nfor i in range(20000): print('line', i)\nsys.exit(3)"]
    result = run_tests(repo, argv, timeout=30, env={})
    assert not result.passed and result.exit_code == 3 and not result.timed_out
    assert result.output_tail.endswith("line 19999\n")
    assert len(result.output_tail) <= 4001


def test_missing_test_program_is_not_blamed_on_the_patch(repo: Path) -> None:
    with pytest.raises(PatchRejected, match="cannot start the test command") as caught:
        run_tests(repo, ["definitely-not-a-program-xyz"], timeout=5, env={})
    assert caught.value.reason == "test_env_error"


# -- the one git environment policy (mendloop.infra.git) ---------------------------------------------------------


def test_inherited_git_variables_are_dropped(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    expected = git(repo, "rev-parse", "HEAD").strip()
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(other))
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "elsewhere.index"))
    monkeypatch.setenv("GIT_SOME_FUTURE_VARIABLE", "1")
    monkeypatch.setenv("LANGUAGE", "de")
    env = infra_git.environment()
    # The policy's own: no prompt, no editor, no pager, no system config or attributes.
    FIXED = ("GIT_TERMINAL_PROMPT", "GIT_EDITOR", "GIT_PAGER", "GIT_CONFIG_NOSYSTEM", "GIT_ATTR_NOSYSTEM")
    assert not [k for k in env if k.startswith("GIT_") and k not in FIXED]
    assert "LANGUAGE" not in env and env["LC_ALL"] == "C"
    assert head(repo) == expected  # the repository asked for, not GIT_DIR's (which has no commit at all)
    assert infra_git.toplevel(repo / "src").resolve() == repo.resolve()


def test_a_caller_may_set_git_variables_deliberately(repo: Path, tmp_path: Path) -> None:
    index = tmp_path / "scratch.index"
    infra_git.run(repo, "read-tree", "HEAD", env={"GIT_INDEX_FILE": str(index)})
    assert index.is_file()


def test_repository_hooks_never_run(repo: Path, parent: Path, tmp_path: Path) -> None:
    ran = tmp_path / "post-checkout-ran"
    hook = repo / ".git/hooks/post-checkout"
    hook.write_text(f"#!/bin/sh\ntouch {ran}\n")
    hook.chmod(0o755)
    with worktree(repo, "HEAD", parent=parent):
        pass
    assert not ran.exists()  # worktree add: no hooks from the repository
    infra_git.run(repo, "checkout", "-q", "-b", "other")
    assert not ran.exists()  # nor anywhere else: there is no way left to ask for them


def test_git_timeout_kills_and_raises(repo: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    started = time.monotonic()
    with pytest.raises(MendloopError, match=r"git slow timed out after 0\.5s"):
        infra_git.run(repo, "-c", f"alias.slow=!sh -c 'echo $$ > {pid_file}; exec sleep 30'", "slow", timeout=0.5)
    assert time.monotonic() - started < 10
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _running(pid):  # the alias's shell was in git's process group: killed with it
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
