"""`serve --processes N`: N real processes answer the API on one socket; the first runs the workers.

What must hold whichever process answers: /health reports the primary's workers and the process count, /metrics
sums the HTTP figures over the processes, and a run triggered through a replica starts at once (the wake pipe),
not after the workers' poll interval. And the lifecycle: a replica that dies is started again, a primary that dies
takes its replicas with it (the port is free again), SIGTERM stops them all with exit 0 and leaves no files.
Real subprocesses on a real SQLite file; a stopped primary (SIGSTOP) is how the test knows a replica answered.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import alive, serve_process, wait_for, write_playbooks

pytestmark = pytest.mark.slow

# Longer than any test here: a run that starts in time was woken, not found by the workers' poll.
POLL_SECONDS = 120


def _config(tmp_path: Path) -> Path:
    marker = tmp_path / "ran"
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "quick",
            "type": "retry",
            "description": "one quick command",
            "steps": [
                {"id": "touch", "action": "command",
                 "with": {"argv": [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]}},
            ],
        },
    )  # fmt: skip
    cfg = tmp_path / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": f"sqlite:///{tmp_path / 'm.db'}",
                "playbook_dirs": [str(tmp_path / "pb")],
                "routing": {"quick": "quick"},
                "poll_interval": POLL_SECONDS,
                "workers": 1,
                # The primary is stopped for a moment: no heartbeat of its may hold SQLite's write lock then.
                "health": {"probe_interval_seconds": 600, "max_write_age_seconds": 3600},
            }
        )
    )
    return cfg


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def served(tmp_path: Path, free_port: int) -> Iterator[tuple[Any, httpx.Client, Path]]:
    """`serve --processes 2`, its client, and the folder its private directory goes in (its TMPDIR)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with serve_process(
        _config(tmp_path), free_port, log=tmp_path / "serve.log", env={"TMPDIR": str(tmp)}, args=("--processes", "2")
    ) as proc:
        # A new connection for each request: a kept-alive one would stay with the process that accepted it.
        fresh = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=f"http://127.0.0.1:{free_port}", timeout=10, limits=fresh) as client:
            # The replica accepts connections: a test that stops the primary is answered by it at once. (Only
            # started, it could take longer to come up on a busy machine than the primary's report stays fresh.)
            wait_for(lambda: client.get("/health").json()["processes"]["serving"] == 2, 60, 0.1)
            [replica] = _children(proc.pid)
            assert sorted(p.name for p in tmp.glob("*/serving-*")) == [f"serving-{replica}"]
            yield proc, client, tmp


def _health_count(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "mendloop_process_http_requests_total" and sample.labels == {
                "method": "GET",
                "route": "/health",
                "status": "200",
            }:
                return sample.value
    return 0.0


def test_a_replica_answers_for_the_primary_and_wakes_its_workers(
    served: tuple[Any, httpx.Client, Path], tmp_path: Path
) -> None:
    proc, client, _ = served
    health = client.get("/health").json()
    assert health["processes"] == {"count": 2, "restarts": 0, "serving": 2, "primary": "ok"}
    # Whichever process answers, from the moment one said so: each counts the markers itself, none reads it from a
    # report the primary writes every REPORT_SECONDS.
    assert {client.get("/health").json()["processes"]["serving"] for _ in range(20)} == {2}
    before = _health_count(client)
    proc.send_signal(signal.SIGSTOP)
    try:
        # Only the replica can answer now: the same figures, the primary's one worker among them.
        answers = [client.get("/health") for _ in range(3)]
        assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
        assert {a.json()["workers"] for a in answers} == {1}
        assert answers[0].json()["processes"]["count"] == 2
        body = {"error_type": "quick", "description": "through the replica", "wait_seconds": 0}
        triggered = client.post("/patches/trigger", json=body)
        assert triggered.status_code == 200, triggered.text
        run_id = triggered.json()["run_id"]
    finally:
        proc.send_signal(signal.SIGCONT)
    # Woken through the pipe: long before the poll interval, the primary's worker has run it.
    wait_for(lambda: client.get(f"/patches/runs/{run_id}").json()["status"] == "completed", 30)
    assert (tmp_path / "ran").read_text() == "x"
    # The replica's three answers count in /metrics, whichever process answers the scrape.
    assert _health_count(client) == before + 3


def test_a_late_primary_makes_the_replicas_health_degraded(served: tuple[Any, httpx.Client, Path]) -> None:
    proc, client, _ = served
    proc.send_signal(signal.SIGSTOP)
    try:

        def stale() -> bool:
            answer = client.get("/health")
            return answer.status_code == 503 and answer.json()["processes"]["primary"].startswith("no report")

        wait_for(stale, 30, 0.2)
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_for(lambda: client.get("/health").status_code == 200, 30)


def test_a_dead_replica_is_started_again_and_a_dead_primary_takes_the_replicas_along(
    served: tuple[Any, httpx.Client, Path], free_port: int
) -> None:
    proc, client, tmp = served
    [first] = _children(proc.pid)
    os.kill(first, signal.SIGKILL)
    back = {"count": 2, "restarts": 1, "serving": 2, "primary": "ok"}
    wait_for(lambda: client.get("/health").json()["processes"] == back, 60, 0.1)
    [second] = _children(proc.pid)
    assert second != first
    # The dead one's word that it served went with it: only the new replica's is left.
    assert sorted(p.name for p in tmp.glob("*/serving-*")) == [f"serving-{second}"]
    assert list(tmp.iterdir())  # the private directory, while they run
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not alive(second), 30)
    # Nothing holds the socket any more, and the replica removed what its killed primary could not.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", free_port))
    assert list(tmp.iterdir()) == []


def test_sigterm_stops_every_process_with_exit_0_and_leaves_nothing(served: tuple[Any, httpx.Client, Path]) -> None:
    proc, client, tmp = served
    [replica] = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert not alive(replica)
    assert list(tmp.iterdir()) == []
    with pytest.raises(httpx.ConnectError):
        client.get("/health")
