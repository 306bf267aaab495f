"""Keyset pages on every list of the API: walking by `next_cursor` gives each item once, in the list's order (ties
on the sort key included), the same items as the spec's `offset` pages; a bad cursor is a 422 naming `cursor`."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.app import App
from mendloop.domain.records import NewEvent
from mendloop.storage import schema as t
from mendloop.testing import FakeClock
from tests.support import api_client, open_app, settings_for, write_playbooks

# Each list: its path, the key of its items in the answer, the item's id field, the filters to walk it with.
LISTS = [
    ("/patches/runs", "runs", "run_id", [{}, {"status": "queued"}, {"status": "cancelled"}]),
    ("/patches/work-orders", "work_orders", "work_order_id", [{}, {"status": "queued"}]),
    ("/incidents", "incidents", "incident_id", [{}, {"status": "open"}, {"error_type": "e1"}]),
    ("/events/recent", "events", "id", [{}, {"event_type": "t.tick"}, {"since": 0}]),
]
PLAYBOOK = {
    "id": "pb",
    "type": "retry",
    "description": "d",
    "steps": [{"id": "a", "action": "sleep", "with": {"seconds": 0}}],
}


@pytest.fixture
def seeded(database_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    clock = FakeClock()
    write_playbooks(tmp_path / "pb", PLAYBOOK)
    app = open_app(settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")]), clock=clock)
    try:
        _seed(app, clock)
        with api_client(app) as client:
            yield client
    finally:
        app.close()


_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()


def _seed(app: App, clock: FakeClock) -> None:
    """Runs, work orders, incidents and events, several of each created at the same instant (ties on the sort key)."""
    for i in range(23):
        if i % 4 == 0:
            clock.advance(1)
        run, _ = app.store.create_run(
            playbook=PLAYBOOK,
            playbook_version="1",
            component="svc",
            error_type="e",
            description="d",
            context={},
            trigger=NewEvent(type="t.tick", message=f"tick {i}"),
            message="Running playbook: pb",
        )
        if i % 3 == 0:
            app.store.cancel_run(run.id, "test")
    for i in range(11):
        app.store.publish([NewEvent(type="t.tock", message=f"tock {i}")])
    for i in range(14):
        if i % 5 == 0:
            clock.advance(1)
        app.intake.ingest(
            [
                app.intake.from_event(
                    event_type="app.exception",
                    payload={"error_type": f"e{i % 2}", "message": f"module {_WORDS[i]} broke"},
                    source="test",
                    message=f"module {_WORDS[i]} broke",
                )
            ]
        )
    with app.store.db.write() as tx:
        for i in range(9):
            tx.conn.execute(
                t.work_orders.insert().values(
                    id=f"wo_test_{i:04d}",
                    type="self_healing_patch",
                    description="d",
                    context={},
                    status="queued" if i % 2 else "completed",
                    estimated_complexity="medium",
                    priority="normal",
                    created_at=1000.0 + i // 3,  # three at each instant
                    updated_at=1000.0,
                    attempts=0,
                )
            )


def _walk(client: httpx.Client, path: str, key: str, params: dict[str, Any], **paging: Any) -> list[Any]:
    pages: list[list[Any]] = []
    query: dict[str, Any] = {**params, "limit": 4}
    for _ in range(100):
        r = client.get(path, params={**query, **paging})
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body[key])
        if "cursor" in paging or "offset" not in paging:
            if body["next_cursor"] is None:
                break
            paging = {"cursor": body["next_cursor"]}
        else:
            if not body[key]:
                break
            paging = {"offset": paging["offset"] + 4}
    return [item for page in pages for item in page]


@pytest.mark.parametrize(("path", "key", "id_field", "filters"), LISTS, ids=[p for p, *_ in LISTS])
def test_cursor_pages_give_every_item_once_in_order(
    seeded: httpx.Client, path: str, key: str, id_field: str, filters: list[dict[str, Any]]
) -> None:
    for params in filters:
        everything = seeded.get(path, params={**params, "limit": 500}).json()
        assert everything["next_cursor"] is None
        expected = [item[id_field] for item in everything[key]]
        assert len(expected) >= 3, (path, params)  # enough for several pages of 4... or at least one full one
        by_cursor = [item[id_field] for item in _walk(seeded, path, key, params)]
        by_offset = [item[id_field] for item in _walk(seeded, path, key, params, offset=0)]
        assert by_cursor == expected, (path, params)
        assert by_offset == expected, (path, params)
        assert len(set(by_cursor)) == len(by_cursor)


def test_lists_are_in_their_documented_order(seeded: httpx.Client) -> None:
    runs = seeded.get("/patches/runs", params={"limit": 500}).json()["runs"]
    assert [(r["created_at"], r["run_id"]) for r in runs] == sorted(
        ((r["created_at"], r["run_id"]) for r in runs), reverse=True
    )
    events = seeded.get("/events/recent", params={"limit": 500}).json()["events"]
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)


def test_an_item_created_after_a_page_does_not_shift_the_next(seeded: httpx.Client) -> None:
    first = seeded.get("/events/recent", params={"limit": 5}).json()
    seeded.post("/events", json={"event_type": "t.late", "payload": {}})
    second = seeded.get("/events/recent", params={"limit": 5, "cursor": first["next_cursor"]}).json()
    assert second["events"][0]["id"] == first["events"][-1]["id"] - 1


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "%%%",
        _b64(["work_orders", 1.0, "wo_1"]),  # another list's
        _b64(["runs", "yesterday", "run_1"]),  # a key of the wrong type
        _b64(["runs", 1.0]),
        _b64({"runs": 1}),
        _b64(["runs", True, "run_1"]),
        base64.urlsafe_b64encode(b'["runs", NaN, "run_1"]').decode(),
        _b64(["runs", 1.0, "r" * 300]),
        base64.urlsafe_b64encode(b'["runs", 1.0, "\\ud800"]').decode(),  # a lone surrogate: no database stores it
        _b64(["runs", 1.0, "run\x00_1"]),  # a NUL: PostgreSQL refuses it
        "x" * 501,
    ],
)
def test_a_bad_cursor_is_a_422_naming_cursor(seeded: httpx.Client, cursor: str) -> None:
    r = seeded.get("/patches/runs", params={"cursor": cursor})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "cursor"


@pytest.mark.parametrize("path", ["/patches/work-orders", "/incidents", "/events/recent"])
def test_every_list_refuses_a_cursor_of_another(seeded: httpx.Client, path: str) -> None:
    runs_cursor = seeded.get("/patches/runs", params={"limit": 1}).json()["next_cursor"]
    r = seeded.get(path, params={"cursor": runs_cursor})
    assert r.status_code == 422 and r.json()["field"] == "cursor"


def test_a_components_trust_history_is_its_newest_changes_oldest_first(seeded: httpx.Client) -> None:
    full = seeded.get("/trust/svc", params={"limit": 1000}).json()["history"]
    assert len(full) >= 23  # one move per run's incident at least
    last = seeded.get("/trust/svc", params={"limit": 3}).json()["history"]
    assert last == full[-3:]
    assert seeded.get("/trust/svc").json()["history"] == full[-100:]
    assert seeded.get("/trust/svc", params={"limit": 0}).status_code == 422
