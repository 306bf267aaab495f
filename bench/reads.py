"""Reads that stay flat: p50/p99 of every list and detail endpoint, with each filter, as history grows.

For each size (runs in the database; bench/gen_history.py builds it in the schema's real shape and caches it) a
real `mendloop serve` (no workers: the history's queued runs stay as they are) answers 20 concurrent keep-alive
clients, endpoint after endpoint, while a second process posts 200 events/s to it (each its own request, the
group-commit path). The baseline is the smallest size, measured in the same run: each endpoint's p99 at the
larger sizes is printed as a ratio to it (goal: within 1.5x), and every p99 against the 20 ms goal.

Each endpoint's figure also has the server's CPU per request (its /proc utime + stime over the 20-client
measurement, less what the write load alone costs it a second, measured first), and each size a same-run baseline:
a bare FastAPI app on uvicorn answering a constant to the same 20 clients, and the load average before and after
(the machine may be shared: a p99 means little without them). 1,000,000 runs take gen_history about 9 minutes on
SQLite (20 on PostgreSQL) the first time; the result is cached under bench/.cache/.

SQLite always; PostgreSQL too when MENDLOOP_BENCH_POSTGRES_URL (or MENDLOOP_TEST_POSTGRES_URL) names a server.

    .venv/bin/python bench/reads.py [--sizes 10000,100000,1000000] [--requests 300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import h11
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gen_history  # noqa: E402

CLIENTS = 20
WRITE_RATE = 200.0
GOAL_P99_MS = 20.0
GOAL_RATIO = 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of process `pid` from /proc/<pid>/status (VmRSS now, VmHWM its peak), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU so far of process `pid` (all its threads) and of its live children (`serve --processes
    N`'s replicas), from /proc."""
    total = 0.0
    for one in (pid, *_children(pid)):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a child that just exited
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


# The same-run baseline: a bare FastAPI app on uvicorn answering a constant, for the same 20 clients.
_BARE = """
import sys
import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.get("/constant")
async def constant() -> dict[str, int]:
    return {"answer": 42}


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def _baseline(requests: int, max_seconds: float) -> dict[str, Any]:
    """p50/p99 and server CPU per request of the bare endpoint under CLIENTS clients (no write load)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", _BARE, str(port)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/constant")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        _measure(port, ["/constant"], CLIENTS * 5, 10)
        cpu = _cpu_seconds(server.pid)
        lat, codes = _measure(port, ["/constant"], requests, max_seconds)
        cpu = _cpu_seconds(server.pid) - cpu
        return {
            "p50_ms": _pct(lat, 50),
            "p99_ms": _pct(lat, 99),
            "n": len(lat),
            "codes": codes,
            "cpu_ms_per_request": cpu * 1000 / max(1, len(lat)),
        }
    finally:
        server.terminate()
        server.wait(30)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- the write load (its own process: `bench/reads.py --write-load SPEC`) ----------------------------------------


def _write_load(spec: dict[str, Any]) -> None:
    """POST one event per request at `rate` a second over 4 connections until SIGTERM; prints what it sent."""
    port, rate = int(spec["port"]), float(spec["rate"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sent: dict[int, int] = {}
    lock = threading.Lock()

    def post(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        interval = 4 / rate
        due = time.monotonic()
        i = 0
        while not stop.is_set():
            body = json.dumps({"event_type": "bench.tick", "payload": {"n": i, "writer": k}, "source": "bench"})
            try:
                conn.request("POST", "/events", body=body, headers={"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                code = r.status
            except OSError:
                code = 0
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                sent[code] = sent.get(code, 0) + 1
            i += 1
            due += interval
            pause = due - time.monotonic()
            if pause > 0:
                stop.wait(pause)

    threads = [threading.Thread(target=post, args=(k,)) for k in range(4)]
    began = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(json.dumps({"seconds": time.monotonic() - began, "statuses": sent}))


# -- the readers ---------------------------------------------------------------------------------------------


def _measure(
    port: int, paths: list[str], requests: int, max_seconds: float, clients: int = CLIENTS
) -> tuple[list[float], dict[int, int]]:
    """`requests` GETs spread over `clients` concurrent clients, each on its own keep-alive connection, cycling
    through `paths`; stops early after `max_seconds` (a slow endpoint at a large size).

    The clients are coroutines on one event loop in this thread, with h11 reading the answers. As threads (one
    http.client each) they were the figures' own tail: twenty threads waking at once queue for this process's
    GIL, and about 1 request in 250 of a 0.5 ms `/health` took 40-55 ms on the client's side alone (2,000 GETs,
    threads: max 50-55 ms; coroutines: max 11 ms, the same server)."""
    return asyncio.run(_clients(port, paths, requests, max_seconds, clients))


async def _clients(
    port: int, paths: list[str], requests: int, max_seconds: float, clients: int
) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    deadline = time.monotonic() + max_seconds
    per_client = max(1, requests // clients)

    async def client(k: int) -> None:
        rnd = random.Random(k)
        conn: _Connection | None = None
        for _ in range(per_client):
            if time.monotonic() > deadline:
                break
            path = paths[rnd.randrange(len(paths))]
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await _Connection.open(port)
                code = await asyncio.wait_for(conn.get(path), 120)
            except (OSError, TimeoutError, h11.ProtocolError):
                code = 0
                if conn is not None:
                    conn.close()
                conn = None
            latencies.append((time.perf_counter() - t0) * 1000)
            codes[code] = codes.get(code, 0) + 1
        if conn is not None:
            conn.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, codes


class _Connection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1, a GET at a time (h11 keeps the protocol right)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, path: str) -> int:
        """The answer's status, once its whole body has been read."""
        request = h11.Request(method="GET", target=path, headers=[("Host", "127.0.0.1")])
        self.writer.write(self.h11.send(request) + self.h11.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                self.h11.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                self.h11.start_next_cycle()
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the server closed the connection")

    def close(self) -> None:
        self.writer.close()


def _get(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status} {body[:300]!r}")
    return json.loads(body)


def _q(path: str, **params: Any) -> str:
    return f"{path}?{urlencode(params)}" if params else path


def _endpoints(port: int, url: str, runs: int) -> dict[str, list[str]]:
    """Each endpoint of the issue's table with each filter it offers, plus /events/recent and /health: a name and
    the paths its requests cycle through (details: 100 runs spread over the history)."""
    engine = sa.create_engine(url)
    rnd = random.Random(1)
    try:
        with engine.connect() as conn:
            lo, hi = conn.execute(sa.text("SELECT min(created_at), max(created_at) FROM runs")).one()
            run_ids = [
                conn.execute(
                    sa.text("SELECT id FROM runs WHERE created_at >= :t ORDER BY created_at LIMIT 1"),
                    {"t": lo + rnd.random() * (hi - lo)},
                ).scalar_one()
                for _ in range(100)
            ]
            wo_run = conn.execute(
                sa.text("SELECT self_healing_run_id FROM work_orders ORDER BY created_at DESC LIMIT 1")
            ).scalar_one()
            fingerprint = conn.execute(
                sa.text("SELECT fingerprint FROM incidents ORDER BY last_seen DESC LIMIT 1")
            ).scalar_one()
    finally:
        engine.dispose()
    # A cursor half way down the history: a deep page costs what the first does.
    deep = _get(port, _q("/patches/runs", limit=1, offset=runs // 2))["next_cursor"]
    deep_wo = _get(port, _q("/patches/work-orders", limit=1, offset=runs // 20))["next_cursor"]
    deep_inc = _get(port, _q("/incidents", limit=1, offset=runs // 10))["next_cursor"]
    deep_ev = _get(port, _q("/events/recent", limit=1, offset=runs * 3))["next_cursor"]
    since = time.time() - 60
    return {
        "GET /patches/stats": ["/patches/stats"],
        "GET /patches/runs?limit=50": [_q("/patches/runs", limit=50)],
        "  runs: status=completed": [_q("/patches/runs", limit=50, status="completed")],
        "  runs: status=queued": [_q("/patches/runs", limit=50, status="queued")],
        "  runs: cursor half way down": [_q("/patches/runs", limit=50, cursor=deep)],
        "GET /patches/work-orders?limit=50": [_q("/patches/work-orders", limit=50)],
        "  work orders: status=queued": [_q("/patches/work-orders", limit=50, status="queued")],
        "  work orders: self_healing_run_id=": [_q("/patches/work-orders", limit=50, self_healing_run_id=wo_run)],
        "  work orders: cursor half way": [_q("/patches/work-orders", limit=50, cursor=deep_wo)],
        "GET /incidents": [_q("/incidents")],
        "  incidents: status=open": [_q("/incidents", status="open")],
        "  incidents: fingerprint=": [_q("/incidents", fingerprint=fingerprint)],
        "  incidents: error_type=": [_q("/incidents", error_type="error_03")],
        "  incidents: status=resolved&error_type=": [_q("/incidents", status="resolved", error_type="error_03")],
        "  incidents: cursor half way": [_q("/incidents", cursor=deep_inc)],
        "GET /patches/runs/{id}": [f"/patches/runs/{r}" for r in run_ids],
        "GET /events/recent": [_q("/events/recent")],
        "  events: event_type=": [_q("/events/recent", event_type="self_healing.triggered")],
        "  events: since=a minute ago": [_q("/events/recent", since=since)],
        "  events: cursor half way": [_q("/events/recent", cursor=deep_ev)],
        "GET /health": ["/health"],
    }


def _serve(
    tmp: Path, url: str, *, extra: dict[str, Any] | None = None, poll: float = 0.2, processes: int = 1
) -> tuple[subprocess.Popen[bytes], int]:
    """`mendloop serve` on `url` (no workers unless `extra` config says so), once /health answers 200 and all of
    its `processes` accept connections (`processes.serving`); `poll`: the wait between probes (bench/scale.py
    times startup with a short one)."""
    cfg = tmp / "mendloop.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": url, "workers": 0, **(extra or {})}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDLOOP_")}
    with (tmp / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mendloop", "serve", "--config", str(cfg), "--port", str(port)]
            + (["--processes", str(processes)] if processes > 1 else []),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    deadline = time.monotonic() + 300
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            answer = conn.getresponse()
            if answer.status == 200 and json.loads(answer.read())["processes"]["serving"] == processes:
                return server, port
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"serve did not start: {(tmp / 'serve.log').read_text()[-2000:]}")
        time.sleep(poll)


def stop_serve(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (serve's graceful shutdown), then SIGKILL if it has not exited within a minute."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)


def _one(tmp: Path, url: str, runs: int, requests: int, max_seconds: float, processes: int = 1) -> dict[str, Any]:
    server, port = _serve(tmp, url, processes=processes)
    try:
        endpoints = _endpoints(port, url, runs)
        spec = json.dumps({"port": port, "rate": WRITE_RATE})
        writer = subprocess.Popen(
            [sys.executable, __file__, "--write-load", spec], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        try:
            time.sleep(1.0)  # the write load at its pace before the first figure
            # What the write load alone costs the server a second, taken out of each endpoint's CPU figure.
            cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
            time.sleep(3.0)
            writer_cpu_per_s = (_cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
            figures: dict[str, Any] = {}
            load_start = os.getloadavg()
            for name, paths in endpoints.items():
                _measure(port, paths, CLIENTS, 10)  # warm: connections open, pages cached
                cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
                lat, codes = _measure(port, paths, requests, max_seconds)
                cpu = _cpu_seconds(server.pid) - cpu0 - writer_cpu_per_s * (time.monotonic() - t0)
                # One client alone: the request's own cost, without the queue 20 clients make on one process.
                solo, _ = _measure(port, paths, 30, max_seconds, clients=1)
                figures[name] = {
                    "solo_p50_ms": _pct(solo, 50),
                    "p50_ms": _pct(lat, 50),
                    "p99_ms": _pct(lat, 99),
                    "n": len(lat),
                    "codes": codes,
                    "cpu_ms_per_request": max(0.0, cpu) * 1000 / max(1, len(lat)),
                }
        finally:
            writer.send_signal(signal.SIGTERM)
            out, _ = writer.communicate(timeout=60)
        written = json.loads(out)
    finally:
        stop_serve(server)
    return {
        "load_average_start": load_start,
        "load_average": os.getloadavg(),
        "writer_cpu_ms_per_s": writer_cpu_per_s * 1000,
        "endpoints": figures,
        "writes_per_s": sum(written["statuses"].values()) / written["seconds"],
        "write_statuses": written["statuses"],
    }


def run(
    *,
    sizes: list[int],
    requests: int = 300,
    max_seconds: float = 30.0,
    postgres: str | None = None,
    sqlite: bool = True,
    processes: tuple[int, ...] = (1,),
) -> dict[str, Any]:
    backends = (["sqlite"] if sqlite else []) + (["postgresql"] if postgres else [])
    out: dict[str, Any] = {}
    for backend in backends:
        for runs in sizes:
            with tempfile.TemporaryDirectory(prefix="mendloop-bench-reads-") as d:
                tmp = Path(d)
                started = time.monotonic()
                if backend == "sqlite":
                    url = f"sqlite:///{gen_history.sqlite_copy(runs, tmp / 'history.db')}"
                else:
                    assert postgres is not None
                    url = gen_history.postgres_copy(runs, postgres, f"bench_reads_{runs}")
                prepared = time.monotonic() - started
                try:
                    baseline = _baseline(requests, max_seconds)
                    # Each process count on the same database, one after the other: ratios of the same run.
                    for n in processes:
                        result = _one(tmp, url, runs, requests, max_seconds, processes=n)
                        result["baseline"] = baseline
                        result["prepare_seconds"] = prepared
                        label = backend if n == 1 else f"{backend}, serve --processes {n}"
                        out.setdefault(label, {})[str(runs)] = result
                finally:
                    if backend == "postgresql":
                        assert postgres is not None
                        gen_history.drop_copy(postgres, f"bench_reads_{runs}")
    return out


def report(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for backend, by_size in r.items():
        sizes = list(by_size)
        base = sizes[0]
        lines.append(
            f"reads with {CLIENTS} concurrent clients and {WRITE_RATE:.0f} events/s written beside them, {backend}"
            f" (bench/reads.py); p50 / p99 ms, goal p99 <= {GOAL_P99_MS:.0f} ms and <= {GOAL_RATIO}x the"
            f" {int(base):,}-run p99"
        )
        header = f"  {'endpoint':<42}" + "".join(f"{int(s):>20,}" for s in sizes)
        header += "".join(f"  p99 {int(s) // 1000}k/{int(base) // 1000}k" for s in sizes[1:])
        header += "".join(f"  solo p50 {int(s) // 1000}k" for s in sizes)
        header += "".join(f"  cpu ms/req {int(s) // 1000}k" for s in sizes)
        lines.append(header)
        for name in by_size[base]["endpoints"]:
            row = f"  {name:<42}"
            for s in sizes:
                f = by_size[s]["endpoints"].get(name)
                if f is None:
                    row += f"{'-':>20}"
                    continue
                mark = "" if f["p99_ms"] <= GOAL_P99_MS else "!"
                bad = sum(n for c, n in f["codes"].items() if str(c) != "200")
                cell = f"{f['p50_ms']:.1f} / {f['p99_ms']:.1f}{mark}" + (f" ({bad} non-200)" if bad else "")
                row += f"{cell:>20}"
            b99 = by_size[base]["endpoints"][name]["p99_ms"]
            for s in sizes[1:]:
                f = by_size[s]["endpoints"].get(name)
                ratio = f["p99_ms"] / b99 if f and b99 else float("nan")
                row += f"{ratio:>12.2f}" + ("!" if ratio > GOAL_RATIO else " ")
            for s in sizes:
                f = by_size[s]["endpoints"].get(name)
                row += f"{f['solo_p50_ms'] if f else float('nan'):>14.1f}"
            for s in sizes:
                f = by_size[s]["endpoints"].get(name)
                row += f"{f['cpu_ms_per_request'] if f else float('nan'):>16.2f}"
            lines.append(row)
        for s in sizes:
            x = by_size[s]
            lines.append(
                f"  {int(s):,} runs: database ready in {x['prepare_seconds']:.1f} s; writes {x['writes_per_s']:.0f}/s"
                f" {x['write_statuses']} (server CPU {x['writer_cpu_ms_per_s']:.0f} ms/s); load average"
                f" {x['load_average_start'][0]:.1f} -> {x['load_average'][0]:.1f} on {os.cpu_count()} CPUs"
            )
            b = x["baseline"]
            lines.append(
                f"    baseline, bare FastAPI/uvicorn constant, same {CLIENTS} clients, no writes: p50 {b['p50_ms']:.1f}"
                f" / p99 {b['p99_ms']:.1f} ms, server CPU {b['cpu_ms_per_request']:.2f} ms/request"
            )
    lines.append("  ! marks a figure over its goal")
    return lines


def sizes_of(text: str) -> list[int]:
    return [int(s.replace("_", "")) for s in text.split(",") if s.strip()]


def postgres_url() -> str | None:
    return os.environ.get("MENDLOOP_BENCH_POSTGRES_URL") or os.environ.get("MENDLOOP_TEST_POSTGRES_URL") or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes_of, default=[10_000, 100_000])
    parser.add_argument("--requests", type=int, default=300, help="requests per endpoint and size")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument(
        "--processes", type=sizes_of, default=[1], help="serve's --processes, each measured: 1,2 compares them"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_load:
        _write_load(json.loads(args.write_load))
        return
    pg = None if args.no_postgres else postgres_url()
    result = run(
        sizes=args.sizes,
        requests=args.requests,
        postgres=pg,
        sqlite=not args.no_sqlite,
        processes=tuple(args.processes),
    )
    print(json.dumps(result, indent=2) if args.json else "\n".join(report(result)))


if __name__ == "__main__":
    main()
