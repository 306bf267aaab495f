"""Dry runs, for every playbook (`control.dry_run`) or one (`dry_run: true` in it): each step is rendered as the step
loop would render it (`playbooks/dry_run.py`), recorded as skipped with what it would have done, and none is
executed; the run ends as `dry_run`, which resolves no incident. Real commands that would leave a mark if they ran,
both backends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from mendloop.app import App
from mendloop.domain.states import RunStatus
from tests.support import api_client, drain, open_app, settings_for, write_playbooks

PY = sys.executable


def _playbook(pid: str, marker: Path, **extra: Any) -> dict[str, Any]:
    write = f"open({str(marker)!r}, 'a').write('ran')"
    return {
        "id": pid,
        "type": "retry",
        "description": "leaves a mark when it runs",
        "steps": [
            {"id": "mark", "action": "command", "with": {"argv": [PY, "-c", write, "{{ event.description }}"]}},
            {"id": "nap", "action": "sleep", "with": {"seconds": 3600}},
            {"id": "fix", "action": "escalate", "with": {"description": "fix {{ error_type }}"}},
            {
                "id": "check",
                "action": "verify",
                "with": {"check": {"command": {"argv": [PY, "-c", write]}}, "expect": "result.exit_code == 0"},
            },
        ],
        **extra,
    }


def _app(database_url: str, tmp_path: Path, *, global_dry_run: bool) -> App:
    write_playbooks(
        tmp_path / "pb",
        _playbook("plain", tmp_path / "plain.mark"),
        _playbook("rehearsed", tmp_path / "rehearsed.mark", dry_run=True),
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"plain": "plain", "rehearsed": "rehearsed"},
        control={"dry_run": global_dry_run},
    )
    return open_app(settings)


def _check_dry(app: App, run_id: str) -> None:
    run = app.store.get_run(run_id)
    assert run.status is RunStatus.DRY_RUN, run.error
    assert run.coding_work_order_id is None and not run.escalated  # the escalate step was not executed
    steps = app.store.run_steps(run_id)
    assert [(s.step_id, s.status.value) for s in steps] == [
        ("mark", "skipped"),
        ("nap", "skipped"),
        ("fix", "skipped"),
        ("check", "skipped"),
    ]
    assert all(s.output["dry_run"] is True for s in steps)
    # Rendered against the run's event, as it would have run.
    assert steps[0].output["call"]["argv"][-1] == "rendered for the rehearsal"
    assert steps[2].output["with"]["description"].startswith("fix ")
    assert run.outputs["dry_run"] == {"steps": 4, "would_fail": []}
    done = [e for e in app.store.run_events(run_id) if e.type == "self_healing.completed"]
    assert len(done) == 1 and "none executed" in done[0].message and done[0].payload["status"] == "dry_run"


def test_a_global_dry_run_records_every_step_and_executes_none(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path, global_dry_run=True)
    try:
        with api_client(app) as client:
            body = {"error_type": "plain", "description": "rendered for the rehearsal", "wait_seconds": 0}
            run_id = client.post("/patches/trigger", json=body).json()["run_id"]
            drain(app)
            shown = client.get(f"/patches/runs/{run_id}").json()
        assert shown["status"] == "dry_run"
        _check_dry(app, run_id)
        assert not (tmp_path / "plain.mark").exists()
        assert app.store.list_work_orders(limit=10)[1] == 0
    finally:
        app.close()


def test_a_playbook_of_its_own_is_a_dry_run_and_the_others_run(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path, global_dry_run=False)
    try:
        rehearsed, _ = app.remediation.trigger(error_type="rehearsed", description="rendered for the rehearsal")
        plain, _ = app.remediation.trigger(error_type="plain", description="for real")
        drain(app)
        _check_dry(app, rehearsed.id)
        assert not (tmp_path / "rehearsed.mark").exists()
        assert (tmp_path / "plain.mark").read_text() == "ran"  # the other playbook executes
        assert app.store.run_status(plain.id) is RunStatus.QUEUED  # now asleep in its `nap` step
    finally:
        app.close()


def test_a_dry_run_from_a_detection_resolves_no_incident(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path, global_dry_run=True)
    try:
        with api_client(app) as client:
            body = {"event_type": "app.error", "payload": {"error_type": "plain"}, "message": "ERROR: plain broke"}
            answer = client.post("/events", json=body).json()
            drain(app)
            incident = client.get(f"/incidents/{answer['incident_id']}").json()
        assert app.store.run_status(answer["run_id"]) is RunStatus.DRY_RUN
        assert incident["status"] == "open"
        assert not (tmp_path / "plain.mark").exists()
    finally:
        app.close()


@pytest.mark.parametrize("value", [True, False])
def test_the_playbook_field_is_a_boolean(value: bool) -> None:
    from mendloop.playbooks.model import Playbook

    pb = Playbook.model_validate(
        {"id": "p", "type": "retry", "description": "d", "dry_run": value, "steps": [{"id": "s", "action": "escalate"}]}
    )
    assert pb.dry_run is value


def test_dry_runs_stay_out_of_the_rates() -> None:
    from mendloop.domain import stats

    sums = {
        stats.RUNS: 4,
        stats.run_status_measure(RunStatus.DRY_RUN): 2,
        stats.run_status_measure(RunStatus.COMPLETED): 1,
        stats.run_status_measure(RunStatus.FAILED): 1,
        stats.RUNS_ESCALATED: 1,
        stats.RUNS_AUTO_FIXED: 1,
    }
    rates = stats.rates(sums)
    # Of the two runs that really ran, one escalated and one of the two finished was fixed on its own.
    assert (rates.escalation_rate, rates.auto_fix_rate, rates.finished) == (0.5, 0.5, 2)
