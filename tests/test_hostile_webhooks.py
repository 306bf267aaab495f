"""Hostile webhooks (issue 8, item 13): a signed body replayed, re-dated, tampered with or signed with the wrong key.

The scheme is `X-Mendloop-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`. A signature is
accepted within `webhook_tolerance_seconds` (5 minutes) of the server's clock, either way; one seen before gets the
first answer again (`Idempotent-Replayed: true`) and stores nothing. Every case below checks the status, the JSON
body naming the header (or its part), and that the database holds exactly what it held before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.api.routes import events as events_route
from mendloop.app import App
from mendloop.storage import schema as t
from mendloop.testing import FakeClock
from tests.support import open_app, settings_for, write_playbooks

SECRET = "hook-secret-for-tests-0001"
HEADER = "X-Mendloop-Signature"

SINGLE = {"event_type": "app.error", "payload": {"error_type": "quick"}, "message": "checkout failed: boom"}
BATCH = {"events": [{**SINGLE, "message": f"job {i} failed"} for i in range(3)]}
ALERTS = {
    "version": "4",
    "status": "firing",
    "alerts": [
        {"status": "firing", "labels": {"alertname": "HighErrorRate", "service": "api"}, "annotations": {}},
        {"status": "firing", "labels": {"alertname": "HighErrorRate", "service": "db"}, "annotations": {}},
    ],
}
# (path, body): every door that takes a signed webhook, and each shape /events takes.
BODIES = {
    "single": ("/events", SINGLE),
    "batch": ("/events", BATCH),
    "records": ("/events", [{"log": "ERROR: Pipeline timeout after 300 seconds", "host": "web-1"}]),
    "alertmanager": ("/events/alertmanager", ALERTS),
}


def _mac(secret: str, ts: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()


def signed(body: bytes, ts: int, secret: str = SECRET) -> dict[str, str]:
    return {HEADER: f"t={ts},v1={_mac(secret, ts, body)}", "Content-Type": "application/json"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(database_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[App]:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "quick",
            "type": "retry",
            "description": "ok",
            "steps": [{"id": "nap", "action": "sleep", "with": {"seconds": 0}}],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"quick": "quick", "HighErrorRate": "quick"},
        webhook_hmac_secret=SECRET,
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
    )
    a = open_app(settings, clock=clock)  # no workers: runs stay queued, so every row counted is the request's
    yield a
    a.close()


def counts(app: App) -> dict[str, int]:
    """Rows of every table a webhook writes to."""
    with app.store.db.read() as conn:
        return {
            table.name: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
            for table in (t.events, t.incidents, t.runs, t.idempotency)
        }


def now(clock: FakeClock) -> int:
    return int(clock())


# -- replays and honest retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(BODIES))
def test_a_signed_body_sent_three_times_is_stored_once(
    client: httpx.Client, app: App, clock: FakeClock, shape: str
) -> None:
    path, doc = BODIES[shape]
    body = json.dumps(doc).encode()
    headers = signed(body, now(clock))
    before = counts(app)
    first = client.post(path, content=body, headers=headers)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    after_first = counts(app)
    # Two alerts of different label sets are two incidents with a run each; every other shape is one error.
    runs = 2 if shape == "alertmanager" else 1
    assert after_first["events"] > before["events"] and after_first["runs"] == before["runs"] + runs
    for _ in range(2):
        clock.advance(30)
        again = client.post(path, content=body, headers=headers)
        assert again.status_code == 202, again.text
        assert again.json() == first.json()  # the stored answer: same event, incident and run ids
        assert again.headers["idempotent-replayed"] == "true"
        assert counts(app) == after_first  # nothing new stored, not even a second claim


def test_an_honest_retry_gets_the_stored_answer(client: httpx.Client, app: App, clock: FakeClock) -> None:
    # The sender lost the first answer (a timeout) and sends the same signed request again, minutes later.
    body = json.dumps(SINGLE).encode()
    headers = signed(body, now(clock))
    first = client.post("/events", content=body, headers=headers)
    assert first.status_code == 202 and first.json()["run_id"]
    stored = counts(app)
    clock.advance(299)
    retry = client.post("/events", content=body, headers=headers)
    assert retry.status_code == 202 and retry.json() == first.json()
    assert counts(app) == stored
    # The same event sent again on purpose is a new request: signed anew, it is a new event on the same incident.
    fresh = client.post("/events", content=body, headers=signed(body, now(clock)))
    assert fresh.status_code == 202 and fresh.json()["event_id"] != first.json()["event_id"]
    assert fresh.json()["incident_id"] == first.json()["incident_id"]
    assert counts(app)["events"] > stored["events"]


def test_a_replay_after_the_window_is_refused(client: httpx.Client, app: App, clock: FakeClock) -> None:
    body = json.dumps(SINGLE).encode()
    headers = signed(body, now(clock))
    assert client.post("/events", content=body, headers=headers).status_code == 202
    stored = counts(app)
    clock.advance(301)
    r = client.post("/events", content=body, headers=headers)
    assert r.status_code == 401 and r.json()["field"] == f"{HEADER}.t", r.text
    assert counts(app) == stored


def test_concurrent_copies_store_one_set(client: httpx.Client, app: App, clock: FakeClock) -> None:
    body = json.dumps(BATCH).encode()
    headers = signed(body, now(clock))
    before = counts(app)
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def post() -> None:
        start.wait()
        r = client.post("/events", content=body, headers=headers)
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(answers) == 8
    assert {r.status_code for r in answers} == {202}, [r.text for r in answers]
    assert len({json.dumps(r.json(), sort_keys=True) for r in answers}) == 1
    after = counts(app)
    assert after["runs"] == before["runs"] + 1
    assert len(app.store.recent_events(event_type="app.error", limit=100)) == 3
    assert after["idempotency"] == before["idempotency"] + 1
    # A ninth copy, once all are done, changes nothing either.
    assert client.post("/events", content=body, headers=headers).json() == answers[0].json()
    assert counts(app) == after


def test_a_signature_is_not_spent_by_a_request_that_stored_nothing(
    client: httpx.Client, app: App, clock: FakeClock
) -> None:
    # An invalid body is refused before anything is claimed: the same signed request is refused the same way again.
    body = json.dumps({"events": "not a list"}).encode()
    headers = signed(body, now(clock))
    before = counts(app)
    for _ in range(2):
        r = client.post("/events", content=body, headers=headers)
        assert r.status_code == 422 and r.json()["field"] == "events"
    assert counts(app) == before


def test_a_signature_used_on_one_door_is_refused_on_the_other(client: httpx.Client, app: App, clock: FakeClock) -> None:
    body = json.dumps(ALERTS).encode()
    headers = signed(body, now(clock))
    assert client.post("/events/alertmanager", content=body, headers=headers).status_code == 202
    stored = counts(app)
    r = client.post("/events", content=body, headers=headers)
    assert r.status_code == 401 and r.json()["field"] == HEADER, r.text
    assert counts(app) == stored


def test_expired_claims_are_pruned(
    client: httpx.Client, app: App, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = json.dumps(SINGLE).encode()
    assert client.post("/events", content=old, headers=signed(old, now(clock))).status_code == 202
    assert counts(app)["idempotency"] == 1
    clock.advance(2 * 300 + 61)
    monkeypatch.setattr(events_route, "_pruned_at", {})  # as if the last prune was a minute ago
    new = json.dumps({**SINGLE, "message": "another"}).encode()
    assert client.post("/events", content=new, headers=signed(new, now(clock))).status_code == 202
    with app.store.db.read() as conn:
        keys = conn.execute(sa.select(t.idempotency.c.key)).scalars().all()
    assert keys == [_mac(SECRET, now(clock), new)]


# -- the hostile table ---------------------------------------------------------------------------------------------

# name -> (build the headers from (body, now), the field the answer names)
Headers = Callable[[bytes, int], dict[str, str]]
_REFUSED: dict[str, tuple[Headers, str]] = {
    "stale by one second": (lambda b, n: signed(b, n - 301), f"{HEADER}.t"),
    "stale by a day": (lambda b, n: signed(b, n - 86_400), f"{HEADER}.t"),
    "stale: the epoch": (lambda b, n: signed(b, 0), f"{HEADER}.t"),
    "future by one second": (lambda b, n: signed(b, n + 301), f"{HEADER}.t"),
    "future by a year": (lambda b, n: signed(b, n + 31_536_000), f"{HEADER}.t"),
    "tampered body: one byte": (
        lambda b, n: signed(b.replace(b"boom", b"bomb").replace(b"db", b"dc"), n),
        f"{HEADER}.v1",
    ),
    "tampered body: trailing space": (lambda b, n: signed(b + b" ", n), f"{HEADER}.v1"),
    "tampered body: empty": (lambda b, n: signed(b"", n), f"{HEADER}.v1"),
    "tampered timestamp: re-dated": (
        lambda b, n: {HEADER: f"t={n},v1={_mac(SECRET, n - 600, b)}"},
        f"{HEADER}.v1",
    ),
    "tampered timestamp: +1": (lambda b, n: {HEADER: f"t={n + 1},v1={_mac(SECRET, n, b)}"}, f"{HEADER}.v1"),
    "tampered timestamp: fraction": (lambda b, n: {HEADER: f"t={n}.0,v1={_mac(SECRET, n, b)}"}, f"{HEADER}.t"),
    "tampered timestamp: two of them": (
        lambda b, n: {HEADER: f"t={n - 900},t={n},v1={_mac(SECRET, n, b)}"},
        f"{HEADER}.t",
    ),
    "missing headers": (lambda b, n: {}, HEADER),
    "empty header": (lambda b, n: {HEADER: ""}, HEADER),
    "missing timestamp": (lambda b, n: {HEADER: f"v1={_mac(SECRET, n, b)}"}, f"{HEADER}.t"),
    "missing signature": (lambda b, n: {HEADER: f"t={n}"}, f"{HEADER}.v1"),
    "old body-only form": (
        lambda b, n: {HEADER: "sha256=" + hmac.new(SECRET.encode(), b, hashlib.sha256).hexdigest()},
        HEADER,
    ),
    "wrong secret": (lambda b, n: signed(b, n, "another-secret-entirely"), f"{HEADER}.v1"),
    "empty secret": (lambda b, n: signed(b, n, ""), f"{HEADER}.v1"),
    "signature of another scheme": (lambda b, n: {HEADER: f"t={n},v0={_mac(SECRET, n, b)}"}, f"{HEADER}.v1"),
    "not hex": (lambda b, n: {HEADER: f"t={n},v1=" + "zz" * 32}, f"{HEADER}.v1"),
    "a bearer token that is not one": (lambda b, n: {"Authorization": "Bearer " + SECRET}, "Authorization"),
}


@pytest.mark.parametrize("door", ["single", "alertmanager"])
@pytest.mark.parametrize("case", list(_REFUSED))
def test_hostile_signatures_are_refused_and_store_nothing(
    client: httpx.Client, app: App, clock: FakeClock, case: str, door: str
) -> None:
    path, doc = BODIES[door]
    body = json.dumps(doc).encode()
    make, field = _REFUSED[case]
    before = counts(app)
    r = client.post(path, content=body, headers={"Content-Type": "application/json", **make(body, now(clock))})
    assert r.status_code == 401, r.text
    answer: dict[str, Any] = r.json()
    assert answer["field"] == field, answer
    assert answer["errors"][0]["field"] == field and answer["detail"]
    assert counts(app) == before
    # The honest request with the same body still goes through: nothing was spent by the hostile one.
    assert client.post(path, content=body, headers=signed(body, now(clock))).status_code == 202


def test_a_replayed_signature_on_a_tampered_copy_is_refused(client: httpx.Client, app: App, clock: FakeClock) -> None:
    body = json.dumps(SINGLE).encode()
    headers = signed(body, now(clock))
    assert client.post("/events", content=body, headers=headers).status_code == 202
    stored = counts(app)
    for tampered in (body + b"\n", body.replace(b"boom", b"BOOM"), json.dumps({**SINGLE, "event_id": "x"}).encode()):
        r = client.post("/events", content=tampered, headers=headers)
        assert r.status_code == 401 and r.json()["field"] == f"{HEADER}.v1", r.text
    assert counts(app) == stored
