"""`mendloop demo`: the sample service and `mendloop serve`, started side by side, and the spec's four tests.

The sample service is copied into `<state>/sample_service` as its own git repository. In the story, `serve` runs
the agent runner embedded in it (`agent_runner:` in the generated config): it claims the escalated work order and
drives `examples/agents/demo_fix.py`, the stand-in for a real coding agent, through the `command` adapter; the
runner computes the diff, checks it, runs the service's tests in a fresh worktree and commits to the copy, so the
checkout is never touched. Each story run starts from the service's own log line, detected by the config's
watchers of `serve.log` (or, with none, from POST /patches/trigger). With `--no-story` no agent of any kind runs
and no watcher: the spec's curl triggers are the only ones. Both processes are children of the demo:
it stops them (by PID, terminate then kill) however it ends: the story's end with `--exit`, Ctrl-C, SIGTERM or
SIGHUP.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import httpx
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mendloop.config import AgentRunnerConfig, Settings, load_settings
from mendloop.domain.states import RUN_FINAL, RunStatus

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SERVICE = REPO_ROOT / "examples" / "sample_service"
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
TARGET = "sample_service"
STAND_IN = "fix_large_file_chunking.py"
DEMO_AGENT = REPO_ROOT / "examples" / "agents" / "demo_fix.py"
AGENT_ID = "demo-runner"
NOBODY = 65534

# A fixed identity, so the copy's commits never depend on (or fail for lack of) the user's git configuration.
GIT = (
    "git",
    "-c",
    "user.name=mendloop demo",
    "-c",
    "user.email=demo@mendloop.invalid",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "init.defaultBranch=main",
)

STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0
RUN_FINISH_SECONDS = 90.0
POLL_SECONDS = 0.1
LISTENING_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
T = TypeVar("T")


class DemoError(Exception):
    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    url: str = ""

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise DemoError(f"{self.name} exited with code {code} (log: {self.log_path})", self.tail())

    def stop(self) -> None:
        """Terminate, then kill after a deadline; reap it either way so no process is left behind."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_SECONDS)
        finally:
            self.log_file.close()


@dataclass
class Demo:
    port: int
    service_port: int | None
    state: Path
    out: Console
    children: list[Child] = field(default_factory=list)
    api_url: str = ""
    service_url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    database: str = ""
    trigger_timeout: float = 60.0
    wrote_info: bool = False
    story_mode: bool = True
    agent_python: str = sys.executable
    agent_run_as: str = "auto"
    runner: AgentRunnerConfig = field(default_factory=AgentRunnerConfig)
    watched: bool = False

    @property
    def copy(self) -> Path:
        return self.state / "sample_service"

    @property
    def info_path(self) -> Path:
        return self.state / "demo.json"

    @property
    def config_path(self) -> Path:
        return self.state / "mendloop.yaml"

    @property
    def service_log(self) -> Path:
        return self.state / "service_state" / "serve.log"

    # -- setup ------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        if not (SAMPLE_SERVICE / "service.py").is_file() or not QUICKSTART.is_file():
            raise DemoError(
                f"the sample service is not at {SAMPLE_SERVICE} (with {QUICKSTART}); "
                "`mendloop demo` runs from a checkout of the mendloop repository"
            )
        if shutil.which("git") is None:
            raise DemoError("git is not installed; the demo keeps the sample service in a git repository")
        for what, port in (("mendloop", self.port), ("the sample service", self.service_port)):
            if port is not None and not _port_free(port):
                flag = "--port" if what == "mendloop" else "--service-port"
                raise DemoError(f"port {port} for {what} is in use (another demo?); choose another with {flag}")
        self.state.mkdir(parents=True, exist_ok=True)
        # Every demo starts from the same story: a fresh copy, fresh service state and its own fresh database.
        # Only paths the demo owns are removed, never the state directory itself.
        other = _running_demo(self.info_path)
        if other is not None:
            # Starting fresh would delete the copy that demo's service runs from.
            raise DemoError(
                f"another demo (pid {other}) is using {self.state}; stop it, or use another --state-dir "
                f"(remove {self.info_path} if that process is not a demo)"
            )
        self.info_path.unlink(missing_ok=True)
        for owned in (self.copy, self.state / "service_state"):
            if owned.exists():
                shutil.rmtree(owned)
        for suffix in ("", "-wal", "-shm", "-journal"):
            (self.state / f"mendloop.db{suffix}").unlink(missing_ok=True)
        shutil.copytree(
            SAMPLE_SERVICE, self.copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "state", ".git")
        )
        self._git("init", "-q")
        self._git("add", "-A")
        self._git("commit", "-q", "-m", "sample_service as copied by mendloop demo")

    def _service_port_arg(self) -> int:
        """The given port; else quickstart.yaml's (8100, as the README's commands use) while it is free; else 0,
        with which the service binds a free port itself, so a second demo cannot race the first for one."""
        if self.service_port is not None:
            return self.service_port
        base_url = ((_quickstart().get("targets") or {}).get(TARGET) or {}).get("base_url", "")
        try:
            preferred = urlsplit(str(base_url)).port
        except ValueError:
            preferred = None
        return preferred if preferred and _port_free(preferred) else 0

    def _write_config(self) -> None:
        config = _quickstart()
        try:
            target = config["targets"][TARGET]
        except (KeyError, TypeError) as exc:
            raise DemoError(f"{QUICKSTART} has no targets.{TARGET}") from exc
        target["base_url"] = self.service_url
        # The copy is the target's repository; its own tests judge a patch (the server's and the runner's).
        tests = [self.agent_python, "-B", "-m", "unittest", "discover", "-s", "tests"]
        target["repository"] = str(self.copy)
        target["test_command"] = tests
        target.setdefault("patch", {})["tests_may_change"] = True  # the stand-in adds a regression test
        # The story's coding agent: the runner embedded in `serve`. Off with --no-story: no agent of any kind.
        config["agent_runner"] = {
            "enabled": self.story_mode,
            "repository": str(self.copy),
            "adapter": "command",
            "argv": [self.agent_python, str(DEMO_AGENT)],
            "test_command": tests,
            "apply": "commit",
            "timeout": 120,
            "agent_id": AGENT_ID,
            "run_as": self.agent_run_as,
        }
        if not self.story_mode:
            # The spec's curl tests by hand are the triggers; a watcher would start a second run for each fault.
            config["watchers"] = []
        config["database_url"] = f"sqlite:///{self.state / 'mendloop.db'}"
        header = "# Written by `mendloop demo` from examples/quickstart.yaml; MENDLOOP_* variables still override it.\n"
        self.config_path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        settings = load_settings(self.config_path)
        self.database = settings.database_url
        self.trigger_timeout = settings.trigger_wait_seconds + 30
        self.runner = settings.agent_runner  # as MENDLOOP_AGENT_RUNNER__* may have changed it (a real agent)
        self.watched = _watches(settings, self.service_log)
        if settings.api_tokens:
            self.headers = {"Authorization": f"Bearer {settings.api_tokens[0]}"}
        host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.api_url = f"http://{host}:{self.port}" if ":" not in host else f"http://[{host}]:{self.port}"

    def _spawn(self, name: str, argv: list[str], log_name: str, cwd: Path, env: dict[str, str]) -> Child:
        log_path = self.state / log_name
        log_file = log_path.open("wb")
        try:
            # A session of its own: a terminal's Ctrl-C reaches only the demo, which then stops its children in
            # order, instead of racing them as they each react to the signal.
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            log_file.close()
            raise DemoError(f"cannot start {name}: {exc}") from exc
        child = Child(name, proc, log_path, log_file)
        self.children.append(child)
        return child

    def start(self) -> None:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        service = self._spawn(
            "the sample service",
            [
                sys.executable,
                "-B",
                str(self.copy / "service.py"),
                "--port",
                str(self._service_port_arg()),
                "--state-dir",
                str(self.state / "service_state"),
            ],
            "sample_service.log",
            self.copy,
            env,
        )
        bound = _poll(lambda: _listening_port(service), service, "to report its port")
        self.service_url = service.url = f"http://127.0.0.1:{bound}"
        # The pid in /health proves the answer comes from this child, not from some other process on the port.
        _poll(lambda: self._healthy(service.url, lambda b: b.get("pid") == service.proc.pid), service, "/health")

        self.agent_python, self.agent_run_as = _agent_python()
        self._write_config()
        mendloop_env = {
            **env,
            # `serve` lets the environment beat --port; pin it so the demo and its server agree on the port.
            "MENDLOOP_PORT": str(self.port),
            # The child must run this very mendloop, whose examples/ the demo uses.
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        }
        server = self._spawn(
            "mendloop serve",
            [sys.executable, "-m", "mendloop", "serve", "--config", str(self.config_path), "--port", str(self.port)],
            "mendloop.log",
            Path.cwd(),
            mendloop_env,
        )
        server.url = self.api_url
        _poll(lambda: self._healthy(server.url, lambda b: b.get("status") == "ok"), server, "/health")
        # A server that lost the race for the port exits after /health was answered by whoever holds it.
        server.check_alive()

    def _healthy(self, url: str, check: Callable[[dict[str, Any]], bool]) -> bool:
        try:
            resp = httpx.get(f"{url}/health", timeout=2, trust_env=False)
            body = resp.json()
        except (httpx.HTTPError, ValueError):
            return False
        return resp.status_code == 200 and isinstance(body, dict) and check(body)

    def _git(self, *args: str) -> str:
        proc = subprocess.run([*GIT, *args], cwd=self.copy, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DemoError(f"git {args[0]} failed in {self.copy}", (proc.stderr or proc.stdout).strip())
        return proc.stdout

    # -- the story --------------------------------------------------------------------------------------------

    def _api(self, client: httpx.Client, method: str, path: str, **kw: Any) -> Any:
        headers = {**self.headers, **kw.pop("headers", {})}
        return _request(client, method, f"{self.api_url}{path}", f"{method} {path}", headers=headers, **kw)

    def _fault(self, client: httpx.Client, name: str, body: dict[str, Any]) -> None:
        answer = _request(client, "POST", f"{self.service_url}/admin/faults/{name}", f"fault {name}", json=body)
        flat = {k: v for k, v in answer.items() if not isinstance(v, dict | list) and k not in ("fault", "replayed")}
        run = answer.get("run")
        if isinstance(run, dict):  # large_file: the pipeline run that timed out, in a few figures
            keys = ("file_path", "size_mb", "chunks", "modeled_seconds", "timeout_seconds", "ok")
            flat.update({f"run.{k}": run[k] for k in keys if k in run})
        self.out.print(f"[dim]injected fault[/] {name} into the sample service: {escape(json.dumps(flat))}")

    def story(self) -> bool:
        out = self.out
        with httpx.Client(timeout=30, trust_env=False) as client:
            out.rule("Test 1: a playbook that heals without escalation")
            t1 = self._start_run(
                client,
                ("db_disconnect", {"reconnect_failures": 2}),
                {"description": "Database connection lost", "error_type": "database_connection"},
                "database_reconnect",
            )
            ok1 = t1.get("status") == RunStatus.COMPLETED and t1.get("escalated_to_coding") is False
            self._print_run(self._api(client, "GET", f"/patches/runs/{t1['run_id']}"))
            out.print("[green]completed without escalation[/]" if ok1 else "[red]did not complete as expected[/]")

            out.rule("Test 2: a playbook that escalates to a coding agent")
            t2 = self._start_run(
                client,
                ("large_file", {}),
                {"description": "Pipeline validation timeout", "error_type": "pipeline_timeout"},
                "pipeline_timeout_fix",
            )
            wo_id, run_id = t2.get("work_order_id"), t2["run_id"]
            if not t2.get("escalated_to_coding") or not wo_id:
                raise DemoError(f"run {run_id} did not escalate (status {t2.get('status')})")
            out.print(f"escalated: work order [bold]{escape(wo_id)}[/]")

            out.rule("Test 3: the work orders")
            listing = self._api(client, "GET", "/patches/work-orders")
            table = Table("work order", "status", "complexity", "run", "description")
            for column in table.columns:
                column.overflow = "fold"  # ids are to be copied whole, never cut with an ellipsis
            for w in listing["work_orders"]:
                table.add_row(
                    w["work_order_id"],
                    w["status"],
                    w["estimated_complexity"],
                    w["self_healing_run_id"] or "",
                    escape(w["description"]),
                )
            out.print(table)
            out.print(f"count={listing['count']}  " + "  ".join(f"{k}={v}" for k, v in listing["stats"].items()))

            out.rule("Test 4: the agent runner fixes the code, the run resumes")
            as_nobody = " as uid 65534" if self.runner.run_as == "auto" and os.geteuid() == 0 else ""
            if self.runner.adapter == "command" and str(DEMO_AGENT) in self.runner.argv:
                out.print(
                    "[yellow]stand-in for a real coding agent[/]: the agent runner embedded in mendloop serve "
                    f"([bold]{escape(self.runner.agent_id)}[/]) claims {escape(wo_id)} and drives "
                    f"{escape(_shown(DEMO_AGENT))} through its `command` adapter, in a git worktree of the copy"
                    f"{as_nobody}. A real agent takes its place with agent_runner.adapter: aider, claude or codex "
                    "(see the README)."
                )
            else:
                out.print(
                    f"the agent runner embedded in mendloop serve ([bold]{escape(self.runner.agent_id)}[/]) claims "
                    f"{escape(wo_id)} and drives [bold]{escape(str(self.runner.adapter))}[/] "
                    f"{escape(' '.join(self.runner.argv))} in a git worktree of the copy{as_nobody}"
                )
            out.print(
                "[dim]the runner computes the diff itself, checks it, runs the service's tests in a fresh worktree "
                "and commits with a Work-Order: trailer; the run then deploys (restart), reruns and verifies[/]"
            )
            detail = self._wait_finished(client, run_id)
            wo = self._api(client, "GET", f"/patches/work-orders/{wo_id}")
            self._print_patch(wo)
            self._print_run(detail)
            trust = detail["trust"]
            out.print(
                f"final status: [bold]{escape(detail['status'])}[/]   "
                f"trust of {escape(str(trust['component']))}: {trust['score']}"
            )
            return bool(ok1 and detail["status"] == RunStatus.COMPLETED)

    def _start_run(
        self, client: httpx.Client, fault: tuple[str, dict[str, Any]], trigger: dict[str, Any], playbook: str
    ) -> dict[str, Any]:
        """Inject the fault. When the config watches the service's serve.log, the run starts from the log line
        the fault writes (a watcher detects it); otherwise from POST /patches/trigger, as the spec's tests do.
        Returns once the run escalated or finished: {run_id, status, escalated_to_coding, work_order_id}."""
        known = {r["run_id"] for r in self._api(client, "GET", "/patches/runs", params={"limit": 500})["runs"]}
        self._fault(client, *fault)
        if not self.watched:
            answer: dict[str, Any] = self._api(
                client, "POST", "/patches/trigger", json=trigger, timeout=self.trigger_timeout
            )
            self.out.print_json(data=answer)
            return answer
        line = _last_error_line(self.service_log)
        self.out.print(f"[dim]serve.log:[/] {escape(line)}")
        self.out.print(f"[dim]a watcher of serve.log starts the run ({playbook}); no trigger is posted[/]")
        deadline = time.monotonic() + self.trigger_timeout
        while True:
            runs = self._api(client, "GET", "/patches/runs", params={"limit": 50})["runs"]
            new = [r for r in runs if r["run_id"] not in known and r["playbook_id"] == playbook]
            if new:
                run = new[-1]
                if run["status"] in RUN_FINAL or (run["escalated_to_coding"] and run["coding_work_order_id"]):
                    summary = {
                        "run_id": run["run_id"],
                        "playbook_id": run["playbook_id"],
                        "status": run["status"],
                        "escalated_to_coding": run["escalated_to_coding"],
                        "work_order_id": run["coding_work_order_id"],
                        "description": run["description"],
                    }
                    self.out.print_json(data=summary)
                    return summary
            if time.monotonic() > deadline:
                raise DemoError(
                    f"no {playbook} run started from serve.log within {self.trigger_timeout:.0f}s",
                    "runs: " + json.dumps([(r["run_id"], r["playbook_id"], r["status"]) for r in new or runs][:5]),
                )
            for child in self.children:
                child.check_alive()
            time.sleep(POLL_SECONDS)

    def _print_patch(self, wo: dict[str, Any]) -> None:
        """What the runner reported (its own figures), and the commit it made in the copy."""
        out = self.out
        result = wo.get("patch_result") or {}
        if wo.get("status") != "completed":
            out.print(
                f"[red]work order {escape(wo['work_order_id'])} {escape(str(wo.get('status')))}[/]"
                f" ({escape(str(wo.get('fail_reason')))}): {escape(json.dumps(result)[:2000])}"
            )
            return
        agent = result.get("agent") or {}
        out.print(
            f"work order {wo['work_order_id']} completed: agent {agent.get('name')} ({agent.get('version', '')}), "
            f"the runner's own tests passed: {result.get('tests_passed')}, "
            f"files changed: {result.get('files_changed')}",
            markup=False,
        )
        commit = str(result.get("applied_commit") or "")
        if commit:
            shown = self._git("show", "--stat", "--format=commit %H%n    %s%n    %(trailers:only,unfold)", commit)
            out.print(re.sub(r"\n\s*\n+", "\n", shown).rstrip(), markup=False)
        out.print(f"diff: {self.api_url}/patches/diffs/{wo['work_order_id']}.diff", markup=False)

    def _wait_finished(self, client: httpx.Client, run_id: str) -> dict[str, Any]:
        # A real agent may take a while; the stand-in takes about a second.
        allowed = RUN_FINISH_SECONDS + self.runner.timeout + self.runner.test_timeout
        deadline = time.monotonic() + allowed
        while True:
            detail: dict[str, Any] = self._api(client, "GET", f"/patches/runs/{run_id}")
            if detail["status"] in RUN_FINAL:
                return detail
            if time.monotonic() > deadline:
                raise DemoError(f"run {run_id} is still {detail['status']} after {allowed:.0f}s")
            for child in self.children:
                child.check_alive()
            time.sleep(POLL_SECONDS * 3)

    def _print_run(self, detail: dict[str, Any]) -> None:
        self.out.print(f"run {detail['run_id']} ({detail['playbook_id']}) timeline:", markup=False)
        for item in detail["timeline"]:
            self.out.print(f"  [{item['time'][11:19]}] {item['message']}", markup=False)

    # -- --no-story -------------------------------------------------------------------------------------------

    def instructions(self) -> None:
        api, svc, p = self.api_url, self.service_url, self.out.print
        auth = ' -H "Authorization: Bearer $MENDLOOP_TOKEN"' if self.headers else ""
        json_h = ' -H "Content-Type: application/json"'
        p("The spec's tests, by hand (no agent of any kind and no log watcher runs in this mode):", markup=False)
        lines = [
            "# Test 1: a fault the playbook heals by itself, then the trigger",
            f"curl -X POST {svc}/admin/faults/db_disconnect{json_h} -d '{{\"reconnect_failures\":2}}'",
            f"curl -X POST {api}/patches/trigger{json_h}{auth} \\\n"
            '  -d \'{"description":"Database connection lost","error_type":"database_connection"}\'',
            "",
            "# Test 2: a bug in the code, then the trigger that escalates it",
            f"curl -X POST {svc}/admin/faults/large_file",
            f"curl -X POST {api}/patches/trigger{json_h}{auth} \\\n"
            '  -d \'{"description":"Pipeline validation timeout","error_type":"pipeline_timeout"}\'',
            "WO=wo_...   # the work_order_id test 2 printed",
            "",
            "# Test 3: the work orders",
            f"curl {api}/patches/work-orders{auth}",
            "",
            "# Test 4: fix the code first (the stand-in for a real coding agent), then complete the work order",
            f"cd {shlex.quote(str(self.copy))} && {shlex.quote(sys.executable)} {STAND_IN} . && "
            f"curl -X POST {api}/patches/work-orders/$WO/complete{json_h}{auth} \\\n"
            '  -d \'{"tests_passed":true,"files_changed":2}\'',
            "# Completing without the fix ends honestly in needs_human: verification reruns the pipeline.",
            f"curl '{api}/patches/runs?limit=5'{auth}",
        ]
        for line in lines:
            p(line, markup=False)

    # -- lifetime ---------------------------------------------------------------------------------------------

    def write_info(self) -> None:
        """`<state>/demo.json`: the children's PIDs and URLs, for scripts and tests; removed when the demo stops."""
        service, server = self.children
        info = {
            "mendloop": {"pid": server.proc.pid, "url": self.api_url},
            "sample_service": {"pid": service.proc.pid, "url": self.service_url, "repo": str(self.copy)},
            "demo_pid": os.getpid(),
        }
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.info_path)  # atomic: a reader never sees half a file
        self.wrote_info = True

    def banner(self) -> None:
        p = self.out.print
        p(f"mendloop        {self.api_url}   (API docs: {self.api_url}/docs)", markup=False)
        p(f"sample service  {self.service_url}   (a git repository at {self.copy})", markup=False)
        p(f"database        {_redact(self.database)}", markup=False)
        p(f"logs            {self.state / 'mendloop.log'}, {self.state / 'sample_service.log'}", markup=False)

    def serve_forever(self) -> None:
        self.out.print("[dim]serving; Ctrl-C stops both[/]")
        stop = threading.Event()
        while True:
            for child in self.children:
                child.check_alive()
            stop.wait(0.5)  # a signal interrupts the wait; the loop only watches the children

    def stop(self) -> None:
        # mendloop first, so no run starts against a service that is going away.
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        if self.wrote_info:  # never another demo's file, found by prepare()
            self.info_path.unlink(missing_ok=True)


def run(*, port: int, service_port: int | None, state_dir: Path, exit_after: bool, story: bool, out: Console) -> int:
    """Start both, walk the story (or print the commands), serve until stopped. 0 when the story's run completed."""
    demo = Demo(port=port, service_port=service_port, state=state_dir.resolve(), out=out, story_mode=story)
    result: int | None = None
    with _signals_interrupt():
        try:
            demo.prepare()
            demo.start()
            demo.write_info()
            demo.banner()
            if story:
                try:
                    result = 0 if demo.story() else 1
                except KeyError as exc:
                    _report(out, DemoError(f"unexpected answer from mendloop: no field {exc}"))
                    result = 1
                except DemoError as exc:
                    # Keep serving (unless --exit) so a person can look at what went wrong; a dead child still ends it.
                    _report(out, exc)
                    result = 1
                out.print("[green]Story complete.[/]" if result == 0 else "[red]The story did not end in completed.[/]")
            else:
                demo.instructions()
                result = 0
            if not exit_after:
                demo.serve_forever()
            return result
        except DemoError as exc:
            _report(out, exc)
            return 1
        except KeyboardInterrupt:
            out.print("stopping")
            return 130 if result is None else result
        finally:
            with _signals_ignored():
                demo.stop()


# -- helpers ------------------------------------------------------------------------------------------------------


def _agent_python() -> tuple[str, str]:
    """The interpreter for the stand-in agent and the tests, and the runner's `run_as`. As root the runner runs
    them as uid 65534 ("auto"), which needs a Python that user can start and a checkout it can read; without one
    (a checkout under /root, say) the demo runs them as the current user ("none") and says so in the config."""
    if os.geteuid() != 0:
        return sys.executable, "auto"
    probe = f"import sys; sys.path.insert(0, {str(SAMPLE_SERVICE)!r}); import fix_large_file_chunking"
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not candidate or not os.path.isfile(candidate):
            continue
        try:
            proc = subprocess.run(
                [candidate, "-B", "-c", f"{probe}; open({str(DEMO_AGENT)!r}).read()"],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                cwd="/",
                env={"PATH": os.environ.get("PATH", os.defpath)},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if proc.returncode == 0:
            return candidate, "auto"
    return sys.executable, "none"


def _watches(settings: Settings, log: Path) -> bool:
    """Whether a watcher of the config follows `log`."""
    return any(fnmatch.fnmatch(str(log), pattern) for w in settings.watchers for pattern in w.paths)


def _last_error_line(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if " ERROR" in line]
    return errors[-1] if errors else ""


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _quickstart() -> dict[str, Any]:
    try:
        config = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DemoError(f"cannot read {QUICKSTART}: {exc}") from exc
    if not isinstance(config, dict):
        raise DemoError(f"{QUICKSTART}: the top level must be a mapping")
    return config


def _report(out: Console, exc: DemoError) -> None:
    out.print(f"[red]demo failed:[/] {escape(exc.message)}")
    if exc.detail:
        out.print(exc.detail, markup=False)


def _running_demo(info_path: Path) -> int | None:
    try:
        pid = int(json.loads(info_path.read_text(encoding="utf-8"))["demo_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as uvicorn and the service use it: only a bound socket makes the port busy, not TIME_WAIT.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening_port(child: Child) -> int | None:
    try:
        match = LISTENING_RE.search(child.log_path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _poll(probe: Callable[[], T | None], child: Child, what: str) -> T:
    """Until `probe` gives a value; fails early if the child dies, with its log's tail."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        child.check_alive()
        if time.monotonic() > deadline:
            raise DemoError(f"{child.name} did not answer {what} within {STARTUP_SECONDS:.0f}s", child.tail())
        time.sleep(POLL_SECONDS)


def _request(client: httpx.Client, method: str, url: str, what: str, **kw: Any) -> Any:
    try:
        resp = client.request(method, url, **kw)
    except httpx.HTTPError as exc:
        raise DemoError(f"{what}: {exc.__class__.__name__}: {exc}") from exc
    try:
        body = resp.json()
    except ValueError:
        body = resp.text[:300]
    if resp.status_code >= 400:
        raise DemoError(f"{what}: HTTP {resp.status_code}", json.dumps(body) if not isinstance(body, str) else body)
    return body


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo as Ctrl-C does, so the same cleanup stops the children. SIGINT is set too:
    a shell starts background jobs with it ignored, and "Ctrl-C stops both" should hold for `kill -INT` as well."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short and leave a child running; the cleanup has its deadlines."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
