"""Restarting a target (issue 9, item 5): `runs:` declares how a target runs, and mendloop provides `restart`
(and `deploy`, `health`) and waits for health.

- `process:` for real: a small stdlib HTTP server this file writes, whose /health answers its pid and a boot id,
  is started detached, adopted by a new Capabilities (a restarted mendloop: no second copy), restarted through
  the `restart` capability (a new pid answers, the old one is gone), and run through the engine in a playbook.
- the provided capabilities count as bound (a target's own binding wins), and bad `runs:` are config errors.

systemd, docker and kubernetes (their argv against the real tools' `--help`, and stand-ins): test_restart_tools.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop import preflight
from mendloop.config import Settings, load_settings
from mendloop.domain.states import RunStatus
from mendloop.errors import ActionError, ConfigError
from mendloop.infra import process
from mendloop.infra.supervisor import Supervisor, matches_argv
from mendloop.playbooks.actions.base import ActionContext
from mendloop.playbooks.actions.capability import Capabilities
from mendloop.playbooks.templates import Templates
from tests.support import alive, drain, free_port, open_app, settings_for, wait_for, write_playbooks

# The operator's service: /health answers its pid and a boot id that is new on every start. `never-healthy`
# answers 503 forever; `crash` exits at once after a log line; `stubborn` ignores SIGTERM.
SERVICE = """
import json, os, signal, sys, uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
port, mode = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "ok")
boot = uuid.uuid4().hex
print(f"booting {boot} as pid {os.getpid()}", flush=True)
if mode == "crash":
    print("fatal: cannot open the database", flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
class Handler(BaseHTTPRequestHandler):
    def log_message(self, *_):
        pass
    def do_GET(self):
        body = json.dumps({"pid": os.getpid(), "boot": boot}).encode()
        self.send_response(503 if mode == "never-healthy" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


class Service:
    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "service.py"
        self.script.write_text(SERVICE)
        self.port = free_port()
        self.health = f"http://127.0.0.1:{self.port}/health"
        self.dir = tmp_path

    def runs(self, mode: str = "ok", **process_extra: Any) -> dict[str, Any]:
        return {
            "process": {
                "argv": [sys.executable, str(self.script), str(self.port), mode],
                "cwd": str(self.dir),
                "pidfile": str(self.dir / "run" / "svc.pid"),
                "log": str(self.dir / "run" / "svc.log"),
                **process_extra,
            },
            "health_url": self.health,
        }

    def copies(self) -> list[int]:
        """Pids of live processes running this script (zombies excluded)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if str(self.script).encode() in cmdline and state != b"Z":
                found.append(int(entry.name))
        return sorted(found)

    def answer(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.health, timeout=5).json()
        return data


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path)
    yield svc
    for pid in svc.copies():  # the service outlives mendloop by design: the test ends it
        process.kill_group(pid)
    wait_for(lambda: not svc.copies())


def capabilities_for(targets: dict[str, Any]) -> Capabilities:
    settings = Settings(targets=targets)
    return Capabilities(settings.targets, Templates())


def ctx_for(target: str, key: str = "run1:restart:1") -> ActionContext:
    return ActionContext(
        run_id="run1",
        step_id="restart",
        attempt=1,
        idempotency_key=key,
        timeout=None,
        target=target,
        http=httpx.Client(),
    )


# -- process: the real thing --------------------------------------------------------------------------------------


def test_a_supervised_process_is_adopted_by_a_new_mendloop_then_restarted_and_its_health_awaited(
    service: Service,
) -> None:
    caps = capabilities_for({"svc": {"runs": service.runs()}})
    (sup,) = caps.supervisors()
    first = sup.ensure()
    assert first.restarted
    wait_for(lambda: _answers(service.health))
    booted = service.answer()
    assert booted["pid"] == first.pid
    assert Path(service.dir / "run" / "svc.pid").read_text().strip() == str(first.pid)
    assert os.getsid(first.pid) == first.pid  # detached: its own session, not mendloop's
    assert "booting" in sup.log_tail()

    # mendloop restarts: a new Capabilities adopts the live process from the pidfile and starts no second copy.
    again = capabilities_for({"svc": {"runs": service.runs()}})
    adopted = again.supervisors()[0].ensure()
    assert (adopted.pid, adopted.restarted) == (first.pid, False)
    assert service.copies() == [first.pid]

    result = again.call("restart", {}, ctx_for("svc"), timeout=30)
    new_pid = result["pid"]
    assert result["restarted"] is True and result["healthy"] is True and result["kind"] == "process"
    assert result["previous_pid"] == first.pid and new_pid != first.pid
    assert result["outputs"]["pid"] == new_pid
    now = service.answer()  # health was awaited: the new process answers at once, with a new boot id
    assert now["pid"] == new_pid and now["boot"] != booted["boot"]
    wait_for(lambda: not alive(first.pid))  # the reaper collects it: gone, not a zombie
    assert service.copies() == [new_pid]

    # The same step retried after a crash (same idempotency key): nothing is restarted twice.
    retried = again.call("restart", {}, ctx_for("svc"), timeout=30)
    assert (retried["pid"], retried["restarted"]) == (new_pid, False)
    # `deploy` defaults to the same restart, `health` to a GET of the health URL.
    deployed = again.call("deploy", {}, ctx_for("svc", "run1:deploy:1"), timeout=30)
    assert deployed["restarted"] is True and deployed["pid"] != new_pid
    health = again.call("health", {}, ctx_for("svc"), timeout=5)
    assert health["outputs"]["healthy"] is True and health["json"]["pid"] == deployed["pid"]


def test_a_pid_reused_by_another_program_is_not_adopted(service: Service) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = service.dir / "run" / "svc.pid"
        pidfile.parent.mkdir(parents=True)
        pidfile.write_text(f"{stranger.pid}\n")
        (sup,) = capabilities_for({"svc": {"runs": service.runs()}}).supervisors()
        assert sup.current() is None
        # Nor when the identity mendloop keeps beside the pidfile (pid and start time) names another start.
        started_at = int(Path(f"/proc/{stranger.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        identity = pidfile.with_name(pidfile.name + ".identity")
        identity.write_text(f"{stranger.pid} {started_at + 1}\n")
        assert sup.current() is None
        identity.write_text(f"{stranger.pid} {started_at}\n")  # the same process: its identity, not its argv
        assert sup.current() == stranger.pid
        identity.unlink()
        started = sup.ensure()
        assert started.restarted and started.pid != stranger.pid
        assert stranger.poll() is None  # never signalled
        wait_for(lambda: _answers(service.health))
    finally:
        stranger.kill()
        stranger.wait()


def test_a_service_that_ignores_sigterm_is_killed_after_stop_timeout(service: Service) -> None:
    caps = capabilities_for({"svc": {"runs": service.runs("stubborn", stop_timeout=0.3)}})
    old = caps.supervisors()[0].ensure().pid
    wait_for(lambda: _answers(service.health))
    result = caps.call("restart", {}, ctx_for("svc"), timeout=30)
    assert result["healthy"] is True and result["pid"] != old
    wait_for(lambda: not alive(old))
    assert service.copies() == [result["pid"]]


def test_a_process_whose_health_never_comes_fails_with_a_clear_error(service: Service) -> None:
    runs = {**service.runs("never-healthy"), "ready_timeout": 1.5}
    caps = capabilities_for({"svc": {"runs": runs}})
    with pytest.raises(ActionError) as err:
        caps.call("restart", {}, ctx_for("svc"), timeout=30)
    assert err.value.message == f"target 'svc' (pid {service.copies()[0]}) did not become healthy within 1.5 s: " + (
        f"{service.health} gave HTTP 503"
    )


def test_a_process_that_dies_on_start_fails_at_once_with_its_log(service: Service) -> None:
    caps = capabilities_for({"svc": {"runs": service.runs("crash")}})
    with pytest.raises(ActionError) as err:
        caps.call("restart", {}, ctx_for("svc"), timeout=30)
    assert "exited before " + service.health + " answered" in err.value.message
    assert "fatal: cannot open the database" in err.value.message


def test_a_pidfile_that_cannot_be_written_is_a_clear_error(service: Service) -> None:
    (service.dir / "a-file").write_text("")
    caps = capabilities_for({"svc": {"runs": service.runs(pidfile=str(service.dir / "a-file" / "svc.pid"))}})
    with pytest.raises(
        ActionError, match=r"target 'svc': cannot use the pidfile .*a-file/svc.pid: (File exists|Not a directory)"
    ):
        caps.call("restart", {}, ctx_for("svc"), timeout=30)
    assert service.copies() == []


def test_a_copy_started_outside_mendloop_is_not_doubled(service: Service) -> None:
    outside = subprocess.Popen([sys.executable, str(service.script), str(service.port)], start_new_session=True)
    try:
        wait_for(lambda: _answers(service.health))
        caps = capabilities_for({"svc": {"runs": service.runs()}})
        with pytest.raises(ActionError, match="already answers, but no process mendloop supervises"):
            caps.call("restart", {}, ctx_for("svc"), timeout=30)
        assert service.copies() == [outside.pid]
    finally:
        outside.kill()
        outside.wait()


def test_the_supervised_process_outlives_the_mendloop_process_that_started_it(service: Service) -> None:
    runs = json.dumps(service.runs())
    code = (
        "import json, sys\n"
        "from mendloop.config import Settings\n"
        "from mendloop.playbooks.actions.capability import Capabilities\n"
        "from mendloop.playbooks.templates import Templates\n"
        f"s = Settings(targets={{'svc': {{'runs': json.loads({runs!r})}}}})\n"
        "print(Capabilities(s.targets, Templates()).supervisors()[0].ensure().pid)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    pid = int(done.stdout)
    wait_for(lambda: _answers(service.health))
    assert service.answer()["pid"] == pid and alive(pid)


def test_matching_a_command_line_allows_a_script_started_by_its_shebang() -> None:
    argv = ["./serve.py", "--port", "1"]
    assert matches_argv(["/usr/bin/python3", "./serve.py", "--port", "1"], argv)
    assert matches_argv(["/usr/bin/python3", "-u", "/srv/serve.py", "--port", "1"], argv)
    assert not matches_argv(["/usr/bin/python3", "./other.py", "--port", "1"], argv)
    assert not matches_argv(["sleep", "60"], ["sleep", "61"])


def test_a_playbook_restarts_the_target_through_the_engine(database_url: str, tmp_path: Path, service: Service) -> None:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "restart_service",
            "type": "retry",
            "description": "restart it and check the new process answers",
            "handles": {"error_types": ["service_stuck"]},
            "steps": [
                {"id": "restart", "action": "capability", "with": {"name": "restart"}},
                {
                    "id": "check",
                    "action": "verify",
                    "with": {
                        "check": {"capability": "health"},
                        "expect": "result.outputs.json.pid == steps.restart.outputs.pid",
                        "describe": "the restarted process answers its health check",
                    },
                },
            ],
        },
    )
    settings = settings_for(
        database_url, tmp_path, playbook_dirs=["pb"], default_target="svc", targets={"svc": {"runs": service.runs()}}
    )
    assert [p for p in preflight.check(settings) if not p.warning] == []  # `restart`, `health` count as bound
    app = open_app(settings)
    try:
        run, _ = app.remediation.trigger(error_type="service_stuck", description="stuck")
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.COMPLETED, done.error
        steps = {s.step_id: s for s in app.store.run_steps(run.id)}
        restarted = steps["restart"].output["outputs"]
        assert restarted["restarted"] is True and restarted["healthy"] is True
        assert service.answer()["pid"] == restarted["pid"] == service.copies()[0]
    finally:
        app.close()


def test_serve_starts_the_process_and_a_restarted_serve_adopts_it(
    database_url: str, tmp_path: Path, service: Service
) -> None:
    settings = settings_for(database_url, tmp_path, targets={"svc": {"runs": service.runs()}})
    app = open_app(settings, start_workers=True)
    try:
        wait_for(lambda: _answers(service.health))
        pid = service.answer()["pid"]
    finally:
        app.close()
    assert alive(pid) and _answers(service.health)  # closing mendloop leaves the operator's service running
    app = open_app(settings, start_workers=True)
    try:
        assert service.copies() == [pid]
    finally:
        app.close()


def test_a_targets_own_binding_wins_and_preflight_counts_provided_capabilities(tmp_path: Path) -> None:
    own = {"restart": {"command": {"argv": [sys.executable, "-c", "print('{\"mine\": true}')"]}}}
    caps = capabilities_for({"svc": {"runs": {"systemd": {"unit": "svc.service"}}, "capabilities": own}, "bare": {}})
    assert caps.call("restart", {}, ctx_for("svc"), timeout=10)["outputs"]["mine"] is True
    assert caps.call("deploy", {}, ctx_for("svc"), timeout=10)["outputs"]["mine"] is True  # deploy: that restart
    assert caps.bound("svc") == ["deploy", "restart"]  # no health URL: no `health`
    assert caps.is_bound("svc", "deploy") and not caps.is_bound("svc", "health")
    assert caps.bound("bare") == [] and not caps.is_bound("bare", "restart")
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "bounce",
            "type": "retry",
            "description": "d",
            "handles": {"error_types": ["bounce_me"]},
            "steps": [{"id": "restart", "action": "capability", "with": {"name": "restart"}}],
        },
    )
    cfg = tmp_path / "m.yaml"
    for target, ok in (({"runs": {"docker": {"container": "web"}}}, True), ({}, False)):
        cfg.write_text(json.dumps({"playbook_dirs": ["pb"], "default_target": "t", "targets": {"t": target}}))
        errors = [p.message for p in preflight.check(_load(cfg)) if not p.warning]
        assert (errors == []) is ok, errors
        if not ok:
            assert "not bound on target 't': restart (step restart)" in errors[0]


# -- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("runs", "field", "says"),
    [
        ({"systemd": {"unit": "--force"}}, "targets.t.runs.systemd.unit", "not starting with '-'"),
        ({"systemd": {"unit": "a b.service"}}, "targets.t.runs.systemd.unit", "systemd unit 'a b.service'"),
        ({"docker": {"container": "-v"}}, "targets.t.runs.docker.container", "docker container '-v'"),
        ({"kubernetes": {"deployment": "Web"}}, "targets.t.runs.kubernetes.deployment", "DNS-1123"),
        ({"kubernetes": {"deployment": "w", "namespace": "-n"}}, "targets.t.runs.kubernetes.namespace", "label"),
        ({"kubernetes": {"deployment": "w", "context": "-x"}}, "targets.t.runs.kubernetes.context", "'-x'"),
        ({"docker": {"container": "a"}, "systemd": {"unit": "b"}}, "targets.t.runs", "exactly one of"),
        ({"process": {"argv": []}}, "targets.t.runs.process.argv", "at least 1"),
        ({"docker": {"container": "a"}, "health_url": "file:///x"}, "targets.t.runs.health_url", "not an http"),
    ],
)
def test_bad_runs_are_config_errors_naming_the_field(
    tmp_path: Path, runs: dict[str, Any], field: str, says: str
) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"targets": {"t": {"runs": runs}}}))
    with pytest.raises(ConfigError) as err:
        _load(cfg)
    assert err.value.fields["field"] == field
    assert says in err.value.message


def test_relative_process_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "m.yaml"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"targets": {"t": {"runs": {"process": {"argv": ["svc"], "cwd": "../svc"}}}}}))
    runs = _load(cfg).targets["t"].runs
    assert runs is not None and runs.process is not None
    assert runs.process.cwd == str(cfg.parent / "../svc")
    assert runs.process.pidfile is None and runs.ready_timeout == 60
    sup = Supervisor("t", runs.process, health_url=None, state_dir=tmp_path / "state")
    assert sup.pidfile.parent == tmp_path / "state" and sup.log == sup.pidfile.with_suffix(".log")


def _load(cfg: Path) -> Settings:
    return load_settings(cfg)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
