"""Webhook intake on SQLite: `POST /events` against a real `mendloop serve`, the load from a second process.

Durable means committed before the 2xx: single events are group-committed (many requests share a transaction,
none is answered before its transaction commits). Measured, each beside a baseline from the same run:

- (a) single-event POSTs/s, closed loop with N concurrent keep-alive connections;
- (b) p50/p99 latency at a fixed open-loop rate (1,000 requests/s), latency counted from each request's
  scheduled send time, so a stalled server cannot hide its backlog (no coordinated omission);
- (c) events/s in batches of 500 (`{"events": [...]}`).

Two event shapes: repeats of one error (one incident counting them all) and every event its own fingerprint
(each opens an incident). Every event carries its own `event_id` (a retried one would be a no-op), so an
idempotency key is written with each. No playbook is routed for `bench.*`, so no runs start: events, incidents
and event ids are what is written. Baselines: the same load generator against a minimal Starlette app on
uvicorn answering 202 without storing anything (the HTTP ceiling of this machine), and bare SQLite commits/s,
one row per commit.
Afterwards the server is killed with SIGKILL and the database is counted: every 2xx must be a stored event.

The load generator is a small asyncio HTTP/1.1 keep-alive client (uvloop when installed) in its own process.
Not httpx: its AsyncClient tops out near 1,200 requests/s on one connection here and falls to under 200/s with
64 (pool contention), against the same null server that answers 14,000+/s to this client; it would measure
itself.

    .venv/bin/python bench/intake.py [--duration 5] [--rate 1000] [--concurrency 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # also when imported as bench.intake (bench/peer)
from words import distinct_word  # noqa: E402

EVENT_TYPE = "bench.event"


# -- the load generator (runs in its own process: `bench/intake.py --loadgen SPEC`) ---------------------------


def _event(prefix: str, i: int, distinct: bool) -> dict[str, Any]:
    message = (
        f"worker {distinct_word(i)} crashed while saving job {i}"
        if distinct
        else f"ERROR: upstream timeout after {i % 977} ms on job {i}"
    )
    return {
        "event_type": EVENT_TYPE,
        "event_id": f"{prefix}-{i}",
        "message": message,
        "component": "bench",
        "payload": {"host": "web-1", "job": i, "severity": "error"},
    }


class _Conn:
    """One keep-alive HTTP/1.1 connection: a request, then its response (Content-Length framed)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            status = int(raw[9:12])
            lower = raw.lower()
            at = lower.find(b"content-length:")
            length = int(lower[at + 15 : lower.find(b"\r\n", at)]) if at >= 0 else 0
            await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise
        if b"connection: close" in lower:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, mode = spec["host"], int(spec["port"]), spec["mode"]
    duration, warmup = float(spec["duration"]), float(spec.get("warmup", 1.0))
    prefix, distinct, batch = spec["prefix"], bool(spec.get("distinct")), int(spec.get("batch", 1))
    counter = int(spec.get("first", 0))
    acked = 0  # 2xx answers in total (warm-up included): each stands for `batch` stored events
    measured: list[float] = []  # latencies of requests that completed inside the measured window
    statuses: dict[str, int] = {}
    errors = 0
    clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
    start = clock() + warmup
    stop = start + duration

    def body() -> bytes:
        nonlocal counter
        if batch == 1:
            counter += 1
            return json.dumps(_event(prefix, counter, distinct)).encode()
        events = [_event(prefix, counter + k + 1, distinct) for k in range(batch)]
        counter += batch
        return json.dumps({"events": events}).encode()

    def note(status: int, began: float, done: float) -> None:
        nonlocal acked
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if 200 <= status < 300:
            acked += 1
            if start <= done <= stop:
                measured.append(done - began)

    async def closed_client() -> None:
        nonlocal errors
        conn = _Conn(host, port)
        while clock() < stop:
            payload = body()
            t0 = clock()
            try:
                status = await conn.post("/events", payload)
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                continue
            note(status, t0, clock())
        conn.close()

    async def open_loop(rate: float, connections: int) -> None:
        nonlocal errors
        due: asyncio.Queue[float | None] = asyncio.Queue()

        async def client() -> None:
            nonlocal errors
            conn = _Conn(host, port)
            while (scheduled := await due.get()) is not None:
                try:
                    status = await conn.post("/events", body())
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    continue
                # From the scheduled send time: time spent queued behind a slow server counts.
                note(status, scheduled, clock())
            conn.close()

        clients = [asyncio.create_task(client()) for _ in range(connections)]
        t0 = clock()
        sent = 0
        while True:
            now = clock()
            if now >= stop:
                break
            target = int((now - t0) * rate) + 1
            while sent < target:
                due.put_nowait(t0 + sent / rate)
                sent += 1
            await asyncio.sleep(min(0.001, 1 / rate))
        for _ in clients:
            due.put_nowait(None)
        await asyncio.gather(*clients)

    if mode == "open":
        await open_loop(float(spec["rate"]), int(spec.get("connections", 64)))
    else:
        await asyncio.gather(*(closed_client() for _ in range(int(spec["concurrency"]))))
    measured.sort()

    def pct(p: float) -> float:
        return measured[min(len(measured) - 1, int(p * len(measured)))] * 1000 if measured else float("nan")

    return {
        "mode": mode,
        "batch": batch,
        "duration": duration,
        "requests_per_s": len(measured) / duration,
        "events_per_s": len(measured) * batch / duration,
        "acked_requests": acked,
        "acked_events": acked * batch,
        "statuses": statuses,
        "errors": errors,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": measured[-1] * 1000 if measured else float("nan"),
    }


def _run_loadgen(spec_json: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_loadgen(json.loads(spec_json)))))


# -- the baseline server: Starlette on uvicorn, 202 without storing anything ----------------------------------


def _run_null_server(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def accept(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"accepted": True}, status_code=202)

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    api = Starlette(routes=[Route("/events", accept, methods=["POST"]), Route("/health", health)])
    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the driver -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError("server did not become healthy")


@contextlib.contextmanager
def _server(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _load(port: int, **spec: Any) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--loadgen", json.dumps({"host": "127.0.0.1", "port": port, **spec})]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def bare_commits(tmp: Path, n: int = 5000) -> float:
    """Each event its own SQLite commit (WAL, synchronous=NORMAL, as mendloop's store): the per-commit ceiling."""
    conn = sqlite3.connect(tmp / "bare.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, type TEXT, message TEXT, payload TEXT)")
    t0 = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO events (type, message, payload) VALUES (?, ?, ?)",
            (EVENT_TYPE, f"ERROR: upstream timeout on job {i}", json.dumps({"job": i})),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return n / elapsed


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) a process has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _phases(
    port: int, pid: int, prefix: str, *, distinct: bool, duration: float, rate: float, concurrency: int, batch: int
) -> dict[str, dict[str, Any]]:
    common = {"duration": duration, "distinct": distinct, "prefix": prefix}
    # Each phase numbers its events from its own range: with distinct fingerprints, no two events share one.
    specs = {
        "closed": {"mode": "closed", "concurrency": concurrency, "first": 0},
        "open": {"mode": "open", "rate": rate, "connections": concurrency, "first": 10**8},
        "batch": {"mode": "closed", "concurrency": 4, "batch": batch, "first": 2 * 10**8},
    }
    out = {}
    for name, spec in specs.items():
        before = _cpu_seconds(pid)
        result = _load(port, **spec, **common)
        after = _cpu_seconds(pid)
        # The server's CPU per acknowledged event: a figure that holds even when other work shares the machine.
        if before is not None and after is not None and result["acked_events"]:
            result["server_cpu_us_per_event"] = (after - before) / result["acked_events"] * 1e6
        out[name] = result
    return out


def _mendloop(tmp: Path, name: str, *, distinct: bool, **load: Any) -> dict[str, Any]:
    d = tmp / name
    d.mkdir()
    db = d / "mendloop.db"
    cfg = d / "mendloop.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": f"sqlite:///{db}", "workers": 1}))
    port = _free_port()
    argv = [
        sys.executable, "-m", "mendloop", "serve", "--config", str(cfg), "--port", str(port),
        "--workers", "1", "--log-level", "warning",
    ]  # fmt: skip
    with _server(argv, port, d / "serve.log") as proc:
        phases = _phases(port, proc.pid, name, distinct=distinct, **load)
        # Durable before the 2xx: kill -9 right after the load, then count what the database holds.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    conn = sqlite3.connect(db)
    try:
        stored = conn.execute("SELECT count(*) FROM events WHERE type = ?", (EVENT_TYPE,)).fetchone()[0]
        incidents, counted = conn.execute(
            "SELECT count(*), coalesce(sum(count), 0) FROM incidents WHERE event_type = ?", (EVENT_TYPE,)
        ).fetchone()
        runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        conn.close()
    acked = sum(p["acked_events"] for p in phases.values())
    return {
        **phases,
        "acked_events": acked,
        "stored_events": stored,
        "incidents": incidents,
        "counted_on_incidents": counted,
        "runs": runs,
        "durable": stored == acked == counted and runs == 0 and (incidents == stored if distinct else incidents == 1),
    }


def run(*, duration: float = 5.0, rate: float = 1000.0, concurrency: int = 64, batch: int = 500) -> dict[str, Any]:
    load: dict[str, Any] = {"duration": duration, "rate": rate, "concurrency": concurrency, "batch": batch}
    cpus, loadavg = os.cpu_count(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="mendloop-bench-intake-") as name:
        tmp = Path(name)
        port = _free_port()
        argv = [sys.executable, __file__, "--null-server", str(port)]
        with _server(argv, port, tmp / "null.log") as proc:
            ceiling = _phases(port, proc.pid, "null", distinct=False, **load)
        commits = bare_commits(tmp)
        repeats = _mendloop(tmp, "repeat", distinct=False, **load)
        distinct = _mendloop(tmp, "distinct", distinct=True, **load)
    return {
        "load": load,
        "machine": {"cpus": cpus, "loadavg_1m_before": loadavg},
        "http_ceiling": ceiling,
        "bare_commits_per_s": commits,
        "repeats": repeats,
        "distinct": distinct,
    }


def _cpu(phase: dict[str, Any]) -> str:
    cpu = phase.get("server_cpu_us_per_event")
    return f"server CPU {cpu:.0f} us/event" if cpu is not None else ""


def report(r: dict[str, Any]) -> list[str]:
    load, ceiling, commits, machine = r["load"], r["http_ceiling"], r["bare_commits_per_s"], r["machine"]
    loadavg = machine["loadavg_1m_before"]
    lines = [
        "webhook intake, SQLite, `mendloop serve` (workers 1) vs a load generator in a second process "
        f"({load['duration']:g} s per figure; {machine['cpus']} CPUs"
        + (f", load average {loadavg:.2f} before the run)" if loadavg is not None else ")"),
        f"  baseline: HTTP ceiling (Starlette answering 202, nothing stored) "
        f"{ceiling['closed']['requests_per_s']:,.0f} POSTs/s; p50 {ceiling['open']['p50_ms']:.1f} ms "
        f"p99 {ceiling['open']['p99_ms']:.1f} ms at {load['rate']:,.0f}/s; "
        f"{ceiling['batch']['events_per_s']:,.0f} events/s in batches of {load['batch']}",
        f"  baseline: bare SQLite commits/s, one event per commit   {commits:,.0f}",
    ]
    for key, title in (("repeats", "one error repeated (one incident)"), ("distinct", "every event a new incident")):
        x = r[key]
        closed, opened, batched = x["closed"], x["open"], x["batch"]
        single = closed["requests_per_s"]
        lines += [
            f"  {title}:",
            f"    single-event POSTs/s ({load['concurrency']} connections) {single:9,.0f}   goal >= 1,500   "
            f"{single / ceiling['closed']['requests_per_s']:.2f}x HTTP ceiling, {single / commits:.3f}x bare commits"
            f"   {_cpu(closed)}",
            f"    at {load['rate']:,.0f} requests/s: p50 {opened['p50_ms']:.1f} ms  p99 {opened['p99_ms']:.1f} ms  "
            f"max {opened['max_ms']:.1f} ms   goal p99 <= 25 ms   ({opened['requests_per_s']:,.0f}/s served)"
            f"   {_cpu(opened)}",
            f"    events/s in batches of {load['batch']}             {batched['events_per_s']:9,.0f}   goal >= 20,000  "
            f"{batched['events_per_s'] / ceiling['batch']['events_per_s']:.3f}x HTTP ceiling, "
            f"{batched['events_per_s'] / commits:.2f}x bare commits   {_cpu(batched)}",
            f"    durable: {x['acked_events']:,} acknowledged, {x['stored_events']:,} stored after kill -9, "
            f"{x['counted_on_incidents']:,} counted on {x['incidents']:,} incident(s), {x['runs']} runs   "
            + ("OK" if x["durable"] else "MISMATCH"),
        ]
        phases = (closed, opened, batched)
        bad = {k: v for p in phases for k, v in p["statuses"].items() if not k.startswith("2")}
        errors = sum(p["errors"] for p in phases)
        if bad or errors:
            lines.append(f"    non-2xx answers {bad}, connection errors {errors}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--null-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        _run_loadgen(args.loadgen)
        return
    if args.null_server:
        _run_null_server(args.null_server)
        return
    result = run(duration=args.duration, rate=args.rate, concurrency=args.concurrency, batch=args.batch)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(report(result)))


if __name__ == "__main__":
    main()
