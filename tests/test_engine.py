"""The durable engine on SQLite and PostgreSQL: steps, conditions, retries, failure policies, escalation,
resume, verification and trust. Commands are real subprocesses; side effects are real files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mendloop.app import App
from mendloop.domain.states import RunStatus, StepStatus, WorkOrderStatus
from mendloop.errors import Conflict, NotFound, UnknownErrorType
from mendloop.testing import FakeClock
from tests.support import drain, open_app, settings_for, wait_for, wait_status, write_playbooks

PY = sys.executable
# Appends one JSON line {"key": <idempotency key>, "tag": argv[2]} to argv[1] and prints facts.
RECORD = (
    "import json,os,sys; f=open(sys.argv[1],'a'); "
    "f.write(json.dumps({'key': os.environ['MENDLOOP_IDEMPOTENCY_KEY'], 'tag': sys.argv[2]})+'\\n'); f.close(); "
    "print(json.dumps({'tag': sys.argv[2], 'n': len(open(sys.argv[1]).readlines())}))"
)
# Fails until it has been called argv[2] times (counted in file argv[1]).
FLAKY = (
    "import sys; p=sys.argv[1]; n=int(open(p).read() or 0) if __import__('os').path.exists(p) else 0; "
    "open(p,'w').write(str(n+1)); sys.exit(0 if n+1 >= int(sys.argv[2]) else 3)"
)


def record(log: Path, tag: str, **extra: Any) -> dict[str, Any]:
    return {"id": tag, "action": "command", "with": {"argv": [PY, "-c", RECORD, str(log), tag]}, **extra}


def lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def make(database_url: str, tmp_path: Path, *playbooks: dict[str, Any], **kw: Any) -> App:
    write_playbooks(tmp_path / "pb", *playbooks)
    routing = {pb["id"]: pb["id"] for pb in playbooks}
    settings = settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing=routing)
    return open_app(settings, **kw)


def test_steps_run_in_order_and_pass_facts(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    pb = {
        "id": "chain",
        "type": "data_fix",
        "description": "d",
        "steps": [
            record(log, "first"),
            {
                "id": "second",
                "action": "command",
                "with": {"argv": [PY, "-c", RECORD, str(log), "after-{{ steps.first.facts.n }}"]},
            },
            record(log, "skipped", when="steps.first.facts.n > 5"),
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="chain", description="go")
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.COMPLETED
        assert [x["tag"] for x in lines(log)] == ["first", "after-1"]
        assert [x["key"] for x in lines(log)] == [f"{run.id}:first:1", f"{run.id}:second:1"]
        steps = app.store.run_steps(run.id)
        assert [(s.step_id, s.status) for s in steps] == [
            ("first", StepStatus.SUCCEEDED),
            ("second", StepStatus.SUCCEEDED),
            ("skipped", StepStatus.SKIPPED),
        ]
        types = [e.type for e in app.store.run_events(run.id)]
        assert types[0] == "self_healing.trigger_requested"
        assert "self_healing.triggered" in types and types[-1] == "self_healing.completed"
    finally:
        app.close()


def test_event_data_never_reaches_a_shell(database_url: str, tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    pwned = tmp_path / "pwned"
    pb = {
        "id": "echo",
        "type": "data_fix",
        "description": "d",
        "steps": [
            {
                "id": "dump",
                "action": "command",
                "with": {
                    "argv": [
                        PY,
                        "-c",
                        "import json,sys; open(sys.argv[1],'w').write(json.dumps(sys.argv[2:]))",
                        str(out),
                        "{{ context.file_path }}",
                    ]
                },
            }
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        hostile = f"x; touch {pwned} $(touch {pwned}) `touch {pwned}`"
        run, _ = app.remediation.trigger(error_type="echo", description="d", file_path=hostile)
        drain(app)
        assert app.store.run_status(run.id) is RunStatus.COMPLETED
        assert json.loads(out.read_text()) == [hostile]
        assert not pwned.exists()
    finally:
        app.close()


def test_templates_are_sandboxed(database_url: str, tmp_path: Path) -> None:
    pb = {
        "id": "escape",
        "type": "data_fix",
        "description": "d",
        "steps": [
            {
                "id": "s",
                "action": "command",
                "with": {"argv": ["echo", "{{ ''.__class__.__mro__[1].__subclasses__() }}"]},
            }
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="escape", description="d")
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.FAILED
        assert "unsafe" in (done.error or "") or "access" in (done.error or "")
    finally:
        app.close()


def test_retry_backs_off_without_holding_a_worker(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    counter = tmp_path / "count"
    pb = {
        "id": "flaky",
        "type": "retry",
        "description": "d",
        "steps": [
            {
                "id": "call",
                "action": "command",
                "with": {"argv": [PY, "-c", FLAKY, str(counter), "3"]},
                "retry": {"max_attempts": 5, "backoff_seconds": 10, "factor": 2, "max_delay_seconds": 15, "jitter": 0},
            }
        ],
    }
    app = make(database_url, tmp_path, pb, clock=clock)
    try:
        run, _ = app.remediation.trigger(error_type="flaky", description="d")
        assert drain(app) == 1
        parked = app.store.get_run(run.id)
        assert parked.status is RunStatus.QUEUED and parked.attempt == 1
        assert parked.next_run_at == clock() + 10 and parked.lease_owner is None
        assert drain(app) == 0  # not due yet
        clock.advance(10)
        assert drain(app) == 1
        assert app.store.get_run(run.id).next_run_at == clock() + 15  # 20 capped at 15
        clock.advance(15)
        drain(app)
        assert app.store.run_status(run.id) is RunStatus.COMPLETED
        attempts = [(s.attempt, s.status) for s in app.store.run_steps(run.id)]
        assert attempts == [(1, StepStatus.FAILED), (2, StepStatus.FAILED), (3, StepStatus.SUCCEEDED)]
        assert counter.read_text() == "3"
    finally:
        app.close()


def test_sleep_parks_the_run(database_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    log = tmp_path / "log.jsonl"
    pb = {
        "id": "nap",
        "type": "retry",
        "description": "d",
        "steps": [{"id": "nap", "action": "sleep", "with": {"seconds": 60}}, record(log, "after")],
    }
    app = make(database_url, tmp_path, pb, clock=clock)
    try:
        run, _ = app.remediation.trigger(error_type="nap", description="d")
        drain(app)
        assert app.store.get_run(run.id).status is RunStatus.QUEUED and not log.exists()
        clock.advance(60)
        drain(app)
        assert app.store.run_status(run.id) is RunStatus.COMPLETED and len(lines(log)) == 1
    finally:
        app.close()


@pytest.mark.parametrize(
    ("policy", "status", "ran_after"),
    [
        ("fail", RunStatus.FAILED, False),
        ("continue", RunStatus.COMPLETED, True),
        ("needs_human", RunStatus.NEEDS_HUMAN, False),
    ],
)
def test_on_failure_policies(
    database_url: str, tmp_path: Path, policy: str, status: RunStatus, ran_after: bool
) -> None:
    log = tmp_path / "log.jsonl"
    pb = {
        "id": "pol",
        "type": "data_fix",
        "description": "d",
        "steps": [
            {"id": "bad", "action": "command", "with": {"argv": ["false"]}, "on_failure": policy},
            record(log, "after"),
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="pol", description="d")
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is status
        assert log.exists() is ran_after
        if status is not RunStatus.COMPLETED:
            assert "false exited with 1" in (done.error or "")
    finally:
        app.close()


def test_goto_and_escalate_on_failure(database_url: str, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    log = tmp_path / "log.jsonl"
    pb = {
        "id": "loop",
        "type": "hybrid",
        "description": "d",
        "steps": [
            record(log, "prepare"),
            {
                "id": "try",
                "action": "command",
                "with": {"argv": [PY, "-c", FLAKY, str(counter), "2"]},
                "on_failure": "goto:prepare",
            },
            {"id": "always_bad", "action": "command", "with": {"argv": ["false"]}, "on_failure": "escalate"},
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="loop", description="d")
        drain(app)
        parked = app.store.get_run(run.id)
        assert [x["tag"] for x in lines(log)] == ["prepare", "prepare"]
        assert parked.status is RunStatus.AWAITING_PATCH and parked.coding_work_order_id
        wo = app.store.get_work_order(parked.coding_work_order_id)
        assert wo.context["failed_step"]["id"] == "always_bad"
        assert "exited with 1" in wo.context["failed_step"]["error"]
    finally:
        app.close()


def _escalating(tmp_path: Path, verify_ok_file: Path) -> dict[str, Any]:
    log = tmp_path / "log.jsonl"
    check = "import sys,os; sys.exit(0 if os.path.exists(sys.argv[1]) else 1)"
    return {
        "id": "needs_code",
        "type": "code_patch",
        "description": "d",
        "steps": [
            record(log, "analyze"),
            {"id": "escalate", "action": "escalate", "with": {"description": "Fix it ({{ steps.analyze.facts.tag }})"}},
            record(log, "deploy", when="run.escalated"),
            {
                "id": "verify",
                "action": "verify",
                "with": {
                    "check": {"command": {"argv": [PY, "-c", check, str(verify_ok_file)]}},
                    "expect": "result.exit_code == 0",
                },
                "on_failure": "needs_human",
            },
        ],
    }


def test_escalation_parks_then_a_verified_patch_completes_and_restores_trust(database_url: str, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    app = make(database_url, tmp_path, _escalating(tmp_path, fixed))
    try:
        run, _ = app.remediation.trigger(error_type="needs_code", description="broken", component="svc")
        drain(app)
        parked = app.store.get_run(run.id)
        assert parked.status is RunStatus.AWAITING_PATCH and parked.lease_owner is None
        wo = app.store.get_work_order(parked.coding_work_order_id or "")
        assert wo.status is WorkOrderStatus.QUEUED and wo.self_healing_run_id == run.id
        assert wo.description == "Fix it (analyze)"
        assert drain(app) == 0  # parked: no worker touches it
        assert app.store.trust_score("svc") == 0.75
        fixed.write_text("yes")
        answer = app.remediation.complete_work_order(wo.id, tests_passed=True, files_changed=2, diff_url=None)
        assert answer["status"] == "completed"
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.COMPLETED
        assert app.store.trust_score("svc") == 0.875
        messages = [e.message for e in app.store.run_events(run.id)]
        assert f"Escalated to coding agent (work order {wo.id})" in messages
        assert "Trust restored: 0.75 → 0.88" in messages
        assert any(m.startswith("Code patch applied by the coding agent (2 files changed)") for m in messages)
        again = app.remediation.complete_work_order(wo.id, tests_passed=True, files_changed=2, diff_url=None)
        assert again["status"] == "completed"
        assert app.store.get_run(run.id).status is RunStatus.COMPLETED  # completing twice is harmless
        stats = app.store.run_stats()
        assert stats["escalated"] == 1 and stats["auto_fixed"] == 0
    finally:
        app.close()


def test_a_claimed_fix_that_does_not_verify_needs_a_human_and_lowers_trust(database_url: str, tmp_path: Path) -> None:
    app = make(database_url, tmp_path, _escalating(tmp_path, tmp_path / "never"))
    try:
        run, _ = app.remediation.trigger(error_type="needs_code", description="broken", component="svc")
        drain(app)
        wo_id = app.store.get_run(run.id).coding_work_order_id or ""
        app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=1, diff_url=None)
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.NEEDS_HUMAN
        assert "verification failed" in (done.error or "")
        assert app.store.trust_score("svc") == 0.45
        assert "Trust lowered: 0.75 → 0.45" in [e.message for e in app.store.run_events(run.id)]
    finally:
        app.close()


def test_failed_tests_fail_the_work_order_and_stop_the_run(database_url: str, tmp_path: Path) -> None:
    app = make(database_url, tmp_path, _escalating(tmp_path, tmp_path / "never"))
    try:
        run, _ = app.remediation.trigger(error_type="needs_code", description="broken")
        drain(app)
        wo_id = app.store.get_run(run.id).coding_work_order_id or ""
        answer = app.remediation.complete_work_order(wo_id, tests_passed=False, files_changed=1, diff_url=None)
        assert answer["status"] == "failed"
        assert app.store.get_run(run.id).status is RunStatus.NEEDS_HUMAN
        with pytest.raises(Conflict):
            app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=1, diff_url=None)
        assert app.store.get_work_order(wo_id).status is WorkOrderStatus.FAILED
        with pytest.raises(NotFound):
            app.remediation.complete_work_order("wo_00000000_9999", tests_passed=True, files_changed=1, diff_url=None)
    finally:
        app.close()


def test_a_parked_run_keeps_its_playbook_version_across_an_edit(database_url: str, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    fixed.write_text("yes")
    original = _escalating(tmp_path, fixed)
    app = make(database_url, tmp_path, original)
    run, _ = app.remediation.trigger(error_type="needs_code", description="broken")
    drain(app)
    wo_id = app.store.get_run(run.id).coding_work_order_id or ""
    version = app.store.get_run(run.id).playbook_version
    app.close()
    # A deploy changes the playbook: the verify step now checks something that never holds.
    edited = _escalating(tmp_path, tmp_path / "never")
    edited["version"] = 2
    app = make(database_url, tmp_path, edited)
    try:
        assert app.playbooks.by_id["needs_code"].version != version
        app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=1, diff_url=None)
        drain(app)
        assert app.store.get_run(run.id).status is RunStatus.COMPLETED
    finally:
        app.close()


def test_unknown_error_type_lists_the_known_ones(database_url: str, tmp_path: Path) -> None:
    app = make(database_url, tmp_path, _escalating(tmp_path, tmp_path / "x"))
    try:
        with pytest.raises(UnknownErrorType) as info:
            app.remediation.trigger(error_type="nope", description="d")
        assert "database_connection" in info.value.message and "needs_code" in info.value.message
        assert app.store.list_runs()[1] == 0
    finally:
        app.close()


def test_unbound_capability_names_the_config_key(database_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, tmp_path, targets={"svc": {"capabilities": {}}}, default_target="svc")
    app = open_app(settings, start_workers=True)  # the playbook sleeps before it reconnects
    try:
        run, _ = app.remediation.trigger(error_type="database_connection", description="db lost")
        wait_status(app, run.id, RunStatus.FAILED, RunStatus.COMPLETED, RunStatus.NEEDS_HUMAN)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.FAILED
        # db.close_stale is optional (skipped); db.reconnect is not.
        assert "capability 'db.reconnect' is not bound for target 'svc'" in (done.error or "")
        assert "targets.svc.capabilities.'db.reconnect'" in (done.error or "")
    finally:
        app.close()


def test_worker_threads_finish_runs_on_their_own(database_url: str, tmp_path: Path) -> None:
    pb = {
        "id": "noop",
        "type": "retry",
        "description": "d",
        "steps": [{"id": f"s{i}", "action": "sleep", "with": {"seconds": 0}} for i in range(3)],
    }
    app = make(database_url, tmp_path, pb, start_workers=True)
    try:
        ids = [app.remediation.trigger(error_type="noop", description="d")[0].id for _ in range(20)]
        for rid in ids:
            assert wait_status(app, rid, RunStatus.COMPLETED) is RunStatus.COMPLETED
        assert all(len(app.store.run_steps(rid)) == 3 for rid in ids)
    finally:
        app.close()


def test_a_new_run_wakes_one_idle_worker_not_all_of_them(database_url: str, tmp_path: Path) -> None:
    """Eight idle worker threads and one trigger: the run is claimed once and at most two empty claims follow (the
    next worker looking for more, the first looking again when done). Waking every idle worker cost eight claim
    transactions per run, seven of them empty, each under SQLite's one write lock."""
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "nap",
            "type": "retry",
            "description": "d",
            "steps": [{"id": "s", "action": "sleep", "with": {"seconds": 0}}],
        },
    )
    # A long poll: idle workers wake only when told, so every claim counted below is one a wake-up caused.
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"nap": "nap"},
        workers=8,
        poll_interval=60,
    )
    app = open_app(settings)
    claims: list[bool] = []
    claim_run = app.store.claim_run

    def counted(*args: Any, **kwargs: Any) -> Any:
        run = claim_run(*args, **kwargs)
        claims.append(run is not None)
        return run

    app.store.claim_run = counted  # type: ignore[method-assign]
    app.workers.start()
    try:
        waiters = app.workers._wake._waiters  # type: ignore[attr-defined]  # CPython's Condition keeps them here
        wait_for(lambda: len(waiters) == 8, timeout=30)  # every worker idle, waiting to be told
        claims.clear()
        run, _ = app.remediation.trigger(error_type="nap", description="one")
        wait_status(app, run.id, RunStatus.COMPLETED)
        wait_for(lambda: len(waiters) == 8, timeout=30)  # and back to waiting: no claim is still on its way
        assert claims.count(True) == 1 and claims.count(False) <= 2, claims
    finally:
        app.close()
