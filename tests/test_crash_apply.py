"""Crash injection: `mendloop serve` killed (SIGKILL, through a named failpoint, mendloop/infra/failpoints.py) at
each stage of applying a held patch to the operator's repository. After a restart the repository is before or
after the patch, never between, and the run finishes. Real serve processes, a real git repository."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import yaml

from mendloop.agents.landing import JOURNAL_NAME
from tests.support import git, serve_process, wait_for, write_playbooks

pytestmark = pytest.mark.slow
PY = sys.executable
DIFF = "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
CHECK = "import sys; sys.path.insert(0, sys.argv[1]); import app; sys.exit(0 if app.VALUE == 2 else 1)"


def make_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "app.py").write_text("VALUE = 1\n")
    (path / "notes.txt").write_text("the operator's own work in progress\n")
    git(path, "add", "app.py")
    git(path, "commit", "-qm", "initial")
    return path


def configure(tmp_path: Path, database_url: str, repo: Path) -> Path:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "escalates, then verifies the repository's state",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "Set VALUE to 2"}},
                {
                    "id": "verify",
                    "action": "verify",
                    "with": {
                        "check": {"command": {"argv": [PY, "-B", "-c", CHECK, str(repo)]}},
                        "expect": "result.exit_code == 0",
                    },
                    "on_failure": "needs_human",
                },
            ],
        },
    )
    cfg = tmp_path / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "playbook_dirs": ["pb"],
                "routing": {"code": "code"},
                "default_target": "svc",
                "targets": {"svc": {"repository": str(repo)}},
                "poll_interval": 0.05,
                # Far longer than the test: only the restart's reclaim brings the run back in time.
                "lease_seconds": 300,
            }
        )
    )
    return cfg


@pytest.mark.parametrize(
    ("failpoint", "landed_when_killed"),
    [
        ("apply.journaled", False),  # the commit object exists, the branch has not moved
        ("apply.ref_moved", True),  # the branch moved, the checkout's files and index have not
        ("apply.checked_out", True),  # the checkout caught up, the journal is still there
        ("apply.landed", True),  # all done, the run has not recorded it
    ],
)
def test_serve_killed_at_each_stage_of_an_apply(
    database_url: str, tmp_path: Path, free_port: int, failpoint: str, landed_when_killed: bool
) -> None:
    repo = make_repo(tmp_path / "repo")
    initial = git(repo, "rev-parse", "HEAD")
    cfg = configure(tmp_path, database_url, repo)
    base = f"http://127.0.0.1:{free_port}"
    first_log = tmp_path / "serve1.log"
    with serve_process(cfg, free_port, log=first_log, env={"MENDLOOP_FAILPOINTS": failpoint}) as first:
        run = httpx.post(
            f"{base}/patches/trigger", json={"description": "d", "error_type": "code", "component": "svc"}, timeout=30
        ).json()
        assert run["status"] == "awaiting_patch"
        done = httpx.post(
            f"{base}/patches/work-orders/{run['work_order_id']}/complete",
            json={"tests_passed": True, "files_changed": 1, "diff": DIFF},
            timeout=30,
        )
        assert done.status_code == 200, done.text
        wait_for(lambda: first.poll() is not None, timeout=30)  # the failpoint killed it mid-apply
        assert first.returncode == -9, first_log.read_text()[-2000:]

    # Killed: the branch is at one side or the other, nothing else.
    assert (git(repo, "rev-parse", "HEAD") != initial) is landed_when_killed

    with serve_process(cfg, free_port, log=tmp_path / "serve2.log"):

        def finished() -> bool:
            status = httpx.get(f"{base}/patches/runs/{run['run_id']}", timeout=10).json()["status"]
            assert status not in ("failed", "needs_human"), status
            return bool(status == "completed")

        wait_for(finished, timeout=30)
        wo = httpx.get(f"{base}/patches/work-orders/{run['work_order_id']}", timeout=10).json()
        assert wo["status"] == "completed"

    # After: exactly one commit carrying the patch, a clean checkout (the operator's untracked file untouched),
    # no journal, no worktree.
    assert git(repo, "rev-parse", "HEAD~1") == initial
    assert f"Work-Order: {run['work_order_id']}" in git(repo, "log", "-1", "--format=%B")
    assert (repo / "app.py").read_text() == "VALUE = 2\n"
    assert git(repo, "status", "--porcelain") == "?? notes.txt"
    assert (repo / "notes.txt").read_text() == "the operator's own work in progress\n"
    assert not (repo / ".git" / JOURNAL_NAME).exists()
    assert git(repo, "worktree", "list").count("\n") == 0
