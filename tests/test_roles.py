"""Tokens with roles (domain/roles.py, api/access.py, storage/tokens.py): the role matrix over every route of the
real app on a real server, 401 for no token and for a revoked one, agent tokens scoped to their repositories, the
audit log, `mendloop tokens` and `mendloop audit` as a user runs them, and `serve` without any token."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
import yaml

from mendloop.api.access import routes_of
from mendloop.api.server import create_api
from mendloop.app import App
from mendloop.config import RoleName, Settings
from mendloop.domain import roles
from mendloop.domain.roles import ANY_METHOD, RULES, Action, Role
from mendloop.errors import ConfigError
from mendloop.storage.tokens import digest
from mendloop.testing import FakeClock
from tests.support import (
    api_client,
    api_server,
    free_port,
    mendloop_argv,
    open_app,
    settings_for,
    wait_for,
    write_playbooks,
)

VI, OP, AG, IN, AD = Role.VIEWER, Role.OPERATOR, Role.AGENT, Role.INTAKE, Role.ADMIN
READERS = {VI, OP, AD}
# A coding agent reads work orders (context, diff) and the run one belongs to, and nothing else.
WORK_READERS = {VI, OP, AG, AD}
WO = "/patches/work-orders/{work_order_id}"

# Written from the issue, not from RULES: who may call the endpoints that matter. A wrong rule fails here.
EXPECTED: dict[tuple[str, str], set[Role]] = {
    ("GET", "/health"): {VI, OP, AG, IN, AD},
    ("GET", "/patches/runs"): READERS,
    ("GET", "/patches/runs/{run_id}"): WORK_READERS,
    ("GET", "/patches/work-orders"): WORK_READERS,
    ("GET", WO): WORK_READERS,
    ("GET", "/patches/diffs/{work_order_id}.diff"): WORK_READERS,
    ("GET", "/patches/stats"): READERS,
    ("GET", "/events/recent"): READERS,
    ("GET", "/metrics"): READERS,
    ("GET", "/incidents"): READERS,
    ("GET", "/incidents/{incident_id}/history"): READERS,
    ("POST", "/patches/trigger"): {OP, AD},
    ("POST", "/patches/runs/{run_id}/cancel"): {OP, AD},
    ("POST", f"{WO}/approve"): {OP, AD},
    ("POST", f"{WO}/reject"): {OP, AD},
    ("POST", f"{WO}/merged"): {OP, AD},
    ("POST", "/incidents/{incident_id}/resolve"): {OP, AD},
    ("POST", "/patches/runs/{run_id}/approve"): {OP, AD},
    ("POST", "/patches/runs/{run_id}/reject"): {OP, AD},
    ("POST", "/patches/runs/{run_id}/retry"): {OP, AD},
    ("POST", "/pause"): {OP, AD},
    ("POST", "/resume"): {OP, AD},
    ("GET", "/pauses"): READERS,
    ("POST", "/patches/work-orders/claim"): {AG, AD},
    ("POST", f"{WO}/heartbeat"): {AG, AD},
    ("POST", f"{WO}/complete"): {AG, AD},
    ("POST", f"{WO}/fail"): {AG, AD},
    ("POST", "/events"): {IN, AD},
    ("POST", "/events/alertmanager"): {IN, AD},
    ("GET", "/tokens"): {AD},
    ("POST", "/tokens"): {AD},
    ("DELETE", "/tokens/{token_id}"): {AD},
    ("GET", "/audit"): {AD},
    # The MCP endpoint (mendloop/mcp/): coding agents; each tool is then judged as the REST call it makes.
    (ANY_METHOD, "/mcp"): {AG, AD},
    # The dashboard: its pages are reads, its login page public, its logout anyone's with a session.
    ("GET", "/"): READERS,
    ("GET", "/ui/runs"): READERS,
    ("GET", "/ui/runs/{run_id}"): READERS,
    ("GET", "/ui/patches"): READERS,
    ("GET", "/ui/patches/{work_order_id}"): READERS,
    ("GET", "/ui/incidents"): READERS,
    ("GET", "/ui/trust"): READERS,
    ("GET", "/ui/login"): {VI, OP, AG, IN, AD},
    ("POST", "/ui/login"): {VI, OP, AG, IN, AD},
    ("POST", "/ui/logout"): {VI, OP, AG, IN, AD},
}


def _api_routes() -> list[tuple[str, frozenset[str]]]:
    return list(routes_of(create_api(App(Settings()), manage=False).routes))


def _keys(template: str, methods: frozenset[str]) -> list[tuple[str, str]]:
    if not methods:
        return [(ANY_METHOD, template)]
    return [(m, template) for m in sorted(methods) if m != "HEAD"]


def test_every_route_of_the_app_has_a_rule_and_every_rule_a_route() -> None:
    keys = [k for template, methods in _api_routes() for k in _keys(template, methods)]
    assert len(keys) > 30
    missing = [k for k in keys if k not in RULES]
    assert not missing, f"routes without a rule in domain/roles.py RULES: {missing}"
    stale = set(RULES) - set(keys)
    assert not stale, f"rules for routes the app does not have: {stale}"
    assert set(EXPECTED) <= set(keys)


def test_the_rules_table_gives_the_expected_matrix() -> None:
    for (method, template), allowed in EXPECTED.items():
        action = roles.action_for(method, template)
        for role in Role:
            assert roles.allows(role, action) == (role in allowed), (method, template, role)
    # A route nobody listed is admin's alone; HEAD is GET's.
    assert [r for r in Role if roles.allows(r, roles.action_for("POST", "/new/route"))] == [AD]
    assert roles.action_for("HEAD", "/patches/runs") is Action.READ
    assert set(get_args(RoleName)) == {r.value for r in Role}


# -- a real server with one token of each role -----------------------------------------------------------------

PLAYBOOK = {
    "id": "patchy",
    "type": "code_patch",
    "description": "escalates",
    "steps": [{"id": "escalate", "action": "escalate", "with": {"description": "Fix it"}}],
}


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"patchy": "patchy"},
        targets={"a": {"repository": str(tmp_path / "a")}, "b": {"repository": str(tmp_path / "b")}},
        default_target="a",
        api_tokens=["config-admin-token-0123456789"],
    )
    a = open_app(settings, start_workers=True, clock=FakeClock(start=time.time()))
    yield a
    a.close()


@pytest.fixture
def server(app: App) -> Iterator[httpx.Client]:
    with api_server(app, free_port()) as client:
        yield client


def _tokens(app: App, tmp_path: Path) -> dict[Role, str]:
    made = {}
    for role in Role:
        repositories = [str((tmp_path / "a").resolve())] if role is AG else []
        _, made[role] = app.tokens.create(f"the-{role}", role.value, repositories)
    return made


def _as(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _call(client: httpx.Client, method: str, template: str, token: str | None) -> httpx.Response:
    path = re.sub(r"\{[^}]+\}", "x", template)
    if path == "/_static/swagger":
        path += "/swagger-ui.css"
    if path == "/events/stream":
        with client.stream(method, path, headers=_as(token)) as streamed:
            content = streamed.read() if streamed.status_code != 200 else b""  # an open stream never ends
            return httpx.Response(streamed.status_code, headers=streamed.headers, content=content)
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, path, headers=_as(token), json=body)


def test_the_role_matrix_on_a_real_server(app: App, server: httpx.Client, tmp_path: Path) -> None:
    tokens = _tokens(app, tmp_path)
    checked = 0
    for template, methods in _api_routes():
        for method, _ in _keys(template, methods):
            method = "GET" if method == ANY_METHOD else method
            action = roles.action_for(method, template)
            for role, token in tokens.items():
                r = _call(server, method, template, token)
                allowed = EXPECTED.get((method, template))
                if allowed is not None:
                    assert roles.allows(role, action) == (role in allowed), (method, template, role)
                if roles.allows(role, action):
                    assert r.status_code not in (401, 403), (method, template, role, r.status_code, r.text)
                else:
                    assert r.status_code == 403, (method, template, role, r.status_code, r.text)
                    body = r.json()
                    assert body["field"] == "Authorization" and body["role"] == role.value, body
                    assert body["action"] == action.value
                checked += 1
            if action is not Action.PUBLIC:
                anonymous = _call(server, method, template, None)
                assert anonymous.status_code == 401, (method, template, anonymous.text)
                assert anonymous.json()["field"] == "Authorization"
                assert anonymous.headers["www-authenticate"] == "Bearer"
                unknown = _call(server, method, template, "not-a-token-anyone-made-0123")
                assert unknown.status_code == 401, (method, template)
    assert checked >= 30 * len(Role)
    # HEAD is GET's; a path no route has needs a token all the same, then it is a 404 (a wrong method a 405).
    assert server.head("/openapi.json").status_code == 200
    assert server.get("/no/such/path").status_code == 401
    assert server.get("/no/such/path", headers=_as(tokens[IN])).status_code == 404
    assert server.put("/patches/runs", headers=_as(tokens[VI])).status_code == 405


def test_config_tokens_keep_working_with_a_role_each(database_url: str, tmp_path: Path) -> None:
    settings = settings_for(
        database_url,
        tmp_path,
        api_tokens=["config-admin-token-0123456789"],
        tokens=[{"name": "grafana", "token": "config-viewer-token-0123456789", "role": "viewer"}],
        intake_tokens=["config-intake-token-0123456789"],
    )
    app = open_app(settings)
    try:
        with api_server(app, free_port()) as client:
            assert client.get("/tokens", headers=_as("config-admin-token-0123456789")).status_code == 200
            assert client.get("/patches/runs", headers=_as("config-viewer-token-0123456789")).status_code == 200
            refused = client.post("/patches/trigger", json={}, headers=_as("config-viewer-token-0123456789"))
            assert refused.status_code == 403 and refused.json()["role"] == "viewer"
            # An intake token posts events and reads nothing.
            posted = client.post(
                "/events", json={"event_type": "x.y", "message": "m"}, headers=_as("config-intake-token-0123456789")
            )
            assert posted.status_code == 202, posted.text
            assert client.get("/patches/runs", headers=_as("config-intake-token-0123456789")).status_code == 403
        rows = app.audit.list(actor="grafana")
        assert [(r.action, r.status, r.role) for r in rows] == [("runs.trigger", 403, "viewer")]
    finally:
        app.close()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "n", "token": "short", "role": "viewer"}, "shorter than 16"),
        ({"name": "n", "token": "x" * 20 + " y", "role": "viewer"}, "whitespace"),
        ({"name": "n", "token": "x" * 20, "role": "root"}, "role"),
        ({"name": "n", "token": "x" * 20, "role": "agent"}, "repositories it may work for"),
        ({"name": "n", "token": "x" * 20, "role": "viewer", "repositories": ["/r"]}, "only agent tokens"),
    ],
)
def test_a_bad_config_token_is_a_config_error_naming_the_entry(
    tmp_path: Path, entry: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_for("sqlite:///unused.db", tmp_path, tokens=[entry])
    assert caught.value.fields["field"].startswith("tokens.0") and problem in caught.value.message
    assert "x" * 20 not in caught.value.message  # never the token


def test_a_revoked_token_is_refused(app: App, server: httpx.Client) -> None:
    row, token = app.tokens.create("ops", "operator")
    _, admin = app.tokens.create("root", "admin")
    assert server.get("/patches/runs", headers=_as(token)).status_code == 200
    revoked = server.delete(f"/tokens/{row.id}", headers=_as(admin))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = server.get("/patches/runs", headers=_as(token))
    assert refused.status_code == 401 and refused.json()["field"] == "Authorization"
    # Revoked in the database by another process (the CLI's way): refused within the keyring's refresh.
    _, other = app.tokens.create("ops2", "operator")
    wait_for(lambda: server.get("/patches/runs", headers=_as(other)).status_code == 200, timeout=10)
    app.tokens.revoke("ops2")
    wait_for(lambda: server.get("/patches/runs", headers=_as(other)).status_code == 401, timeout=10)
    listed = server.get("/tokens", headers=_as(admin)).json()["tokens"]
    assert {t["name"]: bool(t["revoked_at"]) for t in listed} == {"ops": True, "root": False, "ops2": True}
    assert all("digest" not in t and "token" not in t for t in listed)


def test_a_token_is_kept_as_its_digest_only(app: App) -> None:
    import sqlalchemy as sa

    from mendloop.storage import schema as t

    row, token = app.tokens.create("kept", "viewer")
    with app.store.db.read() as conn:
        stored = conn.execute(sa.select(t.api_tokens).where(t.api_tokens.c.id == row.id)).one()._mapping
    assert stored["digest"] == digest(token) and token not in json.dumps({k: str(v) for k, v in stored.items()})


def _escalate(server: httpx.Client, operator: str, component: str) -> str:
    body = {"description": "d", "error_type": "patchy", "component": component}
    answer = server.post("/patches/trigger", json=body, headers=_as(operator)).json()
    assert answer["status"] == "awaiting_patch", answer
    return str(answer["work_order_id"])


def test_an_agent_token_works_only_for_its_repositories(app: App, server: httpx.Client, tmp_path: Path) -> None:
    _, operator = app.tokens.create("ops", "operator")
    repo_a, repo_b = str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve())
    _, agent_a = app.tokens.create("agent-a", "agent", [repo_a])
    _, agent_b = app.tokens.create("agent-b", "agent", [repo_b])
    wo_b = _escalate(server, operator, "b")  # the oldest work order, of the other repository
    wo_a = _escalate(server, operator, "a")

    claim = {"agent_id": "runner-a"}
    # Not another repository's, though it is the oldest queued.
    claimed = server.post("/patches/work-orders/claim", json=claim, headers=_as(agent_a))
    assert claimed.status_code == 200 and claimed.json()["work_order"]["work_order_id"] == wo_a
    assert server.post("/patches/work-orders/claim", json=claim, headers=_as(agent_a)).status_code == 204
    asked = server.post("/patches/work-orders/claim", json={**claim, "repository": repo_b}, headers=_as(agent_a))
    assert asked.status_code == 403 and asked.json()["field"] == "Authorization", asked.text

    lease_b = server.post("/patches/work-orders/claim", json={"agent_id": "runner-b"}, headers=_as(agent_b)).json()
    assert lease_b["work_order"]["work_order_id"] == wo_b
    for verb, body in (
        ("heartbeat", {"lease_id": lease_b["lease_id"]}),
        ("complete", {"tests_passed": False, "lease_id": lease_b["lease_id"]}),
        ("fail", {"reason": "agent_error", "lease_id": lease_b["lease_id"]}),
    ):
        refused = server.post(f"/patches/work-orders/{wo_b}/{verb}", json=body, headers=_as(agent_a))
        assert refused.status_code == 403 and refused.json()["field"] == "Authorization", (verb, refused.text)
    assert app.store.get_work_order(wo_b).status == "in_progress"  # nothing the refused calls did
    ok = server.post(
        f"/patches/work-orders/{wo_b}/heartbeat", json={"lease_id": lease_b["lease_id"]}, headers=_as(agent_b)
    )
    assert ok.status_code == 200
    refusals = app.audit.list(actor="agent-a")
    assert sorted(r.action for r in refusals) == sorted(
        ["work_orders.claim", "work_orders.heartbeat", "work_orders.complete", "work_orders.fail"]
    )
    assert {r.status for r in refusals} == {403} and {r.target_id for r in refusals if r.target_id} == {wo_b}
    # Nor does it read another repository's work order (its context, its diff), or see it listed.
    for path in (f"/patches/work-orders/{wo_b}", f"/patches/diffs/{wo_b}.diff"):
        refused = server.get(path, headers=_as(agent_a))
        assert refused.status_code == 403 and refused.json()["field"] == "Authorization", (path, refused.text)
    assert server.get(f"/patches/work-orders/{wo_a}", headers=_as(agent_a)).status_code == 200
    listed = server.get("/patches/work-orders", headers=_as(agent_a)).json()
    assert [w["work_order_id"] for w in listed["work_orders"]] == [wo_a] and listed["total"] == 1
    everything_listed = server.get("/patches/work-orders", headers=_as(operator)).json()
    everything = everything_listed["work_orders"]
    # Its figures too are its repositories' alone: both work orders are in progress, one of them its own.
    assert everything_listed["stats"]["total_work_orders"] == 2 and everything_listed["stats"]["in_progress"] == 2
    assert listed["stats"]["total_work_orders"] == 1 and listed["stats"]["in_progress"] == 1, listed["stats"]
    assert {w["work_order_id"] for w in everything} == {wo_a, wo_b}

    # The run of its own work order it reads (an agent's timeline); another repository's run it does not.
    run_of = {w["work_order_id"]: w["self_healing_run_id"] for w in everything}
    mine = server.get(f"/patches/runs/{run_of[wo_a]}", headers=_as(agent_a))
    assert mine.status_code == 200 and mine.json()["coding_work_order_id"] == wo_a, mine.text
    theirs = server.get(f"/patches/runs/{run_of[wo_b]}", headers=_as(agent_a))
    assert theirs.status_code == 403 and theirs.json()["field"] == "Authorization", theirs.text
    assert server.get(f"/patches/runs/{run_of[wo_b]}", headers=_as(agent_b)).status_code == 200
    # Nor any list that would show other repositories' failures, scoped or not.
    _, agent_all = app.tokens.create("agent-all", "agent", ["*"])
    app.keyring.invalidate()  # a token made after the server started is known at its next refresh
    for path in ("/patches/runs", "/events/recent", "/incidents", "/patches/stats", "/metrics", "/ui/runs"):
        for token in (agent_a, agent_all):
            refused = server.get(path, headers=_as(token))
            assert refused.status_code == 403 and refused.json()["action"] == "read", (path, refused.text)
    assert server.get(f"/patches/runs/{run_of[wo_b]}", headers=_as(agent_all)).status_code == 200


# -- the audit log --------------------------------------------------------------------------------------------


def test_the_audit_log_keeps_allowed_and_refused_actions(app: App, server: httpx.Client) -> None:
    _, operator = app.tokens.create("alice", "operator")
    _, viewer = app.tokens.create("victor", "viewer")
    _, admin = app.tokens.create("root", "admin")
    run = server.post("/patches/trigger", json={"description": "d", "error_type": "patchy"}, headers=_as(operator))
    assert run.status_code == 200, run.text
    # On record by the time the answer arrived: read at once, no polling.
    (entry,) = app.audit.list(actor="alice")
    assert (entry.action, entry.method, entry.path, entry.status) == ("runs.trigger", "POST", "/patches/trigger", 200)
    assert entry.role == "operator" and entry.actor_id.startswith("db:") and entry.client == "127.0.0.1"

    run_id = run.json()["run_id"]
    assert server.post(f"/patches/runs/{run_id}/cancel", json={}, headers=_as(viewer)).status_code == 403
    assert server.get("/audit", headers=_as(viewer)).status_code == 403
    assert server.get("/patches/runs", headers=_as(viewer)).status_code == 200  # a read: not kept
    assert server.get("/patches/runs").status_code == 401  # nobody: not kept either

    refused = server.get("/audit", params={"actor": "victor"}, headers=_as(admin)).json()["entries"]
    assert [(e["action"], e["status"], e["target_id"]) for e in refused] == [
        ("audit.read", 403, None),
        ("runs.cancel", 403, run_id),
    ]
    triggers = server.get("/audit", params={"action": "runs.trigger"}, headers=_as(admin)).json()
    assert [e["actor_name"] for e in triggers["entries"]] == ["alice"]
    assert server.get("/audit", params={"limit": 1}, headers=_as(admin)).json()["count"] == 1
    everything = app.audit.list(limit=100)
    assert {e.actor_name for e in everything} == {"alice", "victor", "root"}  # root's own reads of /audit


def test_a_server_without_tokens_is_open_and_audits_anonymous(database_url: str, tmp_path: Path) -> None:
    write_playbooks(tmp_path / "pb", {**PLAYBOOK, "steps": [{"id": "s", "action": "sleep", "with": {"seconds": 0}}]})
    settings = settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"patchy": "patchy"})
    app = open_app(settings, start_workers=True)
    try:
        with api_server(app, free_port()) as client:
            assert client.get("/patches/runs").status_code == 200
            triggered = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy"})
            assert triggered.status_code == 200
            (entry,) = app.audit.list()
            assert (entry.actor_name, entry.action, entry.status) == ("anonymous", "runs.trigger", 200)
            # The first token closes it.
            made = client.post("/tokens", json={"name": "first", "role": "admin"})
            assert made.status_code == 201 and made.json()["token"].startswith("mlt_")
            assert client.get("/patches/runs").status_code == 401
            assert client.get("/patches/runs", headers=_as(made.json()["token"])).status_code == 200
            # Revoking the last token does not open it again: whoever revoked it meant to close it.
            revoked = client.delete(f"/tokens/{made.json()['id']}", headers=_as(made.json()["token"]))
            assert revoked.status_code == 200, revoked.text
            assert client.get("/patches/runs").status_code == 401
            assert client.post("/tokens", json={"name": "again", "role": "admin"}).status_code == 401
    finally:
        app.close()


def test_a_server_without_tokens_off_loopback_is_never_open(database_url: str, tmp_path: Path) -> None:
    # `serve` refuses to start like this; an App built around such settings still asks every caller for a token.
    app = open_app(settings_for(database_url, tmp_path, host="0.0.0.0"))
    try:
        assert not app.keyring.is_open()
        with api_client(app) as client:
            assert client.get("/patches/runs").status_code == 401
            assert client.post("/tokens", json={"name": "first", "role": "admin"}).status_code == 401
    finally:
        app.close()


# -- the CLI as a user runs it ----------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mendloop_argv(*args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=dict(os.environ)
    )


@pytest.mark.slow
def test_tokens_cli_shows_a_token_once_lists_without_it_and_revokes(
    app: App, server: httpx.Client, tmp_path: Path
) -> None:
    config = tmp_path / "mendloop.yaml"
    made = _cli("tokens", "create", "--role", "operator", "--name", "ci", "--config", str(config))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("mlt_") and "shown this once" in made.stderr
    as_json = _cli(
        "tokens", "create", "--role", "agent", "--name", "bot", "-r", "/srv/a", "--json", "--config", str(config)
    )
    shown = json.loads(as_json.stdout)
    assert shown["role"] == "agent" and shown["repositories"] == ["/srv/a"] and shown["token"].startswith("mlt_")

    # The server (another process's App on the same database) takes it within its refresh.
    wait_for(lambda: server.post("/patches/trigger", json={}, headers=_as(token)).status_code == 422, timeout=10)

    listed = _cli("tokens", "list", "--config", str(config))
    assert listed.returncode == 0 and "ci" in listed.stdout and "bot" in listed.stdout
    listed_json = _cli("tokens", "list", "--json", "--config", str(config)).stdout
    for secret in (token, shown["token"]):
        assert secret not in listed.stdout and secret not in listed_json
        assert digest(secret) not in listed.stdout and digest(secret) not in listed_json
    assert {t["name"] for t in json.loads(listed_json)["tokens"]} == {"ci", "bot"}

    revoked = _cli("tokens", "revoke", "ci", "--config", str(config))
    assert revoked.returncode == 0 and "revoked ci" in revoked.stdout
    wait_for(lambda: server.get("/patches/runs", headers=_as(token)).status_code == 401, timeout=10)
    again = _cli("tokens", "revoke", "nobody", "--config", str(config))
    assert again.returncode == 1 and again.stderr.strip().count("\n") == 0 and "nobody" in again.stderr
    bad = _cli("tokens", "create", "--role", "agent", "--name", "x", "--config", str(config))
    assert bad.returncode == 1 and "repositories" in bad.stderr and bad.stderr.strip().count("\n") == 0

    audit = _cli("audit", "list", "--json", "--config", str(config))
    assert audit.returncode == 0, audit.stderr
    entries = json.loads(audit.stdout)["entries"]
    assert entries and {(e["actor_name"], e["action"], e["status"]) for e in entries} == {("ci", "runs.trigger", 422)}


@pytest.mark.slow
def test_serve_without_tokens_refuses_other_addresses_and_warns_on_loopback(tmp_path: Path) -> None:
    config = tmp_path / "mendloop.yaml"
    config.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path / 'm.db'}", "workers": 0}))
    port = free_port()
    refused = _cli("serve", "--config", str(config), "--host", "0.0.0.0", "--port", str(port))
    assert refused.returncode == 1 and "refusing to listen on 0.0.0.0 without tokens" in refused.stderr
    log = tmp_path / "serve.log"
    from tests.support import serve_process

    with serve_process(config, port, log=log):
        assert httpx.get(f"http://127.0.0.1:{port}/patches/runs").status_code == 200
    assert "no API tokens" in log.read_text() and "open" in log.read_text()


def test_the_embedded_runner_claims_with_an_in_process_credential(tmp_path: Path) -> None:
    from tests.support import git, migrated_sqlite

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "x.py").write_text("a\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "initial")
    port = free_port()
    admin = "config-admin-token-0123456789"
    settings = settings_for(
        migrated_sqlite(tmp_path / "mendloop.db"),
        tmp_path,
        port=port,
        api_tokens=[admin],
        agent_runner={
            "enabled": True,
            "run_as": "none",
            "repository": str(repo),
            "adapter": "command",
            "argv": ["true"],
        },
    )
    app = open_app(settings, embedded_agent=True)
    other = open_app(settings)
    try:
        runner = app.agent_runner
        assert runner is not None
        # Random per process, in no configuration and no table.
        assert app.agent_token and app.agent_token != other.agent_token and app.agent_token != admin
        assert app.tokens.rows() == []
        with api_server(app, port) as client:
            assert runner.client.claim("probe") is None  # 204: allowed, no work (a 401 or 403 would raise)
            refused = client.post("/patches/trigger", json={}, headers=_as(app.agent_token))
            assert refused.status_code == 403 and refused.json()["role"] == "agent"
            # Another process's credential is nothing here.
            assert client.get("/patches/runs", headers=_as(other.agent_token)).status_code == 401
        (entry,) = app.audit.list()
        assert (entry.actor_id, entry.action, entry.status) == ("process:agent", "runs.trigger", 403)
    finally:
        other.close()
        app.close()


def test_health_needs_no_token_but_shows_operators_words_only_to_callers_with_one(
    database_url: str, tmp_path: Path
) -> None:
    admin = "health-admin-token-0123456789"
    app = open_app(settings_for(database_url, tmp_path, api_tokens=[admin], health={"probe_interval_seconds": 0.05}))
    try:
        with api_client(app) as client:
            paused = client.post(
                "/pause", json={"component": "svc", "reason": "db failover at 3am"}, headers=_as(admin)
            )
            assert paused.status_code == 200, paused.text

            def shown(headers: dict[str, str]) -> list[str]:
                answer = client.get("/health", headers=headers)
                assert answer.status_code == 200, answer.text
                return [p["reason"] for p in answer.json()["paused"]]

            wait_for(lambda: len(shown({})) == 1)  # the write probe reads the pauses each round
            assert shown({}) != ["db failover at 3am"]
            assert shown(_as(admin)) == ["db failover at 3am"]
            assert shown(_as("not-a-token-anyone-made-0123")) != ["db failover at 3am"]
    finally:
        app.close()
