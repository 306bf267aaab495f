"""The dashboard at the HTTP level (mendloop/dashboard, api/access.py, domain/sessions.py): pages render for every
reading role, the login trades a token for an HttpOnly SameSite=Strict session cookie, actions made with the
cookie need the session's CSRF token, logout and revocation end the session, viewers get no action buttons, empty
states say what to do, a browser without a credential is sent to the login page, and behind a proxy's prefix
every link and script URL carries it. On SQLite and PostgreSQL (sessions are rows)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mendloop.app import App
from mendloop.domain import sessions
from mendloop.testing import FakeClock
from tests.support import api_client, open_app, settings_for, wait_for, write_playbooks

PLAYBOOK = {
    "id": "patchy",
    "type": "code_patch",
    "description": "escalates",
    "steps": [{"id": "escalate", "action": "escalate", "with": {"description": "Fix it"}}],
}
PAGES = ["/", "/ui/runs", "/ui/patches", "/ui/incidents", "/ui/trust"]
ADMIN = "config-admin-token-0123456789"


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"patchy": "patchy"},
        api_tokens=[ADMIN],
    )
    a = open_app(settings, start_workers=True, clock=FakeClock(start=time.time()))
    yield a
    a.close()


@pytest.fixture
def client(app: App) -> Iterator[httpx.Client]:
    with api_client(app) as c:
        yield c


def _login(client: httpx.Client, token: str) -> str:
    """Log in with the form a browser sends; returns the session's CSRF token (from the page's data-csrf)."""
    answer = client.post(
        "/ui/login", content=f"token={token}", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie  # plain http here
    assert token not in cookie
    page = client.get("/")
    assert page.status_code == 200
    found = re.search(r'data-csrf="([0-9a-f]{64})"', page.text)
    assert found, page.text[:500]
    return found.group(1)


def test_every_page_renders_its_empty_state_for_a_viewer_and_shows_no_buttons(app: App, client: httpx.Client) -> None:
    _, viewer = app.tokens.create("vic", "viewer")
    for path in PAGES:
        page = client.get(path, headers={"Authorization": f"Bearer {viewer}"})
        assert page.status_code == 200, (path, page.text)
        assert "text/html" in page.headers["content-type"]
        assert "data-post=" not in page.text and "trigger-form" not in page.text, path
    runs = client.get("/ui/runs", headers={"Authorization": f"Bearer {viewer}"}).text
    assert "No runs yet: trigger one" in runs and "mendloop runs trigger" in runs
    assert "No work orders yet" in client.get("/ui/patches", headers={"Authorization": f"Bearer {viewer}"}).text
    assert "No incidents yet" in client.get("/ui/incidents", headers={"Authorization": f"Bearer {viewer}"}).text
    assert "No trust scores yet" in client.get("/ui/trust", headers={"Authorization": f"Bearer {viewer}"}).text


def test_login_session_csrf_logout(app: App, client: httpx.Client) -> None:
    _, operator = app.tokens.create("olga", "operator")
    # No credential: a browser is sent to the login page, a program gets the API's 401.
    assert client.get("/ui/runs").status_code == 401
    sent = client.get("/ui/runs", headers={"Accept": "text/html"})
    assert sent.status_code == 303 and sent.headers["location"] == "/ui/login"
    assert client.get("/ui/login").status_code == 200
    assert client.get("/ui/static/dashboard.js").status_code == 200

    wrong = client.post(
        "/ui/login",
        content="token=not-a-token-of-anyone-000",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.text and "set-cookie" not in wrong.headers
    missing = client.post("/ui/login", json={})
    assert missing.status_code == 422 and "token: an API token is required" in missing.text

    csrf = _login(client, operator)
    page = client.get("/")
    assert 'id="trigger-form"' in page.text and "olga" in page.text  # an operator may trigger
    body = {"description": "from the dashboard", "error_type": "patchy", "wait_seconds": 0}
    refused = client.post("/patches/trigger", json=body)
    assert refused.status_code == 403 and refused.json()["field"] == "X-CSRF-Token", refused.text
    forged = client.post("/patches/trigger", json=body, headers={"X-CSRF-Token": "0" * 64})
    assert forged.status_code == 403 and forged.json()["field"] == "X-CSRF-Token"
    assert app.store.list_runs()[1] == 0
    made = client.post("/patches/trigger", json=body, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 200, made.text
    run_id = made.json()["run_id"]
    (entry,) = app.audit.list(action="runs.trigger", limit=10)[:1]
    assert entry.actor_name == "olga" and entry.status == 200  # the session acts as its token

    wait_for(lambda: app.store.run_status(run_id).value == "awaiting_patch")
    run_page = client.get(f"/ui/runs/{run_id}")
    assert run_page.status_code == 200 and "Escalated to coding agent" in run_page.text
    assert re.search(r"\[\d\d:\d\d:\d\d\] ", run_page.text)  # the spec's timeline form
    assert "Cancel run" in run_page.text

    # Logout needs the CSRF token too, then the cookie is worth nothing (the row is gone).
    assert client.post("/ui/logout").status_code == 403
    out = client.post("/ui/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 204 and "Max-Age=0" in out.headers["set-cookie"]
    assert client.get("/ui/runs", headers={"Accept": "text/html"}).status_code == 303
    assert client.get("/patches/runs").status_code == 401


def test_revoking_the_token_ends_its_sessions(app: App, client: httpx.Client) -> None:
    row, operator = app.tokens.create("olga", "operator")
    _login(client, operator)
    assert client.get("/patches/runs").status_code == 200  # the API reads accept the session too
    revoked = client.delete(f"/tokens/{row.id}", headers={"Authorization": f"Bearer {ADMIN}"})
    assert revoked.status_code == 200
    assert client.get("/patches/runs").status_code == 401
    # Revoked by another process (the CLI's way): the same store call, and the keyring's refresh.
    _, other = app.tokens.create("otto", "operator")
    client.cookies.clear()
    _login(client, other)
    app.tokens.revoke("otto")
    wait_for(lambda: client.get("/patches/runs").status_code == 401, timeout=10)
    with app.store.db.read() as conn:
        import sqlalchemy as sa

        from mendloop.storage import schema as t

        assert conn.execute(sa.select(sa.func.count()).select_from(t.dashboard_sessions)).scalar_one() == 0


def test_a_session_is_kept_as_its_digest_and_expires(app: App) -> None:
    secret = app.sessions.create("config:x", seconds=60)
    assert app.sessions.credential_id(secret) == "config:x"
    import sqlalchemy as sa

    from mendloop.storage import schema as t

    with app.store.db.read() as conn:
        (stored,) = conn.execute(sa.select(t.dashboard_sessions.c.digest)).scalars().all()
    assert stored == sessions.digest(secret) and secret not in stored
    app.clock.advance(61)  # type: ignore[attr-defined]
    assert app.sessions.credential_id(secret) is None


def test_intake_and_agent_tokens_cannot_log_in(app: App, client: httpx.Client) -> None:
    for role, repositories in (("intake", []), ("agent", ["*"])):
        _, token = app.tokens.create(f"the-{role}", role, repositories)
        answer = client.post("/ui/login", json={"token": token})
        assert answer.status_code == 403 and f"a {role} token cannot use the dashboard" in answer.text


def test_an_open_server_shows_the_dashboard_without_login(database_url: str, tmp_path: Path) -> None:
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    settings = settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"patchy": "patchy"})
    app = open_app(settings)
    try:
        with api_client(app) as client:
            page = client.get("/", headers={"Accept": "text/html"})
            assert page.status_code == 200 and 'id="trigger-form"' in page.text
            assert "<option>patchy</option>" in page.text  # the known error types
            assert "Log out" not in page.text
            assert "asks for no token" in client.get("/ui/login").text
    finally:
        app.close()


def test_behind_a_prefix_every_url_carries_it(database_url: str, tmp_path: Path) -> None:
    import threading

    import uvicorn

    from mendloop.api.server import create_api
    from tests.support import free_port

    app = open_app(settings_for(database_url, tmp_path))
    port = free_port()
    # What `serve --root-path /mendloop` runs; the proxy strips the prefix, so requests arrive without it.
    server = uvicorn.Server(
        uvicorn.Config(create_api(app, manage=False), port=port, log_level="warning", root_path="/mendloop")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for path in PAGES:
                page = client.get(path)
                assert page.status_code == 200, page.text
                urls = re.findall(r'(?:href|src|action)="([^"]+)"', page.text)
                assert urls and all(u.startswith(("/mendloop/", "#", "?")) for u in urls), urls
                assert 'data-root="/mendloop"' in page.text
            assert client.get("/ui/static/dashboard.css").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
        app.close()


def test_bad_filters_and_unknown_ids_are_4xx_naming_the_field(app: App, client: httpx.Client) -> None:
    h = {"Authorization": f"Bearer {ADMIN}"}
    bad = client.get("/ui/runs", params={"cursor": "garbage"}, headers=h)
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"
    assert client.get("/ui/runs/nope", headers=h).status_code == 404
    assert client.get("/ui/patches/nope", headers=h).status_code == 404
    assert client.get("/ui/runs", params={"component": "x" * 300}, headers=h).status_code == 422
