"""Hostile limits (issue 8, item 8): what one request may carry. A body over its size cap is a 413 before it is read
(by its Content-Length, or as a chunked body passes the cap), JSON nested too deep is a 422 before any parser
recurses into it, an over-long string is a 422 naming the field; each answer names the limit and its value, and
nothing is written. The work order's complete endpoint (a diff) and intake (batches) have caps of their own, and
honest large bodies under them are accepted.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.app import App
from mendloop.config import LimitsConfig
from mendloop.domain.bounded import MAX_CONTEXT_DEPTH
from mendloop.domain.records import NewEvent
from tests.support import api_client, api_server, drain, open_app, settings_for, write_playbooks

TABLES = ("events", "runs", "steps", "work_orders", "diffs", "incidents", "idempotency", "trust_history")
DEFAULTS = LimitsConfig()
MB = 1 << 20
WO = "/patches/work-orders/{wo}"


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
    return {"playbook_dirs": [str(tmp_path / "pb")], "routing": {"quick": "quick", "patchy": "patchy"}}


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    a = open_app(settings_for(database_url, tmp_path, **_playbooks(tmp_path)))
    yield a
    a.close()


def _counts(app: App) -> dict[str, int]:
    with app.store.engine.connect() as conn:
        return {t: int(conn.execute(sa.text(f"select count(*) from {t}")).scalar_one()) for t in TABLES}


def _escalated(app: App, client: httpx.Client) -> str:
    """The id of a queued work order (its run parked in awaiting_patch)."""
    r = client.post("/patches/trigger", json={"description": "d", "error_type": "patchy", "wait_seconds": 0})
    assert r.status_code == 200, r.text
    drain(app)
    run = client.get(f"/patches/runs/{r.json()['run_id']}").json()
    assert run["status"] == "awaiting_patch", run
    return str(run["coding_work_order_id"])


def _nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """An object `depth` levels below the one returned (a flat object is 0), built without recursion."""
    doc: Any = leaf
    for _ in range(depth):
        doc = {"a": doc}
    assert isinstance(doc, dict)
    return doc


def _deep_raw(prefix: bytes, depth: int, suffix: bytes) -> bytes:
    """A body with `depth` nested arrays inside it: json.dumps itself can't build 100k levels."""
    return prefix + b"[" * depth + b"]" * depth + suffix


def _trigger(**over: Any) -> dict[str, Any]:
    return {"description": "d", "error_type": "quick", "wait_seconds": 0, **over}


def _event(**over: Any) -> dict[str, Any]:
    return {"event_type": "app.error", "message": "boom", "component": "web", **over}


@dataclass(frozen=True)
class Case:
    path: str
    status: int
    field: str
    limit: str | None  # the setting named in the answer (None: a model's own bound, e.g. context depth)
    raw: Callable[[], bytes]  # built when the case runs: some are tens of megabytes


def _raw(body: Any) -> bytes:
    return json.dumps(body).encode()


BIG = 50 * MB
CASES = {
    # -- size: 413 naming the cap
    "trigger-context-50MB": Case(
        "/patches/trigger", 413, "body", "limits.max_body_bytes", lambda: _raw(_trigger(context={"blob": "x" * BIG}))
    ),
    "event-payload-50MB": Case(
        "/events", 413, "body", "limits.max_intake_body_bytes", lambda: _raw(_event(payload={"blob": "x" * BIG}))
    ),
    "fail-details-2MB": Case(
        f"{WO}/fail",
        413,
        "body",
        "limits.max_body_bytes",
        lambda: _raw({"reason": "agent_error", "details": {"x": "y" * 2 * MB}}),
    ),
    "complete-diff-over-its-cap": Case(
        f"{WO}/complete",
        413,
        "body",
        "limits.max_diff_body_bytes",
        lambda: _raw({"tests_passed": True, "diff": "+" * 33 * MB}),
    ),
    # -- nesting of the whole body: 422 before any parser recurses
    "trigger-context-600-deep": Case(
        "/patches/trigger", 422, "body", "limits.max_json_depth", lambda: _raw(_trigger(context=_nested(600)))
    ),
    "trigger-context-100k-deep": Case(
        "/patches/trigger",
        422,
        "body",
        "limits.max_json_depth",
        lambda: _deep_raw(b'{"description":"d","context":{"x":', 100_000, b"}}"),
    ),
    "trigger-unclosed-100k-deep": Case(
        "/patches/trigger", 422, "body", "limits.max_json_depth", lambda: b'{"context":' + b"[" * 100_000
    ),
    "event-payload-600-deep": Case(
        "/events", 422, "body", "limits.max_json_depth", lambda: _raw(_event(payload=_nested(600)))
    ),
    "event-payload-100k-deep": Case(
        "/events",
        422,
        "body",
        "limits.max_json_depth",
        lambda: _deep_raw(b'{"event_type":"app.error","payload":{"x":', 100_000, b"}}"),
    ),
    "event-batch-100k-deep": Case(
        "/events",
        422,
        "body",
        "limits.max_json_depth",
        lambda: _deep_raw(b'{"events":[{"event_type":"app.error","payload":{"x":', 100_000, b"}}]}"),
    ),
    "records-100k-deep": Case("/events", 422, "body", "limits.max_json_depth", lambda: _deep_raw(b"", 100_000, b"")),
    "ndjson-600-deep": Case(
        "/events",
        422,
        "body",
        "limits.max_json_depth",
        lambda: _raw(_event()) + b"\n" + _raw(_event(payload=_nested(600))),
    ),
    "alertmanager-100k-deep": Case(
        "/events/alertmanager",
        422,
        "body",
        "limits.max_json_depth",
        lambda: _deep_raw(b'{"alerts":[{"labels":', 100_000, b"}]}"),
    ),
    "fail-details-600-deep": Case(
        f"{WO}/fail",
        422,
        "body",
        "limits.max_json_depth",
        lambda: _raw({"reason": "agent_error", "details": _nested(600)}),
    ),
    # -- free-form values: at most MAX_CONTEXT_DEPTH levels, a 422 naming the field
    "trigger-context-40-deep": Case(
        "/patches/trigger", 422, "context", None, lambda: _raw(_trigger(context=_nested(40)))
    ),
    "event-payload-40-deep": Case("/events", 422, "payload", None, lambda: _raw(_event(payload=_nested(40)))),
    "batch-payload-40-deep": Case(
        "/events", 422, "events.1.payload", None, lambda: _raw({"events": [_event(), _event(payload=_nested(40))]})
    ),
    "fail-details-40-deep": Case(
        f"{WO}/fail", 422, "details", None, lambda: _raw({"reason": "agent_error", "details": _nested(40)})
    ),
    # -- strings: a 422 naming the field (and the limit, where no model bounds it)
    "event-payload-long-string": Case(
        "/events",
        422,
        "payload.trace",
        "limits.max_string_chars",
        lambda: _raw(_event(payload={"trace": "t" * (DEFAULTS.max_string_chars + 1)})),
    ),
    "event-payload-long-key": Case(
        "/events",
        422,
        "payload",
        "limits.max_string_chars",
        lambda: _raw(_event(payload={"k" * (DEFAULTS.max_string_chars + 1): 1})),
    ),
    "batch-long-string": Case(
        "/events",
        422,
        "events.1.payload.x.0",
        "limits.max_string_chars",
        lambda: _raw({"events": [_event(), _event(payload={"x": ["s" * (DEFAULTS.max_string_chars + 1)]})]}),
    ),
    "event-message-too-long": Case("/events", 422, "message", None, lambda: _raw(_event(message="m" * 4001))),
    "trigger-description-too-long": Case(
        "/patches/trigger", 422, "description", None, lambda: _raw(_trigger(description="d" * 4001))
    ),
    "complete-agent-name-too-long": Case(
        f"{WO}/complete", 422, "agent.name", None, lambda: _raw({"tests_passed": True, "agent": {"name": "n" * 201}})
    ),
    "complete-lease-id-too-long": Case(
        f"{WO}/complete", 422, "lease_id", None, lambda: _raw({"tests_passed": True, "lease_id": "l" * 65})
    ),
}


def _assert_refused(r: httpx.Response, case: Case, limits: LimitsConfig = DEFAULTS) -> None:
    assert r.status_code == case.status, r.text[:500]
    body = r.json()
    assert body["field"] == case.field, body
    assert case.field in body["detail"] and "Traceback" not in r.text, body
    assert body["errors"][0]["field"] == case.field, body
    if case.limit is not None:
        assert body["limit"] == case.limit, body
        assert body["max"] == getattr(limits, case.limit.removeprefix("limits.")), body
        assert case.limit in body["detail"] and str(body["max"]) in body["detail"], body


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_a_body_over_a_limit_is_refused_naming_it_and_writes_nothing(
    app: App, client: httpx.Client, case: Case
) -> None:
    path = case.path.format(wo=_escalated(app, client)) if "{wo}" in case.path else case.path
    wo_before = client.get(path.rsplit("/", 1)[0]).json() if "{wo}" in case.path else None
    before = _counts(app)
    r = client.post(path, content=case.raw(), headers={"content-type": "application/json"})
    _assert_refused(r, case)
    assert _counts(app) == before
    if wo_before is not None:
        assert client.get(path.rsplit("/", 1)[0]).json() == wo_before
    # The same server keeps answering, its reads included.
    assert client.get("/events/recent", params={"limit": 5}).status_code == 200
    assert client.get("/patches/work-orders", params={"limit": 5}).status_code == 200


def test_configured_limits_are_the_ones_enforced_and_named(database_url: str, tmp_path: Path) -> None:
    limits = {"max_body_bytes": 4096, "max_string_chars": 300, "max_json_depth": 10}
    a = open_app(settings_for(database_url, tmp_path, limits=limits, **_playbooks(tmp_path)))
    configured = LimitsConfig(**limits)
    try:
        with api_client(a) as client:
            before = _counts(a)
            cases = [
                Case(
                    "/patches/trigger",
                    413,
                    "body",
                    "limits.max_body_bytes",
                    lambda: _raw(_trigger(context={"x": "y" * 5000})),
                ),
                Case(
                    "/patches/trigger",
                    422,
                    "context.note",
                    "limits.max_string_chars",
                    lambda: _raw(_trigger(context={"note": "n" * 301})),
                ),
                Case(
                    "/patches/trigger",
                    422,
                    "body",
                    "limits.max_json_depth",
                    lambda: _raw(_trigger(context=_nested(10))),
                ),
            ]
            for case in cases:
                r = client.post(case.path, content=case.raw(), headers={"content-type": "application/json"})
                _assert_refused(r, case, configured)
            assert _counts(a) == before
            # Just inside each limit: accepted.
            r = client.post("/patches/trigger", json=_trigger(context={"note": "n" * 300, "deep": _nested(7)}))
            assert r.status_code == 200, r.text
    finally:
        a.close()


def _http(port: int, head: bytes, body_parts: Iterator[bytes]) -> tuple[int, dict[str, Any]]:
    """A raw HTTP/1.1 request: the server may answer before the client has sent its body."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                sock.sendall(part)
        except OSError:
            pass  # the server answered and closed: the rest was never read
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def test_a_declared_50MB_body_is_refused_before_it_is_read(app: App, free_port: int) -> None:
    with api_server(app, free_port):
        before = _counts(app)
        head = (
            b"POST /patches/trigger HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {BIG}\r\n\r\n".encode()
        )
        # Only 1 KB of the declared 50 MB is ever sent: the answer can't have waited for the body.
        status, body = _http(free_port, head, iter([b'{"context": {"x": "' + b"x" * 1000]))
        assert status == 413, body
        assert body["limit"] == "limits.max_body_bytes" and body["max"] == DEFAULTS.max_body_bytes, body
        assert str(BIG) in body["detail"], body
        assert _counts(app) == before


def test_a_chunked_body_over_the_cap_is_refused_as_it_streams(app: App, free_port: int) -> None:
    with api_server(app, free_port):
        before = _counts(app)
        head = (
            b"POST /patches/trigger HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        def chunks() -> Iterator[bytes]:
            piece = b"x" * 65536
            first = b'{"description": "d", "error_type": "quick", "context": {"x": "'
            yield b"%x\r\n%s\r\n" % (len(first), first)
            for _ in range(3 * DEFAULTS.max_body_bytes // len(piece)):  # 3 MB, never finished
                yield b"%x\r\n%s\r\n" % (len(piece), piece)

        status, body = _http(free_port, head, chunks())
        assert status == 413, body
        assert body["limit"] == "limits.max_body_bytes" and body["max"] == DEFAULTS.max_body_bytes, body
        assert body["field"] == "body" and "limits.max_body_bytes" in body["detail"], body
        assert _counts(app) == before


def test_honest_large_bodies_under_their_caps_are_accepted(app: App, client: httpx.Client) -> None:
    # A forwarder's full batch: 10,000 events, well over the general 1 MiB cap, under the intake cap.
    events = [
        _event(
            message=f"worker {i} crashed while saving job {i}: " + "detail " * 20,
            event_id=f"honest-{i}",
            payload={"job": i, "host": "web-1"},
        )
        for i in range(10_000)
    ]
    raw = _raw({"events": events})
    assert DEFAULTS.max_body_bytes < len(raw) < DEFAULTS.max_intake_body_bytes
    r = client.post("/events", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 202, r.text[:500]
    assert r.json()["accepted"] == 10_000
    # One event with a long (500 KB) traceback: under the string cap.
    r = client.post("/events", json=_event(payload={"traceback": "  File x.py, line 1\n" * 25_000}))
    assert r.status_code == 202, r.text[:500]
    # A trigger context as deep as the engine takes it, close to the general cap.
    context = {"deep": _nested(MAX_CONTEXT_DEPTH - 1), "blob": "b" * (DEFAULTS.max_body_bytes - 4096)}
    r = client.post("/patches/trigger", json=_trigger(context=context))
    assert r.status_code == 200, r.text[:500]
    # A 3 MB diff: over the general cap and the string cap, under the diff endpoint's own.
    wo = _escalated(app, client)
    diff = "diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n" + "+line\n" * 500_000
    r = client.post(f"/patches/work-orders/{wo}/complete", json={"tests_passed": True, "diff": diff})
    assert r.status_code == 200, r.text[:500]


def test_the_deepest_allowed_values_read_back_on_every_read_endpoint(app: App, client: httpx.Client) -> None:
    """What intake lets in can always be answered: the deepest payload and context read back as 200."""
    r = client.post("/events", json=_event(payload=_nested(MAX_CONTEXT_DEPTH - 1)))
    assert r.status_code == 202, r.text
    r = client.post("/patches/trigger", json=_trigger(error_type="patchy", context=_nested(MAX_CONTEXT_DEPTH - 1)))
    assert r.status_code == 200, r.text
    drain(app)
    for limit in (1, 5, 50, 1000):
        assert client.get("/events/recent", params={"limit": limit}).status_code == 200
    assert client.get("/patches/work-orders", params={"limit": 5}).status_code == 200
    assert client.get(f"/patches/runs/{r.json()['run_id']}").status_code == 200


def test_a_deep_row_stored_before_the_caps_still_reads_back(app: App, client: httpx.Client) -> None:
    """A row written before these limits (or by another writer) is answered cut, never as a 500."""
    deep = _nested(600)
    app.store.publish([NewEvent(type="legacy.deep", message="old row", payload=deep)])
    run, _ = app.store.create_run(
        playbook={"id": "patchy", "type": "code_patch", "steps": []},
        playbook_version="1",
        component=None,
        error_type="patchy",
        description="old run",
        context={"deep": deep},
        trigger=None,
        message="old",
    )
    for limit in (1, 50):
        r = client.get("/events/recent", params={"limit": limit})
        assert r.status_code == 200, r.text
    (answered,) = [e for e in client.get("/events/recent").json()["events"] if e["event_type"] == "legacy.deep"]
    text = json.dumps(answered["payload"])
    assert "cut: nested deeper than 48 levels" in text
    detail = client.get(f"/patches/runs/{run.id}")
    assert detail.status_code == 200, detail.text
    assert "cut: nested deeper than 48 levels" in json.dumps(detail.json())
