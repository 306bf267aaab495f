"""GET /metrics: parsed with prometheus_client's own parser, its counters against what a script did across a real
`serve` and a real `mendloop worker`, the plans of its queries, its caps on labels, auth, and the process-local
figures."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.dialects import sqlite

from mendloop.domain.records import NewEvent
from mendloop.storage.metrics import OTHER, MetricsQueries
from tests.support import (
    api_client,
    free_port,
    mendloop_argv,
    open_app,
    settings_for,
    wait_for,
    wait_healthy,
    write_playbooks,
)

PY = sys.executable
# Appends the pid of the mendloop process that ran the step (the command's parent) to argv[1]; exits argv[2].
STEP = "import os,sys\nopen(sys.argv[1],'a').write(str(os.getppid())+'\\n')\nsys.exit(int(sys.argv[2]))\n"


def command(log: Path, code: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"exit{code}", "action": "command", "with": {"argv": [PY, "-c", STEP, str(log), str(code)]}, **extra}


def playbooks(directory: Path, log: Path) -> None:
    write_playbooks(
        directory,
        {"id": "heal", "type": "retry", "description": "d", "steps": [command(log, 0)]},
        {"id": "broken", "type": "retry", "description": "d", "steps": [command(log, 1)]},
        {"id": "human", "type": "retry", "description": "d", "steps": [command(log, 1, on_failure="needs_human")]},
        {
            "id": "patch",
            "type": "code_patch",
            "description": "d",
            "steps": [{"id": "escalate", "action": "escalate", "with": {}}, command(log, 0)],
        },
    )


def scrape(base: str, **kw: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of one scrape, through prometheus_client's parser."""
    answer = httpx.get(f"{base}/metrics", timeout=30, **kw)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(answer.text):
        assert family.documentation, f"{family.name} has no help text"
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def by(samples: dict[tuple[tuple[str, str], ...], float], *names: str) -> dict[tuple[str, ...], float]:
    """Samples keyed by the values of `names` (the other labels must not differ)."""
    out: dict[tuple[str, ...], float] = {}
    for labels, value in samples.items():
        d = dict(labels)
        key = tuple(d[n] for n in names)
        assert key not in out, f"two samples for {key}"
        out[key] = value
    return out


def trigger(base: str, error_type: str, *, wait: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"description": "d", "error_type": error_type, "component": f"svc-{error_type}"}
    if wait is not None:
        body["wait_seconds"] = wait
    answer = httpx.post(f"{base}/patches/trigger", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_counters_match_what_serve_and_a_worker_did(database_url: str, tmp_path: Path) -> None:
    """Two `serve` processes on one database: the first runs phase 1's runs itself; the second has no worker
    threads, and what it queues in phase 2 a `mendloop worker` process runs. The second server's /metrics counts
    both phases (it reads the database, not its own work), equal to the script's own count of what it triggered
    and how each run ended."""
    effects = tmp_path / "effects.log"
    playbooks(tmp_path / "pb", effects)
    config = {
        "database_url": database_url,
        "playbook_dirs": ["pb"],
        "routing": {p: p for p in ("heal", "broken", "human", "patch")},
        "poll_interval": 0.05,
        "workers": 1,
    }
    (tmp_path / "runner.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "viewer.yaml").write_text(yaml.safe_dump({**config, "workers": 0}))
    ended: Counter[tuple[str, str]] = Counter()
    run_ids: list[str] = []
    port, port2 = free_port(), free_port()
    base, base2 = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port2}"
    # Both start at once: each start-up costs seconds on a loaded machine.
    first = start(
        mendloop_argv("serve", "--config", str(tmp_path / "runner.yaml"), "--port", str(port)), tmp_path / "serve1.log"
    )
    second = start(
        mendloop_argv("serve", "--config", str(tmp_path / "viewer.yaml"), "--port", str(port2)), tmp_path / "serve2.log"
    )
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_healthy(port, first, tmp_path / "serve1.log")
        wait_healthy(port2, second, tmp_path / "serve2.log")
        for playbook, n in {"heal": 3, "broken": 2, "human": 1}.items():
            for _ in range(n):
                run = trigger(base, playbook)
                ended[(playbook, run["status"])] += 1
                run_ids.append(run["run_id"])
        parked = trigger(base, "patch")
        assert parked["status"] == "awaiting_patch"
        done = httpx.post(
            f"{base}/patches/work-orders/{parked['work_order_id']}/complete", json={"tests_passed": True}, timeout=30
        )
        assert done.status_code == 200, done.text
        wait_for(lambda: httpx.get(f"{base}/patches/runs/{parked['run_id']}").json()["status"] == "completed")
        ended[("patch", "completed")] += 1
        run_ids.append(parked["run_id"])
        stop(first)
        assert ended == {
            ("heal", "completed"): 3,
            ("broken", "failed"): 2,
            ("human", "needs_human"): 1,
            ("patch", "completed"): 1,
        }

        # Phase 2: the second server runs no step; what it queues waits for the worker process.
        queued = [trigger(base2, p, wait=0) for p in ("heal", "heal", "broken", "human")]
        assert {q["status"] for q in queued} == {"queued"}
        before = scrape(base2)
        assert by(before["mendloop_queue_depth"], "state") == {("due",): 4.0, ("waiting",): 0.0}
        assert by(before["mendloop_runs_active"], "playbook", "status") == {
            ("heal", "queued"): 2.0,
            ("broken", "queued"): 1.0,
            ("human", "queued"): 1.0,
        }
        worker = start(
            mendloop_argv("worker", "--config", str(tmp_path / "runner.yaml"), "--count", "1"), tmp_path / "worker.log"
        )

        def settled() -> bool:
            statuses = [httpx.get(f"{base2}/patches/runs/{q['run_id']}").json()["status"] for q in queued]
            return all(s in ("completed", "failed", "needs_human") for s in statuses)

        wait_for(settled, timeout=40)
        stop(worker)
        for q, playbook in zip(queued, ("heal", "heal", "broken", "human"), strict=True):
            status = httpx.get(f"{base2}/patches/runs/{q['run_id']}").json()["status"]
            ended[(playbook, status)] += 1
            run_ids.append(q["run_id"])
        # Both processes ran steps: the first server in phase 1, the worker process in phase 2, never the second.
        pids = Counter(int(x) for x in effects.read_text().split())
        assert pids[first.pid] == 7 and pids[worker.pid] == 4 and len(pids) == 2, pids

        samples = scrape(base2)
        runs = by(samples["mendloop_runs_total"], "playbook", "status")
        assert runs == {k: float(n) for k, n in ended.items()}
        assert ended == {
            ("heal", "completed"): 5,
            ("broken", "failed"): 3,
            ("human", "needs_human"): 2,
            ("patch", "completed"): 1,
        }
        assert samples.get("mendloop_runs_active", {}) == {}
        assert by(samples["mendloop_queue_depth"], "state") == {("due",): 0.0, ("waiting",): 0.0}
        assert by(samples["mendloop_escalations_total"], "playbook") == {("patch",): 1.0}
        assert by(samples["mendloop_work_orders"], "status") == {("completed",): 1.0}
        assert by(samples["mendloop_patch_duration_seconds_count"], "kind") == {("coding",): 1.0}
        events = by(samples["mendloop_events_total"], "type", "source")
        assert events[("self_healing.triggered", "mendloop")] == len(run_ids) == 11

        # One observation per finished run, in its status; every bucket cumulative, +Inf equal to the count.
        finished = Counter(status for (_pb, status), n in ended.items() for _ in range(n))
        counts = by(samples["mendloop_run_duration_seconds_count"], "status")
        assert counts == {(s,): float(n) for s, n in finished.items()}
        buckets = samples["mendloop_run_duration_seconds_bucket"]
        for (status,), n in counts.items():
            row = sorted(
                (float(d["le"]), v) for labels, v in buckets.items() if (d := dict(labels))["status"] == status
            )
            assert row[-1] == (float("inf"), n)
            assert [v for _, v in row] == sorted(v for _, v in row)
        steps = sum(len(httpx.get(f"{base2}/patches/runs/{r}").json()["steps"]) for r in run_ids)
        assert sum(samples["mendloop_step_duration_seconds_count"].values()) == steps > 0

        trust = httpx.get(f"{base2}/trust").json()
        scores = {x["component"]: x["score"] for x in trust["components"]}
        assert scores, trust
        assert by(samples["mendloop_trust_score"], "component") == {(c,): pytest.approx(s) for c, s in scores.items()}

        # The second server's own HTTP figures: the four triggers it answered, by route template.
        http = by(samples["mendloop_process_http_requests_total"], "method", "route", "status")
        assert http[("POST", "/patches/trigger", "200")] == 4
        assert http[("GET", "/patches/runs/{run_id}", "200")] >= 4
    finally:
        for proc in (first, second, worker):
            if proc is not None:
                stop(proc)


def test_each_scrape_query_reads_an_index(tmp_path: Path) -> None:
    """EXPLAIN QUERY PLAN of every statement a scrape runs: runs, steps and events are read through an index
    holding every column the query needs, never by a scan of their (wide) rows."""
    settings = settings_for(f"sqlite:///{tmp_path / 'plans.db'}", tmp_path)
    app = open_app(settings)
    try:
        with app.store.db.read() as conn:
            for name, stmt in MetricsQueries(app.store.db).queries(time.time()).items():
                sql = str(stmt.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
                plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
                reads = [p for p in plan if p.startswith(("SCAN ", "SEARCH ")) and " USING " not in p]
                # Derived tables (the top-N folding) and the one-row-per-component trust table are fine to scan.
                tables = [p.split()[1] for p in reads if p.split()[1] in ("runs", "steps", "events", "work_orders")]
                assert not tables, f"{name}: {plan}"
                for table in ("runs", "steps", "events"):
                    for p in plan:
                        if p.startswith(f"SCAN {table} "):
                            assert "COVERING INDEX" in p, f"{name}: {plan}"
    finally:
        app.close()


def test_labels_beyond_the_cap_are_summed_as_other(database_url: str, tmp_path: Path) -> None:
    app = open_app(settings_for(database_url, tmp_path))
    try:
        counts = {"a": 5, "b": 4, "c": 2, "d": 1}
        app.store.publish(
            [NewEvent(type=f"t.{k}", message="m", source="s") for k, n in counts.items() for _ in range(n)]
        )
        snapshot = MetricsQueries(app.store.db, max_label_values=2).snapshot(time.time())
        assert snapshot.events == {("t.a", "s"): 5, ("t.b", "s"): 4, (OTHER, OTHER): 3}
        assert MetricsQueries(app.store.db).snapshot(time.time()).events == {
            (f"t.{k}", "s"): n for k, n in counts.items()
        }
    finally:
        app.close()


def test_metrics_needs_a_token_like_every_read(tmp_path: Path) -> None:
    settings = settings_for(f"sqlite:///{tmp_path / 'auth.db'}", tmp_path, api_tokens=["s3cret-metrics-token"])
    app = open_app(settings)
    try:
        with api_client(app) as client:
            refused = client.get("/metrics")
            assert refused.status_code == 401 and refused.json()["field"] == "Authorization"
            answer = client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"})
            assert answer.status_code == 200
            names = {f.name for f in text_string_to_metric_families(answer.text)}
            assert {"mendloop_runs", "mendloop_events", "mendloop_process_http_requests"} <= names
            # The refused scrape was counted, by its route and status.
            http = {
                (s.labels["route"], s.labels["status"]): s.value
                for f in text_string_to_metric_families(
                    client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"}).text
                )
                if f.name == "mendloop_process_http_requests"
                for s in f.samples
                if s.name.endswith("_total")
            }
            assert http[("unmatched", "401")] == 1 and http[("/metrics", "200")] == 1
    finally:
        app.close()


def test_watcher_figures_are_this_process_own(tmp_path: Path) -> None:
    """A watcher of this process: lines and detections from its stats, bytes read from its checkpoints, and bytes
    appended while it is stopped as its lag."""
    log = tmp_path / "svc.log"
    log.write_text("")
    pattern = {"name": "boom", "regex": "ERROR", "event_type": "svc.error"}
    watcher = {"name": "svc", "paths": [str(log)], "start_at": "beginning", "multiline": False, "patterns": [pattern]}
    settings = settings_for(f"sqlite:///{tmp_path / 'watch.db'}", tmp_path, watchers=[watcher])
    app = open_app(settings, watch=True)
    try:
        with api_client(app) as client:

            def figures() -> dict[str, float]:
                answer = client.get("/metrics")
                assert answer.status_code == 200
                return {
                    s.name: s.value
                    for f in text_string_to_metric_families(answer.text)
                    if f.name.startswith("mendloop_process_watcher_")
                    for s in f.samples
                    if s.labels == {"watcher": "svc"}
                }

            with log.open("a") as f:
                f.write("ok\nERROR boom\nok\n")
            size = log.stat().st_size
            wait_for(lambda: figures().get("mendloop_process_watcher_read_bytes") == size)
            seen = figures()
            assert seen["mendloop_process_watcher_lines_total"] == 3
            assert seen["mendloop_process_watcher_detections_total"] == 1
            assert seen["mendloop_process_watcher_files"] == 1
            assert seen["mendloop_process_watcher_errors_total"] == 0
            assert seen["mendloop_process_watcher_lag_bytes"] == 0
            # The detection's incident, counted from the database like GET /incidents counts it.
            open_ = client.get("/incidents", params={"status": "open"}).json()["incidents"]
            expected = Counter(i["component"] or "" for i in open_)
            assert sum(expected.values()) == 1
            families = text_string_to_metric_families(client.get("/metrics").text)
            incidents = next(f for f in families if f.name == "mendloop_incidents_open")
            assert {x.labels["component"]: x.value for x in incidents.samples} == dict(expected)
            assert app.watchers is not None
            app.watchers.stop()  # nothing reads the file now: what is appended is lag
            with log.open("a") as f:
                f.write("12345\n")
            seen = figures()
            assert seen["mendloop_process_watcher_lag_bytes"] == 6
            assert seen["mendloop_process_watcher_read_bytes"] == size
    finally:
        app.close()
