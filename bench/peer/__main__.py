"""`make peer-bench`: ansible-rulebook and mendloop through the same open-loop load generator, side by side.

    .venv/bin/python -m bench.peer [--seconds 10] [--rates 200,500,1000,2000] [--json-out bench/peer-results.json]

Measured here: webhook intake at each offered rate (achieved rate, p50/p99 from the scheduled send time,
errors). Run bench/peer/setup.sh first (the make target does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.intake import _free_port, _server
from bench.peer import rulebook
from bench.peer.loadgen import open_loop

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


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ansible-rulebook exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError("ansible-rulebook's webhook did not open its port")


@contextlib.contextmanager
def eda(d: Path, kind: str, recorder: int = 0) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = _free_port()
    proc = rulebook.start(d, rulebook.write(d, kind, port, recorder), d / f"eda-{kind}.log")
    try:
        _wait_port(port, proc)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rates", default="200,500,1000,2000")
    ap.add_argument("--json-out", default=str(ROOT / "bench" / "peer-results.json"))
    a = ap.parse_args()
    rates = [float(x) for x in a.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as t:
        r: dict[str, Any] = {"load_average_before": os.getloadavg(), "seconds": a.seconds}
        r["intake"] = intake(Path(t), rates, a.seconds)
        r["load_average_after"] = os.getloadavg()
    print("\n".join(table(r)))
    print(f"load average before {r['load_average_before']}, after {r['load_average_after']}")
    Path(a.json_out).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
