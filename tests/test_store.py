"""Storage on SQLite and PostgreSQL: migrations, readable ids under concurrency, leases, dedupe, trust."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from mendloop.config import TrustConfig
from mendloop.domain.records import NewEvent
from mendloop.domain.states import RunStatus, StepStatus
from mendloop.domain.trust import TrustReason, next_score
from mendloop.storage import migrate
from mendloop.storage.schema import metadata
from mendloop.storage.store import StepOutcome, Store
from mendloop.testing import FakeClock

PLAYBOOK = {"id": "pb", "type": "retry", "description": "d", "steps": [{"id": "a", "action": "sleep"}]}


@pytest.fixture
def store(database_url: str) -> Store:
    s = Store(database_url, trust=TrustConfig())  # migrated already (conftest)
    yield s  # type: ignore[misc]
    s.close()


def _new_run(store: Store, dedupe: str | None = None, component: str | None = "svc") -> tuple[str, bool]:
    run, created = store.create_run(
        playbook=PLAYBOOK,
        playbook_version="1-x",
        component=component,
        error_type="e",
        description="d",
        context={},
        trigger=NewEvent(type="t", message="m"),
        dedupe_key=dedupe,
        message="Running playbook: pb",
    )
    return run.id, created


@pytest.fixture
def migrated_here(empty_database_url: str) -> Store:
    """A Store on an empty database that this test's own Alembic run migrates (not a copy of the template)."""
    s = Store(empty_database_url, trust=TrustConfig())
    assert migrate.current(s.engine) is None
    migrate.upgrade(s.engine)
    yield s  # type: ignore[misc]
    s.close()


def test_migrations_match_the_tables(migrated_here: Store) -> None:
    store = migrated_here
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert migrate.current(store.engine) == migrate.head()
    migrate.upgrade(store.engine)  # a second upgrade is a no-op
    assert not store.is_empty()


def test_ids_are_readable_and_unique_under_concurrency(store: Store) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def make() -> None:
        for _ in range(15):
            rid, _ = _new_run(store)
            with lock:
                ids.append(rid)

    threads = [threading.Thread(target=make) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(ids) == 90 == len(set(ids))
    assert all(re.fullmatch(r"run_\d{8}_\d{6}_\d{6}", i) for i in ids)


def test_work_order_ids_follow_the_spec(store: Store) -> None:
    rid, _ = _new_run(store)
    run = store.claim_run("o", 30)
    assert run is not None and run.id == rid
    outcome = StepOutcome(0, "a", "escalate", 1, StepStatus.SUCCEEDED, 0.0, {}, None, f"{rid}:a:1")
    result = store.escalate(
        run,
        "o",
        outcome=outcome,
        next_index=1,
        description="x",
        context={},
        estimated_complexity="medium",
        priority="p",
    )
    assert result is not None
    parked, wo = result
    assert re.fullmatch(r"wo_\d{8}_0001", wo.id)
    assert parked.status is RunStatus.AWAITING_PATCH and parked.coding_work_order_id == wo.id
    assert store.get_work_order(wo.id).self_healing_run_id == rid


def test_each_run_is_claimed_by_exactly_one_owner(store: Store) -> None:
    created = {_new_run(store)[0] for _ in range(40)}
    claimed: dict[str, list[str]] = {}
    lock = threading.Lock()

    def worker(owner: str) -> None:
        while True:
            run = store.claim_run(owner, 60)
            if run is None:
                return
            with lock:
                claimed.setdefault(run.id, []).append(owner)

    threads = [threading.Thread(target=worker, args=(f"o{i}",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert set(claimed) == created
    assert all(len(owners) == 1 for owners in claimed.values())


def test_a_lapsed_lease_is_claimed_again_and_the_old_owner_cannot_commit(database_url: str) -> None:
    clock = FakeClock()
    s = Store(database_url, clock=clock)
    try:
        _new_run(s)
        first = s.claim_run("old", 30)
        assert first is not None
        assert s.claim_run("new", 30) is None
        clock.advance(31)
        second = s.claim_run("new", 30)
        assert second is not None and second.id == first.id and second.lease_owner == "new"
        assert s.advance(first, "old", outcome=None, changes={"step_index": 1}, lease_seconds=30) is None
        assert s.get_run(first.id).step_index == 0
    finally:
        s.close()


def test_dead_owners_leases_are_released_at_once(store: Store) -> None:
    _new_run(store)
    run = store.claim_run("host:1-dead:w0", 3600)
    assert run is not None
    assert store.release_leases_of(["host:1-dead:w0"]) == 1
    again = store.get_run(run.id)
    assert again.status is RunStatus.QUEUED and again.lease_owner is None


def test_dedupe_key_returns_the_existing_run(store: Store) -> None:
    first, created = _new_run(store, dedupe="k1")
    second, created_again = _new_run(store, dedupe="k1")
    assert created and not created_again and first == second
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from runs")).scalar() == 1


def test_trust_formula_and_history(store: Store) -> None:
    cfg = TrustConfig()
    rid, _ = _new_run(store, component="svc")  # an incident lowers trust
    after_incident = next_score(1.0, TrustReason.INCIDENT, cfg)
    assert after_incident == 0.75
    assert store.trust_score("svc") == after_incident
    history = store.trust_history(component="svc")
    assert [(h.old, h.new, h.reason, h.run_id) for h in history] == [(1.0, 0.75, "incident", rid)]
    assert next_score(0.75, TrustReason.VERIFIED_FIX, cfg) == 0.875
    assert next_score(0.75, TrustReason.FAILED_VERIFICATION, cfg) == 0.45
    assert next_score(0.0, TrustReason.FAILED_VERIFICATION, cfg) == 0.0
    assert next_score(1.0, TrustReason.VERIFIED_FIX, cfg) == 1.0


def test_recent_events_filters(store: Store, tmp_path: Path) -> None:
    store.publish([NewEvent(type="a.x", message="one"), NewEvent(type="b.y", message="two")])
    assert [e.message for e in store.recent_events(event_type="a.x")] == ["one"]
    assert [e.message for e in store.recent_events(limit=1)] == ["two"]
    assert store.recent_events(since=4_000_000_000) == []


def test_concurrent_claims_respect_the_mutex(store: Store) -> None:
    for _ in range(12):
        with store.db.write() as tx:
            store.runs.insert(
                tx,
                playbook=PLAYBOOK,
                playbook_version="1-x",
                component="db",
                error_type="e",
                description="d",
                context={},
                trigger=None,
                message="m",
                mutex_key="db",
            )
    barrier = threading.Barrier(6)
    won: list[str] = []
    lock = threading.Lock()

    def claim(owner: str) -> None:
        barrier.wait()
        run = store.claim_run(owner, 60)
        if run is not None:
            with lock:
                won.append(run.id)

    threads = [threading.Thread(target=claim, args=(f"o{i}",)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # Six workers asked at once; only one run of the component may execute.
    assert len(won) == 1
