"""kill -9 safety and many workers: real `mendloop serve` / `mendloop worker` processes, real side-effect logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.config import load_settings
from mendloop.domain.states import RunStatus
from mendloop.engine.step_loop import MAX_STALLED_CLAIMS
from tests.support import mendloop_argv, open_app, serve_process, settings_for, wait_for, write_playbooks

pytestmark = pytest.mark.slow
PY = sys.executable
# Appends {"key", "tag", "pid"} to argv[1]; with argv[3] set, then waits for that file to exist.
STEP = (
    "import json,os,sys,time\n"
    "def rec(tag):\n"
    "    with open(sys.argv[1],'a') as f: f.write(json.dumps({'key': os.environ['MENDLOOP_IDEMPOTENCY_KEY'],"
    " 'tag': tag, 'pid': os.getppid()})+'\\n')\n"
    "rec(sys.argv[2])\n"
    "if len(sys.argv) > 3:\n"
    "    while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n"
    "    rec(sys.argv[2] + ':end')\n"
)


def step(tag: str, log: Path, gate: Path | None = None) -> dict[str, Any]:
    argv = [PY, "-c", STEP, str(log), tag] + ([str(gate)] if gate else [])
    return {"id": tag, "action": "command", "with": {"argv": argv}}


def lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_sigkill_mid_step_and_while_parked_loses_nothing(database_url: str, tmp_path: Path, free_port: int) -> None:
    log = tmp_path / "effects.jsonl"
    gate = tmp_path / "gate"
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "slow",
            "type": "retry",
            "description": "d",
            "steps": [step("a", log), step("b", log, gate), step("c", log)],
        },
        {
            "id": "parked",
            "type": "code_patch",
            "description": "d",
            "steps": [step("p1", log), {"id": "escalate", "action": "escalate", "with": {}}, step("p2", log)],
        },
    )
    cfg = tmp_path / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "playbook_dirs": ["pb"],
                "routing": {"slow": "slow", "parked": "parked"},
                "poll_interval": 0.05,
                # Far longer than the test's deadlines: only the restart's reclaim can bring the run back in time.
                "lease_seconds": 300,
            }
        )
    )
    base = f"http://127.0.0.1:{free_port}"
    with serve_process(cfg, free_port, log=tmp_path / "serve1.log") as first:
        parked = httpx.post(
            f"{base}/patches/trigger", json={"description": "d", "error_type": "parked"}, timeout=30
        ).json()
        assert parked["status"] == "awaiting_patch"
        slow = httpx.post(
            f"{base}/patches/trigger", json={"description": "d", "error_type": "slow", "wait_seconds": 0}, timeout=30
        ).json()
        wait_for(lambda: any(x["tag"] == "b" for x in lines(log)))
        first.send_signal(signal.SIGKILL)
        first.wait()
    with serve_process(cfg, free_port, log=tmp_path / "serve2.log"):
        gate.write_text("open")
        done = httpx.post(f"{base}/patches/work-orders/{parked['work_order_id']}/complete", json={"tests_passed": True})
        assert done.status_code == 200

        def finished() -> bool:
            statuses = [httpx.get(f"{base}/patches/runs/{r['run_id']}").json()["status"] for r in (slow, parked)]
            return statuses == ["completed", "completed"]

        wait_for(finished, timeout=20)
    tags = Counter(x["tag"] for x in lines(log))
    # Completed steps ran once; only the in-flight step "b" ran again, with the same idempotency key.
    assert tags["a"] == 1 and tags["c"] == 1 and tags["p1"] == 1 and tags["p2"] == 1
    assert tags["b"] == 2 and tags["b:end"] >= 1
    b_keys = {x["key"] for x in lines(log) if x["tag"] == "b"}
    assert b_keys == {f"{slow['run_id']}:b:1"}


@pytest.mark.postgres
def test_two_worker_processes_share_200_runs_on_postgres(postgres_admin_url: str, tmp_path: Path) -> None:
    import uuid

    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_admin_url)
    name = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = admin.set(database=name).render_as_string(hide_password=False)
    log = tmp_path / "effects.jsonl"
    write_playbooks(tmp_path / "pb", {"id": "one", "type": "retry", "description": "d", "steps": [step("s", log)]})
    settings = settings_for(url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"one": "one"})
    app = open_app(settings)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        run_ids = [app.remediation.trigger(error_type="one", description=str(i))[0].id for i in range(200)]
        env = {**os.environ, "MENDLOOP_DATABASE_URL": url}
        for i in range(2):
            with (tmp_path / f"worker{i}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        mendloop_argv("worker", "--config", str(tmp_path / "mendloop.yaml"), "--count", "2"),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        wait_for(lambda: app.store.list_runs(status=RunStatus.COMPLETED.value, limit=1)[1] == 200, timeout=120)
        effects = lines(log)
        keys = Counter(x["key"] for x in effects)
        assert len(effects) == 200 and set(keys.values()) == {1}
        assert {k.split(":")[0] for k in keys} == set(run_ids)
        # Both processes took a share of the work.
        assert len({x["pid"] for x in effects}) == 2
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        app.close()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_step_that_kills_its_worker_every_time_goes_to_needs_human(database_url: str, tmp_path: Path) -> None:
    """The step kills the worker process that runs it (kill -9 of its parent). Each restarted worker reclaims the
    run and is killed again; after MAX_STALLED_CLAIMS such claims the next worker hands the run to a human."""

    log = tmp_path / "kills.log"
    killer = "import os,signal,sys; open(sys.argv[1],'a').write('kill\\n'); os.kill(os.getppid(), signal.SIGKILL)"
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "killer",
            "type": "retry",
            "description": "d",
            "steps": [{"id": "kill", "action": "command", "with": {"argv": [PY, "-c", killer, str(log)]}}],
        },
    )
    cfg = tmp_path / "mendloop.yaml"
    settings = {
        "database_url": database_url,
        "playbook_dirs": [str(tmp_path / "pb")],
        "routing": {"killer": "killer"},
        "poll_interval": 0.05,
        # Longer than the test: each restart's reclaim of dead workers' leases brings the run back.
        "lease_seconds": 300,
    }
    cfg.write_text(yaml.safe_dump(settings))
    app = open_app(load_settings(cfg))  # no worker threads: only the worker processes run steps
    try:
        run, _ = app.remediation.trigger(error_type="killer", description="d")
        for n in range(1, MAX_STALLED_CLAIMS + 1):
            with (tmp_path / f"worker{n}.log").open("wb") as out:
                proc = subprocess.Popen(
                    mendloop_argv("worker", "--config", str(cfg), "--count", "1"), stdout=out, stderr=subprocess.STDOUT
                )
            assert proc.wait(60) == -signal.SIGKILL
            assert log.read_text().count("kill") == n
        with (tmp_path / "last.log").open("wb") as out:
            last = subprocess.Popen(
                mendloop_argv("worker", "--config", str(cfg), "--count", "1"), stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_for(lambda: app.store.run_status(run.id) is RunStatus.NEEDS_HUMAN, timeout=30)
        finally:
            last.terminate()
            last.wait(15)
        assert log.read_text().count("kill") == MAX_STALLED_CLAIMS  # the step never ran a fourth time
        done = app.store.get_run(run.id)
        assert done.error is not None
        assert done.error.startswith(f"gave up after {MAX_STALLED_CLAIMS} claims in a row crashed the worker: ")
        assert "the worker stopped while it held the run" in done.error
        (step,) = app.store.run_steps(run.id)
        assert step.step_id == "kill" and step.status.value == "failed"
        assert step.error is not None and "the worker stopped" in step.error
        types = [e.type for e in app.store.run_events(run.id)]
        assert "self_healing.step_failed" in types and types[-1] == "self_healing.completed"
    finally:
        app.close()
