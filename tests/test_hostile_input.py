"""Hostile input (issue 8, items 7, 9 and the bound on `files_changed`): every class of bad input is a clear 4xx
naming the field, on SQLite and PostgreSQL, and writes nothing; no token configuration turns authentication off.

The classes: Alertmanager bodies of the wrong shape; a NUL character or a lone surrogate in any string (a body
field at any depth, a key, a path parameter, a query parameter, a header); numbers a column or JSON can't hold
(NaN, Infinity, an overflowing literal, huge counts, limits and offsets); over-long path ids; and weak tokens.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from mendloop.api.server import create_api
from mendloop.app import App
from mendloop.config import Settings, load_settings
from mendloop.errors import ConfigError
from tests.support import api_client, drain, mendloop_argv, open_app, settings_for, write_playbooks

TABLES = ("events", "runs", "steps", "work_orders", "diffs", "incidents", "idempotency", "trust_history")
TOKEN = "hostile-suite-token-0123456789"
NUL = "\x00"
LONE = "\ud800"  # half of a surrogate pair: no UTF-8 encoder takes it


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    field: str
    body: Any = None  # sent as JSON with ASCII escapes (so NUL and lone surrogates arrive as \\u escapes)
    raw: bytes | None = None  # sent as is
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 422


def _alert(**over: Any) -> dict[str, Any]:
    return {
        "status": "firing",
        "labels": {"alertname": "HighErrorRate", "job": "web"},
        "annotations": {"summary": "errors"},
        "startsAt": "2026-11-26T10:00:00Z",
        **over,
    }


def _am(*alerts: Any, **top: Any) -> dict[str, Any]:
    return {"version": "4", "status": "firing", **top, "alerts": list(alerts)}


def _event(**over: Any) -> dict[str, Any]:
    return {"event_type": "app.error", "message": "boom", "component": "web", **over}


def _trigger(**over: Any) -> dict[str, Any]:
    return {"description": "d", "error_type": "quick", "wait_seconds": 0, **over}


AM = "/events/alertmanager"
WO = "/patches/work-orders/{wo}"

# Alertmanager bodies whose fields have the wrong type (500 ValueError / TypeError before).
ALERTMANAGER_SHAPES = {
    "labels-a-string": Case("POST", AM, "alerts.0.labels", _am({"labels": "x"})),
    "annotations-a-number": Case("POST", AM, "alerts.0.annotations", _am({"annotations": 3})),
    "labels-a-list": Case("POST", AM, "alerts.0.labels", _am(_alert(labels=[["alertname", "x"]]))),
    "alerts-a-string": Case("POST", AM, "alerts", {"alerts": "x"}),
    "alert-a-number": Case("POST", AM, "alerts.0", _am(5)),
    "startsAt-a-number": Case("POST", AM, "alerts.0.startsAt", _am(_alert(startsAt=5))),
    "label-value-a-number": Case(
        "POST", AM, "alerts.0.labels.severity", _am(_alert(labels={"alertname": "A", "severity": 3}))
    ),
    "label-value-a-list": Case("POST", AM, "alerts.0.labels.job", _am(_alert(labels={"alertname": "A", "job": []}))),
    "annotation-value-an-object": Case(
        "POST", AM, "alerts.0.annotations.summary", _am(_alert(annotations={"summary": {"x": 1}}))
    ),
    "status-a-number": Case("POST", AM, "alerts.0.status", _am(_alert(status=7))),
    "status-unknown": Case("POST", AM, "alerts.0.status", _am(_alert(status="exploded"))),
    "top-status-a-number": Case("POST", AM, "status", _am(_alert(), status=1)),
    "fingerprint-a-number": Case("POST", AM, "alerts.0.fingerprint", _am(_alert(fingerprint=123))),
    "fingerprint-too-long": Case("POST", AM, "alerts.0.fingerprint", _am(_alert(fingerprint="f" * 65))),
    "component-too-long": Case(
        "POST", AM, "alerts.0.labels.component", _am(_alert(labels={"alertname": "A", "component": "c" * 201}))
    ),
    "second-alert-bad-first-good": Case("POST", AM, "alerts.1.labels", _am(_alert(), {"labels": "x"})),
}

# A NUL character in any text field (503 on PostgreSQL before), and lone surrogates (500 on both).
BAD_TEXT = {
    "event-message-nul": Case("POST", "/events", "message", _event(message=f"a{NUL}b")),
    "event-component-nul": Case("POST", "/events", "component", _event(component=f"web{NUL}")),
    "event-event_id-nul": Case("POST", "/events", "event_id", _event(event_id=f"id-{NUL}")),
    "event-source-nul": Case("POST", "/events", "source", _event(source=f"{NUL}api")),
    "event-fingerprint-nul": Case("POST", "/events", "fingerprint", _event(fingerprint=f"fp{NUL}")),
    "event-payload-value-nul": Case("POST", "/events", "payload.detail", _event(payload={"detail": NUL})),
    "event-payload-key-nul": Case("POST", "/events", "payload", _event(payload={f"k{NUL}": 1})),
    "event-payload-deep-nul": Case("POST", "/events", "payload.a.0.b", _event(payload={"a": [{"b": f"x{NUL}"}]})),
    "event-batch-second-nul": Case("POST", "/events", "events.1.message", {"events": [_event(), _event(message=NUL)]}),
    "event-array-nul": Case("POST", "/events", "1.message", [_event(), _event(message=NUL)]),
    "log-records-nul": Case("POST", "/events", "0.log", [{"log": f"Traceback boom{NUL}"}]),
    "ndjson-nul": Case(
        "POST",
        "/events",
        "1.log",
        raw=(json.dumps({"log": "fine"}) + "\n" + json.dumps({"log": f"bad{NUL}"}) + "\n").encode(),
    ),
    "event-message-surrogate": Case("POST", "/events", "message", _event(message=f"a{LONE}b")),
    "event-payload-key-surrogate": Case("POST", "/events", "payload", _event(payload={LONE: 1})),
    "utf16-body-nul": Case("POST", "/events", "message", raw=json.dumps(_event(message=f"a{NUL}")).encode("utf-16")),
    "alertmanager-label-nul": Case(
        "POST", AM, "alerts.0.labels.job", _am(_alert(labels={"alertname": "A", "job": f"w{NUL}"}))
    ),
    "alertmanager-summary-nul": Case(
        "POST", AM, "alerts.0.annotations.summary", _am(_alert(annotations={"summary": NUL}))
    ),
    "trigger-description-nul": Case("POST", "/patches/trigger", "description", _trigger(description=f"d{NUL}")),
    "trigger-component-nul": Case("POST", "/patches/trigger", "component", _trigger(component=NUL)),
    "trigger-dedupe_key-nul": Case("POST", "/patches/trigger", "dedupe_key", _trigger(dedupe_key=f"k{NUL}")),
    "trigger-file_path-nul": Case("POST", "/patches/trigger", "file_path", _trigger(file_path=f"a{NUL}.py")),
    "trigger-context-nul": Case("POST", "/patches/trigger", "context.ref", _trigger(context={"ref": NUL})),
    "trigger-context-deep-nul": Case(
        "POST", "/patches/trigger", "context.a.0.b", _trigger(context={"a": [{"b": NUL}]})
    ),
    "trigger-context-surrogate": Case("POST", "/patches/trigger", "context.ref", _trigger(context={"ref": LONE})),
    "complete-summary-nul": Case("POST", f"{WO}/complete", "summary", {"tests_passed": True, "summary": NUL}),
    "complete-diff-nul": Case(
        "POST", f"{WO}/complete", "diff", {"tests_passed": True, "diff": f"--- a/x\n+++ b/x\n+{NUL}\n"}
    ),
    "complete-agent-nul": Case("POST", f"{WO}/complete", "agent.name", {"tests_passed": True, "agent": {"name": NUL}}),
    "complete-idempotency-key-nul": Case(
        "POST", f"{WO}/complete", "Idempotency-Key", {"tests_passed": True}, headers={"Idempotency-Key": f"k{NUL}"}
    ),
    "fail-details-nul": Case("POST", f"{WO}/fail", "details.why", {"reason": "agent_error", "details": {"why": NUL}}),
    "reject-reason-nul": Case("POST", f"{WO}/reject", "reason", {"reason": f"no{NUL}"}),
    "heartbeat-note-nul": Case("POST", f"{WO}/heartbeat", "note", {"lease_id": "lease", "note": NUL}),
    "claim-agent_id-nul": Case("POST", "/patches/work-orders/claim", "agent_id", {"agent_id": f"a{NUL}"}),
    "cancel-reason-nul": Case("POST", "/patches/runs/{run}/cancel", "reason", {"reason": NUL}),
    "path-run-nul": Case("GET", "/patches/runs/run%00x", "run_id"),
    "path-work-order-nul": Case("GET", "/patches/work-orders/wo%00", "work_order_id"),
    "path-complete-nul": Case("POST", "/patches/work-orders/%00/complete", "work_order_id", {"tests_passed": True}),
    "path-diff-nul": Case("GET", "/patches/diffs/wo%00.diff", "work_order_id"),
    "path-incident-nul": Case("GET", "/incidents/inc%00", "incident_id"),
    "path-resolve-nul": Case("POST", "/incidents/inc%00/resolve", "incident_id"),
    "path-trust-nul": Case("GET", "/trust/web%00", "component"),
    "query-event_type-nul": Case("GET", "/events/recent", "event_type", params={"event_type": f"app{NUL}"}),
    "query-run-filter-nul": Case(
        "GET", "/patches/work-orders", "self_healing_run_id", params={"self_healing_run_id": NUL}
    ),
    "query-fingerprint-nul": Case("GET", "/incidents", "fingerprint", params={"fingerprint": NUL}),
    "query-error_type-nul": Case("GET", "/incidents", "error_type", params={"error_type": f"x{NUL}"}),
    "header-nul": Case("GET", "/patches/runs", "X-Trace", headers={"X-Trace": f"t{NUL}"}),
}

# Numbers a column, a float or JSON can't hold (files_changed: 10**30 was accepted).
BAD_NUMBERS = {
    "files_changed-huge": Case(
        "POST", f"{WO}/complete", "files_changed", {"tests_passed": True, "files_changed": 10**30}
    ),
    "files_changed-past-bound": Case(
        "POST", f"{WO}/complete", "files_changed", {"tests_passed": True, "files_changed": 100_001}
    ),
    "files_changed-negative": Case(
        "POST", f"{WO}/complete", "files_changed", {"tests_passed": True, "files_changed": -1}
    ),
    "event-count-huge": Case("POST", "/events", "count", _event(count=10**30)),
    "runs-limit-huge": Case("GET", "/patches/runs", "limit", params={"limit": str(10**30)}),
    "runs-offset-huge": Case("GET", "/patches/runs", "offset", params={"offset": str(10**30)}),
    "work-orders-offset-huge": Case("GET", "/patches/work-orders", "offset", params={"offset": str(10**30)}),
    "recent-limit-huge": Case("GET", "/events/recent", "limit", params={"limit": str(10**30)}),
    "incidents-offset-huge": Case("GET", "/incidents", "offset", params={"offset": str(10**30)}),
    "recent-since-inf": Case("GET", "/events/recent", "since", params={"since": "inf"}),
    "recent-since-nan": Case("GET", "/events/recent", "since", params={"since": "nan"}),
    "recent-since-overflow": Case("GET", "/events/recent", "since", params={"since": "1e400"}),
    "trigger-wait-nan": Case(
        "POST", "/patches/trigger", "wait_seconds", raw=b'{"description":"d","error_type":"quick","wait_seconds":NaN}'
    ),
    "trigger-wait-infinity": Case(
        "POST",
        "/patches/trigger",
        "wait_seconds",
        raw=b'{"description":"d","error_type":"quick","wait_seconds":Infinity}',
    ),
    "trigger-context-nan": Case(
        "POST", "/patches/trigger", "context.x", raw=b'{"description":"d","error_type":"quick","context":{"x":NaN}}'
    ),
    "claim-wait-infinity": Case(
        "POST", "/patches/work-orders/claim", "wait_seconds", raw=b'{"agent_id":"a","wait_seconds":Infinity}'
    ),
    "event-payload-infinity": Case(
        "POST", "/events", "payload.x", raw=b'{"event_type":"app.error","payload":{"x":-Infinity}}'
    ),
    "event-payload-overflow": Case(
        "POST", "/events", "payload.x", raw=b'{"event_type":"app.error","payload":{"x":1e400}}'
    ),
    "fail-details-nan": Case("POST", f"{WO}/fail", "details.n", raw=b'{"reason":"agent_error","details":{"n":NaN}}'),
    "path-id-too-long": Case("GET", "/patches/runs/" + "r" * 301, "run_id"),
}

CASES = {
    **{f"alertmanager:{k}": v for k, v in ALERTMANAGER_SHAPES.items()},
    **{f"text:{k}": v for k, v in BAD_TEXT.items()},
    **{f"number:{k}": v for k, v in BAD_NUMBERS.items()},
}


def _playbooks(tmp_path: Path) -> dict[str, Any]:
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
            "steps": [{"id": "escalate", "action": "escalate", "with": {"description": "patch it"}}],
        },
    )
    return {
        "playbook_dirs": [str(tmp_path / "pb")],
        "routing": {"quick": "quick", "patchy": "patchy", "HighErrorRate": "quick"},
    }


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    a = open_app(settings_for(database_url, tmp_path, **_playbooks(tmp_path)))
    yield a
    a.close()


def _counts(app: App) -> dict[str, int]:
    with app.store.engine.connect() as conn:
        return {t: int(conn.execute(sa.text(f"select count(*) from {t}")).scalar_one()) for t in TABLES}


def _escalated(app: App, client: httpx.Client) -> tuple[str, str]:
    """A run parked on a queued work order: (run id, work order id)."""
    r = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy", "wait_seconds": 0})
    assert r.status_code == 200, r.text
    drain(app)
    run = client.get(f"/patches/runs/{r.json()['run_id']}").json()
    assert run["status"] == "awaiting_patch", run
    return run["run_id"], run["coding_work_order_id"]


def _send(client: httpx.Client, case: Case, path: str) -> httpx.Response:
    content = case.raw if case.raw is not None else None
    if content is None and case.body is not None:
        content = json.dumps(case.body).encode()  # ASCII escapes: "\u0000", "\ud800"
    headers = dict(case.headers)
    if content is not None:
        headers.setdefault("content-type", "application/json")
    return client.request(case.method, path, content=content, params=case.params, headers=headers)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_hostile_input_is_a_4xx_naming_the_field_and_writes_nothing(app: App, client: httpx.Client, case: Case) -> None:
    path = case.path
    if "{wo}" in path or "{run}" in path:
        run_id, wo_id = _escalated(app, client)
        path = path.format(run=run_id, wo=wo_id)
        wo_before = client.get(f"/patches/work-orders/{wo_id}").json()
    before = _counts(app)
    r = _send(client, case, path)
    assert r.status_code == case.status, r.text
    body = r.json()
    assert body["field"] == case.field, body
    assert isinstance(body["detail"], str) and case.field in body["detail"] and "Traceback" not in r.text
    assert isinstance(body["errors"], list) and body["errors"][0]["field"] == case.field
    assert _counts(app) == before
    if "{wo}" in case.path:
        assert client.get(f"/patches/work-orders/{wo_id}").json() == wo_before
    # The same server keeps answering: nothing was left half-done in a transaction.
    assert client.get("/events/recent", params={"limit": 5}).status_code == 200


def test_well_formed_neighbours_of_the_hostile_cases_are_accepted(app: App, client: httpx.Client) -> None:
    """The checks refuse what can't be stored, not what merely looks odd: a literal backslash-u0000, the word
    NaN in a string, a big integer inside a payload, a full Alertmanager body."""
    r = client.post(
        "/events", json=_event(message="literal \\u0000 and NaN Infinity", payload={"n": 10**30, "f": 1.5e300})
    )
    assert r.status_code == 202, r.text
    r = client.post(AM, json=_am(_alert(fingerprint="abc123", endsAt="0001-01-01T00:00:00Z", extra={"k": 1})))
    assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
    r = client.post(AM, json=_am(_alert(labels=None, annotations=None)))
    assert r.status_code == 202, r.text
    _, wo = _escalated(app, client)
    ok = client.post(f"/patches/work-orders/{wo}/complete", json={"tests_passed": True, "files_changed": 100_000})
    assert ok.status_code == 200, ok.text
    assert client.get("/events/recent", params={"since": "0", "limit": 1000}).status_code == 200


# -- item 7: authentication off by accident -------------------------------------------------------------------

WEAK_TOKENS = {
    "empty": "",
    "space": " ",
    "whitespace": " \t\n ",
    "short": "tiny1",
    "fifteen": "x" * 15,
    "padded": "  abcdefghijklmnopqrstuvwxyz  ",
    "control": "abcdefghijklmnop\x00",
    "inner-space": "abcdefgh ijklmnopq",
}


@pytest.mark.parametrize("key", ["api_tokens", "intake_tokens"])
@pytest.mark.parametrize("token", list(WEAK_TOKENS.values()), ids=list(WEAK_TOKENS))
def test_a_weak_token_is_a_config_error_naming_the_field(tmp_path: Path, key: str, token: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({key: [TOKEN, token]}))
    with pytest.raises(ConfigError) as bad:
        load_settings(path)
    assert bad.value.fields["field"] == key and key in bad.value.message and "entry 1" in bad.value.message
    if token.strip():
        assert token.strip() not in bad.value.message  # the message never repeats a token
    with pytest.raises(ConfigError):
        load_settings(None, **{key: [token]})  # a command-line override goes through the same check


@pytest.mark.parametrize("value", ['[""]', '["   "]', '["short"]'])
def test_a_weak_token_from_the_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MENDLOOP_API_TOKENS", value)
    with pytest.raises(ConfigError) as bad:
        load_settings(None)
    assert bad.value.fields["field"] == "api_tokens"


def test_strong_tokens_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"api_tokens": [TOKEN, "x" * 16], "intake_tokens": ["i" * 16]}))
    s = load_settings(path)
    assert s.api_tokens == [TOKEN, "x" * 16] and s.intake_tokens == ["i" * 16]


@pytest.mark.parametrize("command", ["check", "serve"])
def test_config_check_and_serve_refuse_a_weak_token_in_one_line(tmp_path: Path, command: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path}/x.db", "api_tokens": [""]}))
    argv = ["config", "check", "--config", str(cfg)] if command == "check" else ["serve", "--config", str(cfg)]
    if command == "serve":
        argv += ["--host", "0.0.0.0", "--port", "1"]
    r = subprocess.run(mendloop_argv(*argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "api_tokens" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_the_api_refuses_settings_that_skipped_the_token_check(tmp_path: Path) -> None:
    settings = Settings.model_construct(**{**Settings().model_dump(), "api_tokens": [""]})
    with pytest.raises(ConfigError) as bad:
        create_api(App(settings))
    assert bad.value.fields["field"] == "api_tokens"


def test_with_tokens_configured_no_route_answers_without_one(database_url: str, tmp_path: Path) -> None:
    settings = settings_for(database_url, tmp_path, api_tokens=[TOKEN], intake_tokens=["intake-" + "i" * 16])
    app = open_app(settings)
    try:
        paths = create_api(app, manage=False).openapi()["paths"]
        doors = [
            (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
            for path, ops in paths.items()
            if path != "/health"
            for method in ops
        ]
        assert len(doors) > 20 and ("POST", "/events") in doors and ("POST", "/events/alertmanager") in doors
        with api_client(app) as client:
            before = _counts(app)
            for method, path in doors:
                for auth in (None, "", "Bearer", "Bearer ", "Bearer wrong-token-000000000", "Basic " + TOKEN):
                    headers = {"Authorization": auth} if auth is not None else {}
                    r = client.request(method, path, headers=headers, json={})
                    assert r.status_code == 401, (method, path, auth, r.status_code, r.text)
            # Paths near the public ones are not public.
            for path in ("/docsx", "/health/../patches/runs", "/openapi.jsonx", "/_staticx"):
                assert client.get(path).status_code in (401, 404), path
            assert client.get("/patches/runs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert client.get("/health").status_code == 200
            assert _counts(app) == before
    finally:
        app.close()
