"""Run details asked for together are read together (storage/run_details.py, api/coalesce.py's `batch`), and each
answer is the one its own read would give, from a read begun after it arrived.

On real SQLite files and a real PostgreSQL, over a history in the schema's real shape (bench/gen_history.py:
steps, events, trust changes and work orders per run).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.api.routes import runs as run_routes
from mendloop.api.server import create_api
from mendloop.app import App
from mendloop.domain.states import RUN_FINAL, RunStatus
from mendloop.storage import run_details
from mendloop.storage import schema as t
from tests.support import api_client, history_app

RUNS = 40


@pytest.fixture
def history(database_url: str, tmp_path: Path) -> Iterator[App]:
    with history_app(database_url, tmp_path, RUNS) as app:
        yield app


def _run_ids(app: App) -> list[str]:
    runs, _ = app.store.list_runs(limit=RUNS)
    return [r.id for r in runs]


def test_many_runs_read_at_once_are_each_what_their_own_reads_give(
    history: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = history
    store = app.store
    ids = _run_ids(app)
    assert len(ids) == RUNS
    monkeypatch.setattr(run_details, "_CHUNK", 7)  # IN lists of 7: the chunking is read through too
    asked = [ids[5], "missing-run", *ids, ids[5]]
    parts = store.run_details.many(asked)
    assert list(parts) == list(dict.fromkeys(i for i in asked if i != "missing-run"))
    shapes = {"steps": 0, "events": 0, "trust": 0, "work_orders": 0}
    for run_id, p in parts.items():
        run = store.get_run(run_id)
        assert p.run == run
        assert p.steps == store.run_steps(run_id)
        assert p.events == store.run_events(run_id)
        assert p.trust_changes == store.trust_history(run_id=run_id)
        assert p.trust_score == (store.trust_score(run.component) if run.component else None)
        wo = store.get_work_order(run.coding_work_order_id) if run.coding_work_order_id else None
        assert p.work_order == wo
        assert p.pauses == store.pauses.current()
        shapes["steps"] += len(p.steps)
        shapes["events"] += len(p.events)
        shapes["trust"] += len(p.trust_changes)
        shapes["work_orders"] += wo is not None
    # The history has every part, so each comparison above compared something.
    assert all(n > 0 for n in shapes.values()), shapes
    assert store.run_details.many([]) == {} and store.run_details.many(["missing-run"]) == {}


def test_details_asked_during_a_read_share_the_next_one_and_see_a_write_made_before_they_arrived(
    history: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = history
    ids = _run_ids(app)
    open_run = next(i for i in ids if app.store.get_run(i).status not in RUN_FINAL)
    other = next(i for i in ids if i != open_run)
    calls: list[list[str]] = []
    entered, gate = threading.Event(), threading.Event()
    real = run_routes.run_details

    def held(app_: App, run_ids: list[str]) -> Any:
        calls.append(list(run_ids))
        answer = real(app_, run_ids)
        if len(calls) == 1:  # the first read has read; it answers only once the others have arrived
            entered.set()
            gate.wait(10)
        return answer

    monkeypatch.setattr(run_routes, "run_details", held)
    api = create_api(app, manage=False)

    async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://mendloop.test") as client:
            first = asyncio.ensure_future(client.get(f"/patches/runs/{open_run}"))
            await asyncio.to_thread(entered.wait, 10)
            app.store.cancel_run(open_run, "cancelled while the first read ran")  # committed before they arrive
            later = [
                asyncio.ensure_future(client.get(f"/patches/runs/{run_id}"))
                for run_id in (other, "missing-run", open_run, other)
            ]
            slot = api.state.reads._keys[("run detail", None)]  # the coalescer's own queue: poll, never sleep
            while len(slot.asked) < 3:
                await asyncio.sleep(0)
            gate.set()
            return await first, list(await asyncio.gather(*later))

    first, (other_a, missing, again, other_b) = asyncio.run(scenario())
    # Two reads: the held one, then one for everything that arrived during it, each id once, in arrival order.
    assert calls == [[open_run], [other, "missing-run", open_run]]
    assert first.status_code == 200 and first.json()["status"] != RunStatus.CANCELLED.value
    assert again.status_code == 200 and again.json()["status"] == RunStatus.CANCELLED.value
    assert other_a.status_code == other_b.status_code == 200
    assert other_a.json() == other_b.json() and other_a.json()["run_id"] == other
    assert missing.status_code == 404 and "missing-run" in missing.text
    assert len(api.state.reads) == 0  # nothing kept once the reads ended


def test_a_run_in_a_list_says_what_its_own_detail_says(history: App) -> None:
    """A page reads each run's summary (storage/rows.py: step ids from the playbook's text, no context or outputs),
    the detail the whole row: where both show a field they agree, for every run and state of the history, and for
    a run waiting on an approval, mid-way through its playbook."""
    app = history
    waiting = _run_ids(app)[3]
    approval = {"step": "confirm", "asked_at": 1.5, "deadline_at": 99.5}
    with app.store.db.write() as tx:  # its own row, as the engine leaves it parked on an approval step
        tx.conn.execute(
            sa.update(t.runs)
            .where(t.runs.c.id == waiting)
            .values(status=RunStatus.AWAITING_APPROVAL.value, step_index=1, pending={"approval": approval})
        )
    with api_client(app) as client:
        listed = client.get("/patches/runs", params={"limit": RUNS})
        assert listed.status_code == 200, listed.text
        rows = listed.json()["runs"]
        assert len(rows) == RUNS
        for row in rows:
            detail = client.get(f"/patches/runs/{row['run_id']}").json()
            assert row == {k: detail[k] for k in row}, row["run_id"]
        by_id = {r["run_id"]: r for r in rows}
    steps = app.store.get_run(waiting).playbook["steps"]
    assert by_id[waiting]["current_step"] == steps[1]["id"] and by_id[waiting]["steps_total"] == len(steps)
    assert by_id[waiting]["approval"] == approval
    # The history's mix: finished and open runs, so each comparison compared something.
    assert len({r["status"] for r in rows}) >= 3 and all(r["steps_total"] > 0 for r in rows)
