"""The dashboard as history grows: the Runs tab (plain, filtered, a deep keyset page), a run's page, the
Workflow tab and the Patches tab, against a real `mendloop serve` on a history database (bench/gen_history.py).

Two figures per page: the server's time (p50/p99 of a GET on loopback by one client: the page read and rendered,
nothing else in the way) and the browser's (Playwright driving Debian's headless Chromium: the navigation timing's
`duration`, from the request to the load event, with the page's CSS and script). Goals (issue 11): under 300 ms
server time and under 1 s in the browser at 10,000 runs, and within 1.5x of that at 1,000,000 (`--sizes
10000,1000000`). The baseline is the smallest size, measured in the same run.

    python bench/dashboard.py [--sizes 10000,100000] [--requests 60] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gen_history  # noqa: E402
import reads  # noqa: E402

GOAL_SERVER_MS = 300.0
GOAL_BROWSER_MS = 1000.0
GOAL_RATIO = 1.5
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _serve(tmp: Path, url: str) -> tuple[subprocess.Popen[bytes], int]:
    cfg = tmp / "mendloop.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": url, "workers": 0}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDLOOP_")}
    with (tmp / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mendloop", "serve", "--config", str(cfg), "--port", str(port)],
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
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"serve did not start: {(tmp / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.2)


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[float, int, str]:
    started = time.perf_counter()
    conn.request("GET", path, headers={"Accept": "text/html"})
    answer = conn.getresponse()
    body = answer.read().decode()
    return (time.perf_counter() - started) * 1000, answer.status, body


def _pages(port: int) -> dict[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    _, _, runs = _get(conn, "/ui/runs")
    run_ids = re.findall(r'<tr data-run="([^"]+)"', runs)
    cursor = re.search(r'href="\?cursor=([^"]+)"', runs)
    deep = "/ui/runs"
    if cursor:  # ten pages down, by keyset
        for _ in range(10):
            _, _, page = _get(conn, f"/ui/runs?cursor={cursor.group(1)}")
            found = re.search(r'href="\?cursor=([^"]+)"', page)
            if not found:
                break
            cursor = found
        deep = f"/ui/runs?cursor={cursor.group(1)}"
    return {
        "Runs tab": "/ui/runs",
        "Runs: status=completed": "/ui/runs?status=completed",
        "Runs: component=svc-07": "/ui/runs?component=svc-07",
        "Runs: 10 pages down": deep,
        "a run's page": f"/ui/runs/{quote(run_ids[len(run_ids) // 2])}",
        "Workflow tab": "/",
        "Patches tab": "/ui/patches",
    }


def _server_times(port: int, pages: dict[str, str], requests: int) -> dict[str, dict[str, float]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = {}
    for name, path in pages.items():
        for _ in range(3):
            _get(conn, path)  # warm
        times = []
        for _ in range(requests):
            ms, status, _ = _get(conn, path)
            if status != 200:
                raise RuntimeError(f"{path}: {status}")
            times.append(ms)
        out[name] = {"p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99)}
    return out


def _browser_times(port: int, pages: dict[str, str], visits: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        for name in ("Runs tab", "a run's page"):
            durations = []
            for _ in range(visits + 1):
                page.goto(f"http://127.0.0.1:{port}{pages[name]}", wait_until="load")
                durations.append(float(page.evaluate("performance.getEntriesByType('navigation')[0].duration")))
            out[name] = statistics.median(durations[1:])  # the first visit fills the browser's cache
        browser.close()
    return out


def run(*, sizes: list[int], requests: int = 60, visits: int = 5) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for runs in sizes:
        with tempfile.TemporaryDirectory(prefix="mendloop-bench-dash-") as d:
            tmp = Path(d)
            url = f"sqlite:///{gen_history.sqlite_copy(runs, tmp / 'history.db')}"
            server, port = _serve(tmp, url)
            try:
                pages = _pages(port)
                out[str(runs)] = {
                    "server": _server_times(port, pages, requests),
                    "browser_ms": _browser_times(port, pages, visits),
                    "load_average": os.getloadavg()[0],
                }
            finally:
                reads.stop_serve(server)
    return out


def report(r: dict[str, Any]) -> list[str]:
    sizes = list(r)
    base = sizes[0]
    lines = [
        f"the dashboard on SQLite (bench/dashboard.py): server p50 / p99 ms by one client, goal p99 <="
        f" {GOAL_SERVER_MS:.0f} ms; browser navigation ms (Chromium, median), goal <= {GOAL_BROWSER_MS:.0f} ms;"
        f" each <= {GOAL_RATIO}x the {int(base):,}-run figure"
    ]
    lines.append(
        f"  {'page':<28}" + "".join(f"{int(s):>22,}" for s in sizes) + "".join("   p99 ratio" for _ in sizes[1:])
    )
    for name in r[base]["server"]:
        row = f"  {name:<28}"
        for s in sizes:
            f = r[s]["server"][name]
            mark = "" if f["p99_ms"] <= GOAL_SERVER_MS else "!"
            row += f"{f['p50_ms']:.1f} / {f['p99_ms']:.1f}{mark}".rjust(22)
        for s in sizes[1:]:
            ratio = r[s]["server"][name]["p99_ms"] / r[base]["server"][name]["p99_ms"]
            row += f"{ratio:>11.2f}" + ("!" if ratio > GOAL_RATIO else " ")
        lines.append(row)
    for name in r[base]["browser_ms"]:
        row = f"  {'browser: ' + name:<28}"
        for s in sizes:
            ms = r[s]["browser_ms"][name]
            row += f"{ms:.0f}{'' if ms <= GOAL_BROWSER_MS else '!'}".rjust(22)
        for s in sizes[1:]:
            ratio = r[s]["browser_ms"][name] / r[base]["browser_ms"][name]
            row += f"{ratio:>11.2f}" + ("!" if ratio > GOAL_RATIO else " ")
        lines.append(row)
    lines.append(
        "  load average " + ", ".join(f"{r[s]['load_average']:.1f}" for s in sizes) + f" on {os.cpu_count()} CPUs"
    )
    lines.append("  ! marks a figure over its goal")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="runs in each history database, e.g. 10000,1000000")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(sizes=[int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()], requests=args.requests)
    print(json.dumps(result, indent=2) if args.json else "\n".join(report(result)))


if __name__ == "__main__":
    main()
