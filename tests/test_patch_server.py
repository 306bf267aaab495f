"""A `complete` that carries a diff goes through the patch pipeline on the server's side before the run resumes:
safety checks, the target's tests in a fresh worktree, one commit with a `Work-Order:` trailer; verification that
fails afterwards reverts it. Real git repositories, real subprocesses, a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.interpreters import python_for_tests
from tests.support import open_app, settings_for, wait_for, write_playbooks

PY = sys.executable
# The server runs a target's tests as uid 65534 when it is root: an interpreter that uid can start.
TEST_PY = python_for_tests()


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "app.py").write_text("VALUE = 1\n")
    (r / "check.py").write_text("import app, sys\nsys.exit(0 if app.VALUE < 10 else 1)\n")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "initial")
    return r


def diff_setting(value: int) -> str:
    return f"--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = {value}\n"


@pytest.fixture
def app(database_url: str, tmp_path: Path, repo: Path) -> Any:
    check = "import sys; sys.path.insert(0, sys.argv[1]); import app; sys.exit(0 if app.VALUE == 2 else 1)"
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
                        "check": {"command": {"argv": [PY, "-c", check, str(repo)]}},
                        "expect": "result.exit_code == 0",
                    },
                    "on_failure": "needs_human",
                },
            ],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"code": "code"},
        default_target="svc",
        targets={"svc": {"repository": str(repo), "test_command": [TEST_PY, "check.py"], "test_timeout": 30}},
    )
    a = open_app(settings, start_workers=True)
    yield a
    a.close()


def escalate_and_complete(client: httpx.Client, diff: str) -> tuple[dict[str, Any], dict[str, Any]]:
    run = client.post("/patches/trigger", json={"description": "d", "error_type": "code", "component": "svc"}).json()
    assert run["status"] == "awaiting_patch"
    done = client.post(
        f"/patches/work-orders/{run['work_order_id']}/complete",
        json={"tests_passed": True, "files_changed": 1, "diff": diff},
    )
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "awaiting_apply"  # was in_progress with a magic lease owner (issue 7)

    def settled() -> bool:
        return client.get(f"/patches/runs/{run['run_id']}").json()["status"] in ("completed", "needs_human", "failed")

    wait_for(settled, timeout=30)
    return run, client.get(f"/patches/runs/{run['run_id']}").json()


def test_a_good_diff_is_tested_committed_and_verified(client: httpx.Client, repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    run, detail = escalate_and_complete(client, diff_setting(2))
    assert detail["status"] == "completed", detail["error"]
    assert (repo / "app.py").read_text() == "VALUE = 2\n"
    assert git(repo, "rev-parse", "HEAD~1") == head
    assert f"Work-Order: {run['work_order_id']}" in git(repo, "log", "-1", "--format=%B")
    wo = client.get(f"/patches/work-orders/{run['work_order_id']}").json()
    assert wo["status"] == "completed" and wo["patch_result"]["applied"]["tests_passed"] is True
    assert client.get(f"/patches/diffs/{run['work_order_id']}.diff").text == diff_setting(2)
    assert any(t["message"].startswith("Code patch applied as commit") for t in detail["timeline"])
    assert git(repo, "worktree", "list").count("\n") == 0


@pytest.mark.parametrize(
    ("diff", "reason"),
    [
        ("--- a/../escape.py\n+++ b/../escape.py\n@@ -0,0 +1 @@\n+x = 1\n", "unsafe_patch"),
        ("--- /dev/null\n+++ b/.github/workflows/ci.yml\n@@ -0,0 +1 @@\n+on: push\n", "unsafe_patch"),
        (diff_setting(50), "tests_failed"),
        ("--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-VALUE = 7\n+VALUE = 2\n", "unsafe_patch"),
    ],
    ids=["dotdot", "ci-config", "tests-fail", "does-not-apply"],
)
def test_a_bad_diff_fails_the_work_order_and_leaves_the_repository(
    client: httpx.Client, repo: Path, diff: str, reason: str
) -> None:
    head = git(repo, "rev-parse", "HEAD")
    run, detail = escalate_and_complete(client, diff)
    assert detail["status"] == "needs_human"
    wo = client.get(f"/patches/work-orders/{run['work_order_id']}").json()
    assert wo["status"] == "failed" and wo["fail_reason"] == reason
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""
    assert not (repo.parent / "escape.py").exists()


def test_verification_failing_after_apply_reverts_and_lowers_trust(client: httpx.Client, repo: Path) -> None:
    run, detail = escalate_and_complete(client, diff_setting(3))  # tests pass (3 < 10) but verify wants 2
    assert detail["status"] == "needs_human"
    assert (repo / "app.py").read_text() == "VALUE = 1\n"
    log = git(repo, "log", "--format=%s", "-3").splitlines()
    assert log[0].startswith("Revert") and len(log) == 3
    wo = client.get(f"/patches/work-orders/{run['work_order_id']}").json()
    assert wo["status"] == "failed" and wo["fail_reason"] == "verification_failed"
    assert detail["trust"]["score"] == 0.45
    assert any(t["message"].startswith("Patch reverted") for t in detail["timeline"])
