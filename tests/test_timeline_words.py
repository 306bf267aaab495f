"""Honest words (issue 9, item 9): each timeline line says who did what, retries show `attempt k/n`, a failed check
says what was expected and what was seen, step counts are right, API timestamps carry milliseconds."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.api import views
from mendloop.app import App
from mendloop.domain.states import RunStatus
from tests.support import api_client, drain, open_app, settings_for, write_playbooks

PY = sys.executable


def make(database_url: str, tmp_path: Path, *playbooks: dict[str, Any]) -> App:
    write_playbooks(tmp_path / "pb", *playbooks)
    routing = {pb["id"]: pb["id"] for pb in playbooks}
    return open_app(settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing=routing))


def lines(app: App, run_id: str) -> list[str]:
    run = app.store.get_run(run_id)
    return [x.message for x in views.timeline(run, app.store.run_steps(run_id), app.store.run_events(run_id))]


def test_a_retried_check_shows_attempt_k_of_n_and_what_it_saw(database_url: str, tmp_path: Path) -> None:
    check = {"command": {"argv": [PY, "-c", 'print(\'{"ok": false, "chunks": 8000}\')']}}
    app = make(
        database_url,
        tmp_path,
        {
            "id": "rerun",
            "type": "retry",
            "description": "d",
            "steps": [
                {
                    "id": "rerun_pipeline",
                    "action": "verify",
                    "with": {"check": check, "expect": "result.facts.ok == true", "describe": "the pipeline finishes"},
                    "retry": {"max_attempts": 2, "backoff_seconds": 0, "jitter": 0},
                }
            ],
        },
    )
    try:
        run, _ = app.remediation.trigger(error_type="rerun", description="d")
        drain(app)
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.FAILED
        failed = [x for x in lines(app, run.id) if x.startswith("Verification failed")]
        expected = "expected the pipeline finishes (result.facts.ok == true); saw "
        assert failed[0].startswith(f"Verification failed: rerun pipeline (attempt 1/2): {expected}")
        assert failed[1].startswith(f"Verification failed: rerun pipeline (attempt 2/2): {expected}")
        assert "verification failed: verification failed" not in " ".join(failed).lower()
        assert done.error is not None and done.error.startswith("verification failed at step 'rerun_pipeline'")
    finally:
        app.close()


def test_a_completed_run_counts_every_step_and_stamps_milliseconds(database_url: str, tmp_path: Path) -> None:
    app = make(
        database_url,
        tmp_path,
        {
            "id": "skippy",
            "type": "data_fix",
            "description": "d",
            "steps": [
                {"id": "a", "action": "command", "with": {"argv": [PY, "-c", "pass"]}},
                {"id": "b", "action": "command", "when": "false", "with": {"argv": [PY, "-c", "pass"]}},
            ],
        },
    )
    try:
        run, _ = app.remediation.trigger(error_type="skippy", description="d")
        drain(app)
        with api_client(app) as client:
            detail = client.get(f"/patches/runs/{run.id}").json()
        assert detail["status"] == "completed"
        assert (detail["steps_completed"], detail["steps_total"]) == (2, 2)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", detail["created_at"])
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t["time"]) for t in detail["timeline"])
    finally:
        app.close()


@pytest.fixture
def app_client(database_url: str, tmp_path: Path) -> Iterator[tuple[App, httpx.Client]]:
    app = make(
        database_url,
        tmp_path,
        {
            "id": "code",
            "type": "code_patch",
            "description": "d",
            "steps": [{"id": "escalate", "action": "escalate", "with": {"description": "fix it"}}],
        },
    )
    try:
        with api_client(app) as client:
            yield app, client
    finally:
        app.close()


def test_a_completion_without_a_diff_says_the_agent_applied_it(app_client: tuple[App, httpx.Client]) -> None:
    app, client = app_client
    run, _ = app.remediation.trigger(error_type="code", description="d", component="svc")
    drain(app)
    wo_id = app.store.get_run(run.id).coding_work_order_id
    done = client.post(f"/patches/work-orders/{wo_id}/complete", json={"tests_passed": True, "files_changed": 2})
    assert done.status_code == 200, done.text
    messages = [e.message for e in app.store.run_events(run.id)]
    assert "Code patch applied by the coding agent (2 files changed). Running verification..." in messages
    assert any(m.endswith("(its claim; verification decides)") for m in messages)
    assert not any(m.startswith("Code patch applied (") for m in messages)
