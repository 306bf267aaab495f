"""Trust-driven autonomy: below its component's trust gate (`control.trust_gates`), a held patch's apply and a
`destructive: true` step wait for an operator's approval, parked exactly like an approval step; at or above it
they run on their own. The timeline names the rule, the score and the gate. Real git repositories, the real
patch pipeline, real workers, both database backends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.domain.states import RunStatus
from tests.interpreters import python_for_tests
from tests.support import api_client, git, open_app, settings_for, wait_for, write_playbooks

PY = sys.executable
TEST_PY = python_for_tests()
DIFF = "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
# A component's trust starts at 1.0 and an incident (each run) moves it by 0.25 toward 0: 0.75 during the run.
SCORE = 0.75


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


def _app(database_url: str, tmp_path: Path, repo: Path, gate: float) -> Any:
    check = "import sys; sys.path.insert(0, sys.argv[1]); import app; sys.exit(0 if app.VALUE == 2 else 1)"
    marker = tmp_path / "dropped"
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
        {
            "id": "drop",
            "type": "data_fix",
            "description": "a destructive step",
            "steps": [
                {
                    "id": "drop_cache",
                    "action": "command",
                    "destructive": True,
                    "with": {"argv": [PY, "-c", f"open({str(marker)!r}, 'w').write('x')"]},
                }
            ],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"code": "code", "drop": "drop"},
        default_target="svc",
        targets={"svc": {"repository": str(repo), "test_command": [TEST_PY, "check.py"], "test_timeout": 30}},
        control={"trust_gates": {"svc": gate}},
    )
    return open_app(settings, start_workers=True)


def _escalate_and_complete(client: httpx.Client) -> dict[str, Any]:
    run = client.post("/patches/trigger", json={"description": "d", "error_type": "code", "component": "svc"}).json()
    assert run["status"] == "awaiting_patch"
    done = client.post(
        f"/patches/work-orders/{run['work_order_id']}/complete",
        json={"tests_passed": True, "files_changed": 1, "diff": DIFF},
    )
    assert done.status_code == 200 and done.json()["status"] == "awaiting_apply", done.text
    return dict(run)


def _status(client: httpx.Client, run_id: str) -> str:
    return str(client.get(f"/patches/runs/{run_id}").json()["status"])


def test_below_the_gate_a_patch_waits_for_approval_and_is_applied_after_it(
    database_url: str, tmp_path: Path, repo: Path
) -> None:
    app = _app(database_url, tmp_path, repo, gate=0.9)
    try:
        with api_client(app) as client:
            run = _escalate_and_complete(client)
            wait_for(lambda: _status(client, run["run_id"]) == "awaiting_approval", timeout=30)
            assert (repo / "app.py").read_text() == "VALUE = 1\n"  # nothing applied yet
            shown = client.get(f"/patches/runs/{run['run_id']}").json()
            assert shown["approval"]["step_id"] == "apply_patch" and shown["approval"]["rule"] == "trust_gate"
            assert (shown["approval"]["score"], shown["approval"]["gate"]) == (SCORE, 0.9)
            asked = [t["message"] for t in shown["timeline"] if "waits for approval" in t["message"]]
            assert asked and f"trust {SCORE} is below the gate 0.9" in asked[0]
            assert client.post(f"/patches/runs/{run['run_id']}/approve", json={"comment": "ok"}).status_code == 200
            wait_for(lambda: _status(client, run["run_id"]) in ("completed", "needs_human", "failed"), timeout=60)
            detail = client.get(f"/patches/runs/{run['run_id']}").json()
        assert detail["status"] == "completed", detail["error"]
        assert (repo / "app.py").read_text() == "VALUE = 2\n"
        assert f"Work-Order: {run['work_order_id']}" in git(repo, "log", "-1", "--format=%B")
        types = [e.type for e in app.store.run_events(run["run_id"])]
        assert types.count("run.approval_requested") == 1 and "run.approved" in types  # asked once, not again
        assert "run.autonomous" not in types
    finally:
        app.close()


def test_a_rejected_patch_is_not_applied_and_its_work_order_fails(
    database_url: str, tmp_path: Path, repo: Path
) -> None:
    app = _app(database_url, tmp_path, repo, gate=0.9)
    try:
        with api_client(app) as client:
            run = _escalate_and_complete(client)
            wait_for(lambda: _status(client, run["run_id"]) == "awaiting_approval", timeout=30)
            assert client.post(f"/patches/runs/{run['run_id']}/reject", json={"comment": "no"}).status_code == 200
            assert _status(client, run["run_id"]) == "needs_human"
            wo = client.get(f"/patches/work-orders/{run['work_order_id']}").json()
        assert wo["status"] == "failed"
        assert (repo / "app.py").read_text() == "VALUE = 1\n"
    finally:
        app.close()


def test_at_or_above_the_gate_the_patch_is_applied_on_its_own(database_url: str, tmp_path: Path, repo: Path) -> None:
    app = _app(database_url, tmp_path, repo, gate=0.5)
    try:
        with api_client(app) as client:
            run = _escalate_and_complete(client)
            wait_for(lambda: _status(client, run["run_id"]) in ("completed", "needs_human", "failed"), timeout=60)
            detail = client.get(f"/patches/runs/{run['run_id']}").json()
        assert detail["status"] == "completed", detail["error"]
        assert (repo / "app.py").read_text() == "VALUE = 2\n"
        events = [e for e in app.store.run_events(run["run_id"]) if e.type.startswith("run.")]
        assert [e.type for e in events] == ["run.autonomous"]
        assert events[0].payload == {"step_id": "apply_patch", "rule": "trust_gate", "score": SCORE, "gate": 0.5}
        assert any("runs without approval" in t["message"] for t in detail["timeline"])
    finally:
        app.close()


def test_a_destructive_step_below_the_gate_waits_and_runs_once_approved(
    database_url: str, tmp_path: Path, repo: Path
) -> None:
    app = _app(database_url, tmp_path, repo, gate=0.9)
    marker = tmp_path / "dropped"
    try:
        with api_client(app) as client:
            run = client.post("/patches/trigger", json={"description": "d", "error_type": "drop"}).json()
            assert run["status"] == "awaiting_approval"
            assert not marker.exists()
            assert client.post(f"/patches/runs/{run['run_id']}/approve").status_code == 200
            wait_for(lambda: _status(client, run["run_id"]) == "completed", timeout=30)
        assert marker.exists()
        steps = [(s.step_id, s.action, s.status.value) for s in app.store.run_steps(run["run_id"])]
        assert steps == [("drop_cache.approval", "approval", "succeeded"), ("drop_cache", "command", "succeeded")]
        assert app.store.run_status(run["run_id"]) is RunStatus.COMPLETED
    finally:
        app.close()


def test_approving_the_run_approves_the_patch_its_work_order_holds(
    database_url: str, tmp_path: Path, repo: Path
) -> None:
    """One verb for operators: a run parked on a work order held for approval is approved through the run too."""
    app = _app(database_url, tmp_path, repo, gate=0.5)
    try:
        with api_client(app) as client:
            run = client.post("/patches/trigger", json={"description": "d", "error_type": "code"}).json()
            held = client.post(
                f"/patches/work-orders/{run['work_order_id']}/complete",
                json={"tests_passed": True, "files_changed": 1, "diff": DIFF, "approval_required": True},
            )
            assert held.json()["status"] == "awaiting_approval", held.text
            assert _status(client, run["run_id"]) == "awaiting_patch"
            assert client.post(f"/patches/runs/{run['run_id']}/approve").status_code == 200
            wait_for(lambda: _status(client, run["run_id"]) in ("completed", "needs_human", "failed"), timeout=60)
            assert _status(client, run["run_id"]) == "completed"
        assert (repo / "app.py").read_text() == "VALUE = 2\n"
    finally:
        app.close()
