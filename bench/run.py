"""`make bench`: mendloop's throughput and latency, each beside its baseline measured in the same run.

1. runs/s of a 3-step no-op playbook on SQLite in one process, beside the same number of bare SQLite commits.
2. p50/p99 of trigger → completed for `database_reconnect` against the real sample service.
3. After kill -9 of `mendloop serve`, how soon after the restarted server is ready the interrupted run resumes.
4. The agent runner's own overhead per work order on a repository of 5,000 files (bench/runner.py), beside bare
   `git worktree add` + `git apply` + `git commit` in the same run.
5. Webhook intake on SQLite against a real `mendloop serve`, the load from a second process (bench/intake.py):
   single-event POSTs/s, p50/p99 at 1,000 requests/s, events/s in batches of 500, beside an HTTP server that
   stores nothing and bare SQLite commits/s, measured in the same run; then kill -9 and every 2xx counted.
6. Redaction of log lines and event payloads (bench/redact.py), beside the regex Redactor it replaced.
7. `/health` p50/p99 while 10,000 distinct errors arrive at a real `mendloop serve` (bench/health.py), beside
   `/health` on the same server idle, measured in the same run.
8. Reads as history grows (bench/reads.py): p50/p99 of every list and detail endpoint, with each filter, with 20
   concurrent clients and 200 events/s written beside them, at 10,000 and 100,000 runs (`--reads-sizes` adds
   1,000,000), on SQLite and on PostgreSQL when MENDLOOP_BENCH_POSTGRES_URL is set; the baseline is the smallest
   size, measured in the same run.
9. The dashboard as history grows (bench/dashboard.py): the Runs tab (plain, filtered, a deep keyset page), a
   run's page, the Workflow and Patches tabs, server p50/p99 and Chromium's navigation timing, at the read bench's
   sizes on SQLite; the baseline is the smallest size, measured in the same run.
10. Command steps (bench/command_steps.py): a one-command playbook triggered open-loop at 100 and 200 runs/s, and at
   200/s with 1 run in 100 holding its worker for 2 s: runs completed/s and scheduled trigger -> command started,
   beside bare `/bin/true` spawns/s.
11. No stalls (bench/storms.py): the API's p99 during a 100k-event batch storm and a 100k-line watcher storm,
   beside the same probes idle; the watcher storm's first line -> its run started; serve's peak RSS.
12. On PostgreSQL (when MENDLOOP_BENCH_POSTGRES_URL is set), 3-step no-op runs/s drained by 1, 2 and 4 `mendloop
   worker` processes (bench/pg_workers.py), beside bare SKIP LOCKED claim + complete jobs/s in as many processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mendloop.app import App  # noqa: E402
from mendloop.config import load_settings  # noqa: E402
from mendloop.domain.states import RunStatus  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import command_steps as commands_bench  # noqa: E402
import cpu_runs as cpu_runs_bench  # noqa: E402
import dashboard as dashboard_bench  # noqa: E402
import detect as detect_bench  # noqa: E402
import health as health_bench  # noqa: E402
import intake as intake_bench  # noqa: E402
import pg_workers as pg_workers_bench  # noqa: E402
import reads as reads_bench  # noqa: E402
import redact as redact_bench  # noqa: E402
import results as results_doc  # noqa: E402
import runner as agent_runner_bench  # noqa: E402
import scan as scan_bench  # noqa: E402
import storms as storms_bench  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Any, timeout: float = 30, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)


def write_config(tmp: Path, **cfg: Any) -> Path:
    path = tmp / "mendloop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def bench_throughput(tmp: Path, n: int) -> dict[str, float]:
    pbdir = tmp / "pb"
    pbdir.mkdir()
    steps = [{"id": f"s{i}", "action": "sleep", "with": {"seconds": 0}} for i in range(3)]
    (pbdir / "noop.yaml").write_text(
        yaml.safe_dump({"id": "noop", "type": "retry", "description": "no-op", "steps": steps})
    )
    cfg = write_config(
        tmp, database_url=f"sqlite:///{tmp}/tp.db", playbook_dirs=["pb"], routing={"noop": "noop"}, workers=0
    )
    app = App(load_settings(cfg)).open(start_workers=False)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            app.remediation.trigger(error_type="noop", description=str(i))
        t1 = time.perf_counter()
        claims = 0
        while app.workers.run_once("bench:0:w0"):
            claims += 1
        t2 = time.perf_counter()
        done = app.store.list_runs(status=RunStatus.COMPLETED.value, limit=1)[1]
        assert done == n, f"{done} of {n} runs completed"
    finally:
        app.close()

    conn = sqlite3.connect(tmp / "bare.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    t3 = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES (?)", (str(i),))
        conn.execute("COMMIT")
    t4 = time.perf_counter()
    conn.close()
    return {
        "runs": n,
        "trigger_per_s": n / (t1 - t0),
        "execute_per_s": n / (t2 - t1),
        "end_to_end_per_s": n / (t2 - t0),
        "bare_commits_per_s": n / (t4 - t3),
    }


def start_service(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    svc = ROOT / "examples" / "sample_service"
    state = tmp / "svc-state"
    state.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "service.py", "--port", str(port), "--state-dir", str(state)],
        cwd=svc,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _ok(f"http://127.0.0.1:{port}/health"), 30)
    return proc


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def quickstart_targets(service_port: int) -> dict[str, Any]:
    quick = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    quick["targets"]["sample_service"]["base_url"] = f"http://127.0.0.1:{service_port}"
    return {"targets": quick["targets"], "default_target": "sample_service"}


def bench_latency(tmp: Path, samples: int) -> dict[str, float]:
    port = free_port()
    svc = start_service(tmp, port)
    cfg = write_config(tmp, database_url=f"sqlite:///{tmp}/lat.db", workers=2, **quickstart_targets(port))
    app = App(load_settings(cfg)).open()
    finished = threading.Condition()
    done: set[str] = set()

    def on_event(event: Any) -> None:
        if event.type == "self_healing.completed" and event.run_id:
            with finished:
                done.add(event.run_id)
                finished.notify_all()

    app.bus.subscribe(on_event)
    latencies: list[float] = []
    try:
        for _ in range(samples):
            httpx.post(f"http://127.0.0.1:{port}/admin/faults/db_disconnect", json={}).raise_for_status()
            t0 = time.perf_counter()
            run, _ = app.remediation.trigger(error_type="database_connection", description="Database connection lost")
            with finished:
                finished.wait_for(lambda rid=run.id: rid in done, timeout=30)
            latencies.append(time.perf_counter() - t0)
            assert app.store.run_status(run.id) is RunStatus.COMPLETED
    finally:
        app.close()
        svc.terminate()
        svc.wait()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {"samples": samples, "p50_ms": statistics.median(latencies) * 1000, "p99_ms": p99 * 1000}


def bench_resume(tmp: Path) -> dict[str, float]:
    log = tmp / "resume.jsonl"
    gate = tmp / "gate"
    script = (
        "import json,os,sys,time\n"
        "open(sys.argv[1],'a').write(json.dumps({'t': time.time()})+'\\n')\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
    )
    pbdir = tmp / "rpb"
    pbdir.mkdir()
    pb = {
        "id": "slow",
        "type": "retry",
        "description": "d",
        "steps": [
            {"id": "wait", "action": "command", "with": {"argv": [sys.executable, "-c", script, str(log), str(gate)]}}
        ],
    }
    (pbdir / "slow.yaml").write_text(yaml.safe_dump(pb))
    (tmp / "r").mkdir()
    cfg = write_config(
        tmp / "r",
        database_url=f"sqlite:///{tmp}/resume.db",
        playbook_dirs=[str(pbdir)],
        routing={"slow": "slow"},
        lease_seconds=300,
        poll_interval=0.5,
    )
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "mendloop",
        "serve",
        "--config",
        str(cfg),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _ok(f"http://127.0.0.1:{port}/health"), 30)
    httpx.post(
        f"http://127.0.0.1:{port}/patches/trigger", json={"description": "d", "error_type": "slow", "wait_seconds": 0}
    )
    wait_for(lambda: log.exists() and log.read_text().count("\n") == 1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    second = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _ok(f"http://127.0.0.1:{port}/health"), 30, 0.005)
        ready = time.time()
        wait_for(lambda: log.read_text().count("\n") == 2, 60)
        resumed = json.loads(log.read_text().splitlines()[1])["t"]
        gate.write_text("go")
    finally:
        second.terminate()
        second.wait()
    return {"resume_after_ready_ms": (resumed - ready) * 1000, "lease_seconds": 300}


def check(args: argparse.Namespace) -> None:
    """`make bench-check`: the CPU-per-unit figures alone (runs, single POSTs, batches), against the recorded
    bench/results.json; exit 1 when one is more than `results.THRESHOLD` times worse. `--repeat N` measures N
    times and prints each figure's spread (max / min), the number the threshold must stay above."""
    try:
        recorded = json.loads(results_doc.RESULTS.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"bench-check: cannot read bench/results.json ({exc}); run `make bench` first")
    docs = []
    for i in range(args.repeat):
        started = results_doc.machine()
        result = {
            "cpu_runs": cpu_runs_bench.run(args.cpu_runs),
            "intake": intake_bench.run(duration=args.check_intake_seconds),
        }
        docs.append(results_doc.document(result, started))
        print(f"bench-check {i + 1}/{args.repeat} (load average {started['load_average'][0]:.2f} at the start)")
        print("\n".join(results_doc.compared(recorded, docs[-1])))
    if args.repeat > 1:
        print("spread across the runs (max / min):")
        for key in [f["key"] for f in docs[0]["figures"] if f["cpu"]]:
            values = [f["value"] for d in docs for f in d["figures"] if f["key"] == key and f["value"]]
            if values:
                print(f"  {key:<34} {max(values) / min(values):.2f}x   ({min(values):.1f} .. {max(values):.1f})")
    worse = results_doc.check(recorded, docs[-1])
    if worse:
        print("bench-check: worse than recorded:\n  " + "\n  ".join(worse))
        sys.exit(1)
    print(f"bench-check: every CPU-per-unit figure within {results_doc.THRESHOLD:g}x of bench/results.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--cpu-runs", type=int, default=1000, help="Runs of the CPU-per-run figure.")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--runner-orders", type=int, default=7, help="Work orders through the agent runner.")
    parser.add_argument("--intake-seconds", type=float, default=5.0, help="Length of each webhook intake figure.")
    parser.add_argument(
        "--reads-sizes",
        type=reads_bench.sizes_of,
        default=[10_000, 100_000],
        help="Runs in the databases of the read bench, e.g. 10000,100000,1000000 (the first is the baseline).",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="Don't write bench/results.json nor the README.")
    parser.add_argument("--check", action="store_true", help="Only the CPU figures, against bench/results.json.")
    parser.add_argument("--repeat", type=int, default=1, help="With --check: measure this many times.")
    parser.add_argument("--check-intake-seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.check:
        check(args)
        return
    started = results_doc.machine()
    with tempfile.TemporaryDirectory(prefix="mendloop-bench-") as d:
        tmp = Path(d)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        (tmp / "c").mkdir()
        tp = bench_throughput(tmp / "a", args.runs)
        lat = bench_latency(tmp / "b", args.samples)
        res = bench_resume(tmp / "c")
    cpu = cpu_runs_bench.run(args.cpu_runs)
    agent = agent_runner_bench.run(files=5000, orders=args.runner_orders)
    intake = intake_bench.run(duration=args.intake_seconds)
    scan = scan_bench.run()
    detect = detect_bench.run()
    redaction = redact_bench.run()
    health = health_bench.run()
    reads = reads_bench.run(sizes=args.reads_sizes, postgres=reads_bench.postgres_url())
    dashboard = dashboard_bench.run(sizes=args.reads_sizes)
    commands = commands_bench.run(rates=[100.0, 200.0], seconds=10.0, workers=[8])
    storms = storms_bench.run()
    pg_url = reads_bench.postgres_url()
    pg_workers = pg_workers_bench.run(pg_url) if pg_url else None
    result = {
        "throughput": tp,
        "cpu_runs": cpu,
        "latency": lat,
        "resume": res,
        "agent_runner": agent,
        "intake": intake,
        "scan": scan,
        "detection": detect,
        "redaction": redaction,
        "health": health,
        "reads": reads,
        "dashboard": dashboard,
        "commands": commands,
        "storms": storms,
        "pg_workers": pg_workers,
    }
    doc = results_doc.document(result, started)
    if not args.no_write:
        results_doc.write(doc)
        results_doc.render_readme(doc)
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print("\n".join(results_doc.header(doc)))
    print(f"3-step no-op playbook, SQLite, one process, {tp['runs']} runs")
    print(f"  runs completed/s (execute)    {tp['execute_per_s']:9.0f}   goal >= 500")
    print(f"  runs triggered/s              {tp['trigger_per_s']:9.0f}")
    print(f"  runs/s trigger+execute        {tp['end_to_end_per_s']:9.0f}")
    print(f"  bare SQLite commits/s         {tp['bare_commits_per_s']:9.0f}   (the limit)")
    print(f"  ratio runs/s : bare commits/s {tp['execute_per_s'] / tp['bare_commits_per_s']:9.3f}")
    print("\n".join(cpu_runs_bench.report(cpu)))
    print(f"database_reconnect vs the sample service, trigger -> completed ({lat['samples']} samples)")
    print(f"  p50 {lat['p50_ms']:.0f} ms   p99 {lat['p99_ms']:.0f} ms   (includes the playbook's 200 ms backoff)")
    print("kill -9 of serve mid-step, restart")
    after = res["resume_after_ready_ms"]
    # Dead workers' leases are released while the server starts, so the run usually resumes before /health answers.
    when = f"{after:.0f} ms after" if after >= 0 else f"{-after:.0f} ms before"
    print(f"  interrupted run resumed {when} the restarted server reported ready (lease 300 s)   goal <= 1000 ms after")
    print("\n".join(agent_runner_bench.report(agent)))
    print("\n".join(intake_bench.report(intake)))
    print("\n".join(scan_report(scan)))
    print("\n".join(detect_bench.report(detect)))
    print("\n".join(redact_bench.report(redaction)))
    print("\n".join(health_bench.report(health)))
    print("\n".join(reads_bench.report(reads)))
    print("\n".join(dashboard_bench.report(dashboard)))
    print("\n".join(commands_bench.report(commands)))
    print("\n".join(storms_bench.report(storms)))
    if pg_workers:
        print("\n".join(pg_workers_bench.report(pg_workers)))
    print("")
    print("\n".join(results_doc.table(doc)))


def scan_report(r: dict[str, Any]) -> list[str]:
    return ["log scan throughput, MB/s on one core (bench/scan.py)"] + [
        f"  {k:<40} {v:10.1f}" for k, v in r.items() if isinstance(v, int | float)
    ]


if __name__ == "__main__":
    main()
