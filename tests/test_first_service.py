"""docs/first-service.md, walked: its ```sh blocks run in order, exactly as written, in one shell session (its
exports and `cd` carried from block to block), with only the guide's own variables set: MENDLOOP_HOME (this
checkout), MENDLOOP_GUIDE_DIR (a scratch directory), PORT and MENDLOOP_PORT (free ports). At each
`<!-- guide-check: NAME -->` of the page the check of that name below looks at what is real by then: the runs
through mendloop's API, the copy's git repository, the importer's /healthz, the trust history.

The importer (examples/importer_service) is healed by its mendloop.yaml alone: a lost database connection
(`database_reconnect`), a cache overflow (`memory_cleanup`) and a real code bug, fixed through the embedded agent
runner (`code_fix`: diagnose, escalate, the runner's diff, tests and commit, a restart of the supervised
process, verify, trust restored). Every process the guide starts is stopped by its pid at the end."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.config import Settings
from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "first-service.md"
_ITEM = re.compile(r"^```sh\n(?P<code>.*?)^```$|^<!-- guide-check: (?P<check>[a-z_]+) -->$", re.MULTILINE | re.DOTALL)
# The slowest stretch is the code fix: the agent, the tests at the base and with the patch (in the sandbox), the
# commit, the restart. About 20 s here; the deadline leaves room for a loaded machine.
FIX_TIMEOUT = 240


def guide_items(text: str) -> list[tuple[str, str]]:
    """("sh", code) and ("check", name) in the order the page has them."""
    return [("sh", m["code"]) if m["code"] is not None else ("check", m["check"]) for m in _ITEM.finditer(text)]


@dataclass
class Walk:
    """One shell session over many `bash` processes: the exported variables and the directory are carried over."""

    tmp: Path
    env: dict[str, str]
    cwd: Path
    outputs: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.env['MENDLOOP_PORT']}"

    @property
    def importer_url(self) -> str:
        return f"http://127.0.0.1:{self.env['PORT']}"

    @property
    def copy(self) -> Path:
        return Path(self.env["MENDLOOP_GUIDE_DIR"]) / "importer"

    def run(self, code: str) -> str:
        state = self.tmp / "shell"
        state.mkdir(exist_ok=True)
        exports, where = state / "exports.sh", state / "cwd"
        script = (
            "set -eo pipefail\n"
            + (f"source {exports}\n" if exports.exists() else "")
            + f"cd {self.cwd}\n"
            + code
            # Carry the session: exported variables (not the shell's read-only ones) and the directory.
            + f"\ndeclare -px | grep -v '^declare -[a-z]*r' > {exports}.new\npwd > {where}\n"
        )
        done = subprocess.run(
            ["bash", "-c", script],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"the guide's block failed (exit {done.returncode}):\n{code}\n---\n{output}"
        os.replace(f"{exports}.new", exports)
        self.cwd = Path(where.read_text().strip())
        self.outputs.append(output)
        return output

    def get(self, path: str) -> Any:
        answer = httpx.get(self.api + path, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def run_of(self, playbook: str, timeout: float) -> dict[str, Any]:
        """The finished run of `playbook`, once there is one."""
        found: dict[str, Any] = {}

        def finished() -> bool:
            for run in self.get("/patches/runs")["runs"]:
                if run["playbook_id"] == playbook and run["status"] in ("completed", "failed", "needs_human"):
                    found.update(self.get(f"/patches/runs/{run['run_id']}"))
                    return True
            return False

        wait_for(finished, timeout, 0.2)
        assert found["status"] == "completed", json.dumps(found, indent=1)[-6000:]
        return found

    def health(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(self.importer_url + "/healthz", timeout=5).json()
        return answer


def steps_of(run: dict[str, Any]) -> dict[str, str]:
    """step id → status of its last attempt."""
    return {s["step_id"]: s["status"] for s in run["steps"]}


# -- the checks, by the names the page gives them -----------------------------------------------------------------


def importer_started(walk: Walk) -> None:
    """mendloop started the importer (`runs.process`): its pid in the pidfile, a child of `serve`, answering."""
    pid = int((walk.copy / "state" / "importer.pid").read_text())
    health = walk.health()
    assert health["pid"] == pid and health["db"] == "connected"
    assert f'"pid": {pid}' in walk.outputs[-1]
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    assert parent == int((walk.copy / "state" / "mendloop.pid").read_text())
    walk.facts["first_pid"], walk.facts["first_boot"] = pid, health["boot_id"]


def mendloop_started(walk: Walk) -> None:
    out = walk.outputs[-1]
    assert out.startswith("ok: 1 target(s), 1 watcher(s)"), out
    assert "mendloop: 200" in out
    routes = {r["key"]: r["playbook"] for r in walk.get("/routing")["routes"]}
    assert routes["database_connection"] == "database_reconnect"
    assert routes["cache_overflow"] == "memory_cleanup"
    assert routes["unhandled_exception"] == "code_fix"


def database_healed(walk: Walk) -> None:
    run = walk.run_of("database_reconnect", 60)
    assert run["escalated_to_coding"] is False and run["component"] == "importer"
    steps = steps_of(run)
    assert steps["close_stale_connections"] == "skipped"  # optional, and the importer has no such thing
    assert steps["reconnect"] == "succeeded" and steps["verify_connection"] == "succeeded"
    assert httpx.get(walk.importer_url + "/ops/db", timeout=5).json() == {"db_connected": True}


def database_works(walk: Walk) -> None:
    out = walk.outputs[-1]
    assert "database_reconnect" in out and "completed" in out
    assert '{"db_connected": true}' in out
    assert '"file": "utilities.csv", "ok": true, "rows": 2' in out


def cache_healed(walk: Walk) -> None:
    run = walk.run_of("memory_cleanup", 60)
    steps = steps_of(run)
    assert steps["identify_caches"] == "skipped" and steps["stop_background_tasks"] == "skipped"
    assert steps["clear_caches"] == "succeeded" and steps["verify_memory_freed"] == "succeeded"
    assert httpx.get(walk.importer_url + "/ops/cache", timeout=5).json()["bytes"] == 0


def bug_fixed(walk: Walk) -> None:
    assert '"ok": false' in walk.outputs[-1] and "ValueError: rent.csv, line 3" in walk.outputs[-1]
    run = walk.run_of("code_fix", FIX_TIMEOUT)
    assert run["escalated_to_coding"] is True
    steps = steps_of(run)
    for step in ("diagnose", "escalate_code_fix", "deploy_patch", "wait_healthy", "verify_fix"):
        assert steps[step] == "succeeded", steps
    work_order = walk.get(f"/patches/work-orders/{run['coding_work_order_id']}")
    assert work_order["status"] == "completed"
    # What the agent was given: the traceback located in the repository, and the log line just before it.
    context = work_order["context"]
    assert context["traceback"]["failing_frame"]["repository_path"] == "parsing.py", context["traceback"]
    assert any(line.endswith("Import failed for rent.csv:") for line in context["log_lines"]["before"]), context
    walk.facts["run"], walk.facts["work_order"] = run, work_order


def after_the_fix(walk: Walk) -> None:
    out = walk.outputs[-1]
    work_order = walk.facts["work_order"]
    run = walk.facts["run"]
    # The commit mendloop made in the copy's repository, with its trailer, changing the code and adding the test.
    head = subprocess.run(
        ["git", "-C", str(walk.copy), "log", "-1", "--format=%H%n%B"], capture_output=True, text=True, check=True
    ).stdout
    assert f"Work-Order: {work_order['work_order_id']}" in head
    changed = subprocess.run(
        ["git", "-C", str(walk.copy), "show", "--name-only", "--format=", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert changed == ["parsing.py", "tests/test_quoted_fields.py"]
    assert "csv.reader" in (walk.copy / "parsing.py").read_text()
    assert f"Work-Order: {work_order['work_order_id']}" in out and "parsing.py" in out
    # mendloop's runner ran the tests itself (at the base and with the patch) before it committed: its figures are
    # on the work order, and the run's timeline names the commit it resumed with.
    assert (work_order["patch_result"] or {}).get("tests_passed") is True, work_order
    timeline = " | ".join(str(t.get("message")) for t in run["timeline"])
    assert head.split()[0][:12] in timeline, timeline
    # The process restarted: a new pid and boot answer /healthz, and the pidfile names it.
    health = walk.health()
    assert health["pid"] != walk.facts["first_pid"] and health["boot_id"] != walk.facts["first_boot"]
    assert int((walk.copy / "state" / "importer.pid").read_text()) == health["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(walk.facts["first_pid"], 0)
    # What failed now succeeds, by the guide's own curl.
    assert '"file": "rent.csv", "ok": true, "rows": 3' in out
    # Trust: the incidents lowered it, the verified fixes restored it; the code fix's run restored it last.
    trust = walk.get("/trust/importer")
    history = trust["history"]
    fixes = [h for h in history if h["run_id"] == run["run_id"] and h["new"] > h["old"]]
    assert fixes, history
    shown = json.loads(out.strip().splitlines()[-1])  # the guide's `curl .../trust/importer`
    assert shown["component"] == "importer" and shown["history"][-1]["reason"] == "verified_fix"


CHECKS: dict[str, Callable[[Walk], None]] = {
    f.__name__: f
    for f in (
        mendloop_started,
        importer_started,
        database_healed,
        database_works,
        cache_healed,
        bug_fixed,
        after_the_fix,
    )
}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return True
    return stat.split(") ", 1)[1].startswith("Z")  # exited, not yet reaped by whoever its parent is


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: _gone(pid), 15, 0.05)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    for tool in ("git", "curl", "bash", "sed"):
        assert shutil.which(tool, path="/usr/bin:/bin"), f"{tool} is needed by the guide"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        # /usr/bin first: the guide's `python3` is the system's, as for a newcomer; the guide appends mendloop's.
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "MENDLOOP_HOME": str(ROOT),
        "MENDLOOP_GUIDE_DIR": str(tmp_path / "guide"),
        "PORT": str(free_port()),
        "MENDLOOP_PORT": str(free_port()),
        "GIT_AUTHOR_NAME": "Guide",
        "GIT_AUTHOR_EMAIL": "guide@example.com",
        "GIT_COMMITTER_NAME": "Guide",
        "GIT_COMMITTER_EMAIL": "guide@example.com",
        "PYTHONDONTWRITEBYTECODE": "1",
        "COLUMNS": "200",  # `mendloop runs list` draws its table this wide, its names whole
    }
    session = Walk(tmp_path, env, ROOT)
    pids: set[int] = set()
    try:
        yield session
    finally:
        state = session.copy / "state"
        for name in ("mendloop.pid", "importer.pid"):
            try:
                pids.add(int((state / name).read_text()))
            except (OSError, ValueError):
                pass
        if "first_pid" in session.facts:
            pids.add(session.facts["first_pid"])
        for pid in sorted(pids):
            _stop(pid)


def test_the_guide_heals_the_importer_by_configuration_alone(walk: Walk) -> None:
    items = guide_items(GUIDE.read_text(encoding="utf-8"))
    names = [name for kind, name in items if kind == "check"]
    assert names == list(CHECKS), "every check of the page exists here, in its order"
    for kind, value in items:
        if kind == "sh":
            walk.run(value)
        else:
            CHECKS[value](walk)
    # The guide's last block stopped both: mendloop by its pid, and the importer mendloop restarted.
    state = walk.copy / "state"
    for name in ("mendloop.pid", "importer.pid"):
        wait_for(functools.partial(_gone, int((state / name).read_text())), 15, 0.05)


def test_the_guides_example_targets_are_valid_config() -> None:
    """The systemd, docker-compose and Kubernetes targets at the end of the page load as mendloop config."""
    blocks = re.findall(r"^```yaml\n(.*?)^```$", GUIDE.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    kinds = []
    for block in blocks:
        settings = Settings(**yaml.safe_load(block))
        runs = settings.targets["importer"].runs
        assert runs is not None
        kinds.append(runs.kind)
    assert kinds == ["systemd", "docker", "kubernetes"]
