"""`make peer-bench`: ansible-rulebook and mendloop through the same open-loop load generator, side by side.

    .venv/bin/python -m bench.peer [--only intake,latency,storm] [--seconds 5] [--rates 200,500,1000,2000]
        [--latency-events 30] [--eda-actions run_module,run_module_parallel,run_playbook] [--storm-events 100000]
        [--storm-rate 2000] [--json-out bench/peer-results.json]

Measured here: webhook intake at each offered rate (achieved rate, p50/p99 from the scheduled send time,
errors); event -> first action latency; a storm of one identical error under a 10 s throttle (bench/peer/actions.py).
Run bench/peer/setup.sh first (the make target does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.intake import _free_port, _server
from bench.peer import actions
from bench.peer.loadgen import open_loop
from bench.peer.rulebook import eda

ROOT = Path(__file__).resolve().parents[2]


def event(i: int) -> dict[str, Any]:
    """The one body both systems get: mendloop's event shape, which EDA sees as `event.payload`."""
    return {
        "event_type": "bench.event",
        "event_id": f"peer-{time.time_ns()}-{i}",
        "message": f"ERROR: upstream timeout after {i % 977} ms on job {i}",
        "component": "bench",
        "payload": {"host": "web-1", "job": i},
    }


@contextlib.contextmanager
def mendloop(d: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    cfg = d / "mendloop.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": f"sqlite:///{d / 'mendloop.db'}", "workers": 1}))
    port = _free_port()
    argv = [
        sys.executable, "-m", "mendloop", "serve", "--config", str(cfg), "--port", str(port),
        "--workers", "1", "--log-level", "warning",
    ]  # fmt: skip
    with _server(argv, port, d / "serve.log") as proc:
        yield port, proc


def intake(tmp: Path, rates: list[float], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"eda": {}, "mendloop": {}}
    for name, server, path in (("eda", lambda d: eda(d, "intake"), "/endpoint"), ("mendloop", mendloop, "/events")):
        for rate in rates:
            d = tmp / f"intake-{name}-{int(rate)}"
            d.mkdir()
            with server(d) as (port, _proc):
                result = asyncio.run(open_loop("127.0.0.1", port, path, event, rate=rate, duration=seconds))
            out[name][str(int(rate))] = result
            got, p50, p99 = result["achieved_per_s"], result["p50_ms"], result["p99_ms"]
            print(f"  {name:8} {rate:6.0f}/s offered: {got:7.0f}/s, p50 {p50:8.1f} ms, p99 {p99:8.1f} ms")
    return out


def table(r: dict[str, Any]) -> list[str]:
    lines = [f"{'offered/s':>10} | {'EDA achieved':>12} {'p50 ms':>8} {'p99 ms':>8} {'err':>5} | "
             f"{'mendloop ach.':>13} {'p50 ms':>8} {'p99 ms':>8} {'err':>5}"]  # fmt: skip
    for rate, e in r["intake"]["eda"].items():
        m = r["intake"]["mendloop"][rate]
        lines.append(
            f"{rate:>10} | {e['achieved_per_s']:12.0f} {e['p50_ms']:8.1f} {e['p99_ms']:8.1f} {e['errors']:5d} | "
            f"{m['achieved_per_s']:13.0f} {m['p50_ms']:8.1f} {m['p99_ms']:8.1f} {m['errors']:5d}"
        )
    return lines


def latency_table(r: dict[str, Any]) -> list[str]:
    head = f"{'event -> first action':24} {'reached':>9} {'first ms':>9} {'p50 ms':>9} {'p99 ms':>9} {'actions/s':>9}"
    lines = [head]
    for name, x in r.items():
        got = f"{x['reached_recorder']}/{x['events']}"
        lines.append(
            f"{name:24} {got:>9} {x['first_ms']:9.1f} {x['p50_ms']:9.1f} {x['p99_ms']:9.1f} {x['actions_per_s']:9.1f}"
        )
    return lines


def storm_table(r: dict[str, Any]) -> list[str]:
    lines = [f"{'storm':10} {'accepted':>9} {'errors':>7} {'intake s':>9} {'p99 ms':>9} {'actions':>8} {'RSS MB':>7}"]
    for name, x in r.items():
        lines.append(
            f"{name:10} {x['accepted']:9d} {x['errors']:7d} {x['intake_seconds']:9.1f} {x['p99_ms']:9.1f} "
            f"{x['actions_reached_recorder']:8d} {x['peak_rss_mb']:7.0f}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="intake,latency,storm")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rates", default="200,500,1000,2000")
    ap.add_argument("--latency-events", type=int, default=30)
    ap.add_argument("--eda-actions", default="run_module,run_module_parallel,run_playbook")
    ap.add_argument("--storm-events", type=int, default=100_000)
    ap.add_argument("--storm-rate", type=float, default=2000.0)
    ap.add_argument("--json-out", default=str(ROOT / "bench" / "peer-results.json"))
    a = ap.parse_args()
    only = set(a.only.split(","))
    rates = [float(x) for x in a.rates.split(",")]
    r: dict[str, Any] = {"load_average_before": os.getloadavg(), "seconds": a.seconds}
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as t:
        if "latency" in only:
            r["latency"] = actions.latency_all(Path(t), a.latency_events, a.eda_actions.split(","))
        if "intake" in only:
            r["intake"] = intake(Path(t), rates, a.seconds)
        if "storm" in only:
            r["storm"] = actions.storm_all(Path(t), a.storm_events, a.storm_rate)
        r["load_average_after"] = os.getloadavg()
    print()
    if "intake" in r:
        print("\n".join(table(r)) + "\n")
    if "latency" in r:
        print("\n".join(latency_table(r["latency"])) + "\n")
    if "storm" in r:
        print("\n".join(storm_table(r["storm"])) + "\n")
    print(f"load average before {r['load_average_before']}, after {r['load_average_after']}")
    Path(a.json_out).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
