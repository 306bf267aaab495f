"""GET /events/stream resumes out of the durable events table: a client that disconnects, or whose server is
killed and restarted, reconnects with Last-Event-ID and gets every event exactly once. Underneath, the one cursor
reader (`storage/event_feed.py`) never skips an event that a PostgreSQL transaction commits late with a smaller id.
Real `mendloop serve` subprocesses on 127.0.0.1, real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from mendloop.app import App
from mendloop.domain.event_cursor import EventFilter, Resume, event_filter, resume
from mendloop.errors import InputError
from mendloop.storage import schema as t
from mendloop.storage.db import Database
from mendloop.storage.event_feed import EventFeed
from tests.support import api_server, open_app, serve_process, settings_for, wait_for

TOTAL = 1000


@dataclass
class Message:
    event: str | None = None
    id: str | None = None
    data: str = ""
    comment: str | None = None

    @property
    def body(self) -> dict[str, Any]:
        return dict(json.loads(self.data))


def messages(resp: httpx.Response) -> Iterator[Message]:
    """The SSE messages and comments of a streaming response, as they arrive."""
    current = Message()
    for line in resp.iter_lines():
        if line.startswith(":"):
            yield Message(comment=line[1:].strip())
        elif not line:
            if current.event is not None or current.data:
                yield current
            current = Message()
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                current.event = value
            elif name == "id":
                current.id = value
            elif name == "data":
                current.data += value


def config(tmp_path: Path, database_url: str) -> Path:
    cfg = tmp_path / "mendloop.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": database_url, "limits": {"sse_keepalive_seconds": 0.2}}))
    return cfg


def post(base: str, events: list[dict[str, Any]]) -> None:
    for i in range(0, len(events), 250):
        r = httpx.post(f"{base}/events", json={"events": events[i : i + 250]}, timeout=60)
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == len(events[i : i + 250])


def ticks(first: int, last: int) -> list[dict[str, Any]]:
    return [
        {"event_type": "resume.tick", "message": f"tick {n}", "component": "svc", "payload": {"n": n}}
        for n in range(first, last)
    ]


class Reader:
    """Reads `resume.*` events from a stream in a thread until it holds `until` in all, then disconnects."""

    def __init__(self, base: str, got: list[Message], until: int, last_id: str | None) -> None:
        self.base, self.got, self.until, self.last_id = base, got, until, last_id
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id is not None else {}
        params = {} if self.last_id is not None else {"after": "0"}
        try:
            with httpx.stream(
                "GET", f"{self.base}/events/stream", params={**params, "type": "resume.*"}, headers=headers, timeout=30
            ) as resp:
                assert resp.status_code == 200
                self.connected.set()
                for m in messages(resp):
                    if m.event is not None:
                        self.got.append(m)
                        if len(self.got) >= self.until:
                            return
        except BaseException as exc:  # handed to the test's thread
            self.error = exc
            self.connected.set()

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive(), f"the reader stopped at {len(self.got)} of {self.until}"
        if self.error is not None:
            raise self.error


def test_a_client_resumes_across_a_reconnect_and_a_server_restart_and_gets_each_event_once(
    tmp_path: Path, database_url: str, free_port: int
) -> None:
    cfg = config(tmp_path, database_url)
    base = f"http://127.0.0.1:{free_port}"
    got: list[Message] = []
    with serve_process(cfg, free_port, log=tmp_path / "serve1.log") as first:
        post(base, ticks(0, 400))
        Reader(base, got, 250, None).join()  # a replay from the start, cut off part way
        # Reconnect: the replay of what was missed, then live events as they are posted.
        reader = Reader(base, got, 600, got[-1].id)
        assert reader.connected.wait(10)
        post(base, ticks(400, 700))
        reader.join()
        first.kill()  # kill -9: nothing is flushed or closed on the way out
        first.wait()
    with serve_process(cfg, free_port, log=tmp_path / "serve2.log"):
        post(base, ticks(700, TOTAL))
        # After a sentinel posted last, anything repeated would have arrived before it.
        post(base, [{"event_type": "resume.sentinel", "message": "the end", "payload": {"n": -1}}])
        Reader(base, got, TOTAL + 1, got[-1].id).join()
    assert got[-1].event == "resume.sentinel"
    numbers = [m.body["payload"]["n"] for m in got[:-1]]
    assert sorted(numbers) == list(range(TOTAL)), "every event exactly once"
    ids = [int(m.id or 0) for m in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "in id order, no id twice"
    assert all(m.body["id"] == int(m.id or 0) for m in got)


@pytest.fixture
def server(database_url: str, tmp_path: Path, free_port: int) -> Iterator[tuple[str, App]]:
    """The API on a real server on 127.0.0.1 (in this process: cheaper than a `serve` per test)."""
    app = open_app(settings_for(database_url, tmp_path, limits={"sse_keepalive_seconds": 0.2}))
    try:
        with api_server(app, free_port):
            yield f"http://127.0.0.1:{free_port}", app
    finally:
        app.close()


def test_keepalives_filters_and_a_reset_for_a_pruned_cursor(server: tuple[str, App]) -> None:
    base, app = server
    # Idle: keepalive comments (every 0.2 s here) and nothing else.
    with httpx.stream("GET", f"{base}/events/stream", timeout=5) as resp:
        seen: list[Message] = []
        for m in messages(resp):
            seen.append(m)
            if len(seen) == 3:
                break
    assert [m.comment for m in seen] == ["keepalive"] * 3

    mixed: list[dict[str, Any]] = [
        {"event_type": f"{family}.{kind}", "message": f"{family} {kind} {c}", "component": c, "payload": {}}
        for family in ("alpha", "beta")
        for kind in ("one", "two")
        for c in ("c1", "c2")
    ]
    mixed.append({"event_type": "alpha.end", "message": "end", "component": "c1", "payload": {}})
    post(base, mixed)

    def filtered(params: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        with httpx.stream("GET", f"{base}/events/stream", params=[("after", "0"), *params], timeout=10) as r:
            assert r.status_code == 200
            for m in messages(r):
                if m.event is not None:
                    out.append((m.event, m.body["component"]))
                    if m.event == "alpha.end":
                        return out
        raise AssertionError("the stream ended")

    assert filtered([("type", "alpha.*"), ("type", "beta.two"), ("component", "c1")]) == [
        ("alpha.one", "c1"),
        ("alpha.two", "c1"),
        ("beta.two", "c1"),
        ("alpha.end", "c1"),
    ]
    assert filtered([("type", "beta.one,alpha.end")]) == [("beta.one", "c1"), ("beta.one", "c2"), ("alpha.end", "c1")]

    for params, headers, field in [
        ({"type": "alpha.*x"}, {}, "type"),
        ({"type": "Has Space"}, {}, "type"),
        ({"after": "-3"}, {}, "after"),
        ({}, {"Last-Event-ID": "abc"}, "Last-Event-ID"),
    ]:
        bad = httpx.get(f"{base}/events/stream", params=params, headers=headers, timeout=5)
        assert bad.status_code == 422 and bad.json()["field"] == field, (params, headers, bad.text)

    # Retention pruned the oldest events: a cursor before them gets a reset naming the oldest kept.
    with app.store.db.write() as tx:
        ids = list(tx.conn.execute(sa.select(t.events.c.id).order_by(t.events.c.id)).scalars())
        tx.conn.execute(sa.delete(t.events).where(t.events.c.id < ids[5]))
    with httpx.stream("GET", f"{base}/events/stream", headers={"Last-Event-ID": "1"}, timeout=10) as r:
        it = messages(r)
        first = next(m for m in it if m.event is not None)
        assert first.event == "reset" and first.body["oldest_id"] == ids[5] and first.id == str(ids[5] - 1)
        following = next(m for m in it if m.event is not None)
        assert following.id == str(ids[5])
    # The reset's id is a cursor: resuming from it replays from the oldest kept, without another reset.
    with httpx.stream("GET", f"{base}/events/stream", headers={"Last-Event-ID": first.id or ""}, timeout=10) as r:
        assert next(m for m in messages(r) if m.event is not None).id == str(ids[5])


def _insert(conn: sa.Connection, name: str) -> int:
    row = {"type": name, "source": "test", "message": name, "payload": {}, "created_at": 0.0}
    return int(conn.execute(sa.insert(t.events).values(**row).returning(t.events.c.id)).scalar_one())


@contextmanager
def _feed(url: str) -> Iterator[tuple[EventFeed, sa.Engine]]:
    db = Database(url)
    engine = sa.create_engine(url)
    try:
        yield EventFeed(db), engine
    finally:
        engine.dispose()
        db.close()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # one writer on SQLite: ids commit in order
@pytest.mark.parametrize("early_xid", [False, True], ids=["plain", "older-xid-commits-first"])
def test_the_reader_never_skips_an_event_committed_late_with_a_smaller_id(database_url: str, early_xid: bool) -> None:
    with _feed(database_url) as (feed, engine), engine.connect() as late, engine.connect() as early:
        assert feed.read_after(0) == ([], 0)
        late_tx = late.begin()
        early_tx = early.begin()
        if early_xid:
            # The committing-first transaction got its xid before the late one did: a filter on
            # `xid < pg_snapshot_xmin` alone would hand its event out and move the cursor past the late one's.
            early.execute(sa.text("SELECT pg_current_xact_id()"))
        small = _insert(late, "late.small")
        large = _insert(early, "early.large")
        assert small < large
        early_tx.commit()
        for _ in range(3):  # however often it looks, nothing at or past the open transaction's id
            events, cursor = feed.read_after(0)
            assert events == [] and cursor < small
        late_tx.commit()
        wait_for(lambda: [e.id for e in feed.read_after(cursor)[0]] == [small, large], timeout=5)
        events, cursor = feed.read_after(cursor)
        assert cursor == large
        assert feed.read_after(cursor) == ([], large)


def test_the_reader_filters_pages_and_passes_over_what_it_skips(database_url: str) -> None:
    with _feed(database_url) as (feed, engine):
        with engine.begin() as conn:
            ids = [_insert(conn, name) for name in ("a.one", "b.two", "a.three", "c.four", "a.five")]
        wait_for(lambda: feed.head() == ids[-1], timeout=5)
        page, cursor = feed.read_after(0, limit=2, types=["a.*"])
        assert [e.type for e in page] == ["a.one", "a.three"] and cursor == ids[2]
        page, cursor = feed.read_after(cursor, limit=2, types=["a.*"])
        assert [e.type for e in page] == ["a.five"] and cursor == ids[-1]
        page, cursor = feed.read_after(0, types=["c.four", "b.two"])
        assert [e.type for e in page] == ["b.two", "c.four"] and cursor == ids[-1]
        assert feed.read_after(0, components=["nobody"]) == ([], ids[-1])
        assert feed.oldest() == ids[0]


def test_filters_and_resume_points_are_decided_purely() -> None:
    f = event_filter(["coding_agent.*", "run.completed,trust.updated"], ["svc"])
    assert f == EventFilter(("run.completed", "trust.updated"), ("coding_agent.",), ("svc",))
    assert f.matches("coding_agent.work_order_created", "svc") and not f.matches("coding_agentx", "svc")
    assert not f.matches("run.completed", "other")
    assert event_filter(["*"]) == EventFilter()
    with pytest.raises(InputError) as err:
        event_filter(["a.*.*"])
    assert err.value.field == "type"
    assert resume(0, None).reset is False and resume(0, 1).reset is False
    assert resume(3, 10) == Resume(9, reset=True)
    assert resume(9, 10).reset is False
