"""The stage: a fresh git copy of the sample service, the config written for it, both processes started and
healthy, `demo.json` for scripts, and everything stopped again at the end."""

from __future__ import annotations

import fnmatch
import json
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from rich.console import Console

from mendloop.config import AgentRunnerConfig, Settings, load_settings
from mendloop.demo.children import Child, listening_port, poll, port_free, spawn
from mendloop.demo.common import (
    AGENT_ID,
    DEMO_AGENT,
    GIT_IDENTITY,
    NOBODY,
    QUICKSTART,
    REPO_ROOT,
    SAMPLE_SERVICE,
    TARGET,
    DemoError,
    quickstart,
    redact,
)
from mendloop.demo.lock import StateLock
from mendloop.errors import MendloopError
from mendloop.infra import git, process
from mendloop.infra.api_client import ApiClient


@dataclass
class Demo:
    port: int
    service_port: int | None
    state: Path
    out: Console
    children: list[Child] = field(default_factory=list)
    api_url: str = ""
    service_url: str = ""
    token: str | None = None
    # What the demo's `mendloop serve` gets in its environment beside the demo's own (its credential, if any).
    server_env: dict[str, str] = field(default_factory=dict)
    database: str = ""
    trigger_timeout: float = 60.0
    wrote_info: bool = False
    story_mode: bool = True
    agent_python: str = sys.executable
    agent_run_as: str = "auto"
    runner: AgentRunnerConfig = field(default_factory=AgentRunnerConfig)
    watched: bool = False
    lock: StateLock = field(init=False)

    def __post_init__(self) -> None:
        self.lock = StateLock(self.state)

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
        # One live demo per state directory: starting fresh would delete the copy another demo's service runs
        # from, and two servers would share one database. Held until stop(), or until this process dies.
        self.lock.acquire()
        for what, port in (("mendloop", self.port), ("the sample service", self.service_port)):
            if port is not None and not port_free(port):
                flag = "--port" if what == "mendloop" else "--service-port"
                raise DemoError(f"port {port} for {what} is in use (another demo?); choose another with {flag}")
        self.state.mkdir(parents=True, exist_ok=True)
        # Every demo starts from the same story: a fresh copy, fresh service state and its own fresh database.
        # Only paths the demo owns are removed, never the state directory itself.
        self.info_path.unlink(missing_ok=True)
        for owned in (self.copy, self.state / "service_state"):
            if owned.exists():
                shutil.rmtree(owned)
        for suffix in ("", "-wal", "-shm", "-journal"):
            (self.state / f"mendloop.db{suffix}").unlink(missing_ok=True)
        shutil.copytree(
            SAMPLE_SERVICE, self.copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "state", ".git")
        )
        self.git("init", "-q")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "sample_service as copied by mendloop demo")

    def _service_port_arg(self) -> int:
        """The given port; else quickstart.yaml's (8100, as the README's commands use) while it is free; else 0,
        with which the service binds a free port itself, so a second demo cannot race the first for one."""
        if self.service_port is not None:
            return self.service_port
        base_url = ((quickstart().get("targets") or {}).get(TARGET) or {}).get("base_url", "")
        try:
            preferred = urlsplit(str(base_url)).port
        except ValueError:
            preferred = None
        return preferred if preferred and port_free(preferred) else 0

    def _write_config(self) -> None:
        config = quickstart()
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
            "argv": [self.agent_python, str(DEMO_AGENT), "--fixes", str(SAMPLE_SERVICE)],
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
        if settings.api_tokens or settings.tokens:
            # The server asks for tokens: the demo drives its story with an operator credential of its own, made
            # here, handed to its server in the environment only, and gone when the demo stops.
            self.token = secrets.token_urlsafe(32)
            own = {"name": "mendloop demo", "token": self.token, "role": "operator", "repositories": []}
            entries = [t.model_dump() for t in settings.tokens if t.name != own["name"]]
            self.server_env = {"MENDLOOP_TOKENS": json.dumps([*entries, own])}
        host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.api_url = f"http://{host}:{self.port}" if ":" not in host else f"http://[{host}]:{self.port}"

    def _spawn(self, name: str, argv: list[str], log_name: str, cwd: Path, env: dict[str, str]) -> Child:
        child = spawn(name, argv, self.state / log_name, cwd, env)
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
        bound = poll(lambda: listening_port(service), service, "to report its port")
        self.service_url = service.url = f"http://127.0.0.1:{bound}"
        # The pid in /health proves the answer comes from this child, not from some other process on the port.
        self._wait_healthy(service, lambda b: b.get("pid") == service.pid)

        self.agent_python, self.agent_run_as = _agent_python()
        self._write_config()
        mendloop_env = {
            **env,
            **self.server_env,
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
        self._wait_healthy(server, lambda b: b.get("status") == "ok")
        # A server that lost the race for the port exits after /health was answered by whoever holds it.
        server.check_alive()

    def _wait_healthy(self, child: Child, check: Callable[[dict[str, Any]], bool]) -> None:
        with ApiClient(child.url, timeout=2, trust_env=False, name=child.name) as probe:

            def healthy() -> bool:
                try:
                    body = probe.call("GET", "/health")
                except MendloopError:
                    return False
                return isinstance(body, dict) and check(body)

            poll(healthy, child, "/health")

    def git(self, *args: str) -> str:
        """git in the copy, with the demo's fixed identity."""
        try:
            proc = git.run(self.copy, *GIT_IDENTITY, *args)
        except MendloopError as exc:
            raise DemoError(f"git {args[0]} failed in {self.copy}", exc.message) from exc
        return git.text(proc.stdout)

    def api(self, timeout: float) -> ApiClient:
        """A client of the demo's mendloop."""
        return ApiClient(self.api_url, self.token, timeout=timeout, trust_env=False)

    # -- lifetime ---------------------------------------------------------------------------------------------

    def write_info(self) -> None:
        """`<state>/demo.json`: the children's PIDs and URLs, for scripts and tests; removed when the demo stops."""
        service, server = self.children
        info = {
            "mendloop": {"pid": server.pid, "url": self.api_url},
            "sample_service": {"pid": service.pid, "url": self.service_url, "repo": str(self.copy)},
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
        p(f"database        {redact(self.database)}", markup=False)
        p(f"logs            {self.state / 'mendloop.log'}, {self.state / 'sample_service.log'}", markup=False)

    def serve_forever(self) -> None:
        self.out.print("[dim]serving; Ctrl-C stops both[/]")
        stop = threading.Event()
        while True:
            for child in self.children:
                child.check_alive()
            stop.wait(0.5)  # a signal interrupts the wait; the loop only watches the children

    def check_children(self) -> None:
        for child in self.children:
            child.check_alive()

    def stop(self) -> None:
        # mendloop first, so no run starts against a service that is going away.
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        if self.wrote_info:  # never another demo's file, found by prepare()
            self.info_path.unlink(missing_ok=True)
        self.lock.release()


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
            proc = process.run(
                [candidate, "-B", "-c", f"{probe}; open({str(DEMO_AGENT)!r}).read()"],
                timeout=30,
                cwd="/",
                env={"PATH": os.environ.get("PATH", os.defpath)},
                run_as=(NOBODY, NOBODY),
            )
        except (MendloopError, OSError):
            continue
        if proc.returncode == 0:
            return candidate, "auto"
    return sys.executable, "none"


def _watches(settings: Settings, log: Path) -> bool:
    """Whether a watcher of the config follows `log`."""
    return any(fnmatch.fnmatch(str(log), pattern) for w in settings.watchers for pattern in w.paths)
