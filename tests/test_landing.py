"""agents/landing.py: a patch lands on the operator's branch all or nothing, and `recover` finishes a landing a
crash interrupted at any point, in the direction the branch shows. Real git repositories; the crash states are
made with the landing's own steps, stopped where a kill -9 would stop them (tests/test_crash_apply.py kills a
real serve at the same points)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mendloop.agents import landing
from mendloop.agents.landing import JOURNAL_NAME, Journal
from tests.support import git

DIFF = (
    "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
    "--- a/old.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-OLD = True\n"
    "--- /dev/null\n+++ b/pkg/deep/new.py\n@@ -0,0 +1 @@\n+NEW = True\n"
)
PATHS = ("app.py", "old.py", "pkg/deep/new.py")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "app.py").write_text("VALUE = 1\n")
    (r / "old.py").write_text("OLD = True\n")
    (r / "other.py").write_text("OTHER = 1\n")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "initial")
    (r / "other.py").write_text("OTHER = 'edited by the operator'\n")  # a local change the landing must keep
    return r


def patched(repo: Path) -> bool:
    return (
        (repo / "app.py").read_text() == "VALUE = 2\n"
        and not (repo / "old.py").exists()
        and (repo / "pkg/deep/new.py").read_text() == "NEW = True\n"
    )


def untouched(repo: Path) -> bool:
    return (
        (repo / "app.py").read_text() == "VALUE = 1\n"
        and (repo / "old.py").read_text() == "OLD = True\n"
        and not (repo / "pkg").exists()
    )


def status(repo: Path) -> str:
    return git(repo, "status", "--porcelain")


def interrupted(repo: Path, *, move_ref: bool) -> Journal:
    """A landing stopped after its journal (and, with `move_ref`, after the branch moved)."""
    old = git(repo, "rev-parse", "HEAD")
    new = landing._build_commit(repo, old, DIFF.encode(), "fix\n")
    journal = Journal(ref="refs/heads/main", old=old, new=new, paths=PATHS)
    landing._write_journal(repo, journal)
    if move_ref:
        git(repo, "update-ref", "refs/heads/main", new, old)
    return journal


def test_land_commits_and_updates_only_the_touched_paths(repo: Path) -> None:
    before = git(repo, "rev-parse", "HEAD")
    sha = landing.land(repo, DIFF.encode(), PATHS, "fix\n\nWork-Order: wo_1\n")
    assert git(repo, "rev-parse", "HEAD") == sha and git(repo, "rev-parse", "HEAD~1") == before
    assert patched(repo)
    assert status(repo) == "M other.py"  # the operator's change stays, unstaged; nothing else differs
    assert "Work-Order: wo_1" in git(repo, "log", "-1", "--format=%B")
    assert not (repo / ".git" / JOURNAL_NAME).exists()
    assert landing.recover(repo) is None


def test_crash_before_the_branch_moved_rolls_back(repo: Path) -> None:
    journal = interrupted(repo, move_ref=False)
    # Half-work of a killed checkout: one file already at the new side, one directory created.
    (repo / "app.py").write_text("VALUE = 2\n")
    (repo / "pkg" / "deep").mkdir(parents=True)
    assert landing.recover(repo) == "rolled back"
    assert git(repo, "rev-parse", "HEAD") == journal.old
    assert untouched(repo)
    assert status(repo) == "M other.py"
    assert not (repo / ".git" / JOURNAL_NAME).exists()


def test_crash_after_the_branch_moved_rolls_forward(repo: Path) -> None:
    journal = interrupted(repo, move_ref=True)
    # The checkout still has the old files and index: `git status` shows the patch reversed, staged.
    assert "old.py" in status(repo)
    assert landing.recover(repo) == "rolled forward"
    assert git(repo, "rev-parse", "HEAD") == journal.new
    assert patched(repo)
    assert status(repo) == "M other.py"


def test_recovery_removes_the_lock_files_a_killed_git_left(repo: Path) -> None:
    interrupted(repo, move_ref=True)
    (repo / ".git" / "index.lock").write_text("")
    (repo / ".git" / "refs" / "heads" / "main.lock").write_text("")
    assert landing.recover(repo) == "rolled forward"
    assert not (repo / ".git" / "index.lock").exists()
    assert patched(repo) and status(repo) == "M other.py"


def test_a_file_edited_by_hand_after_the_crash_is_kept_aside(repo: Path) -> None:
    interrupted(repo, move_ref=False)
    (repo / "app.py").write_text("VALUE = 'typed in by the operator'\n")
    assert landing.recover(repo) == "rolled back"
    assert untouched(repo)
    copies = list((repo / ".git" / "mendloop-recovered").glob("*/app.py"))
    assert [c.read_text() for c in copies] == ["VALUE = 'typed in by the operator'\n"]


def test_a_branch_moved_on_by_others_is_left_alone(repo: Path) -> None:
    interrupted(repo, move_ref=False)
    (repo / "old.py").write_text("OLD = 'theirs'\n")
    git(repo, "commit", "-qam", "someone else's commit")  # commits other.py and old.py
    theirs = git(repo, "rev-parse", "HEAD")
    assert landing.recover(repo) == "abandoned"
    assert git(repo, "rev-parse", "HEAD") == theirs
    assert status(repo) == ""
    assert not (repo / ".git" / JOURNAL_NAME).exists()


def test_an_unreadable_journal_is_dropped(repo: Path) -> None:
    (repo / ".git" / JOURNAL_NAME).write_text("{not json")
    assert landing.recover(repo) == "abandoned"
    assert not (repo / ".git" / JOURNAL_NAME).exists()
    assert untouched(repo)
