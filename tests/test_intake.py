"""Webhooks and storm control on a real server: generic events (single, batch, retried), tokens and HMAC
signatures, Alertmanager, raw Fluent Bit / Vector records, incidents, throttles, the circuit breaker, the
per-component mutex."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.app import App
from mendloop.domain.states import RunStatus
from tests.support import api_client, open_app, settings_for, wait_for, write_playbooks

PY = sys.executable


def _app(database_url: str, tmp_path: Path, **extra: Any) -> App:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "quick",
            "type": "retry",
            "description": "ok",
            "steps": [{"id": "nap", "action": "sleep", "with": {"seconds": 0}}],
        },
        {
            "id": "broken",
            "type": "retry",
            "description": "always fails",
            "steps": [{"id": "bad", "action": "command", "with": {"argv": ["false"]}}],
        },
        {
            "id": "gate",
            "type": "retry",
            "description": "waits for a file",
            "steps": [
                {
                    "id": "wait",
                    "action": "command",
                    "with": {
                        "argv": [
                            PY,
                            "-c",
                            "import os,sys,time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)",
                            str(tmp_path / "gate"),
                        ]
                    },
                }
            ],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"quick": "quick", "broken": "broken", "gate": "gate", "HighErrorRate": "quick"},
        workers=2,
        watchers=[
            {
                "name": "remote",
                "paths": ["unused/*.log"],
                "patterns": [
                    {
                        "name": "timeout",
                        "regex": r"ERROR: Pipeline timeout after (?P<seconds>\d+) seconds",
                        "event_type": "pipeline.timeout",
                        "error_type": "quick",
                    }
                ],
            }
        ],
        **extra,
    )
    return open_app(settings, start_workers=True)


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Any:
    a = _app(database_url, tmp_path)
    yield a
    a.close()


def test_a_retried_event_is_a_no_op(client: httpx.Client, app: App) -> None:
    body = {"event_type": "app.error", "payload": {"error_type": "quick", "message": "boom 1"}, "event_id": "e-1"}
    first = client.post("/events", json=body).json()
    second = client.post("/events", json=body).json()
    assert first["run_id"] and first["duplicate"] is False
    assert second["duplicate"] is True and second["run_id"] is None
    assert client.get("/events/recent", params={"event_type": "app.error"}).json()["count"] == 1


def test_a_batch_is_one_incident_with_one_run(client: httpx.Client) -> None:
    events = [
        {"event_type": "app.error", "payload": {"error_type": "quick"}, "message": f"job {i} failed at 0x{i:08x}"}
        for i in range(500)
    ]
    r = client.post("/events", json={"events": events})
    assert r.status_code == 202 and r.json()["accepted"] == 500
    runs = {e["run_id"] for e in r.json()["events"] if e["run_id"]}
    assert len(runs) == 1
    incidents = client.get("/incidents").json()["incidents"]
    assert len(incidents) == 1 and incidents[0]["count"] == 500
    detail = client.get(f"/incidents/{incidents[0]['incident_id']}").json()
    assert [r["run_id"] for r in detail["runs"]] == list(runs)
    assert detail["absorbed"] == 499


def test_fluent_bit_records_are_matched_on_the_server(client: httpx.Client) -> None:
    records = [{"date": 1.0, "log": "INFO all good"}] + [
        {"date": 2.0 + i, "log": "ERROR: Pipeline timeout after 300 seconds", "host": "web-1"} for i in range(3)
    ]
    r = client.post("/events", json=records).json()
    assert r["accepted"] == 1 and r["events"][0]["run_id"]
    incident = client.get("/incidents", params={"error_type": "quick"}).json()["incidents"][0]
    assert incident["count"] == 3 and incident["event_type"] == "pipeline.timeout"
    ndjson = "\n".join(json.dumps({"message": "ERROR: Pipeline timeout after 300 seconds"}) for _ in range(2))
    r = client.post("/events", content=ndjson, headers={"content-type": "application/x-ndjson"}).json()
    assert r["events"][0]["verdict"] in ("absorbed_in_progress", "absorbed_throttled")
    assert client.get(f"/incidents/{incident['incident_id']}").json()["count"] == 5


def test_alertmanager_alerts_and_resolution(client: httpx.Client) -> None:
    def alert(name: str, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "labels": {"alertname": name, "instance": "web-1", "severity": "critical"},
            "annotations": {"summary": f"{name} on web-1"},
            "startsAt": "2026-11-26T10:00:00Z",
            "fingerprint": f"fp-{name}",
        }

    names = ["HighErrorRate", "DiskFull", "Latency"]
    firing = {"version": "4", "status": "firing", "alerts": [alert(n, "firing") for n in names]}
    r = client.post("/events/alertmanager", json=firing).json()
    assert r["accepted"] == 3
    assert client.get("/events/recent", params={"event_type": "alertmanager.firing"}).json()["count"] == 3
    assert client.get("/incidents", params={"status": "open"}).json()["total"] == 3
    assert [e["run_id"] is not None for e in r["events"]] == [True, False, False]  # only HighErrorRate is routed
    resolved = {"version": "4", "status": "resolved", "alerts": [alert(n, "resolved") for n in names]}
    client.post("/events/alertmanager", json=resolved)
    assert client.get("/incidents", params={"status": "open"}).json()["total"] == 0
    assert client.get("/incidents", params={"status": "resolved"}).json()["total"] == 3


def test_breaker_opens_after_failed_runs(client: httpx.Client, app: App) -> None:
    run_ids = []
    for i in range(3):
        body = {
            "event_type": "app.error",
            "component": "svc",
            "payload": {"error_type": "broken"},
            "message": f"shape {'x' * i} broke",
        }
        run_ids.append(client.post("/events", json=body).json()["run_id"])
    for rid in run_ids:
        wait_for(lambda rid=rid: app.store.run_status(rid) is RunStatus.FAILED)
    fourth = client.post(
        "/events",
        json={
            "event_type": "app.error",
            "component": "svc",
            "payload": {"error_type": "broken"},
            "message": "new shape",
        },
    ).json()
    assert fourth["verdict"] == "breaker_open"
    assert app.store.run_status(fourth["run_id"]) is RunStatus.NEEDS_HUMAN
    assert client.get("/events/recent", params={"event_type": "self_healing.circuit_open"}).json()["count"] == 1


def test_runs_for_one_component_never_execute_at_once(client: httpx.Client, app: App, tmp_path: Path) -> None:
    first = client.post(
        "/events",
        json={"event_type": "app.error", "component": "db", "payload": {"error_type": "gate"}, "message": "a"},
    ).json()
    second = client.post(
        "/events",
        json={"event_type": "app.error", "component": "db", "payload": {"error_type": "gate"}, "message": "b b"},
    ).json()
    wait_for(lambda: app.store.run_status(first["run_id"]) is RunStatus.RUNNING)
    # Two workers are free, but the second run waits for the first: they share the component's mutex.
    assert app.store.run_status(second["run_id"]) is RunStatus.QUEUED
    assert app.workers.run_once("test:0:x") is False
    (tmp_path / "gate").write_text("open")
    wait_for(lambda: app.store.run_status(second["run_id"]) is RunStatus.COMPLETED)


@pytest.mark.parametrize("auth", ["token", "hmac"])
def test_intake_tokens_and_signatures(database_url: str, tmp_path: Path, auth: str) -> None:
    app = _app(database_url, tmp_path, intake_tokens=["in-tok-for-tests-0001"], webhook_hmac_secret="s3cret")
    try:
        with api_client(app) as client:
            body = json.dumps({"event_type": "app.info", "message": "hello"}).encode()
            assert client.post("/events", content=body).status_code == 401
            assert client.post("/events", content=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            if auth == "token":
                headers = {"Authorization": "Bearer in-tok-for-tests-0001"}
            else:
                # Signed with a timestamp: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>.
                ts = int(time.time())
                mac = hmac.new(b"s3cret", f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
                headers = {"X-Mendloop-Signature": f"t={ts},v1={mac}"}
            assert client.post("/events", content=body, headers=headers).status_code == 202
            bad = {"X-Mendloop-Signature": f"t={int(time.time())},v1=" + "0" * 64}
            assert client.post("/events", content=body, headers=bad).status_code == 401
            old = {"X-Mendloop-Signature": "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()}
            assert client.post("/events", content=body, headers=old).status_code == 401  # no timestamp: replayable
    finally:
        app.close()
