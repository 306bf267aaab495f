"""Notifications through Apprise, to real receivers on 127.0.0.1 (an http.server thread that records each request):
the json://, form:// and Mattermost bodies; filters; a receiver that is down while runs finish; kill -9 of a real
`mendloop serve` between an event and its delivery; a durable cursor across restarts (SQLite and PostgreSQL); bad
configuration; the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mendloop.app import App
from mendloop.config import load_settings
from mendloop.domain import notifications as n
from mendloop.domain.states import RunStatus
from mendloop.errors import ConfigError
from mendloop.storage.notify_cursor import NotifyCursors
from tests.support import (
    api_client,
    free_port,
    mendloop_argv,
    migrated_sqlite,
    open_app,
    serve_process,
    settings_for,
    wait_for,
    wait_status,
    write_playbooks,
)

PY = sys.executable
PUBLIC = "https://mendloop.example.com/"
# Small waits so a test sees several retries; the receiver being down is a refused connection (immediate).
FAST = {
    "public_url": PUBLIC,
    "poll_interval_seconds": 0.05,
    "attempt_timeout_seconds": 5,
    "retry_base_seconds": 0.05,
    "retry_max_seconds": 0.2,
    "max_attempts": 1000,
}


class Receiver:
    """A real HTTP receiver on 127.0.0.1:port that records every POST (path, content type, body) and answers 200.
    `up()` and `down()` start and stop it on the same port."""

    def __init__(self, port: int, gate: threading.Event | None = None) -> None:
        self.port = port
        self.gate = gate  # when given, each request is answered only once it is set (a slow target)
        self.got: list[tuple[str, str, bytes]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def up(self) -> Receiver:
        got, gate = self.got, self.gate

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                got.append((self.path, self.headers.get("Content-Type") or "", raw))
                if gate is not None:
                    gate.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None

    def texts(self) -> list[str]:
        """The notification text of each request, whatever its shape (json, form, Mattermost's Slack-like body)."""
        out = []
        for _, ctype, raw in self.got:
            if ctype.startswith("application/x-www-form-urlencoded"):
                out.append(parse_qs(raw.decode())["message"][0])
            else:
                body = json.loads(raw)
                out.append(body.get("message") or body["text"])
        return out


@contextmanager
def receiver(
    port: int | None = None, *, started: bool = True, gate: threading.Event | None = None
) -> Iterator[Receiver]:
    r = Receiver(port or free_port(), gate)
    if started:
        r.up()
    try:
        yield r
    finally:
        r.down()


def playbooks(directory: Path) -> Path:
    ok = {"id": "ok", "action": "command", "with": {"argv": [PY, "-c", "pass"]}}
    bad = {"id": "bad", "action": "command", "with": {"argv": [PY, "-c", "raise SystemExit(1)"]}}
    return write_playbooks(
        directory,
        {"id": "heal", "type": "retry", "description": "d", "steps": [ok]},
        {"id": "broken", "type": "retry", "description": "d", "steps": [bad]},
    )


def config(tmp_path: Path, database_url: str, notify: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    return {
        "playbook_dirs": [str(playbooks(tmp_path / "pb"))],
        "routing": {"heal": "heal", "broken": "broken"},
        "notify": notify,
        "notify_settings": {**FAST, **settings},
    }


def notifying_app(tmp_path: Path, database_url: str, notify: list[dict[str, Any]], **settings: Any) -> App:
    cfg = config(tmp_path, database_url, notify, **settings)
    return open_app(settings_for(database_url, tmp_path, **cfg), start_workers=True)


def run(app: App, error_type: str = "heal", component: str = "svc") -> str:
    r, _ = app.remediation.trigger(error_type=error_type, description="disk full", component=component)
    ended = RunStatus.COMPLETED if error_type == "heal" else RunStatus.FAILED
    assert wait_status(app, r.id, ended) is ended
    return r.id


def settled(app: App, name: str) -> bool:
    """The target has been given everything up to the newest event (nothing pending, its cursor at the head)."""
    assert app.notifier is not None
    row = NotifyCursors(app.store.db).get(name)
    head = app.notifier.feed.head()
    return row is not None and row.cursor >= head and app.notifier.snapshot()[name].pending == 0


# -- the decisions ------------------------------------------------------------------------------------------------


def test_each_event_type_has_a_severity() -> None:
    assert n.severity_of("self_healing.completed", {"status": "completed"}) == "info"
    assert n.severity_of("self_healing.completed", {"status": "cancelled"}) == "warning"
    assert n.severity_of("self_healing.completed", {"status": "failed"}) == "error"
    assert n.severity_of("self_healing.completed", {"status": "needs_human"}) == "error"
    assert n.severity_of("self_healing.escalated", {}) == "error"
    assert n.severity_of("self_healing.circuit_open", {}) == "critical"
    assert n.severity_of("self_healing.step_failed", {}) == "warning"
    assert n.severity_of("coding_agent.work_order_updated", {"status": "failed"}) == "error"
    assert n.severity_of("coding_agent.work_order_updated", {"status": "claimed"}) == "info"
    assert n.severity_of("self_healing.triggered", {}) == "info"
    assert n.severity_of("trust.updated", {}) == "info"
    # Human control: a run waiting for a person is worth a warning; the rest of it is routine.
    assert n.severity_of("self_healing.completed", {"status": "dry_run"}) == "info"
    for waiting in ("run.approval_requested", "run.rejected", "run.approval_timed_out", "control.paused"):
        assert n.severity_of(waiting, {}) == "warning", waiting
    for routine in ("run.approved", "run.autonomous", "run.retried", "control.resumed"):
        assert n.severity_of(routine, {}) == "info", routine
    # A detection says its own severity; one that doesn't is an error, as intake assumes.
    assert n.severity_of("ingestion.failed", {"severity": "critical"}) == "critical"
    assert n.severity_of("ingestion.failed", {"severity": "loud"}) == "error"
    assert n.severity_of("ingestion.failed", {}) == "error"


def test_a_filter_passes_by_type_glob_component_and_least_severity() -> None:
    f = n.NotifyFilter(event_types=("self_healing.*", "incident.re?pened"), components=("svc",), min_severity="warning")
    assert f.matches("self_healing.completed", "svc", "error")
    assert f.matches("incident.reopened", "svc", "warning")
    assert not f.matches("coding_agent.patch_generated", "svc", "error")  # type
    assert not f.matches("self_healing.completed", "other", "error")  # component
    assert not f.matches("self_healing.completed", None, "error")
    assert not f.matches("self_healing.completed", "svc", "info")  # below the least severity
    assert n.NotifyFilter().matches("anything.at_all", None, "info")  # empty: everything
    assert n.glob_problem("run.*") is None and n.glob_problem("*") is None
    assert n.glob_problem("run.[ab]") is not None and n.glob_problem("") is not None


def test_the_text_is_the_message_and_a_link_to_the_run() -> None:
    kw: dict[str, Any] = {"event_type": "self_healing.completed", "component": "svc", "payload": {"status": "failed"}}
    notice = n.notice(message="Run r1 failed: boom", run_id="r1", public_url="https://m.example/", **kw)
    assert notice.body == "Run r1 failed: boom\n\nRun: https://m.example/patches/runs/r1"
    assert notice.severity == "error" and "self_healing.completed" in notice.title and "svc" in notice.title
    assert n.notice(message="m", run_id="r1", public_url=None, **kw).body.endswith("\n\nRun: /patches/runs/r1")
    assert n.notice(message="m", run_id=None, public_url=None, **kw).body == "m"


def test_failed_attempts_back_off_then_give_up() -> None:
    waits = [n.backoff_seconds(k, base=2, maximum=30) for k in range(1, 7)]
    assert waits == [2, 4, 8, 16, 30, 30]
    assert n.after_failure(1, max_attempts=3, now=100, base=2, maximum=30) == n.Retry(False, 102)
    assert n.after_failure(3, max_attempts=3, now=100, base=2, maximum=30) == n.Retry(True, 100)


# -- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["nosuchscheme://127.0.0.1/x", "json://127.0.0.1/${MENDLOOP_TEST_UNSET_VARIABLE}"],
    ids=["scheme", "unset-variable"],
)
def test_a_bad_notify_url_is_a_config_error_naming_the_field(tmp_path: Path, url: str) -> None:
    path = tmp_path / "mendloop.yaml"
    path.write_text(yaml.safe_dump({"notify": [{"name": "ops", "url": url}]}))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.fields["field"] == "notify.0.url"


def test_a_secret_comes_from_the_environment_and_is_never_dumped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MENDLOOP_TEST_HOOK_TOKEN", "s3cr3t-hook-token")
    path = tmp_path / "mendloop.yaml"
    path.write_text(
        yaml.safe_dump({"notify": [{"name": "ops", "url": "mmost://chat.example/${MENDLOOP_TEST_HOOK_TOKEN}"}]})
    )
    settings = load_settings(path)
    assert settings.notify[0].expanded_url == "mmost://chat.example/s3cr3t-hook-token"
    assert "s3cr3t" not in json.dumps(settings.model_dump(mode="json"))
    assert "s3cr3t" not in repr(settings)
    # An error shown for the target never carries the secret.
    from mendloop.engine.notifier import Channel

    channel = Channel(settings.notify[0], timeout=1)
    assert channel.redact("POST mmost://chat.example/s3cr3t-hook-token failed") == "POST *** failed"


# -- delivery -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["json", "form", "mmost"])
def test_a_notification_reaches_a_real_receiver(tmp_path: Path, scheme: str) -> None:
    url = migrated_sqlite(tmp_path / "mendloop.db")
    with receiver() as rx:
        target = f"{scheme}://127.0.0.1:{rx.port}/" + ("HOOKTOKEN" if scheme == "mmost" else "hook")
        app = notifying_app(tmp_path, url, [{"name": "ops", "url": target, "event_types": ["self_healing.completed"]}])
        try:
            run_id = run(app)
            wait_for(lambda: len(rx.got) == 1)
            wait_for(lambda: settled(app, "ops"))
        finally:
            app.close()
    path, ctype, _ = rx.got[0]
    # Mattermost's incoming webhook: /hooks/TOKEN with a Slack-shaped body ({"text": ...}).
    assert path == ("/hooks/HOOKTOKEN" if scheme == "mmost" else "/hook")
    assert ctype.startswith("application/x-www-form-urlencoded" if scheme == "form" else "application/json")
    if scheme == "mmost":
        assert set(json.loads(rx.got[0][2])) >= {"text", "username"}
    (text,) = rx.texts()
    assert f"Run {run_id} completed: heal finished without escalation" in text
    assert f"Run: https://mendloop.example.com/patches/runs/{run_id}" in text


def test_filters_pick_by_type_component_and_severity_end_to_end(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "mendloop.db")
    with receiver() as rx:
        base = f"json://127.0.0.1:{rx.port}"
        app = notifying_app(
            tmp_path,
            url,
            [
                {
                    "name": "pager",
                    "url": f"{base}/pager",
                    "event_types": ["self_healing.comp*"],
                    "components": ["svc"],
                    "min_severity": "error",
                },
                {"name": "everything", "url": f"{base}/all"},
            ],
        )
        try:
            healed = run(app, "heal", "svc")  # info: below the pager's least severity
            other = run(app, "broken", "other")  # another component
            failed = run(app, "broken", "svc")  # the one the pager wants
            wait_for(lambda: settled(app, "pager") and settled(app, "everything"))
        finally:
            app.close()
    pager = [json.loads(raw)["message"] for path, _, raw in rx.got if path == "/pager"]
    assert len(pager) == 1 and pager[0].startswith(f"Run {failed} failed")
    everything = [json.loads(raw)["message"] for path, _, raw in rx.got if path == "/all"]
    for run_id in (healed, other, failed):
        assert any(m.startswith(f"Run {run_id} ") for m in everything)
    assert len(everything) > 3  # the triggers too: no filter is every event


def test_a_receiver_that_is_down_blocks_no_run_and_gets_the_event_once_back(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "mendloop.db")
    with receiver(started=False) as rx:
        app = notifying_app(
            tmp_path,
            url,
            [{"name": "ops", "url": f"json://127.0.0.1:{rx.port}/hook", "event_types": ["self_healing.completed"]}],
        )
        try:
            first = run(app)  # finishes while nothing listens
            second = run(app)
            assert app.notifier is not None
            # Both events are seen and waiting (the second may be seen a round after the first attempts failed).
            wait_for(lambda: app.notifier is not None and app.notifier.snapshot()["ops"].pending == 2)
            wait_for(lambda: app.notifier is not None and app.notifier.snapshot()["ops"].failed >= 2)
            status = app.notifier.snapshot()["ops"]
            assert status.delivered == 0 and status.pending == 2
            assert status.last_error is not None and "127.0.0.1" in status.last_error
            with api_client(app) as client:
                health = client.get("/health").json()["notifications"]["ops"]
                assert health["delivered"] == 0 and health["pending"] == 2 and health["failed"] >= 2
            rx.up()
            wait_for(lambda: len(rx.got) == 2)
            wait_for(lambda: settled(app, "ops"))
            with api_client(app) as client:
                health = client.get("/health").json()["notifications"]["ops"]
                metrics = {
                    (s.name, s.labels.get("target")): s.value
                    for f in text_string_to_metric_families(client.get("/metrics").text)
                    for s in f.samples
                }
        finally:
            app.close()
    texts = rx.texts()
    assert texts[0].startswith(f"Run {first} completed") and texts[1].startswith(f"Run {second} completed")
    assert health["delivered"] == 2 and health["pending"] == 0 and health["dropped"] == 0
    assert metrics[("mendloop_notifications_delivered_total", "ops")] == 2
    assert metrics[("mendloop_notifications_failed_total", "ops")] == health["failed"] >= 2


def test_a_target_that_does_not_answer_does_not_hold_up_another(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "mendloop.db")
    gate = threading.Event()
    with receiver(gate=gate) as slow, receiver() as fast:
        wants = {"event_types": ["self_healing.completed"]}
        app = notifying_app(
            tmp_path,
            url,
            [
                {"name": "slow", "url": f"json://127.0.0.1:{slow.port}/hook", **wants},
                {"name": "fast", "url": f"json://127.0.0.1:{fast.port}/hook", **wants},
            ],
            attempt_timeout_seconds=30,
        )
        try:
            run_id = run(app)
            wait_for(lambda: len(slow.got) == 1)  # the slow target has the request and sits on it
            wait_for(lambda: settled(app, "fast"))
            assert not gate.is_set() and len(fast.got) == 1  # delivered while the other attempt is in flight
            assert app.notifier is not None and app.notifier.snapshot()["slow"].delivered == 0
        finally:
            gate.set()
            app.close()
    assert fast.texts()[0].startswith(f"Run {run_id} completed")


def test_an_event_is_dropped_after_max_attempts_and_the_cursor_moves_on(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "mendloop.db")
    with receiver(started=False) as rx:
        notify = [{"name": "ops", "url": f"json://127.0.0.1:{rx.port}/hook", "event_types": ["self_healing.completed"]}]
        app = notifying_app(tmp_path, url, notify, max_attempts=2)
        try:
            run(app)
            wait_for(lambda: settled(app, "ops"))
            assert app.notifier is not None
            status = app.notifier.snapshot()["ops"]
            assert (status.delivered, status.failed, status.dropped) == (0, 2, 1)
        finally:
            app.close()


def test_a_restart_does_not_deliver_again_and_a_new_target_starts_at_the_newest_event(
    tmp_path: Path, database_url: str
) -> None:
    with receiver() as rx:
        ops = {"name": "ops", "url": f"json://127.0.0.1:{rx.port}/ops", "event_types": ["self_healing.completed"]}
        app = notifying_app(tmp_path, database_url, [ops])
        try:
            first = run(app)
            wait_for(lambda: settled(app, "ops"))
        finally:
            app.close()
        late = {**ops, "name": "late", "url": f"json://127.0.0.1:{rx.port}/late"}
        app = notifying_app(tmp_path, database_url, [ops, late])
        try:
            second = run(app)
            wait_for(lambda: settled(app, "ops") and settled(app, "late"))
            rows = {r.target: r for r in NotifyCursors(app.store.db).all()}
        finally:
            app.close()
    by_path = [(path, json.loads(raw)["message"].split(" ")[1]) for path, _, raw in rx.got]
    assert sorted(by_path) == sorted([("/ops", first), ("/ops", second), ("/late", second)])
    assert rows["ops"].delivered == 2 and rows["late"].delivered == 1  # counters survive the restart


def test_two_processes_notifying_one_target_deliver_each_event_once(tmp_path: Path, database_url: str) -> None:
    """`serve` and a `mendloop worker` both run a notifier: the target's lease lets one of them deliver it."""
    with receiver() as rx:
        ops = {"name": "ops", "url": f"json://127.0.0.1:{rx.port}/ops", "event_types": ["self_healing.completed"]}
        apps = [notifying_app(tmp_path, database_url, [ops]) for _ in range(2)]
        try:
            run_ids = [run(apps[i % 2]) for i in range(4)]
            wait_for(lambda: all(settled(app, "ops") for app in apps))
            holders = [app.notifier.snapshot()["ops"].delivering for app in apps if app.notifier is not None]
        finally:
            for app in apps:
                app.close()
    got = sorted(json.loads(raw)["message"].split(" ")[1] for _, _, raw in rx.got)
    assert got == sorted(run_ids)
    assert holders.count(True) == 1


def test_kill_9_of_serve_between_the_event_and_its_delivery_still_delivers_it(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "mendloop.db")
    port = free_port()
    with receiver(started=False) as rx:
        notify = [{"name": "ops", "url": f"json://127.0.0.1:{rx.port}/hook", "event_types": ["self_healing.completed"]}]
        cfg = tmp_path / "mendloop.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {"database_url": url, **config(tmp_path, url, notify, lease_seconds=1), "poll_interval": 0.05}
            )
        )
        base = f"http://127.0.0.1:{port}"
        with serve_process(cfg, port, log=tmp_path / "serve1.log") as first:
            answer = httpx.post(
                f"{base}/patches/trigger",
                json={"error_type": "heal", "description": "d", "component": "svc", "wait_seconds": 20},
                timeout=30,
            ).json()
            assert answer["status"] == "completed"  # the run finished with the receiver down

            def failing() -> bool:
                ops = httpx.get(f"{base}/health", timeout=5).json()["notifications"]["ops"]
                return bool(ops["failed"] >= 1 and ops["pending"] == 1 and ops["delivered"] == 0)

            wait_for(failing)
            first.send_signal(signal.SIGKILL)  # nothing is flushed or handed back on the way out
            first.wait()
        rx.up()
        with serve_process(cfg, port, log=tmp_path / "serve2.log"):
            wait_for(lambda: len(rx.got) >= 1, timeout=30)

            def delivered() -> bool:
                ops = httpx.get(f"{base}/health", timeout=5).json()["notifications"]["ops"]
                return bool(ops["delivered"] == 1 and ops["pending"] == 0)

            wait_for(delivered)
    (text,) = rx.texts()
    assert text.startswith(f"Run {answer['run_id']} completed")


# -- the CLI ------------------------------------------------------------------------------------------------------


def test_the_cli_tests_a_target_and_shows_each_target_status(tmp_path: Path) -> None:
    url = migrated_sqlite(tmp_path / "mendloop.db")
    with receiver() as rx:
        dead = free_port()  # nothing listens there
        notify = [
            {"name": "ops", "url": f"json://127.0.0.1:{rx.port}/hook", "event_types": ["self_healing.completed"]},
            {"name": "dead", "url": f"json://127.0.0.1:{dead}/hook", "event_types": ["self_healing.completed"]},
        ]
        cfg = tmp_path / "mendloop.yaml"
        cfg.write_text(yaml.safe_dump({"database_url": url, **config(tmp_path, url, notify)}))
        ok = subprocess.run(
            mendloop_argv("notifications", "test", "ops", "-c", str(cfg)), capture_output=True, text=True
        )
        assert ok.returncode == 0, ok.stderr
        assert "test notification" in rx.texts()[0]
        bad = subprocess.run(
            mendloop_argv("notifications", "test", "dead", "-c", str(cfg)), capture_output=True, text=True
        )
        assert bad.returncode == 1
        assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: dead: not delivered")
        unknown = subprocess.run(
            mendloop_argv("notifications", "test", "nobody", "-c", str(cfg)), capture_output=True, text=True
        )
        assert unknown.returncode == 1 and "no notify target is named 'nobody'" in unknown.stderr
        app = open_app(load_settings(cfg), start_workers=True)
        try:
            run(app)
            wait_for(lambda: settled(app, "ops"))
            wait_for(lambda: app.notifier is not None and app.notifier.snapshot()["dead"].failed >= 1)
        finally:
            app.close()
        status = subprocess.run(
            mendloop_argv("notifications", "status", "--json", "-c", str(cfg)), capture_output=True, text=True
        )
        assert status.returncode == 0, status.stderr
        rows = {r["target"]: r for r in json.loads(status.stdout)}
        assert rows["ops"]["delivered"] == 1 and rows["ops"]["pending"] == 0
        assert rows["dead"]["delivered"] == 0 and rows["dead"]["pending"] == 1 and rows["dead"]["failed"] >= 1
        table = subprocess.run(mendloop_argv("notifications", "status", "-c", str(cfg)), capture_output=True, text=True)
        assert table.returncode == 0 and "ops" in table.stdout and "dead" in table.stdout
