"""Runs/s on PostgreSQL with 1, 2 and 4 `mendloop worker` processes, beside bare SKIP LOCKED jobs/s (issue 13).

For each process count, on a fresh database:

- **mendloop**: `--runs` runs of a 3-step no-op playbook are queued (in process, no worker), then that many
  `mendloop worker` processes (one worker thread each) drain them. The rate is the steady one: runs finished
  between the first and the last finish (`runs.finished_at`), so process start-up is left out.
- **baseline**: the same number of jobs in a bare table drained by the same number of processes, each looping
  `SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1` + `UPDATE` to running (one transaction, the claim) and an `UPDATE`
  to done (the completion), with psycopg and nothing else: the least a queue on PostgreSQL can do per job.

Goal: mendloop's runs/s >= 0.5x the bare jobs/s at every process count. A run is a claim, three steps and a
finish, each committed (five transactions) against the baseline's two, so the ratio says what mendloop's own
durability and bookkeeping cost on top of the database's floor.

    MENDLOOP_BENCH_POSTGRES_URL=postgresql+psycopg://... .venv/bin/python bench/pg_workers.py [--runs 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import chaos  # noqa: E402
import reads  # noqa: E402

from mendloop.app import App  # noqa: E402
from mendloop.config import load_settings  # noqa: E402

GOAL_RATIO = 0.5
PROCESSES = (1, 2, 4)


def _psycopg_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _config(tmp: Path, url: str) -> Path:
    pbdir = tmp / "pb"
    pbdir.mkdir(exist_ok=True)
    steps = [{"id": f"s{i}", "action": "sleep", "with": {"seconds": 0}} for i in range(3)]
    (pbdir / "noop.yaml").write_text(
        yaml.safe_dump({"id": "noop", "type": "retry", "description": "no-op", "steps": steps})
    )
    cfg = tmp / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump({"database_url": url, "playbook_dirs": [str(pbdir)], "routing": {"noop": "noop"}, "workers": 0})
    )
    return cfg


def _wait_all(procs: list[subprocess.Popen[bytes]], done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a worker process exited with {dead[0].returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the runs were not drained in time")
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def mendloop_case(admin_url: str, processes: int, runs: int) -> dict[str, Any]:
    import psycopg

    url = chaos.fresh_postgres_database(admin_url)
    try:
        with tempfile.TemporaryDirectory(prefix="mendloop-bench-pgw-") as d:
            tmp = Path(d)
            cfg = _config(tmp, url)
            app = App(load_settings(cfg)).open(start_workers=False)
            try:
                for i in range(runs):
                    app.remediation.trigger(error_type="noop", description=f"r{i}")
            finally:
                app.close()
            env = {k: v for k, v in os.environ.items() if not k.startswith("MENDLOOP_")}
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "mendloop", "worker", "--config", str(cfg), "--count", "1"],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=(tmp / f"worker{k}.log").open("wb"),
                )
                for k in range(processes)
            ]
            with psycopg.connect(_psycopg_url(url), autocommit=True) as conn:
                # The workers' CPU from their first finished run to the last: per run, start-up left out.
                first_cpu: list[tuple[float, int]] = []

                def completed() -> bool:
                    row = conn.execute("SELECT count(*) FROM runs WHERE status = 'completed'").fetchone()
                    n = int(row[0]) if row else 0
                    if n and not first_cpu:
                        first_cpu.append((sum(reads._cpu_seconds(p.pid) for p in procs), n))
                    return n >= runs

                try:
                    _wait_all(procs, completed, timeout=600)
                    last_cpu = sum(reads._cpu_seconds(p.pid) for p in procs)
                finally:
                    _stop(procs)
                first, last, n = conn.execute(
                    "SELECT min(finished_at), max(finished_at), count(*) FROM runs WHERE status = 'completed'"
                ).fetchone() or (0.0, 0.0, 0)
    finally:
        chaos.drop_postgres_database(url)
    cpu0, n0 = first_cpu[0]
    return {
        "processes": processes,
        "runs": int(n),
        "per_s": (int(n) - 1) / max(1e-9, float(last) - float(first)),
        "worker_cpu_ms_per_run": (last_cpu - cpu0) * 1000 / max(1, int(n) - n0),
    }


def bare_worker(spec: dict[str, Any]) -> None:
    """`--bare-worker`: drain the jobs table, each job a SKIP LOCKED claim and a completion, two transactions."""
    import psycopg

    with psycopg.connect(spec["url"]) as conn:
        while True:
            with conn.transaction():
                row = conn.execute(
                    "SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
                ).fetchone()
                if row is None:
                    return
                conn.execute(
                    "UPDATE jobs SET status = 'running', owner = %s, claimed_at = %s WHERE id = %s",
                    (spec["owner"], time.time(), row[0]),
                )
            with conn.transaction():
                conn.execute("UPDATE jobs SET status = 'done', done_at = %s WHERE id = %s", (time.time(), row[0]))


def bare_case(admin_url: str, processes: int, jobs: int) -> dict[str, Any]:
    import psycopg

    url = _psycopg_url(chaos.fresh_postgres_database(admin_url))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE jobs (id bigserial PRIMARY KEY, status text NOT NULL, owner text,"
                " claimed_at double precision, done_at double precision)"
            )
            conn.execute("CREATE INDEX ix_jobs_status ON jobs (status, id)")
            conn.execute("INSERT INTO jobs (status) SELECT 'queued' FROM generate_series(1, %s)", (jobs,))
            procs = [
                subprocess.Popen(
                    [sys.executable, __file__, "--bare-worker", json.dumps({"url": url, "owner": f"w{k}"})],
                    cwd=ROOT,
                )
                for k in range(processes)
            ]
            for p in procs:
                if p.wait(600) != 0:
                    raise RuntimeError(f"a bare worker exited with {p.returncode}")
            first, last, n = conn.execute(
                "SELECT min(done_at), max(done_at), count(*) FROM jobs WHERE status = 'done'"
            ).fetchone() or (0.0, 0.0, 0)
    finally:
        chaos.drop_postgres_database(url)
    return {"processes": processes, "jobs": int(n), "per_s": (int(n) - 1) / max(1e-9, float(last) - float(first))}


def run(admin_url: str, runs: int = 2000, processes: tuple[int, ...] = PROCESSES) -> dict[str, Any]:
    load_start = os.getloadavg()
    cases = []
    for k in processes:
        bare = bare_case(admin_url, k, runs)
        ours = mendloop_case(admin_url, k, runs)
        cases.append({"processes": k, "mendloop": ours, "bare": bare, "ratio": ours["per_s"] / bare["per_s"]})
    return {"load_average_start": load_start, "load_average": os.getloadavg(), "runs": runs, "cases": cases}


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        f"PostgreSQL, 3-step no-op runs drained by N `mendloop worker` processes vs bare SKIP LOCKED jobs"
        f" (bench/pg_workers.py, {r['runs']} each); load average {r['load_average_start'][0]:.1f} ->"
        f" {r['load_average'][0]:.1f}; goal ratio >= {GOAL_RATIO}"
    ]
    for c in r["cases"]:
        mark = "" if c["ratio"] >= GOAL_RATIO else " !"
        lines.append(
            f"  {c['processes']} process(es): mendloop {c['mendloop']['per_s']:7.0f} runs/s   bare"
            f" {c['bare']['per_s']:7.0f} jobs/s   ratio {c['ratio']:.2f}{mark};"
            f" workers' CPU {c['mendloop']['worker_cpu_ms_per_run']:.2f} ms a run"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--processes", default=",".join(map(str, PROCESSES)))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        bare_worker(json.loads(args.bare_worker))
        return
    admin = reads.postgres_url()
    if admin is None:
        sys.exit("bench/pg_workers.py: set MENDLOOP_BENCH_POSTGRES_URL to a PostgreSQL server's admin URL")
    result = run(admin, args.runs, tuple(int(x) for x in args.processes.split(",")))
    print(json.dumps(result, indent=2) if args.json else "\n".join(report(result)))


if __name__ == "__main__":
    main()
