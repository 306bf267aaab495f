"""Where the CPU of a run and of an event goes: cProfile of the real code paths, summed by package.

The CPU goals of issue 13 (a 3-step no-op run ≤ 1.5 ms, a single POST ≤ 250 µs, a batched event ≤ 40 µs) are not
met; this is the profile that says why. Each case runs in one process under cProfile:

- `runs`: trigger and execute 3-step no-op runs on SQLite (bench/cpu_runs.py's playbook and App);
- `post`: single-event `POST /events` through the whole FastAPI application, called as ASGI in process the way
  uvicorn calls it (no socket, no HTTP parsing, no client library: what is profiled is the server's own work);
- `batch`: the same with batches of 500 events;
- `read`: `GET --path` (a runs page by default) the same way, one at a time, over a history of 10,000 runs
  (bench/gen_history.py), with its CPU a request measured first without the profiler.

Self time is summed by the package of each function (`sqlalchemy`, `sqlite3` for its C calls, `pydantic`,
`fastapi/starlette`, `mendloop.<subpackage>`, …) and the top functions by self time are listed. Profiling slows
Python code more than C code, so shares lean towards Python; they still show which layer to work on.

    .venv/bin/python bench/cpu_profile.py --case runs --n 500
    .venv/bin/python bench/cpu_profile.py --case post --n 2000 --json
    .venv/bin/python bench/cpu_profile.py --case read --n 500 --path '/incidents?status=open'
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import cpu_runs  # noqa: E402
import gen_history  # noqa: E402
import intake  # noqa: E402

from mendloop.api.server import create_api  # noqa: E402
from mendloop.app import App  # noqa: E402
from mendloop.config import load_settings  # noqa: E402

CASES = ("runs", "post", "batch", "read")
READ_HISTORY = 10_000  # runs in the database the `read` case reads
# A thread blocked here waits (for the event loop, the thread pool or the GIL): time, not CPU. The self-pipe's
# `send` (call_soon_threadsafe) is a microsecond syscall whose GIL re-acquisition, behind the other thread, is
# what the profiler charges to it (milliseconds per call).
WAITS = (
    "<method 'poll' of 'select.epoll' objects>",
    "<method 'acquire' of '_thread.lock' objects>",
    "<method 'release' of '_thread.lock' objects>",
    "<method 'acquire' of '_thread.RLock' objects>",
    "<method 'send' of '_socket.socket' objects>",
)


class ThreadProfiles:
    """One cProfile per thread: the event loop's, every thread-pool thread's and the intake writer's (cProfile
    sees only the thread that enabled it, and the API writes from other threads). `hook()` before the threads
    start; `start()` profiles the calling thread from then on."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []

    def _start_in_thread(self, *_args: Any) -> None:
        profile = cProfile.Profile()
        self.profiles.append(profile)
        profile.enable()  # replaces this hook in the new thread with the profiler itself

    def hook(self) -> None:
        threading.setprofile(self._start_in_thread)

    def start(self) -> None:
        self._start_in_thread()

    def stop(self) -> pstats.Stats:
        threading.setprofile(None)  # type: ignore[arg-type,unused-ignore]  # None removes the hook; stubs disagree
        first, *rest = self.profiles
        stats = pstats.Stats(first)  # snapshots each profile (threads still running keep theirs going)
        for profile in rest:
            stats.add(profile)
        return stats


def package_of(filename: str, funcname: str) -> str:
    """The layer a profiled function belongs to."""
    if filename == "~":  # a C builtin: name it by the object it belongs to
        if "sqlite3" in funcname:
            return "sqlite3 (C)"
        return "builtins (C)"
    path = filename.replace("\\", "/")
    if "/site-packages/" in path:
        top = path.split("/site-packages/", 1)[1].split("/", 1)[0]
        top = top.removesuffix(".py")
        if top in ("fastapi", "starlette"):
            return "fastapi/starlette"
        if top in ("pydantic", "pydantic_core"):
            return "pydantic"
        return top
    if "/mendloop/" in path:
        parts = path.split("/mendloop/", 1)[1].split("/")
        return "mendloop." + parts[0].removesuffix(".py") if len(parts) > 1 else "mendloop"
    if "/lib/python3" in path:
        return "stdlib." + path.split("/lib/python3", 1)[1].split("/", 2)[1].removesuffix(".py")
    return "other"


def summarise(stats: pstats.Stats, units: int, top: int = 15) -> dict[str, Any]:
    waited = 0.0
    by_package: dict[str, float] = defaultdict(float)
    functions: list[tuple[float, str]] = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]  # pstats keeps them untyped
    for (filename, line, funcname), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        pkg = package_of(filename, funcname)
        if funcname in WAITS:
            waited += tottime
            continue
        by_package[pkg] += tottime
        functions.append((tottime, f"{pkg}: {funcname} ({Path(filename).name}:{line})"))
    total = sum(by_package.values())
    functions.sort(reverse=True)
    return {
        "units": units,
        "profiled_us_per_unit": total * 1e6 / units,
        "waited_us_per_unit": waited * 1e6 / units,
        "packages": {k: round(v / total, 4) for k, v in sorted(by_package.items(), key=lambda kv: kv[1], reverse=True)},
        "top_functions": [{"share": round(t / total, 4), "function": f} for t, f in functions[:top]],
    }


def profile_runs(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mendloop-profile-") as d:
        app = cpu_runs._app(Path(d))
        try:
            for i in range(50):  # warm caches and compiled statements outside the profile
                app.remediation.trigger(error_type="noop", description=f"warm {i}")
            while app.workers.run_once("bench:0:w0"):
                pass
            profile = cProfile.Profile()
            profile.enable()
            for i in range(n):
                app.remediation.trigger(error_type="noop", description=str(i))
            while app.workers.run_once("bench:0:w0"):
                pass
            profile.disable()
        finally:
            app.close()
    return summarise(pstats.Stats(profile), n)


async def asgi_request(api: Any, method: str, target: str, payload: bytes = b"") -> int:
    """One request through the ASGI application, as uvicorn hands it over (no client library's frames); its
    status."""
    path, _, query = target.partition("?")
    headers = [(b"host", b"127.0.0.1")]
    if payload:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # the client never disconnects mid-request
        sent = True
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await api(scope, receive, send)
    return status


def profile_posts(n: int, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mendloop-profile-") as d:
        cfg = Path(d) / "mendloop.yaml"
        cfg.write_text(yaml.safe_dump({"database_url": f"sqlite:///{d}/events.db", "workers": 0}))
        profiles = ThreadProfiles()
        profiles.hook()  # before the intake writer's thread starts (its warm-up writes are a few dozen)
        app = App(load_settings(cfg)).open(start_workers=False)
        api = create_api(app, manage=False)
        counter = 0

        def body() -> bytes:
            nonlocal counter
            if batch == 1:
                counter += 1
                return json.dumps(intake._event("p", counter, False)).encode()
            events = [intake._event("p", counter + k + 1, False) for k in range(batch)]
            counter += batch
            return json.dumps({"events": events}).encode()

        async def drive(requests: int) -> None:
            for _ in range(requests):
                status = await asgi_request(api, "POST", "/events", body())
                if status >= 300:
                    raise RuntimeError(f"POST /events answered {status}")

        try:
            asyncio.run(drive(50))
            requests = max(1, n // batch)
            profiles.start()  # a fresh event loop starts fresh pool threads, each under its own profile too
            asyncio.run(drive(requests))
            stats = profiles.stop()
        finally:
            app.close()
    return summarise(stats, requests * batch)


def profile_reads(n: int, target: str) -> dict[str, Any]:
    """`GET target`, one request at a time (so no read is shared with another), over a history of READ_HISTORY
    runs in the schema's real shape: first timed without the profiler (the process's CPU, every thread's), then
    profiled."""
    with tempfile.TemporaryDirectory(prefix="mendloop-profile-") as d:
        db = gen_history.sqlite_copy(READ_HISTORY, Path(d) / "history.db")
        cfg = Path(d) / "mendloop.yaml"
        cfg.write_text(yaml.safe_dump({"database_url": f"sqlite:///{db}", "workers": 0}))
        profiles = ThreadProfiles()
        profiles.hook()
        app = App(load_settings(cfg)).open(start_workers=False)
        api = create_api(app, manage=False)

        async def drive(requests: int) -> None:
            for _ in range(requests):
                status = await asgi_request(api, "GET", target)
                if status != 200:
                    raise RuntimeError(f"GET {target} answered {status}")

        try:
            asyncio.run(drive(50))
            started = time.process_time()
            asyncio.run(drive(n))
            cpu_ms = (time.process_time() - started) * 1000 / n
            profiles.start()
            asyncio.run(drive(n))
            stats = profiles.stop()
        finally:
            app.close()
    return {"target": target, "cpu_ms_per_request": round(cpu_ms, 3), **summarise(stats, n)}


def run(case: str, n: int, target: str = "/patches/runs?limit=50") -> dict[str, Any]:
    if case == "runs":
        return {"case": case, **profile_runs(n)}
    if case == "read":
        return {"case": case, **profile_reads(n, target)}
    return {"case": case, **profile_posts(n, 1 if case == "post" else 500)}


def report(r: dict[str, Any]) -> list[str]:
    unit = {"runs": "run", "read": "request"}.get(r["case"], "event")
    lines = (
        [f"GET {r['target']}: {r['cpu_ms_per_request']:.2f} ms of CPU a request without the profiler"]
        if "target" in r
        else []
    )
    lines += [
        f"{r['case']}: {r['units']} {unit}s, {r['profiled_us_per_unit']:.0f} µs of work per {unit} under the profiler"
        f" ({r['waited_us_per_unit']:.0f} µs waiting, left out)"
    ]
    lines += [f"  {share * 100:5.1f}%  {pkg}" for pkg, share in list(r["packages"].items())[:12]]
    lines.append("  top functions by self time:")
    lines += [f"  {f['share'] * 100:5.1f}%  {f['function']}" for f in r["top_functions"]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=(*CASES, "all"), default="all")
    parser.add_argument("--n", type=int, default=1000, help="runs, events or requests to profile")
    parser.add_argument("--path", default="/patches/runs?limit=50", help="the `read` case's GET target")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [run(c, args.n, args.path) for c in (CASES if args.case == "all" else (args.case,))]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print("\n".join(report(r)))


if __name__ == "__main__":
    main()
