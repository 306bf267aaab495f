"""Command steps under load: runs of a one-command playbook triggered open-loop at a fixed rate against a real
`mendloop serve`, and how soon each run's command starts.

Each run is one `POST /patches/trigger` (its own component, so storm control's per-component mutex doesn't
serialise them, and a dedupe key that names the request), and its playbook is a single `command` step running
`/bin/true`. The load is open-loop: requests leave on a fixed schedule whatever the server answers, and a run's
latency counts from its scheduled send time to the moment its command started (`steps.started_at`), so time spent
queued behind a busy server counts. Figures per case: runs/s completed, first-step start p50/p99, and the server's
own CPU per run (utime + stime from /proc over the load). The baseline, in the same run: bare `/bin/true` spawns/s
from one Python thread (`subprocess.run`), the cost of the spawn alone.

A second case mixes in slow runs (`sleep 2`, 1 in 100): with a worker pool sized by `workers` in the config, a
slow command holds one worker and the others go on, so the fast runs' p99 should not move.

Goal (issue 13): 200 runs/s with p99 first-step start <= 100 ms.

    python bench/command_steps.py [--rates 100,200] [--seconds 10] [--workers 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import intake  # noqa: E402

GOAL_RATE = 200.0
GOAL_P99_MS = 100.0
COMPONENTS = 64
SLOW_EVERY = 100
TICKS = os.sysconf("SC_CLK_TCK")


def _config(tmp: Path, workers: int) -> Path:
    pbdir = tmp / "pb"
    pbdir.mkdir(exist_ok=True)
    for pb_id, argv in (("one_command", ["/bin/true"]), ("slow_command", ["/bin/sleep", "2"])):
        steps = [{"id": "run", "action": "command", "with": {"argv": argv, "timeout": 30}}]
        (pbdir / f"{pb_id}.yaml").write_text(
            yaml.safe_dump({"id": pb_id, "type": "retry", "description": f"bench: {argv[0]}", "steps": steps})
        )
    cfg = tmp / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": f"sqlite:///{tmp}/runs.db",
                "playbook_dirs": [str(pbdir)],
                "routing": {"bench_cmd": "one_command", "bench_slow": "slow_command"},
                "workers": workers,
            }
        )
    )
    return cfg


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def _offer(port: int, rate: float, seconds: float, tag: str, slow: bool) -> dict[str, Any]:
    """Open-loop triggers; returns each dedupe key's scheduled send time (wall clock) and the answers."""
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    scheduled: dict[str, float] = {}
    statuses: dict[str, int] = {}

    async def client() -> None:
        conn = intake._Conn("127.0.0.1", port)
        while (item := await due.get()) is not None:
            i, at = item
            kind = "bench_slow" if slow and i % SLOW_EVERY == SLOW_EVERY - 1 else "bench_cmd"
            key = f"{tag}-{i}"
            body = {
                "description": f"bench {key}",
                "error_type": kind,
                "component": f"c{i % COMPONENTS}",
                "dedupe_key": key,
                "wait_seconds": 0,
            }
            scheduled[key] = at
            try:
                status = await conn.post("/patches/trigger", json.dumps(body).encode())
            except (OSError, asyncio.IncompleteReadError):
                status = 0
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        conn.close()

    clients = [asyncio.create_task(client()) for _ in range(32)]
    t0, wall0 = time.perf_counter(), time.time()
    total = int(rate * seconds)
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait((i, wall0 + i / rate))
    for _ in clients:
        due.put_nowait(None)
    await asyncio.gather(*clients)
    return {"scheduled": scheduled, "statuses": statuses}


def _runs(db: Path, tag: str) -> list[tuple[str, str, float, float | None, float | None]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT r.dedupe_key, r.status, r.playbook_id = 'slow_command', r.finished_at,"
            " (SELECT min(s.started_at) FROM steps s WHERE s.run_id = r.id)"
            " FROM runs r WHERE r.dedupe_key LIKE ?",
            (f"{tag}-%",),
        ).fetchall()
    finally:
        conn.close()


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def case(*, workers: int, rate: float, seconds: float, slow: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mendloop-bench-commands-") as d:
        tmp = Path(d)
        cfg = _config(tmp, workers)
        port = intake._free_port()
        argv = [sys.executable, "-m", "mendloop", "serve", "--config", str(cfg), "--port", str(port)]
        argv += ["--log-level", "warning"]
        with intake._server(argv, port, tmp / "serve.log") as proc:
            tag = f"w{workers}-r{int(rate)}"
            cpu0 = _cpu_seconds(proc.pid)
            offered = asyncio.run(_offer(port, rate, seconds, tag, slow))
            deadline = time.monotonic() + 120
            while True:
                rows = _runs(tmp / "runs.db", tag)
                if len(rows) == len(offered["scheduled"]) and all(r[3] is not None for r in rows):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            cpu = _cpu_seconds(proc.pid) - cpu0
    sched = offered["scheduled"]
    fast = [r for r in rows if not r[2]]
    starts = [(r[4] - sched[r[0]]) * 1000 for r in fast if r[4] is not None]
    finished = [r[3] for r in rows if r[3] is not None]
    first = min(sched.values())
    span = max(finished) - first if finished else float("nan")
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r[1]] = statuses.get(r[1], 0) + 1
    return {
        "workers": workers,
        "offered_per_s": rate,
        "slow_share": 1 / SLOW_EVERY if slow else 0.0,
        "triggered": len(sched),
        "answers": offered["statuses"],
        "run_statuses": statuses,
        "completed_per_s": len(finished) / span if finished else 0.0,
        "first_step_start_p50_ms": _pct(starts, 0.50),
        "first_step_start_p99_ms": _pct(starts, 0.99),
        "first_step_start_max_ms": max(starts) if starts else float("nan"),
        "server_cpu_per_run_ms": cpu / max(1, len(finished)) * 1000,
    }


def bare_spawns(n: int = 300) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(["/bin/true"], check=True)
    return n / (time.perf_counter() - t0)


def run(*, rates: list[float], seconds: float, workers: list[int]) -> dict[str, Any]:
    cases = [case(workers=w, rate=r, seconds=seconds, slow=False) for w in workers for r in rates]
    cases.append(case(workers=max(workers), rate=max(rates), seconds=seconds, slow=True))
    return {
        "load_average": os.getloadavg(),
        "bare_spawns_per_s": bare_spawns(),
        "goal": {"rate": GOAL_RATE, "p99_ms": GOAL_P99_MS},
        "cases": cases,
    }


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        f"command steps (bench/command_steps.py), load average {r['load_average'][0]:.2f}; "
        f"bare /bin/true spawns from one thread: {r['bare_spawns_per_s']:,.0f}/s",
        "| workers | offered/s | slow share | completed/s | first step start p50 / p99 ms | server CPU/run | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in r["cases"]:
        met = c["completed_per_s"] >= 0.95 * c["offered_per_s"] and c["first_step_start_p99_ms"] <= GOAL_P99_MS
        goal = ("met" if met else "not met") if c["offered_per_s"] >= GOAL_RATE else ""
        lines.append(
            f"| {c['workers']} | {c['offered_per_s']:.0f} | {c['slow_share']:.0%} | {c['completed_per_s']:.0f} | "
            f"{c['first_step_start_p50_ms']:.1f} / {c['first_step_start_p99_ms']:.1f} | "
            f"{c['server_cpu_per_run_ms']:.2f} ms | {goal} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="100,200", help="offered runs/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", default="8", help="worker threads in serve, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run(
        rates=[float(x) for x in args.rates.split(",")],
        seconds=args.seconds,
        workers=[int(x) for x in args.workers.split(",")],
    )
    print(json.dumps(r, indent=2) if args.json else "\n".join(report(r)))


if __name__ == "__main__":
    main()
