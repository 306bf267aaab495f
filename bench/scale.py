"""Scale that stays flat (issue 13, item 2), on SQLite:

1. startup against history: `mendloop serve` exec -> /health 200, and -> the first triggered run completed, with
   a small and a large history (bench/gen_history.py, cached under bench/.cache/); goal: the large within 2x.
2. 100,000 runs parked in `awaiting_patch`, each with its queued work order (the shape `domain.runs.escalate`
   gives them): serve's RSS (goal < 500 MB), API p99 with 4 clients and 1 alone (goal < 50 ms), serve's idle CPU
   over 30 s, and the reaper's search (storage/work_orders.py `reap`): its query plan and cost a pass.

    python bench/scale.py [--sizes 10000,1000000] [--parked 100000] [--idle 30]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gen_history  # noqa: E402
import reads  # noqa: E402

from mendloop.domain import runs as domain_runs  # noqa: E402
from mendloop.storage import schema as t  # noqa: E402
from mendloop.storage.db import sqlite_insert  # noqa: E402
from mendloop.storage.rows import run_of  # noqa: E402

GOAL_STARTUP_RATIO = 2.0
GOAL_RSS_MB = 500.0
GOAL_P99_MS = 50.0
# Queued runs a history keeps at startup, whatever its size (see hold_unfinished).
KEEP_QUEUED = 100

# The reaper's search, as storage/work_orders.py `reap` builds it (its read before any write lock).
REAP_SQL = (
    "SELECT id FROM work_orders WHERE (status = 'in_progress' AND lease_expires_at < :now)"
    " OR (status IN ('queued', 'in_progress') AND deadline_at < :now) LIMIT 1"
)


def _noop_config(tmp: Path) -> dict[str, Any]:
    """One worker and a one-step no-op playbook: the first triggered run is what "ready for work" times."""
    pbdir = tmp / "pb"
    pbdir.mkdir(exist_ok=True)
    steps = [{"id": "s0", "action": "sleep", "with": {"seconds": 0}}]
    (pbdir / "noop.yaml").write_text(
        yaml.safe_dump({"id": "noop", "type": "retry", "description": "no-op", "steps": steps})
    )
    return {"workers": 1, "playbook_dirs": [str(pbdir)], "routing": {"noop": "noop"}}


def _post(port: int, path: str, body: dict[str, Any]) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"POST {path}: {r.status} {data[:300]!r}")
    return json.loads(data)


def hold_unfinished(path: Path, keep: int = KEEP_QUEUED, *, now: float) -> dict[str, int]:
    """Hold the runs a starting worker must take first to the same number at every size.

    gen_history keeps 1% of a history queued and 1% running with lapsed leases, and a starting worker takes those
    before any new run, so "ready for work" would time a backlog that grows with the history, not startup. Here the
    running ones end as cancelled and `keep` queued ones stay, deferred a day (retries backing off): the unfinished
    runs left are those `keep` and the history's parked `awaiting_patch` runs (2%, which startup must not walk).
    Returns the runs of each status that stay unfinished."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute(
            "UPDATE runs SET status = 'cancelled', finished_at = :now, lease_owner = NULL, lease_expires_at = NULL"
            " WHERE status = 'running' OR (status = 'queued' AND id NOT IN"
            " (SELECT id FROM runs WHERE status = 'queued' ORDER BY created_at DESC LIMIT :keep))",
            {"now": now, "keep": keep},
        )
        conn.execute("UPDATE runs SET next_run_at = :later WHERE status = 'queued'", {"later": now + 86_400})
        left = dict(
            conn.execute(
                "SELECT status, count(*) FROM runs WHERE status IN ('queued', 'running', 'awaiting_patch')"
                " GROUP BY status"
            ).fetchall()
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return {str(k): int(v) for k, v in left.items()}


def startup(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mendloop-bench-scale-") as d:
        tmp = Path(d)
        t0 = time.monotonic()
        path = gen_history.sqlite_copy(runs, tmp / "history.db")
        unfinished = hold_unfinished(path, now=time.time())
        url = f"sqlite:///{path}"
        prepared = time.monotonic() - t0
        started = time.monotonic()
        server, port = reads._serve(tmp, url, extra=_noop_config(tmp), poll=0.01)
        health = time.monotonic() - started
        try:
            out = _post(port, "/patches/trigger", {"error_type": "noop", "description": "first", "wait_seconds": 60})
            ready = time.monotonic() - started
            status = out.get("status") or out.get("run", {}).get("status")
        finally:
            reads.stop_serve(server)
    return {
        "runs": runs,
        "health_s": health,
        "first_run_s": ready,
        "status": status,
        "prepare_s": prepared,
        "unfinished": unfinished,
    }


def build_parked(path: Path, parked: int, *, now: float) -> None:
    """`parked` runs in awaiting_patch beside their queued work orders, added to a gen_history file: each a running
    run passed through `domain.runs.escalate`, so the rows are the ones a real escalation writes."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    runs_sql, wo_sql = sqlite_insert(t.runs), sqlite_insert(t.work_orders)
    pb = gen_history._playbook("verification_fix", "code_patch")
    run_rows, wo_rows = [], []
    for i in range(parked):
        created = now - 3600 + i * 0.01
        component = gen_history.COMPONENTS[i % len(gen_history.COMPONENTS)]
        running: dict[str, Any] = {
            "id": gen_history.make_run_id(created, 10_000_000 + i),
            "playbook_id": "verification_fix",
            "playbook_version": "1-0123abcd",
            "playbook_type": "code_patch",
            "playbook": pb,
            "status": "running",
            "component": component,
            "error_type": "error_00",
            "description": f"error_00 in {component}",
            "context": {"file_path": f"/srv/{component}/app.py"},
            "step_index": 1,
            "attempt": 0,
            "outputs": {},
            "pending": {},
            "escalated": False,
            "coding_work_order_id": None,
            "lease_owner": None,
            "lease_expires_at": None,
            "next_run_at": created,
            "created_at": created,
            "updated_at": created,
            "finished_at": None,
            "error": None,
            "trigger_event_id": None,
            "dedupe_key": None,
            "incident_id": None,
            "mutex_key": component,
            "stalled_claims": 0,
        }
        esc = domain_runs.escalate(
            run_of(running),
            wo_id=f"wo_parked_{i:08d}",
            step_id="step1",
            next_index=2,
            description="Code patch required for: error_00",
            context={"error_type": "error_00", "component": component},
            estimated_complexity="medium",
            priority="normal",
            repository=None,
            base_commit=None,
            max_attempts=3,
            deadline_at=None,
            now=created + 1,
        )
        run_rows.append(gen_history._columns(t.runs, _stored({**running, **esc.run})))
        wo_rows.append(gen_history._columns(t.work_orders, _stored(esc.work_order)))
    conn.executemany(runs_sql, run_rows)
    conn.executemany(wo_sql, wo_rows)
    # The triggers of migration 0014 left one count delta a row: fold them as housekeeping would.
    for statement in gen_history._FOLD_COUNTS:
        conn.execute(statement)
    conn.execute("COMMIT")
    conn.close()


def _stored(row: dict[str, Any]) -> dict[str, Any]:
    """JSON columns as sqlite3 stores them (text), the rest as they are."""
    return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}


def reap_search(path: Path, passes: int = 50) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        now = time.time()
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + REAP_SQL, {"now": now})]
        t0 = time.perf_counter()
        for _ in range(passes):
            conn.execute(REAP_SQL, {"now": now}).fetchall()
        ms = (time.perf_counter() - t0) * 1000 / passes
    finally:
        conn.close()
    return {"plan": plan, "ms_per_pass": ms}


def parked_serve(parked: int, idle_seconds: float, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mendloop-bench-scale-") as d:
        tmp = Path(d)
        db = gen_history.sqlite_copy(10_000, tmp / "parked.db")
        t0 = time.monotonic()
        build_parked(db, parked, now=time.time())
        built = time.monotonic() - t0
        reap = reap_search(db)
        url = f"sqlite:///{db}"
        server, port = reads._serve(tmp, url, extra=_noop_config(tmp))
        try:
            with sqlite3.connect(db) as conn:
                run_id = conn.execute("SELECT id FROM runs WHERE status = 'awaiting_patch' LIMIT 1").fetchone()[0]
            paths = {
                "GET /patches/stats": ["/patches/stats"],
                "GET /patches/runs?limit=50": ["/patches/runs?limit=50"],
                "GET /patches/work-orders?limit=50": ["/patches/work-orders?limit=50"],
                "GET /patches/runs/{id}": [f"/patches/runs/{run_id}"],
                "GET /health": ["/health"],
            }
            figures = {}
            for name, p in paths.items():
                reads._measure(port, p, 8, 30, clients=4)  # warm
                lat, codes = reads._measure(port, p, requests, 60, clients=4)
                solo, _ = reads._measure(port, p, requests // 4, 60, clients=1)
                figures[name] = {
                    "p99_ms": reads._pct(lat, 99),
                    "p50_ms": reads._pct(lat, 50),
                    "solo_p99_ms": reads._pct(solo, 99),
                    "codes": codes,
                }
            cpu0, w0 = reads._cpu_seconds(server.pid), time.monotonic()
            time.sleep(idle_seconds)  # idle: nothing asks anything of the server meanwhile
            idle_cpu = (reads._cpu_seconds(server.pid) - cpu0) / (time.monotonic() - w0)
            rss = reads.status_mb(server.pid)
        finally:
            reads.stop_serve(server)
    return {"parked": parked, "build_s": built, "reap": reap, "endpoints": figures, "idle_cpu": idle_cpu, "rss_mb": rss}


def report(r: dict[str, Any]) -> list[str]:
    lines = [f"scale (bench/scale.py), SQLite; load average {r['load_start'][0]:.1f} -> {r['load_end'][0]:.1f}"]
    s = r["startup"]
    for x in s:
        lines.append(
            f"  startup, {x['runs']:>9,} runs: exec -> /health {x['health_s'] * 1000:7.0f} ms; -> first run"
            f" {x['status']} {x['first_run_s'] * 1000:7.0f} ms (history copied in {x['prepare_s']:.1f} s;"
            f" unfinished {x['unfinished']})"
        )
    if len(s) > 1:
        h, f = s[-1]["health_s"] / s[0]["health_s"], s[-1]["first_run_s"] / s[0]["first_run_s"]
        lines.append(
            f"  startup ratio {s[-1]['runs']:,} / {s[0]['runs']:,}: /health {h:.2f}x, first run {f:.2f}x"
            f" (goal <= {GOAL_STARTUP_RATIO}x)"
        )
    p = r.get("parked")
    if p:
        lines.append(f"  {p['parked']:,} runs parked in awaiting_patch (built in {p['build_s']:.1f} s):")
        lines.append(
            f"    serve RSS {p['rss_mb']:.0f} MB (goal < {GOAL_RSS_MB:.0f}); idle CPU {p['idle_cpu'] * 100:.2f}%"
        )
        lines.append(
            f"    reaper search {p['reap']['ms_per_pass']:.3f} ms a pass; plan: {' | '.join(p['reap']['plan'])}"
        )
        for name, f in p["endpoints"].items():
            mark = "" if f["p99_ms"] < GOAL_P99_MS else " !"
            lines.append(
                f"    {name:<36} 4 clients p50 {f['p50_ms']:6.1f} / p99 {f['p99_ms']:6.1f} ms{mark};"
                f" 1 client p99 {f['solo_p99_ms']:6.1f} ms {f['codes']}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=reads.sizes_of, default=[10_000, 1_000_000])
    parser.add_argument("--parked", type=int, default=100_000, help="0: skip the parked-runs part")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measured")
    parser.add_argument("--requests", type=int, default=200, help="requests per endpoint, 4 clients")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {"load_start": os.getloadavg()}
    result["startup"] = [startup(n) for n in args.sizes]
    if args.parked:
        result["parked"] = parked_serve(args.parked, args.idle, args.requests)
    result["load_end"] = os.getloadavg()
    print(json.dumps(result, indent=2) if args.json else "\n".join(report(result)))


if __name__ == "__main__":
    main()
