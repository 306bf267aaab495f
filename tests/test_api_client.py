"""The one client of mendloop's own API (`infra/api_client.py`) against a real server on 127.0.0.1: the pull API's
façade, and every HTTP problem mapped to its mendloop error."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mendloop.app import App
from mendloop.errors import AuthError, Conflict, InputError, MendloopError, NotFound
from mendloop.infra.api_client import AgentClient, ApiClient, Claim
from tests.support import api_server, open_app, settings_for, write_playbooks

TOKEN = "s3cret-token-for-tests"
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
def server(tmp_path: Path, free_port: int) -> Iterator[str]:
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    settings = settings_for(
        f"sqlite:///{tmp_path / 'm.db'}",
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"patchy": "patchy"},
        api_tokens=[TOKEN],
    )
    app: App = open_app(settings, start_workers=True)
    try:
        with api_server(app, free_port):
            yield f"http://127.0.0.1:{free_port}"
    finally:
        app.close()


@pytest.fixture
def api(server: str) -> Iterator[ApiClient]:
    with ApiClient(server, TOKEN, timeout=10) as client:
        yield client


def _escalate(api: ApiClient) -> dict[str, Any]:
    body: dict[str, Any] = api.post("/patches/trigger", {"description": "d", "error_type": "patchy"})
    assert body["escalated_to_coding"] is True
    return body


def test_answers_and_the_pull_api_facade(server: str, api: ApiClient) -> None:
    assert api.get("/health")["status"] == "ok"
    with AgentClient(server, TOKEN, timeout=10) as agent:
        assert agent.claim("a1") is None  # 204: no work
        run = _escalate(api)
        claim = agent.claim("a1", wait_seconds=0)
        assert isinstance(claim, Claim) and claim.work_order_id == run["work_order_id"]
        assert claim.context == claim.work_order["context"] and claim.heartbeat_interval_seconds > 0
        beat = agent.heartbeat(claim.work_order_id, claim.lease_id, "reading")
        assert beat.cancel_requested is False and beat.lease_expires_at
        with pytest.raises(Conflict) as stale:
            agent.heartbeat(claim.work_order_id, "not-the-lease")
        assert stale.value.fields["status"] == 409 and "409" in stale.value.message
        body = {"tests_passed": True, "files_changed": 1, "lease_id": claim.lease_id}
        done = agent.complete(claim.work_order_id, body, idempotency_key="k")
        assert done["status"] == "completed" and done["work_order_id"] == claim.work_order_id
        assert agent.complete(claim.work_order_id, body, idempotency_key="k") == done
        with pytest.raises(ValueError, match="unknown fail reason"):
            agent.fail(claim.work_order_id, lease_id=claim.lease_id, reason="bored", retryable=False)


def test_http_problems_become_mendloop_errors(server: str, api: ApiClient) -> None:
    with pytest.raises(NotFound) as missing:
        api.get("/patches/runs/run_nope")
    assert missing.value.fields["status"] == 404
    assert missing.value.message == "GET /patches/runs/run_nope: 404: run 'run_nope' not found"

    with pytest.raises(InputError) as invalid:
        api.post("/patches/trigger", {"description": "d"})
    assert invalid.value.field == "error_type" and invalid.value.fields["status"] == 422
    with pytest.raises(InputError) as unknown:
        api.post("/patches/trigger", {"description": "d", "error_type": "nope"})
    assert unknown.value.field == "error_type" and "known" in unknown.value.message

    run = _escalate(api)
    api.post(f"/patches/runs/{run['run_id']}/cancel", {})
    with pytest.raises(Conflict) as conflict:
        api.post(f"/patches/work-orders/{run['work_order_id']}/complete", {"tests_passed": True})
    assert "cancelled" in str(conflict.value.fields["detail"])

    for token in (None, "wrong", f"{TOKEN}x"):
        with ApiClient(server, token) as other, pytest.raises(AuthError) as denied:
            other.get("/patches/runs")
        assert denied.value.fields["status"] == 401 and "MENDLOOP_TOKEN" in denied.value.message
    with ApiClient(server, None) as anonymous:
        assert anonymous.get("/health")["status"] == "ok"  # public


class _Broken(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"  upstream is down\n")

    def log_message(self, *_: Any) -> None:
        pass


def test_server_errors_and_unreachable_servers(free_port: int) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with ApiClient(f"http://127.0.0.1:{httpd.server_address[1]}") as api, pytest.raises(MendloopError) as down:
            api.get("/anything")
        assert type(down.value) is MendloopError
        assert down.value.message == "GET /anything: 503: upstream is down"
    finally:
        httpd.shutdown()
        thread.join(5)

    with ApiClient(f"http://127.0.0.1:{free_port}", timeout=5) as api, pytest.raises(MendloopError) as refused:
        api.get("/health")
    assert type(refused.value) is MendloopError
    assert refused.value.message.startswith(f"cannot reach mendloop at http://127.0.0.1:{free_port}: ConnectError")
    assert "\n" not in refused.value.message

    with pytest.raises(MendloopError, match=r"not valid|cannot reach"):
        with ApiClient("http://[::1") as api:
            api.get("/health")
