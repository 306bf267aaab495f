"""Approval steps: a run parks in `awaiting_approval` until an operator approves or rejects it (API, CLI), or its
deadline passes and `on_timeout` decides; it survives a restart of `serve` while it waits. The decisions are pure
(`domain/approvals.py`); the rest runs on a real database (both backends), a real server process and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.domain import approvals
from mendloop.domain.records import Run
from mendloop.domain.states import RunStatus, run_can_move
from mendloop.errors import Conflict
from mendloop.playbooks.model import Playbook, duration_seconds
from mendloop.testing import FakeClock
from tests.support import api_client, drain, mendloop_argv, open_app, serve_process, settings_for, wait_for

PY = sys.executable
NOW = 1_000_000.0


def _run(status: RunStatus = RunStatus.RUNNING, **kw: Any) -> Run:
    base: dict[str, Any] = {
        "id": "run_1",
        "playbook_id": "pb",
        "playbook_version": "1",
        "playbook_type": "retry",
        "playbook": {},
        "status": status,
        "component": "svc",
        "error_type": "e",
        "description": "d",
        "context": {},
        "step_index": 1,
        "attempt": 0,
        "outputs": {"a": {"ok": True}},
        "pending": {},
        "escalated": False,
        "coding_work_order_id": None,
        "lease_owner": "w",
        "lease_expires_at": NOW + 30,
        "next_run_at": NOW,
        "created_at": NOW - 60,
        "updated_at": NOW - 60,
        "finished_at": None,
        "error": None,
        "trigger_event_id": None,
        "dedupe_key": None,
    }
    base.update(kw)
    return Run(**base)


def _parked(
    kind: approvals.Kind = "step", on_timeout: approvals.OnTimeout = "reject", deadline: float | None = None
) -> Run:
    rule = approvals.Rule("approval_step") if kind == "step" else approvals.Rule("trust_gate", score=0.5, gate=0.7)
    d = approvals.request(
        _run(),
        kind=kind,
        step_id="gate",
        rule=rule,
        message="ok?",
        deadline_at=deadline,
        on_timeout=on_timeout,
        now=NOW,
    )
    return _run(RunStatus.AWAITING_APPROVAL, pending=d.run["pending"], next_run_at=d.run["next_run_at"])


# -- the decisions, pure --------------------------------------------------------------------------------------


def test_a_request_parks_the_run_with_its_deadline_as_next_run_at() -> None:
    d = approvals.request(
        _run(),
        kind="step",
        step_id="gate",
        rule=approvals.Rule("approval_step"),
        message="deploy?",
        deadline_at=NOW + 60,
        on_timeout="fail",
        now=NOW,
    )
    assert d.run["status"] == "awaiting_approval" and d.run["next_run_at"] == NOW + 60
    assert d.run["pending"]["approval"]["on_timeout"] == "fail"
    assert [e.type for e in d.events] == ["run.approval_requested"]
    # Without a deadline it waits (next_run_at is NOT NULL: far in the future, never due).
    forever = approvals.request(
        _run(), kind="step", step_id="gate", rule=approvals.Rule("approval_step"), message=None,
        deadline_at=None, on_timeout="reject", now=NOW,
    )  # fmt: skip
    assert forever.run["next_run_at"] == approvals.NO_DEADLINE
    waiting = _run(RunStatus.AWAITING_APPROVAL, pending=forever.run["pending"], next_run_at=forever.run["next_run_at"])
    assert approvals.time_out(waiting, now=NOW + 10 * 365 * 86400) is None


def test_the_state_table_knows_the_waiting_state() -> None:
    assert run_can_move(RunStatus.RUNNING, RunStatus.AWAITING_APPROVAL)
    assert run_can_move(RunStatus.VERIFYING, RunStatus.AWAITING_APPROVAL)
    assert not run_can_move(RunStatus.AWAITING_APPROVAL, RunStatus.RUNNING)  # only through the queue
    with pytest.raises(Conflict):
        approvals.request(
            _run(RunStatus.QUEUED), kind="step", step_id="g", rule=approvals.Rule("approval_step"), message=None,
            deadline_at=None, on_timeout="reject", now=NOW,
        )  # fmt: skip


def test_approving_a_step_moves_past_it_and_approving_a_gate_runs_the_gated_step() -> None:
    step = approvals.decide(_parked("step"), approved=True, by="operator", comment="go", now=NOW + 5)
    assert step.run["status"] == "queued" and step.run["step_index"] == 2 and step.run["next_run_at"] == NOW + 5
    assert step.run["outputs"]["gate"] == {"approved": True, "by": "operator", "comment": "go", "decided_at": NOW + 5}
    assert step.run["outputs"]["a"] == {"ok": True}
    gate = approvals.decide(_parked("gate"), approved=True, by="operator", comment=None, now=NOW + 5)
    assert "step_index" not in gate.run and gate.run["pending"] == {"approved": "gate"}
    assert gate.step is not None and gate.step["step_id"] == "gate.approval"
    assert gate.step["output"]["rule"] == "trust_gate"
    assert [e.type for e in gate.events] == ["run.approved"]


def test_a_rejection_hands_the_run_to_a_human() -> None:
    d = approvals.decide(_parked(), approved=False, by="operator", comment="not now", now=NOW)
    assert d.run["status"] == "needs_human" and "not now" in d.run["error"]
    assert [e.type for e in d.events] == ["run.rejected", "self_healing.completed"]


@pytest.mark.parametrize(
    ("on_timeout", "status", "event"),
    [("reject", "needs_human", "run.rejected"), ("approve", "queued", "run.approved"),
     ("fail", "failed", "run.approval_timed_out")],
)  # fmt: skip
def test_the_deadline_decides_as_on_timeout_says(on_timeout: approvals.OnTimeout, status: str, event: str) -> None:
    run = _parked(on_timeout=on_timeout, deadline=NOW + 60)
    assert approvals.time_out(run, now=NOW + 59) is None
    d = approvals.time_out(run, now=NOW + 60)
    assert d is not None and d.run["status"] == status
    assert d.events[0].type == event and d.events[0].payload["by"] == "timeout"


def test_deciding_a_run_that_waits_for_nothing_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="not waiting for an approval"):
        approvals.decide(_run(), approved=True, by="operator", comment=None, now=NOW)


def test_the_trust_gate_rule() -> None:
    assert approvals.trust_gate(0.9, None) is None
    below = approvals.trust_gate(0.5, 0.7)
    assert approvals.needs_approval(below) and below is not None and below.as_payload() == {
        "rule": "trust_gate", "score": 0.5, "gate": 0.7,
    }  # fmt: skip
    assert not approvals.needs_approval(approvals.trust_gate(0.7, 0.7))  # at the gate: on its own


def test_an_approval_step_is_validated() -> None:
    assert duration_seconds("30m") == 1800 and duration_seconds("2h") == 7200 and duration_seconds(90) == 90
    assert duration_seconds("1.5d") == 129600
    base = {"id": "p", "type": "retry", "description": "d"}
    for params, word in (
        ({"timeout": "soon"}, "with.timeout"),
        ({"on_timeout": "maybe"}, "on_timeout"),
        ({"message": 3}, "with.message"),
        ({"who": "me"}, "with.who"),
    ):
        with pytest.raises(ValueError, match=word):
            Playbook.model_validate({**base, "steps": [{"id": "g", "action": "approval", "with": params}]})
    Playbook.model_validate({**base, "steps": [{"id": "g", "action": "approval"}]})


# -- a run that waits, on a real database ---------------------------------------------------------------------


def _playbook(on_timeout: str = "reject", timeout: str | None = "10m") -> dict[str, Any]:
    gate: dict[str, Any] = {"message": "Restart {{ context.target }}?", "on_timeout": on_timeout}
    if timeout:
        gate["timeout"] = timeout
    return {
        "id": "gated",
        "type": "retry",
        "description": "asks before it acts",
        "steps": [
            {"id": "look", "action": "command", "with": {"argv": [PY, "-c", "print('{\"seen\": 1}')"]}},
            {"id": "ask", "action": "approval", "with": gate},
            {"id": "act", "action": "command", "with": {"argv": [PY, "-c", "print('{\"acted\": 1}')"]}},
        ],
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _open(database_url: str, tmp_path: Path, clock: FakeClock, **playbook: Any) -> Any:
    from tests.support import write_playbooks

    write_playbooks(tmp_path / "pb", _playbook(**playbook))
    settings = settings_for(
        database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"gated": "gated"}, default_target="svc",
        targets={"svc": {}},
    )  # fmt: skip
    return open_app(settings, clock=clock)


def _trigger(app: Any) -> str:
    run, _ = app.remediation.trigger(error_type="gated", description="d")
    drain(app)
    return str(run.id)


def _types(app: Any, run_id: str) -> list[str]:
    return [e.type for e in app.store.run_events(run_id)]


def test_a_run_waits_for_approval_and_goes_on_after_it(database_url: str, tmp_path: Path, clock: FakeClock) -> None:
    app = _open(database_url, tmp_path, clock)
    try:
        run_id = _trigger(app)
        run = app.store.get_run(run_id)
        assert run.status is RunStatus.AWAITING_APPROVAL and "act" not in run.outputs and "look" in run.outputs
        assert drain(app) == 0  # parked: no worker claims it
        assert app.remediation.reap_approvals in app.workers.housekeeping  # serve's reaper calls it
        with api_client(app) as client:
            shown = client.get(f"/patches/runs/{run_id}").json()
            assert shown["status"] == "awaiting_approval"
            assert shown["approval"]["step_id"] == "ask" and shown["approval"]["message"] == "Restart svc?"
            answer = client.post(f"/patches/runs/{run_id}/approve", json={"comment": "go ahead"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "queued"
            again = client.post(f"/patches/runs/{run_id}/approve", json={})
            assert again.status_code == 409 and "not waiting" in again.json()["detail"]
            drain(app)
            detail = client.get(f"/patches/runs/{run_id}").json()
        assert detail["status"] == "completed", detail["error"]
        outputs = app.store.get_run(run_id).outputs
        assert outputs["ask"]["approved"] is True and outputs["ask"]["comment"] == "go ahead"
        assert outputs["act"]["json"] == {"acted": 1}
        types = _types(app, run_id)
        assert types.index("run.approval_requested") < types.index("run.approved")
        steps = [(s.step_id, s.status.value) for s in app.store.run_steps(run_id)]
        assert steps == [("look", "succeeded"), ("ask", "succeeded"), ("act", "succeeded")]
        assert any("approved by anonymous: go ahead" in t["message"] for t in detail["timeline"])
    finally:
        app.close()


def test_the_timeline_names_who_approved_rejected_and_paused(database_url: str, tmp_path: Path) -> None:
    from tests.support import write_playbooks

    write_playbooks(tmp_path / "pb", _playbook())
    token = "alice-operator-token-0123456789"
    settings = settings_for(
        database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"gated": "gated"}, default_target="svc",
        targets={"svc": {}}, tokens=[{"name": "alice", "token": token, "role": "operator"}],
    )  # fmt: skip
    app = open_app(settings, clock=FakeClock())
    try:
        first, second = _trigger(app), _trigger(app)
        with api_client(app) as client:
            auth = {"Authorization": f"Bearer {token}"}
            assert (
                client.post(f"/patches/runs/{first}/approve", json={"comment": "ok"}, headers=auth).status_code == 200
            )
            assert client.post(f"/patches/runs/{second}/reject", json={}, headers=auth).status_code == 200
            assert client.post("/pause", json={"component": "svc", "reason": "deploy"}, headers=auth).status_code == 200
            assert client.post("/resume", json={"component": "svc"}, headers=auth).status_code == 200
        assert app.store.get_run(first).outputs["ask"]["by"] == "alice"
        (asked,) = [s for s in app.store.run_steps(second) if s.step_id == "ask"]
        assert asked.output["by"] == "alice"  # a rejected run has no outputs to go on with: the step keeps it
        # The rejection ended a run: the statistics count it where /metrics and the runs table do.
        assert app.store.get_run(second).status is RunStatus.NEEDS_HUMAN
        stats = app.store.statistics()
        assert stats.runs_by_status["needs_human"] == 1 and stats.overall.finished == 1
        control = [e for e in app.store.recent_events(limit=50) if e.type.startswith("control.")]
        assert sorted((e.type, e.payload["by"]) for e in control) == [
            ("control.paused", "alice"),
            ("control.resumed", "alice"),
        ]
        assert all("by alice" in e.message for e in control)
    finally:
        app.close()


def test_a_rejected_run_needs_a_human_and_does_not_act(database_url: str, tmp_path: Path, clock: FakeClock) -> None:
    app = _open(database_url, tmp_path, clock)
    try:
        run_id = _trigger(app)
        with api_client(app) as client:
            bad = client.post(f"/patches/runs/{run_id}/reject", json={"comment": 5})
            assert bad.status_code == 422 and "comment" in bad.text
            assert client.post("/patches/runs/run_nope/reject", json={}).status_code == 404
            answer = client.post(f"/patches/runs/{run_id}/reject", json={"comment": "not during the sale"})
            assert answer.status_code == 200 and answer.json()["status"] == "needs_human"
        drain(app)
        run = app.store.get_run(run_id)
        assert run.status is RunStatus.NEEDS_HUMAN and "not during the sale" in (run.error or "")
        assert "act" not in run.outputs
        assert "run.rejected" in _types(app, run_id)
    finally:
        app.close()


@pytest.mark.parametrize(
    ("on_timeout", "final"), [("reject", "needs_human"), ("approve", "completed"), ("fail", "failed")]
)
def test_the_deadline_passes_and_on_timeout_decides(
    database_url: str, tmp_path: Path, clock: FakeClock, on_timeout: str, final: str
) -> None:
    app = _open(database_url, tmp_path, clock, on_timeout=on_timeout, timeout="10m")
    try:
        run_id = _trigger(app)
        clock.advance(599)
        assert app.remediation.reap_approvals() == []
        assert app.store.run_status(run_id) is RunStatus.AWAITING_APPROVAL
        clock.advance(1)
        assert app.remediation.reap_approvals() == [run_id]
        drain(app)
        run = app.store.get_run(run_id)
        assert run.status.value == final, run.error
        assert ("act" in run.outputs) is (on_timeout == "approve")
        assert app.remediation.reap_approvals() == []
    finally:
        app.close()


def test_a_waiting_run_can_be_cancelled(database_url: str, tmp_path: Path, clock: FakeClock) -> None:
    app = _open(database_url, tmp_path, clock)
    try:
        run_id = _trigger(app)
        with api_client(app) as client:
            assert client.post(f"/patches/runs/{run_id}/cancel", json={}).json()["status"] == "cancelled"
            assert client.post(f"/patches/runs/{run_id}/approve").status_code == 409
    finally:
        app.close()


# -- across a restart of a real `serve`, decided with the CLI ------------------------------------------------


def test_a_waiting_run_survives_a_restart_of_serve_and_is_approved_with_the_cli(
    database_url: str, tmp_path: Path, free_port: int
) -> None:
    from tests.support import write_playbooks

    write_playbooks(tmp_path / "pb", _playbook(timeout=None))
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "playbook_dirs": ["pb"],
                "routing": {"gated": "gated"},
                "poll_interval": 0.05,
            }
        )
    )
    base = f"http://127.0.0.1:{free_port}"
    with serve_process(cfg, free_port, log=tmp_path / "serve1.log") as first:
        started = httpx.post(f"{base}/patches/trigger", json={"description": "d", "error_type": "gated"}, timeout=30)
        run_id = started.json()["run_id"]
        assert started.json()["status"] == "awaiting_approval"  # a trigger's caller is answered once it parks
        first.terminate()
        first.wait(20)
    with serve_process(cfg, free_port, log=tmp_path / "serve2.log"):
        assert httpx.get(f"{base}/patches/runs/{run_id}").json()["status"] == "awaiting_approval"
        cli = subprocess.run(
            mendloop_argv("runs", "approve", run_id, "--comment", "after the restart", "--url", base),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert f"{run_id}: queued" in cli.stdout

        def done() -> bool:
            return bool(httpx.get(f"{base}/patches/runs/{run_id}").json()["status"] == "completed")

        wait_for(done, timeout=30)
        refused = subprocess.run(
            mendloop_argv("runs", "reject", run_id, "--url", base), capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0 and "not waiting" in (refused.stdout + refused.stderr)
        assert len((refused.stdout + refused.stderr).strip().splitlines()) == 1


def test_runs_stopped_at_an_approval_do_not_open_the_breaker(
    database_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Rejecting risky actions is an operator's word, not a failure of the fixes: three rejected runs of one
    component leave its breaker closed, where three failed runs open it (tests/test_intake.py)."""
    app = _open(database_url, tmp_path, clock)
    try:
        with api_client(app) as client:

            def detect(shape: str) -> dict[str, Any]:
                body = {"event_type": "app.error", "component": "svc", "payload": {"error_type": "gated"}}
                answer = client.post("/events", json={**body, "message": f"shape {shape} broke"})
                assert answer.status_code == 202, answer.text
                return dict(answer.json())

            for shape in ("a", "bb", "ccc"):
                run_id = str(detect(shape)["run_id"])
                drain(app)
                assert app.store.run_status(run_id) is RunStatus.AWAITING_APPROVAL
                app.remediation.reject_run(run_id, "not now")
                assert app.store.run_status(run_id) is RunStatus.NEEDS_HUMAN
            fourth = detect("dddd")
        assert fourth["verdict"] != "breaker_open", fourth
        assert app.store.run_status(str(fourth["run_id"])) is RunStatus.QUEUED
    finally:
        app.close()
