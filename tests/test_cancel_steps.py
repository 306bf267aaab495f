"""Cancel reaches every kind of step: a run cancelled while its step executes has that step stopped (a command's
process group killed, an HTTP step no longer waited for nor sent again, a health wait cut short, a held patch's
tests killed), the step recorded as `cancelled`, and no further step run, whichever process cancelled it (the
worker pool's watcher reads the database). Runs parked in the database (a sleep, a backoff, an approval) stay
cancelled and never resume. Real App and workers, both backends, real programs, a real slow HTTP server, a real
`mendloop serve` and the CLI."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.domain.states import RunStatus, StepStatus, WorkOrderStatus
from mendloop.errors import Conflict, StepCancelled
from mendloop.infra.supervisor import await_health
from mendloop.playbooks.actions.http import call_http
from mendloop.storage.store import Store
from mendloop.testing import FakeClock
from tests.interpreters import python_for_tests
from tests.support import (
    alive,
    api_client,
    drain,
    git,
    json_service,
    mendloop_argv,
    open_app,
    serve_process,
    settings_for,
    wait_for,
    write_playbooks,
)

PY = sys.executable
# Writes its pid to argv[1], then sleeps ten minutes: only a kill ends it within the test.
SLEEPER = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n"


def _touch(path: Path) -> dict[str, Any]:
    return {"argv": [PY, "-c", f"open({str(path)!r}, 'a').write('ran\\n')"]}


def _long_playbook(tmp_path: Path) -> Path:
    """A `command` step running a ten-minute program, then a step that leaves a mark if it ever runs."""
    return write_playbooks(
        tmp_path / "pb",
        {
            "id": "long",
            "type": "retry",
            "description": "a long command, then another step",
            "steps": [
                {
                    "id": "long",
                    "action": "command",
                    "timeout": 900,
                    "retry": {"max_attempts": 3, "backoff_seconds": 0, "jitter": 0},
                    "with": {"argv": [PY, "-c", SLEEPER, str(tmp_path / "pid")]},
                },
                {"id": "after", "action": "command", "with": _touch(tmp_path / "after")},
            ],
        },
        {
            "id": "quick",
            "type": "retry",
            "description": "one quick step",
            "steps": [{"id": "only", "action": "command", "with": _touch(tmp_path / "quick")}],
        },
    )


def _pid(tmp_path: Path) -> int:
    wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().isdigit(), timeout=60)
    return int((tmp_path / "pid").read_text())


def _running_with(marker: str) -> list[int]:
    """The live processes whose argv holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _steps(store: Store, run_id: str) -> list[tuple[str, str]]:
    return [(s.step_id, s.status.value) for s in store.run_steps(run_id)]


def test_a_cancel_from_another_process_kills_the_command_step_and_nothing_runs_after_it(
    database_url: str, tmp_path: Path
) -> None:
    """The cancel comes through another Store (another process's view: only the database is shared), so only the
    worker pool's watcher can learn of it. One worker: a second run completing shows the worker is free again."""
    _long_playbook(tmp_path)
    settings = settings_for(
        database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"long": "long", "quick": "quick"},
        workers=1, poll_interval=0.05, cancel_poll_seconds=0.2, lease_seconds=300,
    )  # fmt: skip
    app = open_app(settings, start_workers=True)
    other = Store(database_url)
    try:
        run, _ = app.remediation.trigger(error_type="long", description="d")
        pid = _pid(tmp_path)
        assert alive(pid)
        other.cancel_run(run.id, "stop it from elsewhere")
        wait_for(lambda: not alive(pid), timeout=30)
        wait_for(lambda: _steps(app.store, run.id) == [("long", "cancelled")], timeout=30)
        quick, _ = app.remediation.trigger(error_type="quick", description="d")
        wait_for(lambda: app.store.run_status(quick.id) is RunStatus.COMPLETED, timeout=30)
        cancelled = app.store.get_run(run.id)
        assert cancelled.status is RunStatus.CANCELLED and cancelled.error == "stop it from elsewhere"
        assert cancelled.lease_owner is None and cancelled.step_index == 0
        # Not failed and not retried: one attempt, recorded as cancelled, and the next step never started.
        assert _steps(app.store, run.id) == [("long", "cancelled")]
        step = app.store.run_steps(run.id)[0]
        assert step.status is StepStatus.CANCELLED and step.attempt == 1 and step.output["cancelled"] is True
        assert "process group were killed" in (step.error or "")
        assert not (tmp_path / "after").exists()
        with api_client(app) as client:
            timeline = [t["message"] for t in client.get(f"/patches/runs/{run.id}").json()["timeline"]]
        assert any(m.startswith("Step stopped by the cancel: long") for m in timeline), timeline
        assert any("was stopped by the cancel" in m for m in timeline), timeline
        assert [e.type for e in app.store.run_events(run.id)].count("self_healing.step_cancelled") == 1
    finally:
        other.close()
        app.close()


def test_a_run_cancelled_between_two_steps_starts_no_further_step(database_url: str, tmp_path: Path) -> None:
    """A cancel that lands while the step loop is between steps: the loop stops there (the in-process cancel
    sets the run's Event at once). Driven on the calling thread, so the moment is the test's."""
    _long_playbook(tmp_path)
    settings = settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"long": "long"})
    app = open_app(settings)
    try:
        run, _ = app.remediation.trigger(error_type="long", description="d")
        claimed = app.store.claim_run("test:0:w", 300)
        assert claimed is not None and claimed.id == run.id
        app.remediation.cancel_run(run.id)
        cancel = threading.Event()
        cancel.set()  # what the watcher sets for a cancelled run
        app.workers.step_loop.advance(claimed, "test:0:w", cancel)
        assert not (tmp_path / "pid").exists()  # the long step never started
        assert _steps(app.store, run.id) == []
        assert app.store.run_status(run.id) is RunStatus.CANCELLED
    finally:
        app.close()


def _parking_playbook(tmp_path: Path) -> None:
    fail = {"argv": [PY, "-c", "import sys; sys.exit(3)"]}
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "backoff",
            "type": "retry",
            "description": "a failing step retried after an hour",
            "steps": [
                {
                    "id": "flaky",
                    "action": "command",
                    "retry": {"max_attempts": 3, "backoff_seconds": 3600, "max_delay_seconds": 3600, "jitter": 0},
                    "with": fail,
                },
                {"id": "after", "action": "command", "with": _touch(tmp_path / "after")},
            ],
        },
        {
            "id": "sleepy",
            "type": "retry",
            "description": "sleeps an hour",
            "steps": [
                {"id": "nap", "action": "sleep", "with": {"seconds": 3600}},
                {"id": "after", "action": "command", "with": _touch(tmp_path / "after")},
            ],
        },
        {
            "id": "escalates",
            "type": "code_patch",
            "description": "waits for the coding agent",
            "steps": [
                {"id": "esc", "action": "escalate", "with": {"description": "fix it"}},
                {"id": "after", "action": "command", "with": _touch(tmp_path / "after")},
            ],
        },
        {
            "id": "asks",
            "type": "retry",
            "description": "waits for an operator",
            "steps": [
                {
                    "id": "ask",
                    "action": "approval",
                    "with": {"message": "go?", "timeout": "1h", "on_timeout": "approve"},
                },
                {"id": "after", "action": "command", "with": _touch(tmp_path / "after")},
            ],
        },
    )


@pytest.mark.parametrize(
    ("error_type", "parked"),
    [
        ("backoff", RunStatus.QUEUED),
        ("sleepy", RunStatus.QUEUED),
        ("asks", RunStatus.AWAITING_APPROVAL),
        ("escalates", RunStatus.AWAITING_PATCH),
    ],
)
def test_a_run_parked_in_the_database_stays_cancelled_and_never_resumes(
    error_type: str, parked: RunStatus, database_url: str, tmp_path: Path
) -> None:
    """A backoff, a sleep, an approval wait and a wait for the coding agent hold no thread: the run waits in the
    database, so the cancel ends it there. After the wait's deadline nothing claims it, the approval's timeout
    decides nothing, an operator can no longer approve it, and a late patch is refused."""
    _parking_playbook(tmp_path)
    clock = FakeClock()
    settings = settings_for(
        database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")],
        routing={"backoff": "backoff", "sleepy": "sleepy", "asks": "asks", "escalates": "escalates"},
    )  # fmt: skip
    app = open_app(settings, clock=clock)
    try:
        run, _ = app.remediation.trigger(error_type=error_type, description="d")
        drain(app)
        assert app.store.run_status(run.id) is parked
        steps_before = _steps(app.store, run.id)
        app.remediation.cancel_run(run.id)
        clock.advance(2 * 3600)  # past the backoff, the sleep and the approval's deadline
        app.remediation.reap_approvals()
        assert drain(app) == 0
        if error_type == "asks":
            with pytest.raises(Conflict):
                app.remediation.approve_run(run.id)
        if error_type == "escalates":
            # The agent's patch arrives after the cancel: its work order was cancelled with the run.
            wo_id = app.store.get_run(run.id).coding_work_order_id or ""
            assert app.store.get_work_order(wo_id).status is WorkOrderStatus.CANCELLED
            with pytest.raises(Conflict):
                app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=1, diff_url=None)
        assert drain(app) == 0
        assert app.store.run_status(run.id) is RunStatus.CANCELLED
        assert _steps(app.store, run.id) == steps_before
        assert not (tmp_path / "after").exists()
    finally:
        app.close()


@contextmanager
def held_service(status: int) -> Iterator[tuple[str, list[str], threading.Event, threading.Event]]:
    """A real slow HTTP service on 127.0.0.1: each request is counted (`arrived` set), held until the test sets
    `release`, then answered `status`. Yields (base URL, the paths asked, arrived, release)."""
    seen: list[str] = []
    arrived, release = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(self.path)
            arrived.set()
            release.wait(60)  # the test's gate, bounded so a failed test never hangs the server
            body = b'{"busy": true}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen, arrived, release
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def test_an_http_step_in_flight_at_the_cancel_stops_at_once_and_is_not_retried(
    database_url: str, tmp_path: Path
) -> None:
    """The service holds the request (its timeout is 60 s). The cancel stops the step while the service still
    holds it: the step recorded as cancelled, saying the request had been sent; the 503 the service gives once
    released is not retried, and the next step never runs."""
    with held_service(503) as (base, seen, arrived, release):
        write_playbooks(
            tmp_path / "pb",
            {
                "id": "calls",
                "type": "retry",
                "description": "a slow service call, retried on 5xx",
                "steps": [
                    {
                        "id": "call",
                        "action": "http",
                        "timeout": 60,
                        "retry": {"max_attempts": 5, "backoff_seconds": 0, "jitter": 0},
                        "with": {"method": "POST", "url": f"{base}/slow", "json": {"x": 1}},
                    },
                    {"id": "after", "action": "command", "with": _touch(tmp_path / "after")},
                ],
            },
        )
        settings = settings_for(
            database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"calls": "calls"},
            workers=1, poll_interval=0.05, lease_seconds=300,
        )  # fmt: skip
        app = open_app(settings, start_workers=True)
        try:
            run, _ = app.remediation.trigger(error_type="calls", description="d")
            assert arrived.wait(30)
            app.remediation.cancel_run(run.id)  # in process: the run's Event is set before this returns
            # The service still holds the request (release is not set): only the cancel can end the step now.
            wait_for(lambda: _steps(app.store, run.id) == [("call", "cancelled")], timeout=30)
            assert not release.is_set()
            step = app.store.run_steps(run.id)[0]
            assert step.output == {"sent": True, "answered": False, "cancelled": True}
            assert "had been sent" in (step.error or "")
            assert app.store.run_status(run.id) is RunStatus.CANCELLED
            release.set()  # the 503 that would be retried comes now, to nobody
            assert seen == ["/slow"]
            assert not (tmp_path / "after").exists()
        finally:
            app.close()
        assert seen == ["/slow"]  # not retried, even by the time the workers stopped


def test_an_http_call_after_the_cancel_sends_nothing() -> None:
    asked: list[str] = []
    cancel = threading.Event()
    cancel.set()

    def answer(method: str, path: str, body: Any) -> dict[str, Any]:
        asked.append(path)
        return {}

    with json_service(answer) as base, httpx.Client() as client:
        with pytest.raises(StepCancelled, match="was not sent"):
            call_http(
                client, method="POST", url=f"{base}/act", json_body=None, headers={}, expect_status=[200],
                timeout=10, idempotency_key="k", cancel=cancel,
            )  # fmt: skip
        # The same call without a cancel reaches the service: the refusal above was the cancel's.
        call_http(
            client, method="POST", url=f"{base}/act", json_body=None, headers={}, expect_status=[200],
            timeout=10, idempotency_key="k",
        )  # fmt: skip
    assert asked == ["/act"]


def test_a_health_wait_stops_at_the_cancel() -> None:
    """The wait a `restart` makes for its target's health (up to ready_timeout) ends at the cancel."""
    with held_service(503) as (base, _seen, arrived, release):
        release.set()  # answers at once, always 503: never healthy
        cancel = threading.Event()
        failed: list[BaseException] = []

        def wait() -> None:
            try:
                await_health(f"{base}/health", timeout=600, cancel=cancel)
            except BaseException as exc:
                failed.append(exc)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        assert arrived.wait(30)
        cancel.set()
        waiter.join(30)
        assert not waiter.is_alive()
        assert len(failed) == 1 and isinstance(failed[0], StepCancelled)


def test_the_tests_of_a_held_patch_are_killed_by_the_cancel(database_url: str, tmp_path: Path) -> None:
    """mendloop's own test run of an agent's held diff: the cancel kills the test command (it would sleep ten
    minutes), nothing lands, and the apply_patch step is recorded as cancelled."""
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "patchy",
            "type": "code_patch",
            "description": "escalate, then apply the agent's patch",
            "steps": [
                {"id": "esc", "action": "escalate", "with": {"description": "fix x"}},
                {"id": "after", "action": "command", "with": _touch(tmp_path / "after")},
            ],
        },
    )
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "x.py").write_text("a\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    head = git(repo, "rev-parse", "HEAD")
    # The sandbox may hide or freeze every path but the worktree's, so the test program is found by a marker in
    # its argv (read from /proc), not by a file it writes.
    marker = f"mendloop-held-tests-{tmp_path.name}"
    sleeper = "import time\ntime.sleep(600)\n"
    target = {
        "repository": str(repo),
        "test_command": [python_for_tests(), "-c", sleeper, marker],
        "report": "none",
        "test_timeout": 900,
    }
    settings = settings_for(
        database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"patchy": "patchy"},
        targets={"svc": target}, default_target="svc", workers=1, poll_interval=0.05, lease_seconds=300,
        cancel_poll_seconds=0.2,
    )  # fmt: skip
    app = open_app(settings, start_workers=True)
    other = Store(database_url)
    try:
        run, _ = app.remediation.trigger(error_type="patchy", description="d")
        wait_for(lambda: app.store.get_run(run.id).coding_work_order_id is not None, timeout=30)
        wo_id = app.store.get_run(run.id).coding_work_order_id or ""
        diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
        app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=1, diff_url=None, diff=diff)
        wait_for(lambda: bool(_running_with(marker)), timeout=60)
        other.cancel_run(run.id, "stop the tests")  # from elsewhere: the watcher must notice
        wait_for(lambda: not _running_with(marker), timeout=30)
        wait_for(lambda: ("apply_patch", "cancelled") in _steps(app.store, run.id), timeout=30)
        assert app.store.run_status(run.id) is RunStatus.CANCELLED
        assert app.store.get_work_order(wo_id).status is WorkOrderStatus.CANCELLED
        assert git(repo, "rev-parse", "HEAD") == head and (repo / "x.py").read_text() == "a\n"
        wait_for(lambda: len(git(repo, "worktree", "list").splitlines()) == 1)  # its test worktrees are gone
        assert not (tmp_path / "after").exists()
    finally:
        other.close()
        app.close()


def test_mendloop_runs_cancel_against_a_serve_process_kills_its_command_step(
    database_url: str, tmp_path: Path, free_port: int
) -> None:
    _long_playbook(tmp_path)
    cfg = tmp_path / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "playbook_dirs": [str(tmp_path / "pb")],
                "routing": {"long": "long"},
                "poll_interval": 0.05,
                "workers": 1,
                "lease_seconds": 300,
            }
        )
    )
    url = f"http://127.0.0.1:{free_port}"
    with serve_process(cfg, free_port, log=tmp_path / "serve.log"):
        body = {"error_type": "long", "description": "d", "wait_seconds": 0}
        run_id = httpx.post(f"{url}/patches/trigger", json=body, timeout=30).json()["run_id"]
        pid = _pid(tmp_path)
        done = subprocess.run(
            mendloop_argv("runs", "cancel", run_id, "--reason", "from the CLI", "--url", url),
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"{run_id}: cancelled" in done.stdout
        wait_for(lambda: not alive(pid), timeout=30)
        wait_for(lambda: httpx.get(f"{url}/patches/runs/{run_id}", timeout=10).json()["steps"] != [], timeout=30)
        detail = httpx.get(f"{url}/patches/runs/{run_id}", timeout=10).json()
        missing = subprocess.run(
            mendloop_argv("runs", "cancel", "run_nope", "--url", url), capture_output=True, text=True, timeout=60
        )
    assert detail["status"] == "cancelled" and detail["error"] == "from the CLI"
    assert [(s["step_id"], s["status"]) for s in detail["steps"]] == [("long", "cancelled")]
    assert not (tmp_path / "after").exists()
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
