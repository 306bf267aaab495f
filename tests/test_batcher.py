"""Group commit of single-event POSTs: concurrent requests share transactions, yet each is committed before its
2xx and answered with its own outcome; a bad event fails alone; a broken database fails its whole batch, and a
failed request can be retried."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.app import App
from mendloop.domain.records import Detection, DetectionOutcome
from mendloop.errors import StorageError
from mendloop.intake.batcher import IntakeBatcher
from mendloop.storage import schema as t
from tests.support import api_server, open_app, settings_for, write_playbooks


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "quick",
            "type": "retry",
            "description": "ok",
            "steps": [{"id": "nap", "action": "sleep", "with": {"seconds": 0}}],
        },
    )
    # No workers: runs stay queued, so every outcome is decided by what the intake itself wrote.
    settings = settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"quick": "quick"})
    a = open_app(settings)
    yield a
    a.close()


def _slow_batcher(app: App, max_wait: float = 0.3) -> IntakeBatcher:
    """Replace the App's batcher with one that waits long enough for every concurrent request to join a batch."""
    app.batcher.close()
    app.batcher = IntakeBatcher(app.intake, max_wait=max_wait)
    return app.batcher


def _event(i: int, *, routed: bool = False, event_id: str | None = None, message: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_type": "app.error",
        # Letters, not digits: each index is its own fingerprint, so its own incident.
        "message": message or f"shard {'abcdefghij'[i % 10]}{'klmnopqrst'[i // 10 % 10]}{'uvwxyz'[i // 100]} broke",
        "payload": {"error_type": "quick"} if routed else {"n": i},
    }
    if event_id is not None:
        body["event_id"] = event_id
    return body


async def _post_all(port: int, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as client:
        return list(await asyncio.gather(*(client.post("/events", json=b) for b in bodies)))


def _stored(app: App) -> dict[int, str]:
    with app.store.engine.connect() as conn:
        rows = conn.execute(sa.select(t.events.c.id, t.events.c.message).where(t.events.c.type == "app.error"))
        return {int(i): str(m) for i, m in rows}


def test_concurrent_posts_share_transactions_and_each_gets_its_own_outcome(app: App, free_port: int) -> None:
    bodies = [_event(i, event_id=f"plain-{i}") for i in range(150)]
    bodies += [_event(150 + i, routed=True, event_id=f"routed-{i}") for i in range(30)]
    # The same event id twice at once: one is recorded, the other is its duplicate.
    bodies += [_event(300 + i, event_id=f"twice-{i}") for i in range(10)]
    bodies += [_event(300 + i, event_id=f"twice-{i}") for i in range(10)]
    with api_server(app, free_port):
        answers = asyncio.run(_post_all(free_port, bodies))
        assert all(r.status_code == 202 for r in answers), [r.text for r in answers if r.status_code != 202]
        results = [r.json() for r in answers]
        stored = _stored(app)
        # Each answer names the event its own request stored: same message, its own incident, its own run.
        for body, res in zip(bodies, results, strict=True):
            if res["duplicate"]:
                assert res["event_id"] is None and res["run_id"] is None
                continue
            assert stored[res["event_id"]] == body["message"]
        fresh = [res for res in results if not res["duplicate"]]
        assert len(fresh) == 190 == len(stored)
        assert len({res["event_id"] for res in fresh}) == 190
        assert len({res["incident_id"] for res in fresh}) == 190
        routed = results[150:180]
        assert all(res["verdict"] == "run" and res["playbook_id"] == "quick" for res in routed)
        assert len({res["run_id"] for res in routed}) == 30
        for res in routed:
            run = app.store.get_run(res["run_id"])
            assert run.trigger_event_id == res["event_id"] and run.incident_id == res["incident_id"]
        assert all(res["run_id"] is None and res["verdict"] == "no_playbook" for res in results[:150])
        for i in range(10):
            pair = [results[180 + i]["duplicate"], results[190 + i]["duplicate"]]
            assert sorted(pair) == [False, True]
        # Retried later, in another transaction: a duplicate too, and nothing more is stored.
        again = asyncio.run(_post_all(free_port, bodies[:5] + bodies[150:155]))
        assert all(r.status_code == 202 and r.json()["duplicate"] for r in again)
        assert len(_stored(app)) == 190
    stats = app.batcher.stats
    assert stats.events == 210 and stats.transactions < 200 and stats.failed == 0


def test_one_batch_decides_duplicates_and_storms_in_arrival_order(app: App) -> None:
    batcher = _slow_batcher(app, max_wait=0.5)
    same: dict[str, Any] = {
        "event_type": "app.error",
        "payload": {"error_type": "quick"},
        "message": "disk full on /dev/sda1",
    }

    def detection(event_id: str | None) -> Detection:
        return app.intake.from_event(source="api", event_id=event_id, **same)

    async def burst() -> list[DetectionOutcome]:
        return list(await asyncio.gather(*(batcher.submit(detection(e)) for e in ["a", "b", "a", None, "b", "c"])))

    first = asyncio.run(burst())
    assert batcher.stats.transactions == 1 and batcher.stats.largest == 6
    assert [o.duplicate for o in first] == [False, False, True, False, True, False]
    # The first opens the incident and starts its run; the repeats in the same transaction are absorbed by it.
    assert first[0].verdict == "run" and first[0].run_id
    absorbed, dup = "absorbed_in_progress", "duplicate"
    assert [o.verdict for o in first[1:]] == [absorbed, dup, absorbed, dup, absorbed]
    assert len({o.incident_id for o in first if not o.duplicate}) == 1
    assert app.incidents.get(first[0].incident_id or "").count == 4
    # Across transactions: every id already seen is a duplicate.
    second = asyncio.run(burst())
    assert batcher.stats.transactions == 2
    assert [o.duplicate for o in second] == [True, True, True, False, True, True]
    assert app.incidents.get(first[0].incident_id or "").count == 5


def test_a_bad_event_fails_alone(app: App, free_port: int) -> None:
    """A row the database refuses (here a real constraint on events) fails its own request with a clear error;
    the rest of its batch is committed and answered."""
    with app.store.engine.begin() as conn:
        if app.store.is_sqlite:
            conn.exec_driver_sql(
                "CREATE TRIGGER no_poison BEFORE INSERT ON events WHEN instr(NEW.message, 'poison') > 0 "
                "BEGIN SELECT RAISE(ABORT, 'no_poison: poisoned event refused'); END"
            )
        else:
            conn.exec_driver_sql("ALTER TABLE events ADD CONSTRAINT no_poison CHECK (strpos(message, 'poison') = 0)")
    batcher = _slow_batcher(app)
    bodies = [_event(i, event_id=f"ok-{i}", routed=i % 5 == 0) for i in range(40)]
    bodies[17] = _event(17, event_id="bad-17", message="poison pill 17")
    with api_server(app, free_port):
        answers = asyncio.run(_post_all(free_port, bodies))
    bad = answers[17]
    assert bad.status_code == 503
    assert "no_poison" in bad.json()["detail"] and bad.json()["error"] == "StorageError"
    good = [r for i, r in enumerate(answers) if i != 17]
    assert all(r.status_code == 202 for r in good), [r.text for r in good if r.status_code != 202]
    stored = _stored(app)
    assert len(stored) == 39 and "poison pill 17" not in stored.values()
    for i, r in enumerate(answers):
        if i != 17:
            assert stored[r.json()["event_id"]] == bodies[i]["message"]
    assert batcher.stats.failed >= 1 and batcher.stats.events == 39  # split, retried, committed
    # Its event id was not spent: once the database accepts the row, the same request succeeds.
    with app.store.engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP TRIGGER no_poison" if app.store.is_sqlite else "ALTER TABLE events DROP CONSTRAINT no_poison"
        )
    with api_server(app, free_port):
        retried = asyncio.run(_post_all(free_port, [bodies[17]]))[0]
    assert retried.status_code == 202 and retried.json()["duplicate"] is False


def test_a_broken_database_fails_every_request_of_its_batch(app: App, free_port: int) -> None:
    """Not a row's fault (the events table is gone): every request of the batch gets the error at once, with no
    retry in halves, nothing of it is stored, and each can be retried once the database is back."""
    before = [_event(i, event_id=f"early-{i}") for i in range(5)]
    during = [_event(10 + i, event_id=f"during-{i}", routed=i == 0) for i in range(20)]
    with api_server(app, free_port):
        assert all(r.status_code == 202 for r in asyncio.run(_post_all(free_port, before)))
        batcher = _slow_batcher(app)
        with app.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE events RENAME TO events_away")
        answers = asyncio.run(_post_all(free_port, during))
        assert [r.status_code for r in answers] == [503] * 20
        assert all("events" in r.json()["detail"] for r in answers)
        assert batcher.stats.transactions == 0 and batcher.stats.failed <= 2  # one attempt per batch, not halves
        with app.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE events_away RENAME TO events")
        assert len(_stored(app)) == 5  # what was committed before stays
        retried = asyncio.run(_post_all(free_port, during))
        assert all(r.status_code == 202 and not r.json()["duplicate"] for r in retried)
        assert retried[0].json()["run_id"]
        assert len(_stored(app)) == 25


def test_close_commits_what_is_queued_and_refuses_more(app: App) -> None:
    batcher = _slow_batcher(app, max_wait=5)

    async def submit_then_close() -> list[DetectionOutcome]:
        tasks = [
            asyncio.ensure_future(batcher.submit(app.intake.from_event(source="api", **_event(i)))) for i in range(3)
        ]
        await asyncio.sleep(0.05)  # queued, the writer waiting for more
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        return list(await asyncio.gather(*tasks))

    outcomes = asyncio.run(submit_then_close())
    assert all(o.event_id for o in outcomes) and len(_stored(app)) == 3

    async def late() -> DetectionOutcome:
        return await batcher.submit(app.intake.from_event(source="api", **_event(9)))

    with pytest.raises(StorageError, match="shutting down"):
        asyncio.run(late())
