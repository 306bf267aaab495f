"""Event -> first action latency and the 100k storm, on both systems, against bench/peer/recorder.py.

Both systems' first action is one HTTP POST to the recorder (`{"job": N}`), which notes its arrival time:

- mendloop: `mendloop serve` with a playbook dir holding `peer_first_action`, whose first (only) step is an
  `http` step to the recorder, routed from the event type by `routing` in the config;
- EDA: a rule whose action is `run_module` `ansible.builtin.uri` (the cheapest EDA action that reaches HTTP;
  `debug` cannot), and `run_playbook` with a one-task `uri` playbook (what an operator usually writes).

Latency: events sent open-loop at 5/s (200 ms apart), each its own fingerprint and component for mendloop (so
storm control's once-per-fingerprint window and per-component mutex do not hold them back); from each event's
send time (wall clock) to its recorder arrival. Storm: N identical events (one error, one component) through
the same open-loop generator under a 10 s throttle on both; counted: actions that reached the recorder, runs
mendloop created, intake duration, and the server's peak RSS (VmHWM of the process tree, read from /proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.intake import _free_port, _server
from bench.peer.loadgen import open_loop, percentile
from bench.peer.rulebook import eda
from bench.words import distinct_word

PLAYBOOK = "peer_first_action"
EVENT_TYPE = "bench.event"


def distinct_event(i: int) -> dict[str, Any]:
    return {
        "event_type": EVENT_TYPE,
        "event_id": f"lat-{time.time_ns()}-{i}",
        "message": f"worker {distinct_word(i)} crashed",
        "component": f"svc-{distinct_word(i)}",
        "payload": {"host": "web-1", "job": i},
    }


def storm_event(i: int) -> dict[str, Any]:
    # One identical error every time; only the event id (a retry key) and the job differ.
    return {
        "event_type": EVENT_TYPE,
        "event_id": f"storm-{time.time_ns()}-{i}",
        "message": "ERROR: upstream timeout talking to the payments database",
        "component": "payments",
        "payload": {"host": "web-1", "job": i},
    }


@contextlib.contextmanager
def recorder(d: Path) -> Iterator[tuple[int, Path]]:
    port, out = _free_port(), d / "recorder.log"
    out.touch()
    argv = [sys.executable, str(Path(__file__).with_name("recorder.py")), str(port), str(out)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.05)
        yield port, out
    finally:
        proc.kill()
        proc.wait()


def arrivals(log: Path) -> dict[int, float]:
    """job -> first arrival time (wall clock) from the recorder's lines `<time> {"job": N}`."""
    got: dict[int, float] = {}
    for line in log.read_text().splitlines():
        at, _, body = line.partition(" ")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            job = int(yaml.safe_load(body)["job"])
            got.setdefault(job, float(at))
    return got


def _wait_lines(log: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(log.read_text().splitlines()) < n:
        time.sleep(0.2)


def peak_rss_mb(pid: int) -> float:
    """VmHWM of `pid` plus its live children's (ansible-runner forks), in MB; read from /proc."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


class PeakWatcher:
    """Samples `peak_rss_mb` every 0.2 s in a thread: children come and go, the process's own VmHWM stays."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, peak_rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, peak_rss_mb(self.pid))
        return self.peak


def mendloop_config(d: Path, recorder_port: int, *, storm: bool) -> Path:
    pbdir = d / "playbooks"
    pbdir.mkdir(exist_ok=True)
    step = {
        "id": "call_recorder",
        "action": "http",
        "with": {
            "url": f"http://127.0.0.1:{recorder_port}/action",
            "method": "POST",
            "json": {"job": "{{ event.job }}"},
        },
    }
    (pbdir / f"{PLAYBOOK}.yaml").write_text(
        yaml.safe_dump({"id": PLAYBOOK, "type": "retry", "description": "peer bench: first action", "steps": [step]})
    )
    # Latency: no window or cap may hold an event back. Storm: the 10 s once-per-fingerprint window EDA gets.
    storm_cfg: dict[str, Any] = (
        {"once_within_seconds": 10}
        if storm
        else {"once_within_seconds": 0, "max_new_runs_per_window": 0, "max_new_runs_per_component": 0}
    )
    cfg = d / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": f"sqlite:///{d / 'mendloop.db'}",
                "playbook_dirs": [str(pbdir)],
                "routing": {EVENT_TYPE: PLAYBOOK},
                "workers": 4,
                "storm": storm_cfg,
            }
        )
    )
    return cfg


@contextlib.contextmanager
def mendloop(d: Path, recorder_port: int, *, storm: bool) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    cfg = mendloop_config(d, recorder_port, storm=storm)
    port = _free_port()
    argv = [sys.executable, "-m", "mendloop", "serve", "--config", str(cfg), "--port", str(port),
            "--log-level", "warning"]  # fmt: skip
    with _server(argv, port, d / "serve.log") as proc:
        yield port, proc


def latency(port: int, path: str, log: Path, *, events: int, wait: float) -> dict[str, Any]:
    sent: dict[int, float] = {}

    def body(i: int) -> dict[str, Any]:
        sent[i] = time.time()  # called as the request leaves, within ~1 ms of its scheduled time at 5/s
        return distinct_event(i)

    intake = asyncio.run(open_loop("127.0.0.1", port, path, body, rate=5.0, duration=events / 5.0, connections=4))
    _wait_lines(log, events, wait)
    got = arrivals(log)
    lat = sorted((got[i] - sent[i]) * 1000 for i in sent if i in got)
    return {
        "events": len(sent),
        "accepted": intake["ok"],
        "reached_recorder": len(lat),
        # The first event's, with nothing queued ahead of it: the cost of one action alone.
        "first_ms": (got[0] - sent[0]) * 1000 if 0 in got and 0 in sent else float("nan"),
        # How fast actions completed once they started landing: the rate a backlog drains at.
        "actions_per_s": (len(got) - 1) / (max(got.values()) - min(got.values())) if len(got) > 1 else float("nan"),
        "p50_ms": percentile(lat, 0.5),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": lat[-1] if lat else float("nan"),
    }


def latency_all(tmp: Path, events: int, eda_kinds: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    d = tmp / "latency-mendloop"
    d.mkdir()
    with recorder(d) as (rport, log), mendloop(d, rport, storm=False) as (port, _):
        out["mendloop"] = latency(port, "/events", log, events=events, wait=60)
    for kind in eda_kinds:
        d = tmp / f"latency-eda-{kind}"
        d.mkdir()
        with recorder(d) as (rport, log), eda(d, kind, rport) as (port, _):
            out[f"eda_{kind}"] = latency(port, "/endpoint", log, events=events, wait=120)
    for name, r in out.items():
        print(f"  {name:16} {r['reached_recorder']:3d}/{r['events']} reached the recorder, "
              f"p50 {r['p50_ms']:8.1f} ms, p99 {r['p99_ms']:8.1f} ms")  # fmt: skip
    return out


def _runs(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT count(*) FROM runs").fetchone()[0])


def storm(port: int, proc: subprocess.Popen[bytes], path: str, log: Path, *, n: int, rate: float) -> dict[str, Any]:
    watch = PeakWatcher(proc.pid)
    t0 = time.perf_counter()
    intake = asyncio.run(open_loop("127.0.0.1", port, path, storm_event, rate=rate, duration=n / rate))
    took = time.perf_counter() - t0
    # Actions already started finish within seconds; let them land before counting.
    time.sleep(5)
    return {
        "events": n,
        "offered_per_s": rate,
        "accepted": intake["ok"],
        "errors": intake["errors"],
        "intake_seconds": took,
        "achieved_per_s": intake["achieved_per_s"],
        "p99_ms": intake["p99_ms"],
        "actions_reached_recorder": len(log.read_text().splitlines()),
        "peak_rss_mb": watch.stop(),
    }


def storm_all(tmp: Path, n: int, rate: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    d = tmp / "storm-mendloop"
    d.mkdir()
    with recorder(d) as (rport, log), mendloop(d, rport, storm=True) as (port, proc):
        out["mendloop"] = storm(port, proc, "/events", log, n=n, rate=rate)
        out["mendloop"]["runs_created"] = _runs(d / "mendloop.db")
    d = tmp / "storm-eda"
    d.mkdir()
    with recorder(d) as (rport, log), eda(d, "storm", rport) as (port, proc):
        out["eda"] = storm(port, proc, "/endpoint", log, n=n, rate=rate)
    for name, r in out.items():
        print(f"  {name:8} {r['accepted']}/{n} accepted in {r['intake_seconds']:.1f} s, "
              f"{r['actions_reached_recorder']} actions, peak RSS {r['peak_rss_mb']:.0f} MB")  # fmt: skip
    return out
