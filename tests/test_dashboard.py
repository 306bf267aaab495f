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
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    # A token made a moment ago in the store (as by `mendloop tokens create` in another process) is known once
    # the keyring reads the table again (at most every MISS_REFRESH_SECONDS on a miss).
    answers: list[httpx.Response] = []

    def attempt() -> bool:
        answers.append(client.post("/ui/login", content=f"token={token}", headers=form))
        return answers[-1].status_code != 401

    wait_for(attempt, timeout=5)
    answer = answers[-1]
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
        wait_for(lambda t=token: client.post("/ui/login", json={"token": t}).status_code != 401, timeout=5)
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


def _posts(html: str) -> dict[str, str]:
    """The action buttons of a page: their label -> the API path they POST to."""
    return {label.strip(): path for path, label in re.findall(r'data-post="([^"]+)"[^>]*>([^<]+)</button>', html)}


def test_a_patch_page_shows_its_components_pause(app: App, client: httpx.Client) -> None:
    h = {"Authorization": f"Bearer {ADMIN}"}
    body = {"description": "d", "error_type": "patchy", "component": "svc", "wait_seconds": 5}
    wo_id = client.post("/patches/trigger", json=body, headers=h).json()["work_order_id"]
    assert wo_id
    assert "(paused:" not in client.get(f"/ui/patches/{wo_id}", headers=h).text
    assert client.post("/pause", json={"component": "svc", "reason": "db <migration>"}, headers=h).status_code == 200
    page = client.get(f"/ui/patches/{wo_id}", headers=h).text
    assert "(paused: db &lt;migration&gt;)" in page  # the operator's words, escaped


def test_each_action_button_posts_to_the_api_route_the_cli_uses(app: App, client: httpx.Client) -> None:
    """The buttons an operator gets, pressed as the page's script does (the session cookie and its CSRF token):
    cancel, retry from a step, reject a held patch, resolve an incident."""
    _, operator = app.tokens.create("olga", "operator")
    csrf = _login(client, operator)
    h = {"X-CSRF-Token": csrf}
    body = {"description": "d", "error_type": "patchy", "wait_seconds": 5}
    run_id = client.post("/patches/trigger", json=body, headers=h).json()["run_id"]
    buttons = _posts(client.get(f"/ui/runs/{run_id}").text)
    assert buttons == {"Cancel run": f"/patches/runs/{run_id}/cancel"}
    assert client.post(buttons["Cancel run"], json={}, headers=h).status_code == 200
    page = client.get(f"/ui/runs/{run_id}").text
    assert "Cancel run" not in page and f'data-retry="/patches/runs/{run_id}/retry"' in page
    retried = client.post(f"/patches/runs/{run_id}/retry", json={"from_step": "escalate"}, headers=h)
    assert retried.status_code == 200, retried.text
    new_run = retried.json()["run_id"]
    wait_for(lambda: app.store.run_status(new_run).value == "awaiting_patch")

    # A patch held for approval: approve and reject on its page.
    wo_id = app.store.get_run(new_run).coding_work_order_id
    done = client.post(
        f"/patches/work-orders/{wo_id}/complete",
        json={"tests_passed": True, "files_changed": 1, "approval_required": True},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert done.status_code == 200, done.text
    buttons = _posts(client.get(f"/ui/patches/{wo_id}").text)
    assert set(buttons) == {"Approve patch", "Reject patch"}
    assert client.post(buttons["Reject patch"], json={"reason": "no"}, headers=h).status_code == 200
    assert app.store.get_work_order(wo_id).status.value in ("failed", "cancelled")
    # Refused by the API: the page's script shows this body's words.
    again = client.post(buttons["Approve patch"], headers=h)
    assert again.status_code == 409 and again.json()["detail"]

    # An incident from POST /events, resolved from its row.
    event = {
        "event_type": "app.error",
        "component": "svc",
        "message": "boom",
        "payload": {"error_type": "nothing_routed"},
    }
    assert client.post("/events", json=event, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 202
    buttons = _posts(client.get("/ui/incidents").text)
    assert list(buttons) == ["Resolve"]
    assert client.post(buttons["Resolve"], headers=h).status_code == 200
    assert "Resolve</button>" not in client.get("/ui/incidents").text


def test_the_runs_tab_filters_and_pages_by_cursor(app: App, client: httpx.Client) -> None:
    for i in range(30):
        app.remediation.trigger(error_type="patchy", description=f"r{i}", component="a" if i % 3 else "b")
    h = {"Authorization": f"Bearer {ADMIN}"}
    first = client.get("/ui/runs", headers=h).text
    assert first.count("<tr data-run=") == 25 and "older ones on the next" in first
    cursor = re.search(r'href="\?cursor=([^"]+)"', first)
    assert cursor
    second = client.get(f"/ui/runs?cursor={cursor.group(1)}", headers=h).text
    assert second.count("<tr data-run=") == 5
    ids = set(re.findall(r'<tr data-run="([^"]+)"', first)) | set(re.findall(r'<tr data-run="([^"]+)"', second))
    assert len(ids) == 30
    only_b = client.get("/ui/runs", params={"component": "b"}, headers=h).text
    assert "matching the filters" in only_b and only_b.count("<tr data-run=") == 10
    assert "No run matches" in client.get("/ui/runs", params={"playbook": "other"}, headers=h).text
    # The API's list takes the same filters.
    listed = client.get("/patches/runs", params={"component": "b", "playbook_id": "patchy"}, headers=h).json()
    assert listed["total"] == 10


def test_a_rejected_patch_shows_the_safety_finding_and_a_highlighted_diff(database_url: str, tmp_path: Path) -> None:
    """A real git repository behind the target: the run's patch pipeline refuses a diff that edits CI config, and
    the work order's page says why, next to the diff highlighted by Pygments."""
    from tests.support import git

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text("x = 1\n")
    git(repo, "add", "app.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"patchy": "patchy"},
        targets={"svc": {"repository": str(repo)}},
        default_target="svc",
    )
    app = open_app(settings, start_workers=True)
    diff = (
        "diff --git a/.github/workflows/ci.yml b/.github/workflows/ci.yml\nnew file mode 100644\n"
        "--- /dev/null\n+++ b/.github/workflows/ci.yml\n@@ -0,0 +1 @@\n+on: push\n"
    )
    try:
        with api_client(app) as client:
            run_id = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy"}).json()["run_id"]
            wo_id = app.store.get_run(run_id).coding_work_order_id
            done = client.post(
                f"/patches/work-orders/{wo_id}/complete", json={"tests_passed": True, "files_changed": 1, "diff": diff}
            )
            assert done.status_code == 200, done.text
            wait_for(lambda: app.store.get_work_order(wo_id).status.value == "failed")
            page = client.get(f"/ui/patches/{wo_id}").text
            finding = re.search(r'data-testid="safety-finding"><strong>([^<]+)</strong>: ([^<]+)</p>', page)
            assert finding and finding.group(1) == "unsafe_patch" and ".github" in finding.group(2), page
            assert '<span class="gi">+on: push' in page
            assert "<script" not in page.split('id="diff-title"')[1].split("</section>")[0]
    finally:
        app.close()


def test_hostile_text_is_escaped_everywhere_it_is_shown(app: App, client: httpx.Client) -> None:
    """Event data, descriptions and diffs are data: never markup on the page (agents and senders are hostile)."""
    from mendloop.dashboard.render import highlight_diff

    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    assert "<script>" not in highlight_diff(f"--- a/f\n+++ b/f\n@@ -1 +1 @@\n-{evil}\n+{evil}\n")
    h = {"Authorization": f"Bearer {ADMIN}"}
    run = client.post(
        "/patches/trigger", json={"description": evil, "error_type": "patchy", "component": evil}, headers=h
    ).json()
    for path in ("/", "/ui/runs", f"/ui/runs/{run['run_id']}", f"/ui/patches/{run['work_order_id']}", "/ui/patches"):
        page = client.get(path, headers=h).text
        assert "<script>alert" not in page and "<img src=x" not in page, path
    assert "&lt;script&gt;alert" in client.get(f"/ui/runs/{run['run_id']}", headers=h).text


def test_an_open_event_stream_ends_with_its_session(app: App) -> None:
    """EventSource with the session cookie: the stream is let in, and it ends when the session is logged out or
    its token revoked (from another process: the store call `mendloop tokens revoke` makes)."""
    import threading

    from tests.support import api_server, free_port

    _, operator = app.tokens.create("olga", "operator")
    with api_server(app, free_port()) as client:
        for how in ("logout", "revoke"):
            csrf = _login(client, operator)
            connected, ended = threading.Event(), threading.Event()

            def read(connected: threading.Event = connected, ended: threading.Event = ended) -> None:
                with client.stream("GET", "/events/stream", headers={"Accept": "text/event-stream"}) as streamed:
                    assert streamed.status_code == 200
                    connected.set()
                    for _ in streamed.iter_lines():
                        pass
                ended.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert connected.wait(10) and not ended.is_set()
            if how == "logout":
                assert client.post("/ui/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
            else:
                app.tokens.revoke("olga")
            assert ended.wait(10), f"the stream outlived the {how}"
            reader.join(5)


def test_the_cookie_is_secure_over_https(app: App, client: httpx.Client) -> None:
    _, viewer = app.tokens.create("vic", "viewer")
    answer = client.post("https://mendloop.test/ui/login", json={"token": viewer})
    assert answer.status_code == 303 and "; Secure" in answer.headers["set-cookie"]
