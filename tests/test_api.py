"""The HTTP API, in process (the live stream on a real server on 127.0.0.1): the spec's shapes, and bad input that
gets a clear 4xx and changes nothing."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.app import App
from tests.support import open_app, settings_for, write_playbooks

PY = sys.executable


def _playbooks(tmp_path: Path) -> dict[str, Any]:
    flag = tmp_path / "fixed"
    check = "import os,sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 1)"
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "quick",
            "type": "retry",
            "description": "no-op",
            "steps": [{"id": "nap", "action": "sleep", "with": {"seconds": 0}}],
        },
        {
            "id": "patchy",
            "type": "code_patch",
            "description": "escalates",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "Code patch required for: patchy"}},
                {
                    "id": "verify",
                    "action": "verify",
                    "with": {
                        "check": {"command": {"argv": [PY, "-c", check, str(flag)]}},
                        "expect": "result.exit_code == 0",
                    },
                    "on_failure": "needs_human",
                },
            ],
        },
    )
    return {"playbook_dirs": [str(tmp_path / "pb")], "routing": {"quick": "quick", "patchy": "patchy"}}


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Any:
    a = open_app(settings_for(database_url, tmp_path, **_playbooks(tmp_path)), start_workers=True)
    yield a
    a.close()


def _counts(app: App) -> dict[str, int]:
    with app.store.engine.connect() as conn:
        return {
            t: int(conn.execute(sa.text(f"select count(*) from {t}")).scalar_one())
            for t in ("runs", "steps", "work_orders", "events", "trust_history")
        }


def test_trigger_that_completes_without_escalation(client: httpx.Client) -> None:
    r = client.post("/patches/trigger", json={"description": "d", "error_type": "quick"})
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and body["status"] == "completed"
    assert body["message"] == "Playbook 'quick' triggered"
    assert body["escalated_to_coding"] is False and body["work_order_id"] is None
    assert re.fullmatch(r"run_\d{8}_\d{6}_\d{6}", body["run_id"])
    detail = client.get(f"/patches/runs/{body['run_id']}").json()
    assert detail["status"] == "completed" and [s["step_id"] for s in detail["steps"]] == ["nap"]
    assert any(t["message"] == "Running playbook: quick" for t in detail["timeline"])


def test_escalation_flow_and_spec_shapes(client: httpx.Client, tmp_path: Path) -> None:
    body = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy"}).json()
    assert body["escalated_to_coding"] is True and body["status"] == "awaiting_patch"
    wo_id = body["work_order_id"]
    assert re.fullmatch(r"wo_\d{8}_0001", wo_id)

    listing = client.get("/patches/work-orders", params={"status": "queued"}).json()
    assert listing["count"] == 1
    wo = listing["work_orders"][0]
    for field in (
        "work_order_id",
        "type",
        "description",
        "status",
        "self_healing_run_id",
        "estimated_complexity",
        "created_at",
    ):
        assert field in wo
    assert wo["type"] == "self_healing_patch" and wo["description"] == "Code patch required for: patchy"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", wo["created_at"])
    assert listing["stats"] == {
        "total_work_orders": 1,
        "queued": 1,
        "in_progress": 0,
        # Held work orders have statuses of their own (issue 7); they used to count as in_progress.
        "awaiting_apply": 0,
        "awaiting_approval": 0,
        "awaiting_merge": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    by_run = client.get("/patches/work-orders", params={"self_healing_run_id": body["run_id"]}).json()
    assert [w["work_order_id"] for w in by_run["work_orders"]] == [wo_id]
    assert client.get("/patches/runs", params={"status": "awaiting_patch"}).json()["count"] == 1
    assert client.get(f"/patches/runs/{body['run_id']}").json()["coding_work_order_id"] == wo_id
    assert client.get(f"/patches/diffs/{wo_id}.diff").status_code == 404

    (tmp_path / "fixed").write_text("y")
    diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
    done = client.post(
        f"/patches/work-orders/{wo_id}/complete",
        json={"tests_passed": True, "files_changed": 2, "diff": diff},
        headers={"Idempotency-Key": "k1"},
    )
    assert done.status_code == 200 and done.json()["status"] == "completed"
    again = client.post(
        f"/patches/work-orders/{wo_id}/complete",
        json={"tests_passed": True, "files_changed": 2, "diff": diff},
        headers={"Idempotency-Key": "k1"},
    )
    assert again.json() == done.json()
    served = client.get(f"/patches/diffs/{wo_id}.diff")
    assert served.status_code == 200 and served.text == diff

    events = client.get("/events/recent", params={"event_type": "self_healing.escalated"}).json()
    assert events["events"][0]["message"] == f"Escalated to coding agent (work order {wo_id})"

    def finished() -> bool:
        return client.get(f"/patches/runs/{body['run_id']}").json()["status"] == "completed"

    from tests.support import wait_for

    wait_for(finished)
    stats = client.get("/patches/stats").json()
    assert stats["total_playbook_runs"] == 1 and stats["escalation_rate"] == 1.0 and stats["auto_fix_rate"] == 0.0
    assert stats["work_orders"]["completed"] == 1 and stats["average_patch_time_minutes"] is not None
    assert client.get("/events/recent", params={"event_type": "self_healing.patch_applied"}).json()["count"] == 1


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "field"),
    [
        ("POST", "/patches/trigger", {"description": "d", "error_type": "no_such"}, 422, "error_type"),
        ("POST", "/patches/trigger", {"description": "d"}, 422, "error_type"),
        ("POST", "/patches/trigger", {"description": 5, "error_type": "quick"}, 422, "description"),
        ("POST", "/patches/trigger", {"description": "d", "error_type": "quick", "extra": 1}, 422, "extra"),
        (
            "POST",
            "/patches/trigger",
            {"description": "d", "error_type": "quick", "wait_seconds": -1},
            422,
            "wait_seconds",
        ),
        ("POST", "/patches/work-orders/wo_20990101_0001/complete", {"tests_passed": True}, 404, None),
        ("POST", "/patches/work-orders/wo_20990101_0001/complete", {"tests_passed": "yes"}, 422, "tests_passed"),
        ("GET", "/patches/work-orders/nope", None, 404, None),
        ("GET", "/patches/runs/nope", None, 404, None),
        ("GET", "/patches/runs?status=bogus", None, 422, "status"),
        ("GET", "/patches/work-orders?limit=0", None, 422, "limit"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    app: App, client: httpx.Client, method: str, path: str, payload: Any, status: int, field: str | None
) -> None:
    before = _counts(app)
    r = client.request(method, path, json=payload)
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and "Traceback" not in r.text
    if field:
        assert body["field"] == field
    if "no_such" in str(payload):
        assert "database_connection" in body["known_error_types"] and "quick" in body["known_error_types"]
    assert _counts(app) == before


def test_malformed_json_is_a_400(app: App, client: httpx.Client) -> None:
    before = _counts(app)
    r = client.post("/patches/trigger", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "json" in r.json()["detail"].lower()
    assert _counts(app) == before


def test_completing_a_failed_or_cancelled_work_order_is_a_conflict(app: App, client: httpx.Client) -> None:
    first = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy"}).json()
    failed = client.post(f"/patches/work-orders/{first['work_order_id']}/complete", json={"tests_passed": False})
    assert failed.json()["status"] == "failed"
    assert client.get(f"/patches/runs/{first['run_id']}").json()["status"] == "needs_human"
    second = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy"}).json()
    assert client.post(f"/patches/runs/{second['run_id']}/cancel", json={}).json()["status"] == "cancelled"
    assert client.get(f"/patches/work-orders/{second['work_order_id']}").json()["status"] == "cancelled"
    before = _counts(app)
    for wo in (first["work_order_id"], second["work_order_id"]):
        r = client.post(f"/patches/work-orders/{wo}/complete", json={"tests_passed": True, "files_changed": 1})
        assert r.status_code == 409 and wo in r.json()["detail"]
    assert _counts(app) == before


def test_health_playbooks_and_offline_docs(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["database"] == "ok"
    playbooks = client.get("/playbooks").json()
    ids = {p["id"] for p in playbooks["playbooks"]}
    assert {
        "ingestion_replay",
        "schema_recovery",
        "memory_cleanup",
        "database_reconnect",
        "pipeline_timeout_fix",
        "verification_fix",
    } <= ids
    assert playbooks["routing"]["database_connection"] == "database_reconnect"
    docs = client.get("/docs").text
    assert "/_static/swagger/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/_static/swagger/swagger-ui-bundle.js").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/patches/trigger"]


def test_events_recent_since_and_limit(client: httpx.Client) -> None:
    client.post("/patches/trigger", json={"description": "d", "error_type": "quick"})
    all_events = client.get("/events/recent", params={"limit": 100}).json()["events"]
    assert len(all_events) >= 3 and all(e["message"] for e in all_events)
    newest = all_events[0]["created_at"]
    assert client.get("/events/recent", params={"since": newest + 1}).json()["count"] == 0
    assert client.get("/events/recent", params={"limit": 1}).json()["count"] == 1


def test_published_events_are_stored_and_routed(client: httpx.Client, app: App) -> None:
    plain = client.post("/events", json={"event_type": "ingestion.completed", "payload": {"file_path": "a.pdf"}})
    assert plain.status_code == 202 and plain.json()["run_id"] is None
    routed = client.post(
        "/events",
        json={"event_type": "custom.thing", "payload": {"error_type": "quick"}, "message": "Something broke"},
    ).json()
    assert routed["playbook_id"] == "quick" and routed["run_id"]
    recent = client.get("/events/recent", params={"event_type": "custom.thing"}).json()["events"]
    assert recent[0]["message"] == "Something broke" and recent[0]["run_id"] == routed["run_id"]
    bad = client.post("/events", json={"event_type": "No Dots", "payload": {}})
    assert bad.status_code == 422 and bad.json()["field"] == "event_type"


def test_live_stream_delivers_committed_events(live_client: httpx.Client, app: App) -> None:
    client = live_client
    import threading

    got: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        with client.stream("GET", "/events/stream", timeout=30) as resp:
            ready.set()
            for line in resp.iter_lines():
                if line.startswith("data:") and "stream.probe" in line:
                    got.append(line)
                    return

    th = threading.Thread(target=listen, daemon=True)
    th.start()
    ready.wait(10)

    def delivered() -> bool:
        client.post("/events", json={"event_type": "stream.probe", "message": "probe"})
        th.join(0.2)
        return bool(got)

    from tests.support import wait_for

    wait_for(delivered, timeout=15)
    assert '"message": "probe"' in got[0]
