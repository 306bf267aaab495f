"""Graceful shutdown: on SIGTERM, `serve` and `worker` claim nothing more, let the step in flight finish (up to
`control.shutdown_timeout_seconds`), start no further step, and hand the run back by releasing its lease; the
process exits 0. Real processes, a real slow step that waits for the test, both backends."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.domain.states import RunStatus
from mendloop.storage.store import Store
from tests.support import mendloop_argv, open_app, serve_process, settings_for, wait_for, write_playbooks

PY = sys.executable
# Writes `started`, waits for the gate file (for at most 60 s, so an orphan never outlives the test by much),
# then writes `finished`.
SLOW = (
    "import os, sys, time\n"
    "open(sys.argv[1], 'a').write('started\\n')\n"
    "end = time.time() + 60\n"
    "while not os.path.exists(sys.argv[2]) and time.time() < end:\n"
    "    time.sleep(0.02)\n"
    "open(sys.argv[1], 'a').write('finished\\n')\n"
)


def _config(database_url: str, tmp_path: Path, shutdown_timeout: float) -> Path:
    log, gate = tmp_path / "step.log", tmp_path / "gate"
    slow = {"argv": [PY, "-c", SLOW, str(log), str(gate)]}
    after = {"argv": [PY, "-c", f"open({str(log)!r}, 'a').write('next\\n')"]}
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "slow",
            "type": "retry",
            "description": "a slow step, then another",
            "steps": [
                {"id": "slow", "action": "command", "timeout": 120, "with": slow},
                {"id": "next", "action": "command", "with": after},
            ],
        },
    )
    cfg = tmp_path / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "playbook_dirs": [str(tmp_path / "pb")],
                "routing": {"slow": "slow"},
                "poll_interval": 0.05,
                "workers": 1,
                # Longer than the test: only the shutdown's release can hand the run back in time.
                "lease_seconds": 300,
                "control": {"shutdown_timeout_seconds": shutdown_timeout},
            }
        )
    )
    return cfg


def _lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "step.log"
    return path.read_text().splitlines() if path.exists() else []


def _start(kind: str, cfg: Path, database_url: str, tmp_path: Path, port: int) -> tuple[Any, str, Any]:
    """The process and the id of the run it is working on, once the slow step has started."""
    if kind == "serve":
        ctx = serve_process(cfg, port, log=tmp_path / "serve.log")
        proc = ctx.__enter__()
        body = {"error_type": "slow", "description": "d", "wait_seconds": 0}
        run_id = httpx.post(f"http://127.0.0.1:{port}/patches/trigger", json=body, timeout=30).json()["run_id"]
    else:
        app = open_app(settings_for(database_url, tmp_path / "trigger", playbook_dirs=[str(tmp_path / "pb")],
                                    routing={"slow": "slow"}, workers=0))  # fmt: skip
        try:
            run_id = app.remediation.trigger(error_type="slow", description="d")[0].id
        finally:
            app.close()
        ctx = None
        with (tmp_path / "worker.log").open("ab") as out:
            proc = subprocess.Popen(mendloop_argv("worker", "--config", str(cfg)), stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: "started" in _lines(tmp_path), timeout=60)
    return proc, run_id, ctx


@pytest.fixture
def trigger_dir(tmp_path: Path) -> Path:
    (tmp_path / "trigger").mkdir()
    return tmp_path / "trigger"


@pytest.mark.parametrize("kind", ["serve", "worker"])
def test_sigterm_lets_the_step_finish_then_hands_the_run_back(
    kind: str, database_url: str, tmp_path: Path, free_port: int, trigger_dir: Path
) -> None:
    cfg = _config(database_url, tmp_path, shutdown_timeout=60)
    proc, run_id, ctx = _start(kind, cfg, database_url, tmp_path, free_port)
    try:
        proc.send_signal(signal.SIGTERM)
        log = tmp_path / f"{kind}.log"
        wait_for(lambda: "waiting up to 60 s for 1 step(s) in flight" in log.read_text(), timeout=30)
        # Still there: the step in flight holds the shutdown (it waits for the gate, which only the test opens).
        assert proc.poll() is None
        (tmp_path / "gate").write_text("open")
        assert proc.wait(60) == 0
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
        elif proc.poll() is None:
            proc.kill()
    assert _lines(tmp_path) == ["started", "finished"]  # it finished; the next step never started
    store = Store(database_url)
    try:
        run = store.get_run(run_id)
        steps = store.run_steps(run_id)
    finally:
        store.close()
    assert [(s.step_id, s.status.value) for s in steps] == [("slow", "succeeded")]
    assert run.status is RunStatus.QUEUED and run.lease_owner is None and run.lease_expires_at is None
    assert run.step_index == 1  # handed back at the next step, for any worker to take at once


def test_after_the_timeout_the_run_is_handed_back_all_the_same(
    database_url: str, tmp_path: Path, free_port: int, trigger_dir: Path
) -> None:
    cfg = _config(database_url, tmp_path, shutdown_timeout=0.5)
    proc, run_id, _ = _start("worker", cfg, database_url, tmp_path, free_port)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        (tmp_path / "gate").write_text("open")  # lets the orphaned step program end
        if proc.poll() is None:
            proc.kill()
    store = Store(database_url)
    try:
        run = store.get_run(run_id)
    finally:
        store.close()
    # The step was cut off: the run is queued at that step again, its lease released, for another worker now.
    assert run.status is RunStatus.QUEUED and run.lease_owner is None and run.step_index == 0
    assert "shutdown: 1 step(s) still running after the timeout" in (tmp_path / "worker.log").read_text()
