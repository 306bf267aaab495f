"""The pull API for coding agents on a real server: claim by lease (long-poll), heartbeat, complete, fail; lapsed
leases, attempts and deadlines."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.app import App
from mendloop.testing import FakeClock
from tests.support import open_app, settings_for, wait_for, write_playbooks

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
def app(database_url: str, tmp_path: Path, clock: FakeClock) -> Any:
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"patchy": "patchy"},
        agent_lease_seconds=60,
        targets={"svc": {"work_orders": {"max_attempts": 2, "deadline_seconds": 1000}}},
        default_target="svc",
    )
    a = open_app(settings, start_workers=True, clock=clock)
    yield a
    a.close()


def escalate(client: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy"}).json()
    assert body["status"] == "awaiting_patch"
    return body


def claim(client: httpx.Client, agent: str, wait: float = 0) -> httpx.Response:
    return client.post("/patches/work-orders/claim", json={"agent_id": agent, "wait_seconds": wait})


def test_claim_heartbeat_complete(client: httpx.Client) -> None:
    assert claim(client, "a1").status_code == 204
    run = escalate(client)
    r = claim(client, "a1")
    assert r.status_code == 200
    body = r.json()
    assert body["work_order"]["work_order_id"] == run["work_order_id"]
    assert body["work_order"]["status"] == "in_progress" and body["work_order"]["leased_to"] == "a1"
    assert body["heartbeat_interval_seconds"] == 20.0 and body["lease_expires_at"]
    assert "constraints" in body["work_order"]["context"]
    wo = run["work_order_id"]
    hb = client.post(f"/patches/work-orders/{wo}/heartbeat", json={"lease_id": body["lease_id"], "note": "reading"})
    assert hb.status_code == 200 and hb.json()["cancel_requested"] is False
    stale = client.post(f"/patches/work-orders/{wo}/heartbeat", json={"lease_id": "nope"})
    assert stale.status_code == 409
    # lease_id may be left out only while the work order is not leased
    assert client.post(f"/patches/work-orders/{wo}/complete", json={"tests_passed": True}).status_code == 409
    bad = client.post(f"/patches/work-orders/{wo}/complete", json={"tests_passed": True, "lease_id": "nope"})
    assert bad.status_code == 409 and "stale" in bad.json()["detail"]
    ok = client.post(
        f"/patches/work-orders/{wo}/complete",
        json={"tests_passed": True, "files_changed": 1, "lease_id": body["lease_id"]},
        headers={"Idempotency-Key": "same"},
    )
    again = client.post(
        f"/patches/work-orders/{wo}/complete",
        json={"tests_passed": True, "files_changed": 1, "lease_id": body["lease_id"]},
        headers={"Idempotency-Key": "same"},
    )
    assert ok.status_code == again.status_code == 200 and ok.json() == again.json()
    wait_for(lambda: client.get(f"/patches/runs/{run['run_id']}").json()["status"] == "completed")


def test_long_poll_wakes_when_work_arrives(client: httpx.Client) -> None:
    result: dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        r = claim(client, "waiter", wait=20)
        result["status"] = r.status_code
        result["elapsed"] = time.monotonic() - started

    th = threading.Thread(target=poll)
    th.start()
    escalate(client)
    th.join(30)
    assert result["status"] == 200 and result["elapsed"] < 15


def test_two_agents_racing_one_wins(client: httpx.Client) -> None:
    escalate(client)
    answers: list[int] = []
    barrier = threading.Barrier(4)

    def race(name: str) -> None:
        barrier.wait()
        answers.append(claim(client, name).status_code)

    threads = [threading.Thread(target=race, args=(f"agent{i}",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(answers) == [200, 204, 204, 204]


def test_a_lapsed_lease_returns_to_the_queue_then_attempts_run_out(
    client: httpx.Client, app: App, clock: FakeClock
) -> None:
    run = escalate(client)
    wo = run["work_order_id"]
    first = claim(client, "dies").json()
    clock.advance(61)
    app.remediation.reap()
    assert client.get(f"/patches/work-orders/{wo}").json()["status"] == "queued"
    late = client.post(
        f"/patches/work-orders/{wo}/complete", json={"tests_passed": True, "lease_id": first["lease_id"]}
    )
    assert late.status_code == 409
    second = claim(client, "also-dies").json()
    assert second["work_order"]["attempts"] == 2
    clock.advance(61)
    app.remediation.reap()
    assert client.get(f"/patches/work-orders/{wo}").json()["status"] == "failed"
    assert client.get(f"/patches/runs/{run['run_id']}").json()["status"] == "needs_human"


def test_fail_retryable_requeues_and_final_fail_stops_the_run(client: httpx.Client) -> None:
    run = escalate(client)
    wo = run["work_order_id"]
    lease = claim(client, "a").json()["lease_id"]
    r = client.post(
        f"/patches/work-orders/{wo}/fail",
        json={"lease_id": lease, "reason": "agent_error", "retryable": True, "details": {"message": "crashed"}},
    )
    assert r.status_code == 200 and r.json()["status"] == "queued"
    lease = claim(client, "b").json()["lease_id"]
    r = client.post(f"/patches/work-orders/{wo}/fail", json={"lease_id": lease, "reason": "out_of_scope"})
    assert r.json()["status"] == "failed" and r.json()["fail_reason"] == "out_of_scope"
    assert client.get(f"/patches/runs/{run['run_id']}").json()["status"] == "needs_human"
    bad = client.post(f"/patches/work-orders/{wo}/fail", json={"reason": "bored"})
    assert bad.status_code == 422 and bad.json()["field"] == "reason"
    assert client.post(f"/patches/work-orders/{wo}/fail", json={"reason": "timeout"}).status_code == 409


def test_a_passed_deadline_fails_the_work_order(client: httpx.Client, app: App, clock: FakeClock) -> None:
    run = escalate(client)
    clock.advance(1001)
    assert claim(client, "late").status_code == 204
    app.remediation.reap()
    wo = client.get(f"/patches/work-orders/{run['work_order_id']}").json()
    assert wo["status"] == "failed" and wo["fail_reason"] == "timeout"
    assert client.get(f"/patches/runs/{run['run_id']}").json()["status"] == "needs_human"
