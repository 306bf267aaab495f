"""No stalls (issue 13, item 1): the API while a storm arrives, on a real `mendloop serve` on SQLite.

Two storms against one server (2 workers, a one-step no-op playbook routed for the watcher's error, storm
control at its defaults), each in a second process so that this one only measures:

1. **batch storm**: 100,000 events posted in batches of 500 by 2 keep-alive connections, as fast as the server
   takes them (repeats of 1,000 distinct errors, so the incident upserts and storm control all work);
2. **watcher storm**: 100,000 identical log lines appended to a watched file in 10 s (chunks of 1,000 every
   100 ms), the shape of the test suite's storm (tests/test_watcher.py).

Meanwhile this process polls `GET /health` and `GET /patches/runs?limit=10` (a page read through the whole
stack), each on its own keep-alive connection, one request every 10 ms, and records each latency; the same
pollers first measure the idle server for the baseline. For the watcher storm it also times the first line's
write to the start of the storm's one run (its first step's `started_at`), and it reads serve's peak RSS
(`VmHWM`) after each storm. Goals: API p99 <= 50 ms during both, the watcher storm's run started within 1 s of
its first line, memory <= 150 MB.

    .venv/bin/python bench/storms.py [--events 100000] [--lines 100000] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import reads  # noqa: E402
from words import distinct_word  # noqa: E402

GOAL_P99_MS = 50.0
GOAL_FIRST_RUN_S = 1.0
GOAL_RSS_MB = 150.0
POLL_EVERY_S = 0.01
PROBES = {"/health": "/health", "runs page": "/patches/runs?limit=10"}
LINE = b"2026-12-03 10:00:00 ERROR: Pipeline timeout after 300 seconds\n"
PATTERN = {
    "name": "timeout",
    "regex": r"ERROR: Pipeline timeout after (?P<seconds>\d+) seconds",
    "event_type": "pipeline.timeout",
    "error_type": "storm_timeout",
    "severity": "critical",
}


def _config(tmp: Path, log: Path) -> dict[str, Any]:
    pbdir = tmp / "pb"
    pbdir.mkdir()
    steps = [{"id": "nap", "action": "sleep", "with": {"seconds": 0}}]
    (pbdir / "quick.yaml").write_text(
        yaml.safe_dump({"id": "quick", "type": "retry", "description": "no-op", "steps": steps})
    )
    return {
        "workers": 2,
        "playbook_dirs": [str(pbdir)],
        "routing": {"storm_timeout": "quick"},
        "watchers": [{"name": "storm", "paths": [str(log)], "start_at": "end", "patterns": [PATTERN]}],
    }


class Poller:
    """GET one path every POLL_EVERY_S on its own keep-alive connection until stopped; each latency kept."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            took = time.perf_counter() - t0
            if ok:
                self.latencies.append(took)
            else:
                self.failures += 1
            self._stop.wait(max(0.0, POLL_EVERY_S - took))
        conn.close()

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def figures(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "n": len(ms),
            "failures": self.failures,
            "p50_ms": reads._pct(ms, 50),
            "p99_ms": reads._pct(ms, 99),
            "max_ms": max(ms, default=0.0),
        }


def _polled(port: int, during: Any) -> tuple[dict[str, Any], Any]:
    pollers = [Poller(port, path) for path in PROBES.values()]
    for p in pollers:
        p.__enter__()
    try:
        out = during()
    finally:
        for p in pollers:
            p.__exit__()
    return {name: p.figures() for name, p in zip(PROBES, pollers, strict=True)}, out


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- the loads (second processes) -----------------------------------------------------------------------------


def post_batches(spec: dict[str, Any]) -> None:
    """`--post-batches`: the batch storm, 2 connections; prints the statuses."""
    port, events, batch = spec["port"], spec["events"], spec["batch"]
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def sender(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for start in range(k * batch, events, 2 * batch):
            body = {
                "events": [
                    {
                        "event_type": "bench.storm",
                        "event_id": f"storm-{i}",
                        "message": f"worker {distinct_word(i % 1000)} crashed while saving job {i}",
                        "component": f"svc-{i % 50:02d}",
                        "payload": {"job": i, "severity": "error"},
                    }
                    for i in range(start, min(events, start + batch))
                ]
            }
            conn.request("POST", "/events", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            with lock:
                statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
        conn.close()

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(json.dumps(statuses))


def write_lines(spec: dict[str, Any]) -> None:
    """`--write-lines`: the watcher storm, paced; prints the wall time of the first write."""
    path, lines, chunk, seconds = Path(spec["path"]), spec["lines"], spec["chunk"], spec["seconds"]
    chunks = lines // chunk
    first = 0.0
    start = time.monotonic()
    with path.open("ab") as fh:
        for i in range(chunks):
            pause = start + i * seconds / chunks - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            fh.write(LINE * chunk)
            fh.flush()
            if i == 0:
                first = time.time()
    print(json.dumps({"first_write": first, "seconds": time.monotonic() - start}))


def _child(flag: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, flag, json.dumps(spec)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


# -- the storms -------------------------------------------------------------------------------------------------


def batch_storm(port: int, pid: int, events: int) -> dict[str, Any]:
    def during() -> dict[str, Any]:
        t0 = time.monotonic()
        child = _child("--post-batches", {"port": port, "events": events, "batch": 500})
        out, _ = child.communicate(timeout=900)
        return {"seconds": time.monotonic() - t0, "statuses": json.loads(out)}

    probes, load = _polled(port, during)
    return {
        "events": events,
        **load,
        "events_per_s": events / load["seconds"],
        "probes": probes,
        "peak_rss_mb": reads.status_mb(pid, "VmHWM"),
    }


def watcher_storm(port: int, pid: int, log: Path, lines: int) -> dict[str, Any]:
    def during() -> dict[str, Any]:
        child = _child("--write-lines", {"path": str(log), "lines": lines, "chunk": 1000, "seconds": 10.0})
        out, _ = child.communicate(timeout=300)
        written = json.loads(out)
        # Every line counted on the one incident: the storm is absorbed (the pollers measure until then).
        deadline = time.monotonic() + 120
        while True:
            found = reads._get(port, "/incidents?error_type=storm_timeout")["incidents"]
            if found and found[0]["count"] >= lines:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"watcher storm not absorbed: {found}")
            time.sleep(0.1)
        return {**written, "absorbed_s": time.time() - written["first_write"], "incident": found[0]}

    probes, load = _polled(port, during)
    runs = reads._get(port, "/patches/runs?limit=50")["runs"]
    storm_runs = [r for r in runs if r["error_type"] == "storm_timeout"]
    first = min(storm_runs, key=lambda r: r["created_at"])
    detail = reads._get(port, f"/patches/runs/{first['run_id']}")
    started = min(_epoch(s["started_at"]) for s in detail["steps"])
    return {
        "lines": lines,
        "write_seconds": load["seconds"],
        "absorbed_s": load["absorbed_s"],
        "incident_count": load["incident"]["count"],
        "runs": len(storm_runs),
        "first_run_created_s": _epoch(first["created_at"]) - load["first_write"],
        "first_run_started_s": started - load["first_write"],
        "probes": probes,
        "peak_rss_mb": reads.status_mb(pid, "VmHWM"),
    }


def run(events: int = 100_000, lines: int = 100_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mendloop-bench-storms-") as d:
        tmp = Path(d)
        log = tmp / "storm.log"
        log.touch()
        url = f"sqlite:///{tmp}/storms.db"
        load_start = os.getloadavg()
        server, port = reads._serve(tmp, url, extra=_config(tmp, log))
        try:
            idle, _ = _polled(port, lambda: time.sleep(5.0))
            rss_idle = reads.status_mb(server.pid)
            batch = batch_storm(port, server.pid, events)
            watcher = watcher_storm(port, server.pid, log, lines)
        finally:
            reads.stop_serve(server)
    return {
        "load_average_start": load_start,
        "load_average": os.getloadavg(),
        "idle": idle,
        "rss_idle_mb": rss_idle,
        "batch": batch,
        "watcher": watcher,
        "api_p99_ms": max(f["p99_ms"] for s in (batch, watcher) for f in s["probes"].values()),
    }


def report(r: dict[str, Any]) -> list[str]:
    def probes(label: str, ps: dict[str, Any]) -> list[str]:
        out = []
        for name, f in ps.items():
            mark = " !" if f["p99_ms"] > GOAL_P99_MS and label != "idle" else ""
            out.append(
                f"    {label:<15} {name:<10} p50 {f['p50_ms']:6.1f}  p99 {f['p99_ms']:6.1f}{mark}"
                f"  max {f['max_ms']:7.1f} ms  ({f['n']} requests, {f['failures']} failed)"
            )
        return out

    b, w = r["batch"], r["watcher"]
    la0, la1 = r["load_average_start"][0], r["load_average"][0]
    lines = [
        f"no stalls (bench/storms.py), SQLite, serve with 2 workers; load average {la0:.1f} -> {la1:.1f};"
        f" goal API p99 <= {GOAL_P99_MS:.0f} ms",
        *probes("idle", r["idle"]),
        f"  batch storm: {b['events']:,} events in batches of 500 in {b['seconds']:.1f} s"
        f" ({b['events_per_s']:,.0f}/s, {b['statuses']}); peak RSS {b['peak_rss_mb']:.0f} MB",
        *probes("batch storm", b["probes"]),
        f"  watcher storm: {w['lines']:,} lines in {w['write_seconds']:.1f} s, all {w['incident_count']:,} counted"
        f" {w['absorbed_s']:.1f} s after the first; {w['runs']} run(s)",
        f"    first line -> its run created {w['first_run_created_s'] * 1000:.0f} ms, started"
        f" {w['first_run_started_s'] * 1000:.0f} ms (goal <= {GOAL_FIRST_RUN_S * 1000:.0f});"
        f" serve peak RSS {w['peak_rss_mb']:.0f} MB (goal <= {GOAL_RSS_MB:.0f}; idle {r['rss_idle_mb']:.0f})",
        *probes("watcher storm", w["probes"]),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--post-batches", help=argparse.SUPPRESS)
    parser.add_argument("--write-lines", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.post_batches:
        post_batches(json.loads(args.post_batches))
        return
    if args.write_lines:
        write_lines(json.loads(args.write_lines))
        return
    result = run(args.events, args.lines)
    print(json.dumps(result, indent=2) if args.json else "\n".join(report(result)))


if __name__ == "__main__":
    main()
