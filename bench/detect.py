"""Detection latency: a second process appends matching lines to a watched log at a fixed rate; a real
`mendloop serve` watches it. Measured per line, from the writer's append to the stored event that counted it, and
for lines with new fingerprints, from the append to their run stored. Baseline in the same run: a bare tail loop
(stdlib, polling with os.stat every millisecond) that only reads the line, no matching and no database.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

WRITER = textwrap.dedent(
    """
    import json, sys, time
    path, out = sys.argv[1], sys.argv[5]
    rate, seconds, every_new = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    stamps = []
    start = time.time()
    with open(path, "a", buffering=1) as log:
        i = 0
        while time.time() - start < seconds:
            due = start + i / rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            if every_new and i % every_new == 0:
                # A new shape (letters are not normalised away): a new fingerprint, so a new incident and run.
                word = "".join(chr(97 + (i // 26 ** k) % 26) for k in range(4))
                line = f"ERROR: Ingestion failed for batch-{word}: Schema mismatch in {word} seq={i}\\n"
            else:
                line = f"ERROR: Pipeline timeout after 300 seconds seq={i}\\n"
            log.write(line)
            stamps.append((i, time.time(), bool(every_new and i % every_new == 0)))
            i += 1
    json.dump(stamps, open(out, "w"))
    """
)

BARE_TAIL = textwrap.dedent(
    """
    import os, sys, time, json
    path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    seen = []
    pos = 0
    buf = b""
    while len(seen) < n:
        size = os.stat(path).st_size
        if size > pos:
            with open(path, "rb") as fh:
                fh.seek(pos)
                data = fh.read(size - pos)
            pos = size
            now = time.time()
            buf += data
            *lines, buf = buf.split(b"\\n")
            seen.extend(now for _ in lines)
        else:
            time.sleep(0.001)
    json.dump(seen, open(out, "w"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _wait_health(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("mendloop serve exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("mendloop serve did not start")


def run(rate: float = 1000, seconds: float = 5, every_new: int = 50) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mendloop-detect-") as d:
        tmp = Path(d)
        log = tmp / "app.log"
        log.write_text("")
        pb = tmp / "pb"
        pb.mkdir()
        # Runs park for a while: the bench measures detection, not remediation.
        (pb / "park.yaml").write_text(
            yaml.safe_dump(
                {
                    "id": "park",
                    "type": "retry",
                    "description": "d",
                    "steps": [{"id": "s", "action": "sleep", "with": {"seconds": 600}}],
                }
            )
        )
        config = {
            "database_url": f"sqlite:///{tmp}/detect.db",
            "playbook_dirs": ["pb"],
            "routing": {"pipeline_timeout": "park", "schema_mismatch": "park"},
            "workers": 1,
            "storm": {"mutex_per_component": False},
            "watchers": [
                {
                    "name": "bench",
                    "paths": ["app.log"],
                    "start_at": "end",
                    "patterns": [
                        {
                            "name": "timeout",
                            "regex": r"ERROR: Pipeline timeout after (?P<seconds>\d+) seconds",
                            "event_type": "pipeline.timeout",
                            "error_type": "pipeline_timeout",
                        },
                        {
                            "name": "schema",
                            "regex": r"ERROR: Ingestion failed for (?P<file_path>\S+): Schema mismatch",
                            "event_type": "ingestion.failed",
                            "error_type": "schema_mismatch",
                        },
                    ],
                }
            ],
        }
        (tmp / "mendloop.yaml").write_text(yaml.safe_dump(config))
        port = _free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mendloop",
                "serve",
                "--config",
                str(tmp / "mendloop.yaml"),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_health(port, server)
            stamps_file = tmp / "stamps.json"
            subprocess.run(
                [sys.executable, "-c", WRITER, str(log), str(rate), str(seconds), str(every_new), str(stamps_file)],
                check=True,
            )
            stamps = json.loads(stamps_file.read_text())
            total = len(stamps)
            db = sqlite3.connect(tmp / "detect.db")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                counted = db.execute("select coalesce(sum(count), 0) from incidents").fetchone()[0]
                if counted >= total:
                    break
                time.sleep(0.05)
            events = db.execute(
                "select created_at, payload, message from events"
                " where type in ('pipeline.timeout', 'ingestion.failed') order by id"
            ).fetchall()
            runs = db.execute("select created_at, description from runs").fetchall()
            db.close()
        finally:
            server.terminate()
            server.wait(15)

        # Each stored event counts `count` lines of its fingerprint, in order: attribute lines to events.
        appended = {i: t for i, t, _ in stamps}
        per_fp: dict[str, list[tuple[float, int]]] = {}
        for created, payload, _msg in events:
            p = json.loads(payload)
            per_fp.setdefault(p["fingerprint"], []).append((created, int(p.get("count", 1))))
        timeout_lines = [i for i, _, new in stamps if not new]
        event_lat: list[float] = []
        # Same-fingerprint lines (the timeout ones) are counted in order by their events.
        timeout_events = max(per_fp.values(), key=lambda v: sum(c for _, c in v))
        cursor = 0
        for created, count in timeout_events:
            for i in timeout_lines[cursor : cursor + count]:
                event_lat.append(created - appended[i])
            cursor += count
        new_lines = {f"seq={i}": appended[i] for i, _, new in stamps if new}
        run_lat = [created - new_lines[d.split()[-1]] for created, d in runs if d.split()[-1] in new_lines]

        bare_out = tmp / "bare.json"
        log2 = tmp / "bare.log"
        log2.write_text("")
        tail = subprocess.Popen([sys.executable, "-c", BARE_TAIL, str(log2), str(total), str(bare_out)])
        subprocess.run(
            [sys.executable, "-c", WRITER, str(log2), str(rate), str(seconds), str(every_new), str(stamps_file)],
            check=True,
        )
        tail.wait(60)
        bare_stamps = json.loads(stamps_file.read_text())
        seen = json.loads(bare_out.read_text())
        bare_lat = [s - t for (_, t, _), s in zip(bare_stamps, seen, strict=False)]
    return {
        "lines": total,
        "rate": rate,
        "event_p50_ms": statistics.median(event_lat) * 1000,
        "event_p99_ms": _pct(event_lat, 0.99) * 1000,
        "events_counted": len(event_lat),
        "run_p50_ms": statistics.median(run_lat) * 1000 if run_lat else float("nan"),
        "run_p99_ms": _pct(run_lat, 0.99) * 1000 if run_lat else float("nan"),
        "new_fingerprints": len(run_lat),
        "bare_tail_p50_ms": statistics.median(bare_lat) * 1000,
        "bare_tail_p99_ms": _pct(bare_lat, 0.99) * 1000,
    }


def report(r: dict[str, Any]) -> list[str]:
    def row(label: str, p50: float, p99: float, tail: str = "") -> str:
        return f"  {label:<38} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   {tail}".rstrip()

    return [
        f"detection latency, {r['lines']} lines at {r['rate']:.0f} lines/s appended by a second process",
        row("line appended -> its event stored", r["event_p50_ms"], r["event_p99_ms"], "goal p99 <= 50"),
        row("new fingerprint -> its run stored", r["run_p50_ms"], r["run_p99_ms"], f"({r['new_fingerprints']} runs)"),
        row("bare tail loop (read only, baseline)", r["bare_tail_p50_ms"], r["bare_tail_p99_ms"]),
    ]


if __name__ == "__main__":
    print("\n".join(report(run())))
