"""Storms of distinct errors (issue 8, item 11): every event its own fingerprint, so the per-fingerprint throttle
lets each through. The caps on new runs per window (global and per component) hold under concurrent intake on
both databases, the overflow is recorded as incidents without runs and counted in /health and the stats, and a
caller's own `fingerprint` is used only from a forwarder token (or when the operator trusts every caller)."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.words import distinct_word as word
from mendloop.app import App
from mendloop.config import StormConfig
from mendloop.domain.storm import Situation, Verdict, WindowCounts, decide, full_cap
from mendloop.intake.fingerprint import fingerprint
from tests.support import api_client, api_server, free_port, open_app, settings_for, wait_for, write_playbooks

FORWARDER = "forwarder-token-0123456789"
INTAKE = "intake-token-0123456789ab"


def event(i: int, component: str | None) -> dict[str, Any]:
    return {
        "event_type": "app.error",
        "component": component,
        "payload": {"error_type": "quick"},
        "message": f"ERROR: shape {word(i)} broke",
        "event_id": f"storm-{i}",
    }


def storm_app(database_url: str, tmp_path: Path, *, clock: Any = None, **extra: Any) -> App:
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
        routing={"quick": "quick"},
        workers=0,
        **extra,
    )
    return open_app(settings, **({"clock": clock} if clock is not None else {}))


# -- the decision ----------------------------------------------------------------------------------------------


def _situation(counts: WindowCounts, *, component: bool = True, **kw: Any) -> Situation:
    asked: list[str] = []

    def window() -> WindowCounts:
        asked.append("window")
        return counts

    return Situation(
        has_playbook=kw.get("has_playbook", True),
        last_run_at=kw.get("last_run_at"),
        now=1000.0,
        run_in_progress=lambda: kw.get("in_progress", False),
        recent_failures=lambda: kw.get("failures", 0),
        window_counts=window,
        has_component=component,
    )


def test_the_caps_are_a_pure_decision() -> None:
    cfg = StormConfig(max_new_runs_per_window=10, max_new_runs_per_component=3)
    assert decide(_situation(WindowCounts(9, 2)), cfg) == (Verdict.RUN, 0)
    assert decide(_situation(WindowCounts(10, 0)), cfg) == (Verdict.RATE_LIMITED, 0)
    assert decide(_situation(WindowCounts(4, 3)), cfg) == (Verdict.RATE_LIMITED, 0)
    # No component: only the global cap counts.
    assert decide(_situation(WindowCounts(4, 3), component=False), cfg) == (Verdict.RUN, 0)
    assert full_cap(WindowCounts(10, 0), True, cfg) == "storm.max_new_runs_per_window"
    assert full_cap(WindowCounts(0, 3), True, cfg) == "storm.max_new_runs_per_component"
    # Repeats are absorbed or throttled before any cap is asked (and before the counter is locked).
    assert decide(_situation(WindowCounts(10, 3), in_progress=True), cfg)[0] is Verdict.ABSORBED_IN_PROGRESS
    assert decide(_situation(WindowCounts(10, 3), last_run_at=990.0), cfg)[0] is Verdict.ABSORBED_THROTTLED
    # A detection that reopens a resolved incident is not a repeat: the throttle lets it through to the caps.
    reopening = dataclasses.replace(_situation(WindowCounts(0, 0), last_run_at=990.0), reopens=True)
    assert decide(reopening, cfg) == (Verdict.RUN, 0)
    # Before the breaker: a run handed to a human is still a run.
    assert decide(_situation(WindowCounts(10, 0), failures=5), cfg)[0] is Verdict.RATE_LIMITED
    assert decide(_situation(WindowCounts(0, 0), failures=5), cfg)[0] is Verdict.BREAKER_OPEN
    # 0 switches a cap off.
    off = StormConfig(max_new_runs_per_window=0, max_new_runs_per_component=0)
    assert decide(_situation(WindowCounts(10**6, 10**6)), off) == (Verdict.RUN, 0)


# -- 2,000 distinct events, concurrently -----------------------------------------------------------------------


def test_a_storm_of_distinct_errors_starts_only_the_capped_runs(database_url: str, tmp_path: Path) -> None:
    app = storm_app(
        database_url,
        tmp_path,
        storm={"max_new_runs_per_window": 25, "max_new_runs_per_component": 10, "new_runs_window_seconds": 3600},
        health={"probe_interval_seconds": 0.1},
    )
    components = itertools.cycle(["a", "b", "c", None])
    events = [event(i, next(components)) for i in range(2000)]
    # 8 threads: most events in batches of 50, a hundred alone (the group-commit path), all at once.
    work: list[list[dict[str, Any]]] = [events[i : i + 50] for i in range(0, 1900, 50)]
    work += [[e] for e in events[1900:]]
    answers: list[dict[str, Any]] = []
    failures: list[str] = []
    lock = threading.Lock()
    port = free_port()
    try:
        with api_server(app, port):

            def post(chunks: list[list[dict[str, Any]]]) -> None:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                    for chunk in chunks:
                        r = c.post("/events", json=chunk[0] if len(chunk) == 1 else {"events": chunk})
                        with lock:
                            if r.status_code != 202:
                                failures.append(f"{r.status_code} {r.text[:200]}")
                                continue
                            body = r.json()
                            answers.extend(body["events"] if "events" in body else [body])

            threads = [threading.Thread(target=post, args=(work[i::8],)) for i in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(120)
            assert not failures, failures[:3]
            assert len(answers) == 2000
            verdicts = Counter(a["verdict"] for a in answers)
            assert verdicts == {"run": 25, "rate_limited": 1975}, verdicts
            runs, total = app.store.list_runs(limit=100)
            assert total == 25
            per_component = Counter(r.component for r in runs)
            assert all(per_component[c] <= 10 for c in ("a", "b", "c")), per_component
            # Every detection is its own incident, with or without a run: nothing is dropped.
            with api_client(app) as client:
                incidents = client.get("/incidents", params={"limit": 1}).json()
                assert incidents["total"] == 2000
                limited = next(a for a in answers if a["verdict"] == "rate_limited")
                detail = client.get(f"/incidents/{limited['incident_id']}").json()
                assert detail["count"] == 1 and detail["runs"] == []
                stats = client.get("/patches/stats").json()
                assert stats["total_playbook_runs"] == 25
                assert stats["storm"]["rate_limited"] == 1975
                assert stats["storm"]["rate_limited_in_window"] == 1975
                assert stats["storm"]["new_runs_in_window"] == 25
                assert stats["storm"]["max_new_runs_per_window"] == 25
                # /health shows what its probe last read (every 0.1 s here), not a query of its own.
                wait_for(lambda: client.get("/health").json()["storm"]["rate_limited"] == 1975, 10)
                assert client.get("/health").json()["status"] == "ok"
                # A retried event is still a no-op, and a repeat of a rate-limited error counts on its incident.
                again = client.post("/events", json=events[1]).json()
                assert again["duplicate"] is True
                repeat = {**event(0, detail["component"]), "message": detail["title"], "event_id": "storm-repeat"}
                again = client.post("/events", json=repeat).json()
                assert again["verdict"] == "rate_limited" and again["incident_id"] == limited["incident_id"]
                assert client.get(f"/incidents/{limited['incident_id']}").json()["count"] == 2
    finally:
        app.close()


def test_a_new_window_lets_runs_start_again(database_url: str, tmp_path: Path) -> None:
    clock = [1_000_000.0]
    app = storm_app(
        database_url,
        tmp_path,
        storm={"max_new_runs_per_window": 2, "max_new_runs_per_component": 0, "new_runs_window_seconds": 60},
        clock=lambda: clock[0],
    )
    try:
        with api_client(app) as client:
            first = [client.post("/events", json=event(i, "svc")).json()["verdict"] for i in range(4)]
            assert first == ["run", "run", "rate_limited", "rate_limited"]
            clock[0] += 60  # the next window
            # The rate-limited error repeats: now it gets its run, on the same incident.
            repeat = client.post("/events", json={**event(2, "svc"), "event_id": "again-2"}).json()
            assert repeat["verdict"] == "run" and repeat["run_id"]
            assert app.incidents.storm_counts().new_runs_in_window == 1
            assert app.incidents.storm_counts().rate_limited_total == 2
    finally:
        app.close()


def test_repeats_of_rate_limited_errors_racing_in_a_new_window_keep_the_cap(database_url: str, tmp_path: Path) -> None:
    """No new incident is opened here (so no transaction waits on the incident number sequence): only the
    window's counter, locked by the first transaction that would start a run, keeps concurrent intake under the
    cap."""
    clock = [2_000_000.0]
    app = storm_app(
        database_url,
        tmp_path,
        storm={"max_new_runs_per_window": 8, "max_new_runs_per_component": 0, "new_runs_window_seconds": 60},
        clock=lambda: clock[0],
    )
    events = [event(i, "svc") for i in range(240)]
    port = free_port()
    try:
        with api_server(app, port) as client:
            r = client.post("/events", json={"events": events}).json()
            assert Counter(e["verdict"] for e in r["events"]) == {"run": 8, "rate_limited": 232}
            clock[0] += 60
            # One repeat first, alone: the new window's counter row exists before the race (its creation would
            # make the racers wait on its primary key, hiding a missing lock).
            first = client.post("/events", json={**events[8], "event_id": "first-of-window"}).json()
            assert first["verdict"] == "run"
            events = events[:8] + events[9:]
            verdicts: list[str] = []
            lock = threading.Lock()
            barrier = threading.Barrier(8)

            def post(part: list[dict[str, Any]]) -> None:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                    barrier.wait(10)
                    for i in range(0, len(part), 10):
                        batch = [{**e, "event_id": e["event_id"] + "-again"} for e in part[i : i + 10]]
                        body = c.post("/events", json={"events": batch}).json()
                        with lock:
                            verdicts.extend(e["verdict"] for e in body["events"])

            threads = [threading.Thread(target=post, args=(events[i::8],)) for i in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            # The 8 incidents with runs absorb their repeats (their runs are queued: no worker runs here); of the
            # 231 rate-limited ones left, exactly 7 get a run in the new window, whose cap is then full.
            assert Counter(verdicts) == {"absorbed_in_progress": 8, "run": 7, "rate_limited": 224}, Counter(verdicts)
            assert app.store.list_runs()[1] == 16
            assert app.incidents.storm_counts().new_runs_in_window == 8
    finally:
        app.close()


# -- whose fingerprint ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_callers_fingerprint_is_used_only_from_a_forwarder(database_url: str, tmp_path: Path) -> None:
    app = storm_app(database_url, tmp_path, intake_tokens=[INTAKE], forwarder_tokens=[FORWARDER])
    try:
        with api_client(app) as client:
            body = {"event_type": "app.error", "message": "ERROR: chosen", "fingerprint": "fp-chosen-by-caller"}
            own = fingerprint("app.error ERROR: chosen", error_type=None)
            # An intake token: the fingerprint is ignored (and the answer says so); the server computes its own.
            plain = client.post("/events", json=body, headers={"Authorization": f"Bearer {INTAKE}"}).json()
            assert plain["fingerprint_ignored"] is True
            incident = client.get(f"/incidents/{plain['incident_id']}").json()
            assert incident["fingerprint"] == own
            assert client.get("/incidents", params={"fingerprint": "fp-chosen-by-caller"}).json()["total"] == 0
            batch = client.post(
                "/events", json={"events": [body, body]}, headers={"Authorization": f"Bearer {INTAKE}"}
            ).json()
            assert batch["fingerprints_ignored"] == 2
            # A forwarder token: the forwarder's fingerprint is the incident's.
            fwd = client.post("/events", json=body, headers={"Authorization": f"Bearer {FORWARDER}"}).json()
            assert fwd["fingerprint_ignored"] is False
            assert client.get(f"/incidents/{fwd['incident_id']}").json()["fingerprint"] == "fp-chosen-by-caller"
            # The forwarder token is an intake token too; a wrong one is refused as before.
            wrong = client.post("/events", json=body, headers={"Authorization": "Bearer not-a-token-at-all-x"})
            assert wrong.status_code == 401 and wrong.json()["field"] == "Authorization"
    finally:
        app.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_trust_caller_fingerprint_is_an_explicit_setting(database_url: str, tmp_path: Path) -> None:
    app = storm_app(database_url, tmp_path, trust_caller_fingerprint=True)
    try:
        with api_client(app) as client:
            body = {"event_type": "app.error", "message": "ERROR: chosen", "fingerprint": "fp-operator-trusts"}
            r = client.post("/events", json=body).json()
            assert r["fingerprint_ignored"] is False
            assert client.get(f"/incidents/{r['incident_id']}").json()["fingerprint"] == "fp-operator-trusts"
    finally:
        app.close()
