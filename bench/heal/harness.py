"""One scenario of the healing benchmark, end to end: a fresh git copy of the example service, its own config,
the service and a real `mendloop serve` (its watcher, playbooks and agent runner), the fault injected through
the service's own API, mendloop's runs followed to their end, then mendloop stopped and the scenario's probe run
against the service. The probe's verdict, not mendloop's, decides "healed"; a run mendloop reported completed
while the probe finds the service broken is a false heal.

Every scenario gets everything new (copy, database, ports), so none can heal another or inherit its damage: the
repository is reset between uses by being made again."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

from mendloop.demo.stage import _agent_python
from mendloop.infra import process

ROOT = Path(__file__).resolve().parents[2]
IMPORTER = ROOT / "examples" / "importer_service"
SAMPLE = ROOT / "examples" / "sample_service"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
DEMO_FIX = ROOT / "examples" / "agents" / "demo_fix.py"
BENCH_FIXES = Path(__file__).resolve().parent / "fixes"
GIT_IDENTITY = ("-c", "user.name=heal-bench", "-c", "user.email=heal-bench@localhost", "-c", "commit.gpgsign=false")
# Runs that end mendloop's part: completed is its claim of a heal; needs_human and failed hand the incident over.
FINAL = ("completed", "failed", "needs_human", "cancelled")
HANDED_OVER = ("failed", "needs_human", "cancelled")
STARTUP_SECONDS = 60.0
# The slowest scenario is a code fix on a loaded machine: agent, tests at the base and with the patch, commit,
# restart, verify. About 10-20 s here; the deadline is for a machine shared with other work.
RUN_SECONDS = 240.0
POLL_SECONDS = 0.1


class BenchError(Exception):
    """The bench itself could not run a scenario (a process that did not start, a fault that did not take)."""


@dataclass(frozen=True)
class Agent:
    """Who fixes code-bug scenarios: the stand-in (a per-bug fix module, "fix supplied") or a real model."""

    label: str
    adapter: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    @property
    def stand_in(self) -> bool:
        return self.adapter == "command"


def stand_in(fixes: Path, module: str, python: str) -> Agent:
    """The stand-in coding agent: examples/agents/demo_fix.py making the edit of `fixes/module.py`."""
    return Agent(
        "fix supplied (stand-in agent)",
        "command",
        (python, "-B", str(DEMO_FIX), "--fixes", str(fixes), "--fix", module),
    )


def model_agent(env: dict[str, str]) -> Agent | None:
    """With MENDLOOP_BENCH_MODEL_URL (an OpenAI-compatible endpoint): the `openai` adapter, or aider with
    MENDLOOP_BENCH_AGENT=aider, against the model MENDLOOP_BENCH_MODEL; its key in MENDLOOP_BENCH_MODEL_KEY."""
    url = env.get("MENDLOOP_BENCH_MODEL_URL")
    if not url:
        return None
    model = env.get("MENDLOOP_BENCH_MODEL", "default")
    if env.get("MENDLOOP_BENCH_AGENT", "openai") == "aider":
        passed = (("OPENAI_API_BASE", url), ("OPENAI_API_KEY", env.get("MENDLOOP_BENCH_MODEL_KEY", "none")))
        return Agent(f"model {model} (aider)", "aider", ("--model", f"openai/{model}"), passed)
    argv = ("--base-url", url, "--model", model, "--api-key-env", "MENDLOOP_BENCH_MODEL_KEY")
    return Agent(f"model {model} (openai adapter)", "openai", argv)


@dataclass
class Probe:
    """The scenario's own verdict on the service: every check, and whether all held."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.checks.append((name, bool(ok), str(detail)[:300]))
        return bool(ok)

    @property
    def healthy(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)


@dataclass(frozen=True)
class Scenario:
    name: str
    fault_class: str
    service: str  # "importer" or "sample"
    summary: str
    inject: Callable[[Stage], None]
    probe: Callable[[Stage, Probe], None]
    expect: str  # "healed" or "escalated": what an honest mendloop does with it
    fix: tuple[Path, str] | None = None  # the stand-in's fix module (directory, name) for a code bug
    prepare: Callable[[Stage], None] | None = None  # before the base commit: files the scenario adds
    runs: int = 1  # runs the injection starts (a flapping fault starts several)
    settings: tuple[tuple[str, Any], ...] = ()  # top-level config keys the scenario sets


@dataclass
class Stage:
    """A scenario's processes and files, under `root`."""

    scenario: Scenario
    root: Path
    agent: Agent | None
    env: dict[str, str]
    service_port: int = 0
    api_port: int = 0
    # The interpreter of the agent and the tests, and the runner's run_as: as root the runner runs them as uid
    # 65534, which must be able to start it (not a pyenv shim under a 0700 /root); the demo's own choice.
    python: str = "python3"
    run_as: str = "auto"
    # The control arm: no mendloop at all, so the fault stays; the probe must see it.
    control: bool = False
    children: list[tuple[process.Child, IO[bytes]]] = field(default_factory=list)
    injected_at: list[float] = field(default_factory=list)
    mendloop: process.Child | None = None

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- talking to the service and to mendloop ----------------------------------------------------------------

    def call(self, method: str, path: str, body: object = None, *, ok: tuple[int, ...] = ()) -> dict[str, Any]:
        """The service's JSON answer; with `ok`, a status outside it is a BenchError (a fault that did not take)."""
        answer = httpx.request(method, self.service_url + path, json=body, timeout=30, trust_env=False)
        if ok and answer.status_code not in ok:
            raise BenchError(f"{method} {path} on {self.scenario.service}: {answer.status_code} {answer.text[:300]}")
        try:
            data = answer.json()
        except ValueError:
            data = {"text": answer.text}
        data = data if isinstance(data, dict) else {"answer": data}
        data["_status"] = answer.status_code
        return data

    def inject(self, method: str, path: str, body: object = None, *, ok: tuple[int, ...] = ()) -> dict[str, Any]:
        """A call that injects (or triggers) the fault: its time starts the clock of time to heal."""
        self.injected_at.append(time.time())
        return self.call(method, path, body, ok=ok)

    def runs(self) -> list[dict[str, Any]]:
        answer = httpx.get(self.api_url + "/patches/runs", params={"limit": 100}, timeout=30, trust_env=False)
        answer.raise_for_status()
        found: list[dict[str, Any]] = answer.json()["runs"]
        return sorted(found, key=lambda r: str(r["created_at"]))

    def run_detail(self, run_id: str) -> dict[str, Any]:
        answer = httpx.get(f"{self.api_url}/patches/runs/{run_id}", timeout=30, trust_env=False)
        answer.raise_for_status()
        detail: dict[str, Any] = answer.json()
        return detail

    def wait_runs_final(self, count: int, timeout: float = RUN_SECONDS) -> list[dict[str, Any]]:
        """Once `count` runs exist and all have ended; fails early if mendloop dies."""
        found: list[dict[str, Any]] = []

        def ended() -> bool:
            nonlocal found
            found = self.runs()
            return len(found) >= count and all(r["status"] in FINAL for r in found)

        wait(ended, timeout, self, f"{count} run(s) of mendloop to end")
        return found

    def git(self, *args: str) -> str:
        done = subprocess.run(
            ["git", *GIT_IDENTITY, *args], cwd=self.repo, capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"git {args[0]} in {self.repo}: {done.stderr.strip()[:300]}")
        return done.stdout

    # -- processes ---------------------------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> process.Child:
        log = (self.root / f"{name}.out").open("wb")
        try:
            child = process.spawn(
                argv, cwd=cwd, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, die_with_parent=True
            )
        except process.CannotStart as exc:
            log.close()
            raise BenchError(f"cannot start {name}: {exc.strerror}") from exc
        self.children.append((child, log))
        return child

    def alive_check(self) -> None:
        if self.mendloop is not None and self.mendloop.poll() is not None:
            raise BenchError(f"mendloop serve exited {self.mendloop.poll()}: {tail(self.root / 'mendloop.out')}")

    def stop_mendloop(self) -> None:
        for child, log in list(self.children):
            if child is self.mendloop:
                with suppress(Exception):
                    child.stop(grace=10)
                log.close()
                self.children.remove((child, log))
        self.mendloop = None

    def stop_all(self) -> None:
        self.stop_mendloop()
        for child, log in reversed(self.children):
            with suppress(Exception):
                child.stop(grace=10)
            log.close()
        self.children.clear()
        # The importer is started by mendloop (`runs.process`) and outlives it: stopped by the pid it wrote.
        pidfile = self.state / "importer.pid"
        with suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _cmdline_mentions(pid, str(self.repo)):
                os.kill(pid, 15)
                wait(lambda: not _cmdline_mentions(pid, str(self.repo)), 10, None, "the importer to stop")


@functools.cache
def agent_python() -> tuple[str, str]:
    return _agent_python()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text in raw.decode(errors="replace") and ") Z " not in status


def wait(predicate: Callable[[], bool], timeout: float, stage: Stage | None, what: str) -> None:
    """Poll `predicate` until it holds; a BenchError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        with suppress(httpx.HTTPError):
            if predicate():
                return
        if stage is not None:
            stage.alive_check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_SECONDS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- setting a scenario up ----------------------------------------------------------------------------------------


def _copy_repo(stage: Stage, source: Path) -> None:
    shutil.copytree(source, stage.repo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "state", ".git"))
    if stage.scenario.prepare is not None:
        stage.scenario.prepare(stage)
    stage.git("init", "-q")
    stage.git("add", "-A")
    stage.git("commit", "-q", "-m", f"{stage.scenario.service} as shipped (heal-bench {stage.scenario.name})")


def _agent_runner(stage: Stage, tests: list[str]) -> dict[str, Any]:
    agent = stage.agent
    if agent is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "repository": str(stage.repo),
        "adapter": agent.adapter,
        "argv": list(agent.argv),
        "test_command": tests,
        "apply": "commit",
        "timeout": 300,
        "agent_id": "heal-bench",
        "run_as": stage.run_as,
    }


def importer_config(stage: Stage) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((IMPORTER / "mendloop.yaml").read_text(encoding="utf-8"))
    url = stage.service_url
    target = config["targets"]["importer"]
    target["base_url"] = url
    target["repository"] = str(stage.repo)
    target["runs"]["process"] = {
        "argv": [
            stage.python,
            "-B",
            str(stage.repo / "importer.py"),
            "--port",
            str(stage.service_port),
            "--state-dir",
            str(stage.state),
            "--inbox",
            str(stage.inbox),
        ],
        "cwd": str(stage.repo),
        "pidfile": str(stage.state / "importer.pid"),
        "log": str(stage.state / "importer.out"),
        "health_url": f"{url}/healthz",
    }
    config["watchers"][0]["paths"] = [str(stage.state / "importer.log")]
    tests = [stage.python, *target["test_command"][1:]]
    target["test_command"] = tests
    config["agent_runner"] = _agent_runner(stage, tests)
    return config


def sample_config(stage: Stage) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    target = config["targets"]["sample_service"]
    target["base_url"] = stage.service_url
    target["repository"] = str(stage.repo)
    tests = [stage.python, "-B", "-m", "unittest", "discover", "-s", "tests"]
    target["test_command"] = tests
    target.setdefault("patch", {})["tests_may_change"] = True
    watcher = config["watchers"][0]
    watcher["paths"] = [str(stage.state / "serve.log")]
    watcher["start_at"] = "beginning"  # a fresh log: nothing the service writes before the watcher starts is lost
    config["agent_runner"] = _agent_runner(stage, tests)
    return config


def setup(stage: Stage) -> None:
    """The copy, the inbox, the config, the processes, all answering."""
    scenario = stage.scenario
    stage.root.mkdir(parents=True)
    # The agent runner runs the agent and the tests as an unprivileged user when mendloop runs as root: it must
    # be able to read the copy.
    stage.root.chmod(0o755)
    stage.state.mkdir()
    stage.service_port, stage.api_port = free_port(), free_port()
    if scenario.service == "importer":
        shutil.copytree(IMPORTER / "inbox", stage.inbox)
        _copy_repo(stage, IMPORTER)
        config = importer_config(stage)
    else:
        _copy_repo(stage, SAMPLE)
        stage.spawn(
            "sample_service",
            [
                stage.python,
                "-B",
                str(stage.repo / "service.py"),
                "--port",
                str(stage.service_port),
                "--state-dir",
                str(stage.state),
            ],
            stage.repo,
        )
        config = sample_config(stage)
    config.update(dict(scenario.settings))
    config["database_url"] = f"sqlite:///{stage.root / 'mendloop.db'}"
    config["port"] = stage.api_port
    config["host"] = "127.0.0.1"
    path = stage.root / "mendloop.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    health = "/healthz" if scenario.service == "importer" else "/health"

    def answers(url: str) -> bool:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200

    if stage.control:
        # Nothing to heal it, so no mendloop at all; the importer is started as mendloop would start it.
        if scenario.service == "importer":
            runs = config["targets"]["importer"]["runs"]["process"]
            stage.spawn("importer", list(runs["argv"]), stage.repo)
        wait(lambda: answers(stage.service_url + health), STARTUP_SECONDS, stage, f"the {scenario.service}'s {health}")
        return
    agent_env = dict(stage.agent.env) if stage.agent else {}
    env = {**stage.env, **agent_env, "MENDLOOP_PORT": str(stage.api_port)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    stage.mendloop = stage.spawn(
        "mendloop", [sys.executable, "-m", "mendloop", "serve", "--config", str(path)], stage.root, env
    )
    wait(lambda: answers(stage.api_url + "/health"), STARTUP_SECONDS, stage, "mendloop serve's /health")
    wait(lambda: answers(stage.service_url + health), STARTUP_SECONDS, stage, f"the {scenario.service}'s {health}")


@contextmanager
def staged(
    scenario: Scenario, root: Path, agent: Agent | None, env: dict[str, str], python: str, run_as: str, control: bool
) -> Iterator[Stage]:
    stage = Stage(scenario, root, agent, env, python=python, run_as=run_as, control=control)
    try:
        setup(stage)
        yield stage
    finally:
        stage.stop_all()


# -- one scenario, judged ---------------------------------------------------------------------------------------


def _seconds(stamp: object) -> float | None:
    if not isinstance(stamp, str):
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def control_probe(scenario: Scenario, root: Path) -> dict[str, Any]:
    """The control arm: the same fault on the same fresh stage, with nothing healing it (no mendloop runs), then
    the same probe. A probe that passes here cannot tell a heal from no heal; it must fail."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    python, run_as = agent_python()
    probe = Probe()
    try:
        with staged(scenario, root, None, env, python, run_as, True) as stage:
            scenario.inject(stage)
            stage.stop_mendloop()
            scenario.probe(stage, probe)
    except BenchError as exc:
        return {"error": str(exc), "detects_fault": False}
    failed = [name for name, ok, _ in probe.checks if not ok]
    return {"detects_fault": not probe.healthy, "failed_checks": failed}


def run_scenario(
    scenario: Scenario, root: Path, *, model: Agent | None = None, control: bool = False
) -> dict[str, Any]:
    """Run one scenario under `root` (created; left for inspection) and judge it. A code bug is fixed by `model`
    when given, else by the scenario's stand-in fix. With `control`, the control arm runs first (under
    `root`/control): the probe must find the unhealed fault."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    python, run_as = agent_python()
    agent = model if model is not None else (stand_in(*scenario.fix, python) if scenario.fix else None)
    started = time.monotonic()
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "class": scenario.fault_class,
        "service": scenario.service,
        "summary": scenario.summary,
        "agent": agent.label if agent and scenario.fix else None,
        "expected": scenario.expect,
    }
    if control:
        result["control"] = control_probe(scenario, root / "control")
    probe = Probe()
    try:
        with staged(scenario, root / "run", agent, env, python, run_as, False) as stage:
            scenario.inject(stage)
            runs = stage.wait_runs_final(scenario.runs)
            details = [stage.run_detail(r["run_id"]) for r in runs]
            # mendloop is stopped before the probe: nothing it does can help the service pass, and the probe's own
            # requests start no run.
            stage.stop_mendloop()
            scenario.probe(stage, probe)
            commits = stage.git("log", "--format=%s").splitlines()
            # Whether the code is the shipped code again: a patch that was reverted (or none) leaves no diff.
            base = stage.git("rev-list", "--max-parents=0", "HEAD").split()[0]
            code_at_base = not stage.git("diff", "--stat", base, "HEAD").strip()
    except BenchError as exc:
        result.update(error=str(exc), healed=False, escalated=False, false_heal=False, as_expected=False)
        result["seconds"] = round(time.monotonic() - started, 1)
        return result
    claimed = bool(details) and details[-1]["status"] == "completed"
    handed_over = any(d["status"] in HANDED_OVER for d in details)
    healed = probe.healthy and claimed and not handed_over
    # Time to heal: from each injection to the end of the run it started (a flapping fault injects several).
    finished = [_seconds(d.get("finished_at")) for d in details]
    spans = [end - at for at, end in zip(stage.injected_at[-len(details) :], finished, strict=False) if end]
    heal_seconds = round(max(0.0, sum(spans) / len(spans)), 2) if healed and spans else None
    result.update(
        healed=healed,
        escalated=handed_over,
        false_heal=claimed and not probe.healthy,
        time_to_heal_seconds=heal_seconds,
        probe={"healthy": probe.healthy, "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in probe.checks]},
        runs=[
            {
                "run_id": d["run_id"],
                "playbook": d["playbook_id"],
                "status": d["status"],
                "escalated_to_coding": d["escalated_to_coding"],
                "work_order": (d.get("work_order") or {}).get("status"),
                "error": d.get("error"),
            }
            for d in details
        ],
        commits=commits,
        code_at_base=code_at_base,
        seconds=round(time.monotonic() - started, 1),
    )
    outcome = "healed" if healed else "escalated" if handed_over and not probe.healthy else "neither"
    result["outcome"] = outcome
    # A real model's fix is its own: only a false heal is a failure of the bench then, not a different outcome.
    expected = (outcome == scenario.expect) if agent is None or agent.stand_in else not result["false_heal"]
    blind = control and not result["control"].get("detects_fault")
    result["as_expected"] = expected and not blind
    return result


def dumps(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=False) + "\n"
