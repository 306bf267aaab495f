"""`mendloop watch`, the forwarder: watchers on another host shipping events to the server in batches, buffered on
disk while the server is away; every line delivered exactly once, counted through the API."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.config import Settings, load_settings
from mendloop.intake.forwarder import Forwarder
from tests.support import api_server, mendloop_argv, open_app, serve_process, wait_for, write_playbooks
from tests.test_watcher import PATTERNS, TIMEOUT_LINE, append, task_line


def server_config(tmp_path: Path, database_url: str) -> Path:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "quick",
            "type": "retry",
            "description": "ok",
            "steps": [{"id": "nap", "action": "sleep", "with": {"seconds": 0}}],
        },
    )
    path = tmp_path / "server.yaml"
    cfg = {
        "database_url": database_url,
        "workers": 1,
        "poll_interval": 0.05,
        "playbook_dirs": [str(tmp_path / "pb")],
        "routing": {"quick": "quick"},
        "intake_tokens": ["fwd-token-for-tests-01"],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def forwarder_config(tmp_path: Path) -> Path:
    path = tmp_path / "forwarder.yaml"
    cfg = {"watchers": [{"name": "app", "paths": ["logs/*.log"], "start_at": "beginning", "patterns": PATTERNS}]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def api_counts(client: httpx.Client) -> dict[str, int]:
    """Incident title → count, every incident, through the API."""
    out: dict[str, int] = {}
    offset = 0
    while True:
        body = client.get("/incidents", params={"limit": 500, "offset": offset}).json()
        for i in body["incidents"]:
            out[i["title"]] = i["count"]
        offset += body["count"]
        if offset >= body["total"] or not body["count"]:
            return out


def spooled(spool: Path) -> int:
    """How many lines the events waiting in the spool stand for."""
    total = 0
    for entry in (spool / "outbox").glob("*.json"):
        total += sum(e["count"] for e in json.loads(entry.read_text())["events"])
    return total


def write_lines(log: Path, tasks: range, timeouts: int) -> dict[str, int]:
    """Distinct task lines and identical timeout lines, interleaved with noise; returns what they count as."""
    chunks = []
    for n in tasks:
        chunks.append(f"INFO step {n}\n{task_line(n)}\n")
    chunks.extend(f"2026-11-26 10:00:00 {TIMEOUT_LINE}\n" for _ in range(timeouts))
    append(log, "".join(chunks))
    return {**{task_line(n): 1 for n in tasks}, TIMEOUT_LINE: timeouts}


def merge(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def same_counts(seen: dict[str, int], expected: dict[str, int]) -> bool:
    # The timeout incident's title is its first line (with its timestamp).
    return {(TIMEOUT_LINE if k.endswith(TIMEOUT_LINE) else k): v for k, v in seen.items()} == expected


# -- in process ----------------------------------------------------------------------------------------------------


@contextmanager
def forwarding(settings: Settings, url: str, spool: Path, **kw: Any) -> Iterator[Forwarder]:
    """A Forwarder on its own thread and loop, as `mendloop watch` runs it; stopped (cleanly) on exit."""
    fwd = Forwarder(settings, url=url, spool_dir=spool, token="fwd-token-for-tests-01", retry_max=0.3, **kw)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        async def go() -> None:
            box["loop"] = asyncio.get_running_loop()
            box["stop"] = asyncio.Event()
            ready.set()
            await fwd.run(box["stop"])

        try:
            asyncio.run(go())
        except BaseException as e:
            box["error"] = e
            ready.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield fwd
    finally:
        if "loop" in box:
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)
        fwd.close()
        assert not thread.is_alive()
        if "error" in box:
            raise box["error"]


def test_spool_recovery_and_a_resent_batch_count_once(database_url: str, tmp_path: Path, free_port: int) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "svc.log"
    spool = tmp_path / "spool"
    settings = load_settings(forwarder_config(tmp_path))
    app = open_app(load_settings(server_config(tmp_path, database_url)))
    try:
        with api_server(app, free_port) as client:
            url = f"http://127.0.0.1:{free_port}"
            # Server unreachable: the batch waits in the spool.
            with forwarding(settings, "http://127.0.0.1:9", spool):
                first = write_lines(log, range(0, 5), 10)
                wait_for(lambda: spooled(spool) == 15)
            saved = tmp_path / "saved"
            shutil.copytree(spool / "outbox", saved)
            # A crash between the spool write and the checkpoint save: the entry still knows where it got to.
            (spool / "offsets.json").unlink()
            with forwarding(settings, url, spool):
                wait_for(lambda: sum(api_counts(client).values()) >= 15)
                wait_for(lambda: not list((spool / "outbox").glob("*.json")))
            assert same_counts(api_counts(client), first)
            # The answer to that batch was lost: it is sent again, and the server takes it as a no-op.
            for entry in saved.glob("*.json"):
                shutil.copy(entry, spool / "outbox" / entry.name)
            with forwarding(settings, url, spool):
                wait_for(lambda: not list((spool / "outbox").glob("*.json")))
                second = write_lines(log, range(5, 8), 4)
                wait_for(lambda: sum(api_counts(client).values()) >= 22)
            assert same_counts(api_counts(client), merge(first, second))
            duplicates = app.store.recent_events(event_type="task.broke", limit=100)
            assert len(duplicates) == 8
    finally:
        app.close()


# -- real processes ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_forwarder_delivers_every_line_once_across_a_server_outage(
    database_url: str, tmp_path: Path, free_port: int
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "svc.log"
    spool = tmp_path / "spool"
    config = server_config(tmp_path, database_url)
    url = f"http://127.0.0.1:{free_port}"
    server_log = tmp_path / "serve.log"
    with (tmp_path / "watch.log").open("ab") as out:
        forwarder = subprocess.Popen(
            mendloop_argv("watch", "--config", str(forwarder_config(tmp_path)), "--url", url, "--spool", str(spool)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "MENDLOOP_TOKEN": "fwd-token-for-tests-01"},
        )
    try:
        with serve_process(config, free_port, log=server_log) as server, httpx.Client(base_url=url) as client:
            expected = write_lines(log, range(0, 120), 400)
            wait_for(lambda: sum(api_counts(client).values()) >= 520, 60)
            assert same_counts(api_counts(client), expected)
            server.terminate()
            server.wait(20)
        # The server is down: these wait in the forwarder's spool.
        later = write_lines(log, range(120, 200), 300)
        expected = merge(expected, later)
        wait_for(lambda: spooled(spool) == 380, 60)
        assert forwarder.poll() is None
        with serve_process(config, free_port, log=server_log), httpx.Client(base_url=url) as client:
            wait_for(lambda: sum(api_counts(client).values()) >= 900, 60)
            # Stopping the forwarder drains it; nothing can arrive afterwards, so the counts are final.
            forwarder.send_signal(signal.SIGTERM)
            assert forwarder.wait(30) == 0
            seen = api_counts(client)
            assert same_counts(seen, expected), (len(seen), sum(seen.values()))
            assert sum(seen.values()) == 900
            timeouts = client.get("/incidents", params={"error_type": "quick"}).json()["incidents"]
            assert len(timeouts) == 1 and timeouts[0]["count"] == 700
            detail = client.get(f"/incidents/{timeouts[0]['incident_id']}").json()
            assert len(detail["runs"]) == 1
        assert not list((spool / "outbox").glob("*.json"))
    finally:
        if forwarder.poll() is None:
            forwarder.kill()
            forwarder.wait()
