"""Agent and test processes in the bubblewrap sandbox (mendloop/infra/sandbox.py), and the fallback without it.

Real parts: bwrap itself (Debian's bubblewrap; scripts/test.sh installs it), the agent runner on a real git
repository with a `command` agent and a test command that each probe their confinement, a TCP server on 127.0.0.1
they try to reach, `mendloop serve` killed with -9 while its sandboxed agent runs, and `mendloop serve` refusing
to start when bubblewrap is required and missing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.agents import adapters
from mendloop.agents.agent_runner import NOBODY, AgentRunner, RunnerOptions
from mendloop.errors import ConfigError
from mendloop.infra import process, sandbox
from mendloop.infra.api_client import AgentClient, Claim, Heartbeat
from tests.support import free_port, in_ci, mendloop_argv, migrated_sqlite, wait_for, write_playbooks

PY = sys.executable
CALC = "def add(a, b):\n    return a * b\n"


def _bwrap_or_skip() -> sandbox.Sandbox:
    found = sandbox.detect(None, mode="auto", bwrap=None, environ={"PATH": os.environ.get("PATH", os.defpath)})
    if not found.confined:
        message = f"no working bubblewrap here: {found.reason} (scripts/test.sh installs Debian's bubblewrap)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _calc_repo(path: Path) -> Path:
    (path / "tests").mkdir(parents=True)
    (path / "calc.py").write_text(CALC)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "initial")
    return path


def _running_with(marker: str, besides: str = "") -> list[int]:
    """Live processes whose command line holds `marker` (zombies waiting for a reaper are dead), but for those
    whose name is `besides`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() not in (entry / "cmdline").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if state not in ("Z", "X") and name != besides:
            found.append(int(entry.name))
    return found


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP server on 127.0.0.1 that nothing in a sandbox without the network may reach."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _accepted(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


# An agent that probes its confinement: it fixes calc.py in its worktree, tries to write outside it (into the
# test's temp dir, and into the read-only system), to reach the test's TCP server, and leaves a `sleep` running in
# a session of its own. It reports what happened in RESULT_FILE's summary (the one field the runner keeps).
PROBING_AGENT = r"""
import json, os, socket, subprocess, sys
port, outside, system_path, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
seen = {"uid": os.getuid()}
calc = os.path.join(os.environ["WORKTREE"], "calc.py")
with open(calc) as fh:
    text = fh.read()
with open(calc, "w") as fh:
    fh.write(text.replace("a * b", "a + b"))
seen["worktree"] = "written"
for name, target in (("outside", outside), ("system", system_path)):
    try:
        with open(target, "w") as fh:
            fh.write("escaped")
        seen[name] = "written"
    except OSError as exc:
        seen[name] = exc.strerror
try:
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    seen["connect"] = "connected"
except OSError as exc:
    seen["connect"] = type(exc).__name__
subprocess.Popen(["sleep", marker], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
with open(os.environ["RESULT_FILE"], "w") as fh:
    json.dump({"summary": json.dumps(seen)}, fh)
"""

# The test command: exits 0 only when the network and the system are out of its reach (and the fix is there), so
# a completed work order is the proof that the tests ran confined too.
PROBING_TESTS = r"""
import os, socket, sys
port, system_path = int(sys.argv[1]), sys.argv[2]
sys.path.insert(0, os.getcwd())
import calc
assert calc.add(2, 3) == 5, "the fix is missing"
try:
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    sys.exit("the tests reached the network")
except OSError:
    pass
try:
    open(system_path, "w").write("escaped")
    sys.exit("the tests wrote outside their worktree")
except OSError:
    pass
"""


class _OneClaim(AgentClient):
    """The pull API as the runner sees it, for one work order: every report is recorded."""

    def __init__(self, work_order: dict[str, Any]) -> None:
        super().__init__("http://127.0.0.1:9")
        self.work_order = work_order
        self.calls: list[tuple[str, Any]] = []

    def claim(self, agent_id: str, *, repository: str | None = None, wait_seconds: float = 0) -> Claim | None:
        if self.calls:
            return None
        self.calls.append(("claim", repository))
        return Claim(self.work_order, "lease-1", None, 5.0)

    def heartbeat(self, work_order_id: str, lease_id: str, note: str | None = None) -> Heartbeat:
        return Heartbeat(lease_expires_at=None, cancel_requested=False)

    def complete(self, work_order_id: str, body: dict[str, Any], *, idempotency_key: str | None = None) -> Any:
        self.calls.append(("complete", body))
        return {"status": "completed"}

    def fail(self, work_order_id: str, **kw: Any) -> Any:
        self.calls.append(("fail", kw))
        return {"status": "failed"}


def test_agent_and_tests_run_confined_through_the_runner(tmp_path: Path, listener: socket.socket) -> None:
    _bwrap_or_skip()
    repo = _calc_repo(tmp_path / "calc")
    marker = f"{7000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"
    outside = tmp_path / "outside.txt"
    system_path = Path("/var/tmp") / f"mendloop-sandbox-{uuid.uuid4().hex}"
    agent = tmp_path / "probing_agent.py"
    agent.write_text(PROBING_AGENT)
    tests = tmp_path / "probing_tests.py"
    tests.write_text(PROBING_TESTS)
    port = listener.getsockname()[1]
    work_order = {
        "work_order_id": "wo_sandbox_1",
        "description": "add() is wrong",
        "context": {
            "repository": str(repo),
            "base_commit": _git(repo, "rev-parse", "HEAD").strip(),
            "test_command": [PY, str(tests), str(port), str(system_path)],
            "constraints": {"allowed_paths": ["**"], "forbidden_paths": [], "max_files": 5, "max_changed_lines": 50},
        },
    }
    client = _OneClaim(work_order)
    adapter = adapters.create("command", [PY, str(agent), str(port), str(outside), str(system_path), marker])
    runner = AgentRunner(client, RunnerOptions(repo=repo, adapter=adapter, run_as=None, apply="approval"))
    assert runner.sandbox.kind == "bwrap"
    try:
        outcome = runner.process_next(wait_seconds=0)
    finally:
        system_path.unlink(missing_ok=True)
    assert outcome is not None
    # Completed: the runner's own test run passed, i.e. the tests could neither reach the network nor write out.
    assert outcome.status == "completed", (outcome.message, outcome.output_tail)
    seen = json.loads(outcome.agent_claims["summary"])
    assert seen["worktree"] == "written" and outcome.files == ["calc.py"]
    assert seen["system"] == "Read-only file system"
    assert not outside.exists()  # whatever it wrote there went to its private /tmp, gone with it
    assert seen["connect"] == "ConnectionRefusedError"  # a private loopback: the host's ports are not there
    assert not _accepted(listener)
    assert _running_with(marker) == []  # its pid namespace ended with it: the background sleep too
    assert _git(repo, "status", "--porcelain") == "" and (repo / "calc.py").read_text() == CALC


def test_network_only_for_an_agent_that_needs_a_model_endpoint(tmp_path: Path, listener: socket.socket) -> None:
    found = _bwrap_or_skip()
    port = listener.getsockname()[1]
    probe = [PY, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3).close()"]
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    assert adapters.create("aider").needs_network and not adapters.create("command", ["x"]).needs_network
    assert adapters.create("command", ["x"], network=True).needs_network
    shut = found.run(probe, cwd=tmp_path, env=env, timeout=30, writable=[], network=False)
    assert shut.returncode != 0 and "ConnectionRefusedError" in shut.stdout_text()
    assert not _accepted(listener)
    opened = found.run(probe, cwd=tmp_path, env=env, timeout=30, writable=[], network=True)
    assert opened.returncode == 0, opened.stdout_text()
    wait_for(lambda: _accepted(listener), 5)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to uid 65534 needs root")
def test_as_root_the_uid_drops_before_bwrap(tmp_path: Path) -> None:
    _bwrap_or_skip()
    found = sandbox.detect(NOBODY, mode="bwrap")
    assert found.kind == "bwrap" and found.run_as == NOBODY
    work = Path(tempfile.mkdtemp(prefix="mendloop-sandbox-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        work.chmod(0o755)
        os.chown(work, *NOBODY)
        code = "import os; open('made', 'w').write(str(os.getuid()))"
        done = found.run(
            ["python3", "-c", code], cwd=work, env={"PATH": os.defpath}, timeout=30, writable=[], network=False
        )
        assert done.returncode == 0, done.stdout_text()
        # uid 65534 outside the sandbox too: bwrap ran as that user, it holds no root in any namespace.
        assert (work / "made").read_text() == str(NOBODY[0]) and (work / "made").stat().st_uid == NOBODY[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_missing_program_is_cannot_start_not_an_exit_code(tmp_path: Path) -> None:
    found = _bwrap_or_skip()
    with pytest.raises(process.CannotStart) as caught:
        found.run(["no-such-program-x"], cwd=tmp_path, env={"PATH": os.defpath}, timeout=10, writable=[], network=False)
    assert caught.value.program == "no-such-program-x"


# -- kill -9 of serve ------------------------------------------------------------------------------------------

HANGING_AGENT = r"""
import subprocess, sys, time
subprocess.Popen(["sleep", sys.argv[1]], start_new_session=True)
time.sleep(1000)
"""


def test_nothing_sandboxed_outlives_a_kill_9_of_serve(tmp_path: Path) -> None:
    _bwrap_or_skip()
    repo = _calc_repo(tmp_path / "calc")
    marker = f"{8000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"
    agent = tmp_path / "hang.py"
    agent.write_text(HANGING_AGENT)
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "patchy",
            "type": "code_patch",
            "description": "escalates",
            "steps": [{"id": "escalate", "action": "escalate", "with": {"description": "fix add()"}}],
        },
    )
    port = free_port()
    config = tmp_path / "mendloop.yaml"
    config.write_text(
        json.dumps(
            {
                "database_url": migrated_sqlite(tmp_path / "mendloop.db"),
                "playbook_dirs": [str(tmp_path / "pb")],
                "routing": {"patchy": "patchy"},
                "targets": {"svc": {"test_command": [PY, "-c", "pass"]}},
                "agent_runner": {
                    "enabled": True,
                    "repository": str(repo),
                    "adapter": "command",
                    "argv": [PY, str(agent), marker],
                    "timeout": 120,
                    "run_as": "none",
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDLOOP_")}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        mendloop_argv("serve", "--config", str(config), "--port", str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, 0.05)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/patches/trigger", json={"error_type": "patchy", "description": "d"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        # The agent and its background sleep, both started: bwrap's own processes carry the marker too, and a kill
        # while bwrap still sets itself up is another test's matter.
        wait_for(lambda: len(_running_with(marker, besides="bwrap")) >= 2, 30, 0.05)
        assert all(_under_bwrap(pid) for pid in _running_with(marker))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for(lambda: _running_with(marker) == [], 10, 0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        for pid in _running_with(marker):  # a safety net only: the assertion above is the test
            os.kill(pid, signal.SIGKILL)


def _under_bwrap(pid: int) -> bool:
    """Whether a bwrap process is among the ancestors of `pid`."""
    while pid > 1:
        try:
            if (Path("/proc") / str(pid) / "comm").read_text().strip() == "bwrap":
                return True
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return False
    return False


# -- the fallback ------------------------------------------------------------------------------------------------


def test_without_bwrap_the_fallback_is_the_uid_drop_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "no" / "bwrap")
    caplog.set_level(logging.WARNING, logger="mendloop.infra.sandbox")
    run_as = NOBODY if os.geteuid() == 0 else None
    found = sandbox.detect(run_as, bwrap=missing, environ={"PATH": os.defpath})
    assert found.kind == ("uid-drop" if run_as else "none") and not found.confined
    assert missing in found.reason
    warned = [r.getMessage() for r in caplog.records if "no bubblewrap sandbox" in r.getMessage()]
    assert len(warned) == 1 and missing in warned[0] and "reach the network" in warned[0]
    sandbox.detect(run_as, bwrap=missing, environ={"PATH": os.defpath})
    assert len([r for r in caplog.records if "no bubblewrap sandbox" in r.getMessage()]) == 1  # once per process

    # The agent runner takes it from its environment (MENDLOOP_BWRAP, MENDLOOP_SANDBOX) and still drops the uid.
    repo = _calc_repo(tmp_path / "calc")
    environ = {"PATH": os.environ.get("PATH", os.defpath), "MENDLOOP_BWRAP": missing}
    runner = AgentRunner(
        _OneClaim({}), RunnerOptions(repo=repo, adapter=adapters.create("command", ["x"]), environ=environ)
    )
    assert runner.sandbox.kind == found.kind and runner.sandbox.run_as == run_as
    done = found.run(
        ["python3", "-c", "import os; print(os.getuid())"],
        cwd=Path("/"),
        env={"PATH": os.defpath},
        timeout=30,
        writable=[],
        network=False,
    )
    assert done.returncode == 0 and done.stdout_text().strip() == str(run_as[0] if run_as else os.getuid())


def test_sandbox_off_and_required_bwrap(tmp_path: Path) -> None:
    off = sandbox.detect(None, environ={"MENDLOOP_SANDBOX": "off", "PATH": os.defpath})
    assert off.kind == "none" and "off" in off.reason
    with pytest.raises(ConfigError) as caught:
        sandbox.detect(None, mode="bwrap", bwrap=str(tmp_path / "missing"))
    assert "bwrap is required" in caught.value.message
    with pytest.raises(ConfigError) as bad:
        sandbox.detect(None, environ={"MENDLOOP_SANDBOX": "sometimes"})
    assert "MENDLOOP_SANDBOX" in bad.value.message


def test_configure_checks_at_startup_and_holds_for_the_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What `serve` calls before anything starts: a required bubblewrap that is missing stops it (a one-line
    ConfigError), and the settings it was given hold for every later `detect` of the process."""
    missing = str(tmp_path / "missing")
    with pytest.raises(ConfigError) as caught:
        sandbox.configure(mode="bwrap", bwrap=missing, run_as=None)
    assert "bwrap is required" in caught.value.message and missing in caught.value.message
    caplog.set_level(logging.INFO, logger="mendloop.infra.sandbox")
    try:
        chosen = sandbox.configure(mode="off", bwrap=None, run_as=None)
        assert chosen.kind == "none"
        # The environment says auto, the configuration said off: the configuration (file and environment merged
        # into the settings) wins.
        assert sandbox.detect(None, environ={"MENDLOOP_SANDBOX": "auto", "PATH": os.defpath}).kind == "none"
    finally:
        sandbox._configured.clear()
    assert sandbox.detect(None, mode="off").kind == "none"


def test_a_program_the_sandbox_cannot_start_exits_like_a_shell_says(tmp_path: Path) -> None:
    """Visible outside, not inside (a private /tmp hides what the argv does not name: here the script's
    interpreter): bwrap's exit 1 would read as a failing test; it is 127, what a shell answers for a missing
    program, which the test runner reports as `test_env_error`."""
    found = _bwrap_or_skip()
    hidden = Path(tempfile.mkdtemp(prefix="mendloop-hidden-", dir="/tmp"))
    try:
        shutil.copy("/bin/sh", hidden / "interp")
        script = tmp_path / "run.sh"
        script.write_text(f"#!{hidden / 'interp'}\nexit 0\n")
        script.chmod(0o755)
        done = found.run([str(script)], cwd=tmp_path, env={"PATH": os.defpath}, timeout=10, writable=[], network=False)
        assert done.returncode == 127, done.stdout_text()
        failing = found.run(
            ["sh", "-c", "echo 'bwrap: pretend'; exit 1"],
            cwd=tmp_path,
            env={"PATH": os.defpath},
            timeout=10,
            writable=[],
            network=False,
        )
        assert failing.returncode == 1  # a program's own exit 1 stays what it is
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop to 65534 needs root")
def test_as_root_what_only_root_can_reach_is_still_visible_to_the_dropped_user(tmp_path: Path) -> None:
    """A project in a 0700 temp directory of root's (a CI clone in `mktemp -d`) and a worktree in a 0700 directory
    under /dev/shm: bwrap starts as root, binds them, and setpriv drops to 65534 with no capability left."""
    found = _bwrap_or_skip()
    confined = sandbox.Sandbox(kind="bwrap", run_as=NOBODY, bwrap=found.bwrap)
    project = Path(tempfile.mkdtemp(prefix="mendloop-private-", dir="/tmp"))  # 0700, root's
    outer = Path(tempfile.mkdtemp(prefix="mendloop-wt-test-", dir="/dev/shm"))  # 0700, root's
    try:
        script = project / "tool" / "show.py"
        script.parent.mkdir()
        script.write_text(
            "import os, sys\n"
            "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd', 'CapPrm'))]\n"
            "print(os.getuid(), sorted(os.listdir(sys.argv[1])), caps)\n"
        )
        tree = outer / "worktree"
        tree.mkdir()
        (tree / "calc.py").write_text("x = 1\n")
        os.chown(tree, *NOBODY)
        os.chmod(outer, 0o711)
        done = confined.run(
            ["/usr/bin/python3", str(script), str(tree)],
            cwd=tree,
            env={"PATH": os.defpath},
            timeout=30,
            writable=[],
            network=False,
        )
        assert done.returncode == 0, done.stdout_text()
        uid, listing, caps = done.stdout_text().split(" ", 2)
        assert uid == "65534" and "calc.py" in listing
        assert caps.strip() == "['0000000000000000', '0000000000000000', '0000000000000000']"
    finally:
        shutil.rmtree(project, ignore_errors=True)
        shutil.rmtree(outer, ignore_errors=True)
