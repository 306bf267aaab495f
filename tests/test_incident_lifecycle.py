"""Incidents follow their runs: a verified fix resolves its incident (with the run and its commit), an unverified
or failed run leaves it open, a recurrence reopens it and counts, and the count makes trust fall faster. Through
the real App (workers running real commands), the API in process and a real server for the CLI, on a SQLite file
and on PostgreSQL; the migration upgrades a database holding an incident from the previous head."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.app import App
from mendloop.domain import incidents as lifecycle
from mendloop.domain import trust
from mendloop.domain.states import RunStatus
from mendloop.storage import migrate
from mendloop.storage import schema as t
from mendloop.storage.store import Store
from tests.support import api_client, api_server, open_app, settings_for, wait_status, write_playbooks

PY = sys.executable


def _app(database_url: str, tmp_path: Path, *, storm: dict[str, Any] | None = None) -> App:
    ok = tmp_path / "fix-holds"
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "fixed",
            "type": "data_fix",
            "description": "fixes, then verifies the fix holds (it does while the file exists)",
            "steps": [
                {"id": "fix", "action": "command", "with": {"argv": ["true"]}},
                {
                    "id": "check",
                    "action": "verify",
                    "with": {
                        "check": {
                            "command": {
                                "argv": [
                                    PY,
                                    "-c",
                                    "import os,sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 3)",
                                    str(ok),
                                ]
                            }
                        },
                        "expect": "result.exit_code == 0",
                    },
                    "on_failure": "needs_human",
                },
            ],
        },
        {
            "id": "unchecked",
            "type": "data_fix",
            "description": "fixes and never checks",
            "steps": [{"id": "fix", "action": "command", "with": {"argv": ["true"]}}],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"fixed": "fixed", "unchecked": "unchecked"},
        # Every detection of a resolved incident may start its run at once (the throttle is storm control's, and
        # unchanged: tested in test_intake.py).
        storm={"once_within_seconds": 0} if storm is None else storm,
        workers=1,
    )
    return open_app(settings, start_workers=True)


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Any:
    a = _app(database_url, tmp_path)
    yield a
    a.close()


def _detect(client: httpx.Client, error_type: str = "fixed", component: str = "svc") -> dict[str, Any]:
    body = {
        "event_type": "app.error",
        "component": component,
        "payload": {"error_type": error_type},
        "message": f"ERROR: {error_type} broke at 0x00ff",
    }
    r = client.post("/events", json=body)
    assert r.status_code == 202, r.text
    answer: dict[str, Any] = r.json()
    return answer


def _finished(app: App, run_id: str) -> RunStatus:
    return wait_status(app, run_id, RunStatus.COMPLETED, RunStatus.NEEDS_HUMAN, RunStatus.FAILED)


def _incident(client: httpx.Client, incident_id: str) -> dict[str, Any]:
    r = client.get(f"/incidents/{incident_id}")
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def _history(app: App, run_id: str) -> list[tuple[str, float, float, int | None]]:
    h = t.trust_history.c
    q = sa.select(h.reason, h.old, h.new, h.recurrences).where(h.run_id == run_id).order_by(h.id)
    with app.store.engine.connect() as conn:
        return [(str(r), float(o), float(n), c) for r, o, n, c in conn.execute(q)]


def test_a_verified_fix_resolves_its_incident(app: App, client: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "fix-holds").write_text("yes")
    first = _detect(client)
    assert _finished(app, first["run_id"]) is RunStatus.COMPLETED
    inc = _incident(client, first["incident_id"])
    assert inc["status"] == "resolved" and inc["resolved_by_run"] == first["run_id"]
    assert inc["resolved_at"] is not None and inc["recurrences"] == 0 and inc["last_resolved_at"] is None
    assert inc["resolved_commit"] is None  # the playbook applied no patch
    events = client.get("/events/recent", params={"event_type": "incident.resolved"}).json()["events"]
    assert [e["run_id"] for e in events] == [first["run_id"]]
    timeline = [i["message"] for i in client.get(f"/patches/runs/{first['run_id']}").json()["timeline"]]
    assert any(f"Incident {first['incident_id']} resolved by run {first['run_id']}" in m for m in timeline)
    listed = client.get("/incidents", params={"status": "resolved"}).json()["incidents"]
    assert [(i["incident_id"], i["resolved_by_run"]) for i in listed] == [(first["incident_id"], first["run_id"])]


@pytest.mark.parametrize("case", ["no_verify_step", "verification_failed"])
def test_an_unverified_or_failed_run_leaves_its_incident_open(
    app: App, client: httpx.Client, tmp_path: Path, case: str
) -> None:
    # The fix-holds file is missing: the `fixed` playbook's verification fails; `unchecked` has none to pass.
    first = _detect(client, "unchecked" if case == "no_verify_step" else "fixed")
    expected = RunStatus.COMPLETED if case == "no_verify_step" else RunStatus.NEEDS_HUMAN
    assert _finished(app, first["run_id"]) is expected
    inc = _incident(client, first["incident_id"])
    assert inc["status"] == "open" and inc["resolved_by_run"] is None and inc["resolved_at"] is None
    assert client.get("/events/recent", params={"event_type": "incident.resolved"}).json()["count"] == 0
    # The next detection counts on the same open incident: no reopening.
    again = _detect(client, "unchecked" if case == "no_verify_step" else "fixed")
    assert again["incident_id"] == first["incident_id"]
    if again["run_id"]:
        _finished(app, again["run_id"])
    assert _incident(client, first["incident_id"])["recurrences"] == 0


def test_a_recurrence_reopens_its_incident_and_costs_more_trust(app: App, client: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "fix-holds").write_text("yes")
    runs: list[str] = []
    resolved_at: list[str] = []
    runs_incident = ""
    for recurrence in range(3):
        detected = _detect(client)
        runs.append(detected["run_id"])
        assert detected["run_id"] and detected["verdict"] == "run"
        if recurrence:
            # Reopened, counted, and its run started as usual.
            assert detected["incident_id"] == runs_incident
            reopened = _incident(client, runs_incident)
            assert reopened["recurrences"] == recurrence
            assert reopened["last_resolved_at"] == resolved_at[-1]
        else:
            runs_incident = detected["incident_id"]
        assert _finished(app, detected["run_id"]) is RunStatus.COMPLETED
        inc = _incident(client, runs_incident)
        assert inc["status"] == "resolved" and inc["resolved_by_run"] == detected["run_id"]
        assert inc["recurrences"] == recurrence
        resolved_at.append(inc["resolved_at"])
    assert len(set(runs)) == 3
    assert client.get("/incidents").json()["total"] == 1
    reopenings = client.get("/events/recent", params={"event_type": "incident.reopened"}).json()["events"]
    assert sorted((e["payload"]["recurrences"], e["run_id"]) for e in reopenings) == [(1, runs[1]), (2, runs[2])]
    # The reopening is on the new run's timeline.
    timeline = [i["message"] for i in client.get(f"/patches/runs/{runs[2]}").json()["timeline"]]
    assert any("reopened" in m and "recurrence 2" in m for m in timeline)

    # Trust: each run's stored history, in order. A first failure costs the incident move; a recurrence adds a
    # recurrence move naming its count, larger with each recurrence.
    first, second, third = (_history(app, r) for r in runs)
    assert [(r, c) for r, _, _, c in first] == [("incident", None), ("verified_fix", None)]
    assert [(r, c) for r, _, _, c in second] == [("incident", None), ("recurrence", 1), ("verified_fix", None)]
    assert [(r, c) for r, _, _, c in third] == [("incident", None), ("recurrence", 2), ("verified_fix", None)]

    def drop(history: list[tuple[str, float, float, int | None]]) -> float:
        return sum(old - new for reason, old, new, _ in history if reason != "verified_fix")

    def share(history: list[tuple[str, float, float, int | None]]) -> float:
        # The share of the score the failure took, whatever the score was before it.
        before = history[0][1]
        after = [new for reason, _, new, _ in history if reason != "verified_fix"][-1]
        return (before - after) / before

    assert drop(third) > drop(second) > drop(first)
    assert share(third) > share(second) > share(first)
    rec1, rec2 = second[1], third[1]
    assert (rec2[1] - rec2[2]) / rec2[1] > (rec1[1] - rec1[2]) / rec1[1]
    events = client.get("/events/recent", params={"event_type": "trust.updated"}).json()["events"]
    assert any(e["payload"].get("recurrences") == 2 and "(recurrence 2)" in e["message"] for e in events)


def test_manual_resolve_stays_and_its_recurrence_reopens(app: App, client: httpx.Client) -> None:
    first = _detect(client, "unchecked")
    assert _finished(app, first["run_id"]) is RunStatus.COMPLETED
    assert _incident(client, first["incident_id"])["status"] == "open"
    r = client.post(f"/incidents/{first['incident_id']}/resolve")
    assert r.status_code == 200
    assert r.json()["status"] == "resolved" and r.json()["resolved_by_run"] is None
    # Resolving a resolved incident changes nothing.
    again = client.post(f"/incidents/{first['incident_id']}/resolve").json()
    assert again["resolved_at"] == r.json()["resolved_at"]
    by = [
        e["payload"]["by"]
        for e in client.get("/events/recent", params={"event_type": "incident.resolved"}).json()["events"]
    ]
    assert by == ["operator"]
    second = _detect(client, "unchecked")
    assert second["incident_id"] == first["incident_id"] and second["run_id"]
    _finished(app, second["run_id"])
    inc = _incident(client, first["incident_id"])
    assert inc["status"] == "open" and inc["recurrences"] == 1 and inc["last_resolved_at"] == r.json()["resolved_at"]
    missing = client.post("/incidents/inc_19700101_9999/resolve")
    assert missing.status_code == 404 and missing.json()["detail"]


def test_the_cli_shows_the_lifecycle(app: App, client: httpx.Client, tmp_path: Path, free_port: int) -> None:
    (tmp_path / "fix-holds").write_text("yes")
    first = _detect(client)
    _finished(app, first["run_id"])
    with api_server(app, free_port):
        cli = "from mendloop.cli.incidents import incidents_cli; incidents_cli()"
        url = f"http://127.0.0.1:{free_port}"
        env = {**os.environ, "COLUMNS": "200"}  # rich would cut the table's ids to fit a narrow pipe
        shown = subprocess.run(
            [PY, "-c", cli, "show", first["incident_id"], "--url", url],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        listed = subprocess.run(
            [PY, "-c", cli, "list", "--status", "resolved", "--url", url],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    assert shown.returncode == 0, shown.stderr
    assert f"resolved_by_run: {first['run_id']}" in shown.stdout
    assert "recurrences: 0" in shown.stdout and "status: resolved" in shown.stdout
    assert "resolved_at: 20" in shown.stdout
    assert listed.returncode == 0, listed.stderr
    assert first["incident_id"] in listed.stdout


def test_the_migration_upgrades_a_database_with_an_incident(empty_database_url: str) -> None:
    store = Store(empty_database_url)
    try:
        migrate.upgrade(store.engine, "0004")
        with store.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO incidents (id, fingerprint, status, error_type, event_type, component, source,"
                    " title, sample, count, first_seen, last_seen, resolved_at, last_run_id, last_run_at, absorbed)"
                    " VALUES ('inc_20261101_0001', 'fp1', 'resolved', 'fixed', 'app.error', 'svc', 'webhook',"
                    " 't', 's', 7, 10.0, 20.0, 30.0, NULL, NULL, 2)"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO trust_history (component, old, new, reason, run_id, created_at)"
                    " VALUES ('svc', 1.0, 0.75, 'incident', NULL, 5.0)"
                )
            )
        migrate.upgrade(store.engine)
        assert migrate.current(store.engine) == migrate.head()  # 0005 and every revision after it
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(t.incidents)).one()
            history = conn.execute(sa.select(t.trust_history)).one()
        assert (row.id, row.status, row._mapping["count"], row.resolved_at) == (
            "inc_20261101_0001",
            "resolved",
            7,
            30.0,
        )
        assert (row.recurrences, row.resolved_by_run, row.resolved_commit, row.last_resolved_at) == (
            0,
            None,
            None,
            None,
        )
        assert (history.reason, history.recurrences) == ("incident", None)
    finally:
        store.close()


def test_what_counts_as_verified() -> None:
    assert lifecycle.verified(["v"], {"v": {"passed": True, "result": {}}})
    assert not lifecycle.verified(["v"], {})  # skipped or never reached
    assert not lifecycle.verified([], {"fix": {}})  # no verify step
    assert not lifecycle.verified(["v", "w"], {"v": {"passed": True}, "w": {"passed": False}})  # on_failure: continue
    assert not lifecycle.verified(["v"], {"v": {}})  # a check that could not run
    assert lifecycle.applied_commit({"apply_patch": {"commit": "abc123"}}) == "abc123"
    assert lifecycle.applied_commit({"apply_patch": {"commit": "abc123", "reverted": "def"}}) is None


def test_the_recurrence_weight_grows_with_the_count_and_is_bounded() -> None:
    weights = [trust.recurrence_weight(k, 0.25) for k in range(0, 40)]
    assert weights[0] == 0.0 and weights[1] == pytest.approx(0.25) and weights[2] == pytest.approx(0.4375)
    assert all(a <= b for a, b in itertools.pairwise(weights))
    assert max(weights) == trust.MAX_RECURRENCE_WEIGHT and weights[8] < trust.MAX_RECURRENCE_WEIGHT
    # Together with the incident move it costs what k + 1 incidents in a row would.
    for k in (1, 2, 3):
        after = (1 - 0.25) * (1 - trust.recurrence_weight(k, 0.25))
        assert after == pytest.approx((1 - 0.25) ** (k + 1))


def test_a_recurrence_right_after_a_heal_starts_a_run_under_the_default_throttle(
    database_url: str, tmp_path: Path
) -> None:
    """A flapping fault: healed, then broken again seconds later. The reopening is a new failure, so the default
    `once_within_seconds` (600) does not swallow it (it did: the service stayed broken and no run started), while a
    repeat of an incident that is still open inside the window stays throttled."""
    (tmp_path / "fix-holds").write_text("yes")
    app = _app(database_url, tmp_path, storm={})
    assert app.settings.storm.once_within_seconds == 600
    try:
        with api_client(app) as client:
            first = _detect(client)
            assert _finished(app, first["run_id"]) is RunStatus.COMPLETED
            assert _incident(client, first["incident_id"])["status"] == "resolved"
            again = _detect(client)
            assert again["incident_id"] == first["incident_id"] and again["run_id"] not in (None, first["run_id"])
            assert _finished(app, again["run_id"]) is RunStatus.COMPLETED
            inc = _incident(client, first["incident_id"])
            assert inc["status"] == "resolved" and inc["recurrences"] == 1
            # Still open (its verification fails without the file), a repeat inside the window starts nothing.
            (tmp_path / "fix-holds").unlink()
            third = _detect(client)
            assert third["run_id"] not in (None, again["run_id"])
            assert _finished(app, third["run_id"]) is RunStatus.NEEDS_HUMAN
            repeat = _detect(client)
            assert repeat["run_id"] is None, repeat
    finally:
        app.close()
