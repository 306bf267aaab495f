"""Pause a component, or all: detections still open incidents and queue their runs (nothing is lost), but no queued
run is claimed until it is resumed; the reason shows on /health, the run, the incident and the work order. The
pauses are a table: they hold for every worker and across a restart. Both backends; the CLI against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.app import App
from mendloop.domain import pauses
from mendloop.domain.pauses import Pause
from mendloop.domain.states import RunStatus
from mendloop.errors import InputError
from tests.support import api_client, api_server, drain, mendloop_argv, open_app, settings_for, write_playbooks

PY = sys.executable


def test_a_components_own_pause_comes_before_the_global_one() -> None:
    own, every = Pause("svc", "deploying svc", 1.0), Pause(pauses.ALL, "freeze", 2.0)
    assert pauses.applying({"svc": own, "*": every}, "svc") is own
    assert pauses.applying({"svc": own, "*": every}, "other") is every
    assert pauses.applying({"svc": own}, None) is None  # a run without a component: only the global pause
    assert pauses.applying({"*": every}, None) is every
    assert pauses.scope_of(None) == "*" and pauses.scope_of("svc") == "svc"
    for bad in ("*", " "):
        with pytest.raises(InputError):
            pauses.scope_of(bad)


def _app(database_url: str, tmp_path: Path) -> App:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "quick",
            "type": "retry",
            "description": "one command",
            "steps": [{"id": "act", "action": "command", "with": {"argv": [PY, "-c", "print(1)"]}}],
        },
        {
            "id": "patchy",
            "type": "code_patch",
            "description": "asks a coding agent",
            "steps": [{"id": "escalate", "action": "escalate", "with": {"description": "fix it"}}],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"quick": "quick", "patchy": "patchy"},
        storm={"mutex_per_component": False},
    )
    return open_app(settings)


def _detect(client: httpx.Client, component: str, n: int = 0) -> dict[str, Any]:
    body = {
        "event_type": "app.error",
        "component": component,
        "payload": {"error_type": "quick"},
        "message": f"ERROR: {component} broke, try {'x' * (n + 1)}",
    }
    r = client.post("/events", json=body)
    assert r.status_code == 202, r.text
    answer: dict[str, Any] = r.json()
    return answer


def _runs(app: App) -> dict[str, RunStatus]:
    items, _ = app.store.list_runs(limit=100)
    return {r.id: r.status for r in items}


def test_a_paused_component_opens_incidents_but_starts_no_run_until_resumed(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        with api_client(app) as client:
            paused = client.post("/pause", json={"component": "svc", "reason": "migrating the database"})
            assert paused.status_code == 200 and paused.json()["scope"] == "svc", paused.text
            _detect(client, "svc")
            _detect(client, "other")
            assert drain(app) == 1  # only the other component's run started
            runs = app.store.list_runs(limit=10)[0]
            held = next(r for r in runs if r.component == "svc")
            assert held.status is RunStatus.QUEUED
            shown = client.get(f"/patches/runs/{held.id}").json()
            assert shown["paused"] == "migrating the database"
            listed = {r["run_id"]: r for r in client.get("/patches/runs").json()["runs"]}
            assert listed[held.id]["paused"] == "migrating the database"
            done = next(r for r in runs if r.component == "other")
            assert listed[done.id]["status"] == "completed" and listed[done.id]["paused"] is None
            incidents = {i["component"]: i for i in client.get("/incidents").json()["incidents"]}
            assert incidents["svc"]["paused"] == "migrating the database" and incidents["other"]["paused"] is None
            detail = client.get(f"/incidents/{incidents['svc']['incident_id']}").json()
            assert detail["paused"] == "migrating the database"
            assert app.health is not None
            app.health.probe_once()
            health = client.get("/health").json()
            assert [(p["scope"], p["reason"]) for p in health["paused"]] == [("svc", "migrating the database")]
            assert client.get("/pauses").json()["count"] == 1

            resumed = client.post("/resume", json={"component": "svc"})
            assert [p["scope"] for p in resumed.json()["pauses"]] == ["svc"]
            assert drain(app) == 1
            assert app.store.run_status(held.id) is RunStatus.COMPLETED
            assert client.get(f"/patches/runs/{held.id}").json()["paused"] is None
            types = [e["event_type"] for e in client.get("/events/recent", params={"limit": 200}).json()["events"]]
        assert "control.paused" in types and "control.resumed" in types
    finally:
        app.close()


def test_a_work_order_shows_its_components_pause_until_it_ends(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        with api_client(app) as client:
            for component in ("svc", "other"):
                app.remediation.trigger(error_type="patchy", description="broken", component=component)
            drain(app)
            orders = app.store.work_orders.find(limit=10)[0]
            by_component = {w.component: w.id for w in orders}
            assert set(by_component) == {"svc", "other"}
            run_of = {w.component: w.self_healing_run_id for w in orders}

            def shown() -> dict[str, Any]:
                listed = {w["component"]: w["paused"] for w in client.get("/patches/work-orders").json()["work_orders"]}
                detail = {c: client.get(f"/patches/work-orders/{i}").json()["paused"] for c, i in by_component.items()}
                assert detail == listed  # the list and each detail say the same
                return listed

            assert shown() == {"svc": None, "other": None}
            client.post("/pause", json={"component": "svc", "reason": "migrating the database"})
            assert shown() == {"svc": "migrating the database", "other": None}
            client.post("/pause", json={"reason": "change freeze"})
            assert shown() == {"svc": "migrating the database", "other": "change freeze"}  # its own reason first
            cancelled = client.post(f"/patches/runs/{run_of['other']}/cancel")  # its work order is cancelled too
            assert cancelled.status_code == 200, cancelled.text
            assert client.get(f"/patches/work-orders/{by_component['other']}").json()["status"] == "cancelled"
            assert shown() == {"svc": "migrating the database", "other": None}  # ended: nothing is held any more
            client.post("/resume")
            assert shown() == {"svc": None, "other": None}
    finally:
        app.close()


def test_pausing_all_holds_every_component_and_survives_a_restart(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        with api_client(app) as client:
            assert client.post("/pause", json={"reason": "change freeze"}).json()["scope"] == "*"
            _detect(client, "svc")
            app.remediation.trigger(error_type="quick", description="no component")
            assert drain(app) == 0
    finally:
        app.close()
    app = _app(database_url, tmp_path)  # a new process would read the same table
    try:
        assert drain(app) == 0
        assert set(_runs(app).values()) == {RunStatus.QUEUED}
        with api_client(app) as client:
            lifted = client.post("/resume").json()
            assert [p["scope"] for p in lifted["pauses"]] == ["*"]
            assert client.post("/resume").json()["count"] == 0  # nothing left to lift
        drain(app)
        assert set(_runs(app).values()) == {RunStatus.COMPLETED}
    finally:
        app.close()


def test_bad_pause_requests_name_the_field(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        with api_client(app) as client:
            missing = client.post("/pause", json={"component": "svc"})
            assert missing.status_code == 422 and missing.json()["field"] == "reason"
            star = client.post("/pause", json={"component": "*", "reason": "x"})
            assert star.status_code == 422 and star.json()["field"] == "component"
            assert client.post("/resume", json={"component": 3}).status_code == 422
    finally:
        app.close()


def test_the_cli_pauses_and_resumes(database_url: str, tmp_path: Path, free_port: int) -> None:
    app = _app(database_url, tmp_path)
    base = f"http://127.0.0.1:{free_port}"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(mendloop_argv(*args, "--url", base), capture_output=True, text=True, timeout=60)

    try:
        with api_server(app, free_port):
            paused = cli("pause", "svc", "--reason", "deploy window")
            assert paused.returncode == 0 and "paused svc: deploy window" in paused.stdout, paused.stderr
            assert cli("pause", "--reason", "freeze").stdout.strip() == "paused all components: freeze"
            assert set(app.store.pauses.current()) == {"svc", "*"}
            resumed = cli("resume")
            assert resumed.returncode == 0 and resumed.stdout.strip() == "resumed *, svc".replace("*", "all components")
            assert app.store.pauses.current() == {}
            bad = cli("pause", "*", "--reason", "x")
            assert bad.returncode != 0 and len((bad.stdout + bad.stderr).strip().splitlines()) == 1
    finally:
        app.close()
