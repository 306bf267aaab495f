"""Crash injection: `mendloop serve` killed (SIGKILL, through a named failpoint, mendloop/infra/failpoints.py) at
each stage of applying a held patch to the operator's repository. After a restart the repository is before or
after the patch, never between, and the run finishes. Real serve processes, a real git repository."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from mendloop.agents.landing import JOURNAL_NAME
from tests.interpreters import python_for_tests
from tests.support import GATE_SCRIPT, git, serve_process, wait_for, write_playbooks

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


def _test_processes(marker: str) -> list[int]:
    """Pids of the held diff's test processes: the interpreter running the gated test script (not bwrap, setpriv
    or the group guard)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and Path(argv[0].decode(errors="replace")).name.startswith("python"):
            if argv[1:2] == [b"-c"]:
                found.append(int(entry.name))
    return found


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def test_the_servers_tests_of_a_held_diff_are_sandboxed_die_with_serve_and_leave_no_worktree(
    database_url: str, tmp_path: Path, free_port: int
) -> None:
    """The tests mendloop runs for a diff posted to `complete` run in the sandbox (another user, no network, their
    own mount namespace), end with a `kill -9` of serve, and the worktree they ran in is pruned when serve starts
    again; the held diff is then tested again and lands."""
    repo = make_repo(tmp_path / "repo")
    initial = git(repo, "rev-parse", "HEAD")
    gate = tmp_path / "gate"  # a directory, so the sandbox shows it; the test waits for a file inside
    gate.mkdir()
    marker = str(gate)
    cfg = configure(tmp_path, database_url, repo)
    config = yaml.safe_load(cfg.read_text())
    tests = {"test_command": [python_for_tests(), "-c", GATE_SCRIPT, marker], "report": "none", "test_timeout": 120}
    config["targets"]["svc"].update(tests)
    cfg.write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{free_port}"
    log = tmp_path / "serve1.log"
    with serve_process(cfg, free_port, log=log) as first:
        run = httpx.post(
            f"{base}/patches/trigger", json={"description": "d", "error_type": "code", "component": "svc"}, timeout=30
        ).json()
        done = httpx.post(
            f"{base}/patches/work-orders/{run['work_order_id']}/complete",
            json={"tests_passed": True, "files_changed": 1, "diff": DIFF},
            timeout=30,
        )
        assert done.status_code == 200 and done.json()["status"] == "awaiting_apply", done.text
        try:
            wait_for(lambda: bool(_test_processes(marker)), timeout=30)
        except AssertionError:
            wo = httpx.get(f"{base}/patches/work-orders/{run['work_order_id']}", timeout=10).json()
            raise AssertionError(f"no test process; work order {wo['status']}: {wo.get('patch_result')}") from None
        pids = _test_processes(marker)
        for pid in pids:
            if os.getuid() == 0:  # as root, the tests run as nobody (65534), never as the server's root
                assert _status_field(pid, "Uid").split()[0] == "65534", pid
            if shutil.which("bwrap"):
                # Their own network (only a private loopback) and mount namespaces: not the server's.
                for ns in ("net", "mnt"):
                    assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        worktrees = [line for line in git(repo, "worktree", "list", "--porcelain").splitlines() if "worktree " in line]
        assert len(worktrees) == 2, worktrees  # the operator's checkout and the tests' worktree
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        wait_for(lambda: not _test_processes(marker), timeout=10)  # nothing it started outlives it
    stale = Path(worktrees[1].split(" ", 1)[1])
    assert git(repo, "rev-parse", "HEAD") == initial

    (gate / "open").write_text("")
    with serve_process(cfg, free_port, log=tmp_path / "serve2.log"):
        # Pruned while serve started, before anything else ran in the repository.
        assert not stale.exists()

        def finished() -> bool:
            status = httpx.get(f"{base}/patches/runs/{run['run_id']}", timeout=10).json()["status"]
            assert status not in ("failed", "needs_human"), status
            return bool(status == "completed")

        wait_for(finished, timeout=60)
    assert git(repo, "rev-parse", "HEAD~1") == initial
    assert (repo / "app.py").read_text() == "VALUE = 2\n"
    assert git(repo, "worktree", "list").count("\n") == 0
