"""Work order transitions under hostile or racing callers (issue 8, items 4 and 5): every transition is a
compare-and-set inside the transaction, so exactly one caller wins and the others get 409 or the same answer;
an Idempotency-Key is bound to its request, refusals included. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.app import App
from mendloop.domain.states import WorkOrderStatus
from mendloop.errors import Conflict
from mendloop.testing import FakeClock
from tests.interpreters import python_for_tests
from tests.support import GATE_SCRIPT, api_server, drain, git, open_app, settings_for, wait_for, write_playbooks

PLAYBOOK = {
    "id": "patchy",
    "type": "code_patch",
    "description": "escalates",
    "steps": [
        {"id": "escalate", "action": "escalate", "with": {"description": "Fix it"}},
        {"id": "after", "action": "sleep", "with": {"seconds": 0}},
    ],
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=time.time())


@pytest.fixture
def app(database_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[App]:
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"patchy": "patchy"},
        agent_lease_seconds=60,
        targets={"svc": {"work_orders": {"max_attempts": 3}}},
        default_target="svc",
    )
    a = open_app(settings, start_workers=True, clock=clock)
    yield a
    a.close()


def escalate(client: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy"}).json()
    assert body["status"] == "awaiting_patch"
    return body


def complete(client: httpx.Client, wo_id: str, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(f"/patches/work-orders/{wo_id}/complete", json=body, headers=headers)


def updates(app: App, wo_id: str) -> list[str]:
    return [e.message for e in app.store.recent_events(limit=500) if e.work_order_id == wo_id]


def run_status(client: httpx.Client, run_id: str) -> str:
    return str(client.get(f"/patches/runs/{run_id}").json()["status"])


@pytest.mark.parametrize("late", ["tests_failed", "fail"])
def test_a_late_claim_cannot_undo_a_completion(app: App, client: httpx.Client, late: str) -> None:
    run = escalate(client)
    wo_id = run["work_order_id"]
    assert complete(client, wo_id, tests_passed=True, files_changed=1).json()["status"] == "completed"
    wait_for(lambda: run_status(client, run["run_id"]) == "completed")
    before = updates(app, wo_id)
    if late == "tests_failed":
        answer = complete(client, wo_id, tests_passed=False, files_changed=1)
    else:
        answer = client.post(f"/patches/work-orders/{wo_id}/fail", json={"reason": "agent_error"})
    assert answer.status_code == 409, answer.text
    assert "completed" in answer.json()["detail"]
    assert app.store.get_work_order(wo_id).status is WorkOrderStatus.COMPLETED
    assert run_status(client, run["run_id"]) == "completed"
    assert updates(app, wo_id) == before  # nothing was written
    # The same successful claim again is answered as before, and changes nothing either.
    again = complete(client, wo_id, tests_passed=True, files_changed=1)
    assert again.status_code == 200 and again.json()["status"] == "completed"
    assert updates(app, wo_id) == before


def test_twenty_concurrent_completes_have_one_outcome(app: App, live_client: httpx.Client) -> None:
    run = escalate(live_client)
    wo_id = run["work_order_id"]
    barrier = threading.Barrier(20)
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    url = str(live_client.base_url)

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            barrier.wait()
            r = complete(c, wo_id, tests_passed=i % 2 == 0, files_changed=i, summary=f"agent {i}")
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    codes = sorted({r.status_code for r in answers})
    assert set(codes) <= {200, 409}, [r.text for r in answers if r.status_code not in (200, 409)]
    final = app.store.get_work_order(wo_id)
    winners = {r.json()["status"] for r in answers if r.status_code == 200}
    # Every 200 tells the one outcome that was stored; every other caller was refused.
    assert winners == {final.status.value}
    outcome = [m for m in updates(app, wo_id) if "completed by the coding agent" in m or "did not pass" in m]
    assert len(outcome) == 1, outcome
    passed = [r for r in answers if json.loads(r.request.content)["tests_passed"]]
    if final.status is WorkOrderStatus.COMPLETED:
        # A success won: the other successes are the same claim, answered alike; every failure was refused.
        assert all(r.status_code == 200 for r in passed)
        assert all(r.status_code == 409 for r in answers if r not in passed)
    else:
        assert final.status is WorkOrderStatus.FAILED
        assert sum(r.status_code == 200 for r in answers) == 1


@pytest.mark.parametrize("after", [59.0, 60.0, 60.5, 61.0])
def test_complete_racing_the_reaper_ends_consistently(
    app: App, client: httpx.Client, clock: FakeClock, after: float
) -> None:
    """Around the moment the lease lapses, a completion and the reaper decide on the same rule inside their
    transactions: either the completion wins (and nothing is reaped) or it is refused as stale (and the work
    order goes back to the queue), never both."""
    run = escalate(client)
    wo_id = run["work_order_id"]
    lease = client.post("/patches/work-orders/claim", json={"agent_id": "a1", "wait_seconds": 0}).json()
    assert lease["work_order"]["work_order_id"] == wo_id
    clock.advance(after)  # the lease is 60 s
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def reap() -> None:
        barrier.wait()
        results["reaped"] = app.remediation.reap()

    def finish() -> None:
        barrier.wait()
        results["answer"] = complete(client, wo_id, tests_passed=True, files_changed=1, lease_id=lease["lease_id"])

    threads = [threading.Thread(target=reap), threading.Thread(target=finish)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    answer: httpx.Response = results["answer"]
    wo = app.store.get_work_order(wo_id)
    if answer.status_code == 200:
        assert wo_id not in results["reaped"] and wo.status is WorkOrderStatus.COMPLETED
    else:
        assert answer.status_code == 409, answer.text
        if wo_id not in results["reaped"]:  # the completion was refused first; the next pass reaps it
            assert app.remediation.reap() == [wo_id]
        assert app.store.get_work_order(wo_id).status is WorkOrderStatus.QUEUED
    assert (answer.status_code == 200) is (after <= 60)


def test_a_fail_while_the_diff_is_held_for_the_pipeline_is_refused(database_url: str, tmp_path: Path) -> None:
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    repo = tmp_path / "repo"
    repo.mkdir()
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"patchy": "patchy"},
        targets={"svc": {"repository": str(repo)}},
        default_target="svc",
    )
    # No workers: the diff stays held for the patch pipeline while the agent changes its mind.
    app = open_app(settings, start_workers=False)
    try:
        run, _ = app.remediation.trigger(error_type="patchy", description="d")
        drain(app)
        wo_id = app.store.get_run(run.id).coding_work_order_id
        assert wo_id is not None
        diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
        held = app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=1, diff_url=None, diff=diff)
        assert held["status"] == "awaiting_apply"
        for reason in ("agent_error", "needs_human", "timeout"):
            with pytest.raises(Conflict, match="awaiting_apply; it cannot fail"):
                app.remediation.fail_work_order(wo_id, lease_id=None, reason=reason, retryable=False, details={})
        with pytest.raises(Conflict, match="can no longer be changed"):
            app.remediation.complete_work_order(wo_id, tests_passed=False, files_changed=1, diff_url=None)
        assert app.store.get_work_order(wo_id).status is WorkOrderStatus.AWAITING_APPLY
    finally:
        app.close()


def test_an_idempotency_key_replays_its_answer_refusals_included(app: App, client: httpx.Client) -> None:
    run = escalate(client)
    wo_id = run["work_order_id"]
    failed = complete(client, wo_id, "k-1", tests_passed=False, files_changed=0)
    assert failed.status_code == 200 and failed.json()["status"] == "failed"
    wait_for(lambda: run_status(client, run["run_id"]) == "needs_human")
    events = updates(app, wo_id)
    # A retry of that same request gets the same answer, not a 409 for the work order it failed.
    again = complete(client, wo_id, "k-1", tests_passed=False, files_changed=0)
    assert again.status_code == 200 and again.json() == failed.json()
    # The key with another request is refused, naming the header, and nothing changes.
    other = complete(client, wo_id, "k-1", tests_passed=True, files_changed=3)
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    # A refused request's key keeps its refusal.
    refused = complete(client, wo_id, "k-2", tests_passed=True, files_changed=1)
    assert refused.status_code == 409
    assert complete(client, wo_id, "k-2", tests_passed=True, files_changed=1).json() == refused.json()
    assert complete(client, wo_id, "k-2", tests_passed=True, files_changed=2).status_code == 422
    assert updates(app, wo_id) == events
    assert app.store.get_work_order(wo_id).status is WorkOrderStatus.FAILED


def test_the_same_key_and_body_from_two_callers_at_once_is_one_completion(app: App, live_client: httpx.Client) -> None:
    run = escalate(live_client)
    wo_id = run["work_order_id"]
    barrier = threading.Barrier(8)
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    url = str(live_client.base_url)

    def one() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            barrier.wait()
            r = complete(c, wo_id, "same", tests_passed=True, files_changed=1)
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [r.status_code for r in answers] == [200] * 8
    assert len({r.text for r in answers}) == 1
    outcome = [m for m in updates(app, wo_id) if "completed by the coding agent" in m]
    assert len(outcome) == 1


def _worktrees_now(repo: Path) -> str:
    """`git worktree list` while mendloop may be adding or removing one: a listing caught halfway (git exits 128
    on a worktree whose admin files are not all written yet) is "not yet", not a failure."""
    try:
        return git(repo, "worktree", "list")
    except subprocess.CalledProcessError:
        return "(caught halfway)\n\n"


def _gated(database_url: str, tmp_path: Path) -> tuple[App, Path, str, Path]:
    """An App whose target repository's tests wait for `gate/open`: (app, repo, its head, gate)."""
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "x.py").write_text("a\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    gate = tmp_path / "gate"
    gate.mkdir()
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"patchy": "patchy"},
        targets={
            "svc": {
                "repository": str(repo),
                "test_command": [python_for_tests(), "-c", GATE_SCRIPT, str(gate)],
                "report": "none",
                "test_timeout": 60,
            }
        },
        default_target="svc",
    )
    return open_app(settings, start_workers=True), repo, git(repo, "rev-parse", "HEAD"), gate


def test_a_run_cancelled_while_its_held_diff_is_tested_lands_nothing(database_url: str, tmp_path: Path) -> None:
    """The operator cancels while mendloop's own tests of the held diff run: the cancel stops the tests (see
    tests/test_cancel_steps.py; the check under the repository's lock right before the commit backs it up), the
    commit does not land, the branch and checkout are as they were."""
    app, repo, head, gate = _gated(database_url, tmp_path)
    try:
        run, _ = app.remediation.trigger(error_type="patchy", description="d")
        wait_for(lambda: app.store.get_run(run.id).coding_work_order_id is not None)
        wo_id = app.store.get_run(run.id).coding_work_order_id or ""
        diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
        app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=1, diff_url=None, diff=diff)
        # The pipeline is in the tests (a worktree exists) when the operator cancels.
        wait_for(lambda: "mendloop-wt-" in _worktrees_now(repo))
        app.remediation.cancel_run(run.id)
        (gate / "open").write_text("")
        wait_for(lambda: _worktrees_now(repo).count("\n") == 0)
        wait_for(lambda: app.store.get_run(run.id).finished_at is not None)
        assert app.store.get_work_order(wo_id).status is WorkOrderStatus.CANCELLED
        assert git(repo, "rev-parse", "HEAD") == head
        assert git(repo, "status", "--porcelain") == ""
        assert (repo / "x.py").read_text() == "a\n"
    finally:
        app.close()


def _race(url: str, wo_id: str, n: int) -> list[tuple[str, httpx.Response]]:
    """`n` completes and `n` fails of one work order, released together; (which, answer) for each."""
    barrier = threading.Barrier(2 * n)
    answers: list[tuple[str, httpx.Response]] = []
    lock = threading.Lock()

    def one(kind: str, i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            if kind == "complete":
                r = complete(c, wo_id, tests_passed=True, files_changed=1, summary=f"agent {i}")
            else:
                r = c.post(f"/patches/work-orders/{wo_id}/fail", json={"reason": "agent_error", "retryable": False})
        with lock:
            answers.append((kind, r))

    threads = [threading.Thread(target=one, args=(k, i)) for i in range(n) for k in ("complete", "fail")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return answers


def test_completes_racing_fails_have_one_outcome(app: App, live_client: httpx.Client) -> None:
    """Ten completes against ten fails of one work order: one wins, every other caller gets 409 or the winner's
    own answer, one outcome is recorded, and the run ends the way the work order did."""
    run = escalate(live_client)
    wo_id = run["work_order_id"]
    answers = _race(str(live_client.base_url), wo_id, 10)
    assert {r.status_code for _, r in answers} <= {200, 409}, [r.text for _, r in answers if r.status_code >= 500]
    final = app.store.get_work_order(wo_id)
    won = {kind for kind, r in answers if r.status_code == 200}
    assert len(won) == 1, [(k, r.status_code, r.text) for k, r in answers]
    if won == {"complete"}:
        assert final.status is WorkOrderStatus.COMPLETED
        assert all(r.status_code == 409 for kind, r in answers if kind == "fail")
        wait_for(lambda: run_status(live_client, run["run_id"]) == "completed")
    else:
        assert final.status is WorkOrderStatus.FAILED
        assert sum(r.status_code == 200 for _, r in answers) == 1
        wait_for(lambda: run_status(live_client, run["run_id"]) in ("needs_human", "failed"))
    outcomes = [
        m
        for m in updates(app, wo_id)
        if "completed by the coding agent" in m or m.startswith(f"Work order {wo_id} failed:")
    ]
    assert len(outcomes) == 1, outcomes


def test_a_fail_while_the_server_tests_the_held_diff_is_refused_and_the_patch_lands(
    database_url: str, tmp_path: Path, free_port: int
) -> None:
    """The agent sends `fail` (and more completes and fails) while mendloop's own tests of its held diff run:
    each is a 409 (or the same answer, for the same claim), nothing changes the work order under the pipeline,
    and when the tests pass the patch is committed once and the run completes, without looping."""
    app, repo, head, gate = _gated(database_url, tmp_path)
    try:
        with api_server(app, free_port) as client:
            run = escalate(client)
            wo_id = run["work_order_id"]
            diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
            held = complete(client, wo_id, tests_passed=True, files_changed=1, diff=diff)
            assert held.status_code == 200 and held.json()["status"] == "awaiting_apply", held.text
            wait_for(lambda: "mendloop-wt-" in _worktrees_now(repo))  # the pipeline is in the tests
            refused = client.post(f"/patches/work-orders/{wo_id}/fail", json={"reason": "agent_error"})
            assert refused.status_code == 409 and "awaiting_apply" in refused.json()["detail"], refused.text
            answers = _race(str(client.base_url), wo_id, 5)
            assert all(r.status_code == 409 for kind, r in answers if kind == "fail"), answers
            assert {r.status_code for _, r in answers} <= {200, 409}
            assert app.store.get_work_order(wo_id).status is WorkOrderStatus.AWAITING_APPLY
            (gate / "open").write_text("")
            wait_for(lambda: run_status(client, run["run_id"]) == "completed", 60)
            assert app.store.get_work_order(wo_id).status is WorkOrderStatus.COMPLETED
            assert git(repo, "rev-parse", "HEAD~1") == head
            assert (repo / "x.py").read_text() == "b\n" and git(repo, "status", "--porcelain") == ""
            applied = [e for e in app.store.recent_events(limit=500) if e.type == "self_healing.patch_applied"]
            assert len(applied) == 1, applied
    finally:
        app.close()
