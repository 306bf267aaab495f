"""`mendloop demo` end to end, as a subprocess: the story with --exit, and the spec's curl tests 1-4 by hand
against --no-story. Each test has its own state directory and ports; MENDLOOP_DATABASE_URL is unset so the demo
uses its own SQLite database there."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.demo.lock import StateLock
from tests.support import alive, free_port, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "sample_service"
WO_RE = re.compile(r"^wo_\d{8}_0001$")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDLOOP_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def test_story_exits_zero_and_commits_in_the_copy(tmp_path: Path) -> None:
    before = _snapshot(SAMPLE)
    state = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mendloop",
            "demo",
            "--exit",
            "--port",
            str(free_port()),
            "--service-port",
            str(free_port()),
            "--state-dir",
            str(state),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    wo = re.search(r"wo_\d{8}_\d{4}", output)
    assert wo is not None, output
    assert "Trust restored" in output
    assert "stand-in for a real coding agent" in output and "examples/agents/demo_fix.py" in output
    assert f"Work-Order: {wo.group(0)}" in output  # the commit, as the demo prints it
    log = _git(state / "sample_service", "log", "--format=%B")
    assert f"Work-Order: {wo.group(0)}" in log
    assert "file_size_bytes // 200" in (state / "sample_service" / "ingestion_pipeline.py").read_text()
    assert _snapshot(SAMPLE) == before, "the checkout's sample service must not change"
    assert not (state / "demo.json").exists()


def test_story_with_tokens_runs_on_its_own_credentials(tmp_path: Path) -> None:
    """A server closed by a token: the story drives it with an operator credential of the demo's own and the
    embedded runner claims with the server's in-process one; neither is the configured token, which is admin's."""
    admin = "demo-admin-token-0123456789"
    state = tmp_path / "demo"
    argv = [sys.executable, "-m", "mendloop", "demo", "--exit", "--port", str(free_port())]
    argv += ["--service-port", str(free_port()), "--state-dir", str(state)]
    env = {**_env(), "MENDLOOP_API_TOKENS": json.dumps([admin])}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Trust restored" in output
    assert admin not in (state / "mendloop.yaml").read_text()  # the written config holds no credential
    assert "tokens:" not in (state / "mendloop.yaml").read_text()


def test_story_the_embedded_runner_commits_tests_and_the_run_completes(tmp_path: Path) -> None:
    """The story without --exit: while the demo serves on, the API shows what the embedded runner did."""
    state = tmp_path / "demo"
    out_path = tmp_path / "demo.out"
    out = out_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mendloop", "demo", "--port", str(free_port()), "--state-dir", str(state)],
        cwd=tmp_path,
        env=_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    info: dict[str, Any] = {}
    try:
        wait_for(
            lambda: (
                "Story complete." in out_path.read_text()
                or "did not end" in out_path.read_text()
                or proc.poll() is not None
            ),
            timeout=120,
            interval=0.1,
        )
        output = out_path.read_text()
        assert "Story complete." in output, output
        info = json.loads((state / "demo.json").read_text())
        api, copy = info["mendloop"]["url"], Path(info["sample_service"]["repo"])
        config = yaml.safe_load((state / "mendloop.yaml").read_text())
        assert config["agent_runner"]["enabled"] is True and config["agent_runner"]["adapter"] == "command"
        assert config["agent_runner"]["repository"] == str(copy)
        assert config["targets"]["sample_service"]["repository"] == str(copy)

        with httpx.Client(base_url=api, timeout=30, trust_env=False) as http:
            (wo,) = http.get("/patches/work-orders").json()["work_orders"]
            wo_id = wo["work_order_id"]
            assert wo["status"] == "completed" and wo["attempts"] == 1, wo
            result = wo["patch_result"]
            # The runner's own figures: its tests passed, and it made the commit (the server had nothing to apply).
            assert result["tests_passed"] is True and result["files_changed"] == 2, result
            assert result["agent"]["name"] == "command" and "demo_fix.py" in result["agent"]["version"]
            head = _git(copy, "rev-parse", "HEAD").strip()
            assert result["applied_commit"] == head
            assert _git(copy, "rev-parse", "HEAD~1").strip() == result["base_commit"]
            assert _git(copy, "rev-list", "--count", "HEAD").strip() == "2"  # the demo's copy + the runner's fix
            assert f"Work-Order: {wo_id}" in _git(copy, "log", "-1", "--format=%(trailers)")
            assert "adaptive chunking" in _git(copy, "log", "-1", "--format=%B")  # the agent's summary
            assert _git(copy, "status", "--porcelain") == ""
            assert _git(copy, "worktree", "list", "--porcelain").count("worktree ") == 1  # none left behind
            assert _git(copy, "show", "--name-only", "--format=", "HEAD").split() == [
                "ingestion_pipeline.py",
                "tests/test_large_files.py",
            ]
            run = http.get(f"/patches/runs/{wo['self_healing_run_id']}").json()
            assert run["status"] == "completed", run
            if config.get("watchers"):
                # The story starts from the service's log line, detected by a watcher: no trigger is posted.
                assert "no trigger is posted" in output
                assert "ERROR: Pipeline timeout after 300 seconds" in run["description"], run["description"]
                assert http.get("/patches/runs").json()["total"] == 2  # one run per fault, none from a trigger
            messages = [item["message"] for item in run["timeline"]]
            assert any("Coding agent demo-runner analyzing" in m for m in messages), messages  # it claimed
            assert any("Code patch already applied by the agent runner" in m for m in messages), messages
            assert any("Trust restored" in m for m in messages), messages
            served = http.get(f"/patches/diffs/{wo_id}.diff")
            assert served.status_code == 200
            assert "+    return max(1 * MB, file_size_bytes // 200)" in served.text
            assert served.text == _git(copy, "diff", "HEAD~1", "HEAD")
            assert f"/patches/diffs/{wo_id}.diff" in output
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in ("mendloop", "sample_service"):
            pid = info.get(child, {}).get("pid")
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        out.close()
    assert proc.returncode == 0
    for child in ("mendloop", "sample_service"):
        assert not alive(info[child]["pid"]), f"{child} still running after the demo stopped"


@pytest.fixture
def no_story_demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    state = tmp_path / "demo"
    out = (tmp_path / "demo.out").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mendloop",
            "demo",
            "--no-story",
            "--port",
            str(free_port()),
            "--state-dir",
            str(state),
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    info_path = state / "demo.json"
    info: dict[str, Any] = {}
    try:
        wait_for(lambda: info_path.exists() or proc.poll() is not None, timeout=30, interval=0.05)
        assert proc.poll() is None, (tmp_path / "demo.out").read_text()
        info = json.loads(info_path.read_text())
        yield proc, info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Safety net only: the demo itself must have stopped them (the test asserts it).
        for child in ("mendloop", "sample_service"):
            pid = info.get(child, {}).get("pid")
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        out.close()


def test_spec_curl_tests_against_no_story(no_story_demo: tuple[subprocess.Popen[bytes], dict[str, Any]]) -> None:
    proc, info = no_story_demo
    api, svc = info["mendloop"]["url"], info["sample_service"]["url"]
    config = yaml.safe_load((Path(info["sample_service"]["repo"]).parent / "mendloop.yaml").read_text())
    assert config["agent_runner"]["enabled"] is False
    assert config.get("watchers", []) == []  # the curl triggers are the only ones: no second run per fault
    with httpx.Client(timeout=60, trust_env=False) as http:
        # Test 1: a database fault that the retry playbook heals by itself.
        http.post(f"{svc}/admin/faults/db_disconnect", json={"reconnect_failures": 1}).raise_for_status()
        t1 = http.post(
            f"{api}/patches/trigger",
            json={"description": "Database connection lost", "error_type": "database_connection"},
        ).json()
        assert t1["success"] is True and t1["status"] == "completed", t1
        assert t1["escalated_to_coding"] is False and t1["work_order_id"] is None

        # Test 2: a code fault that escalates.
        http.post(f"{svc}/admin/faults/large_file").raise_for_status()
        t2 = http.post(
            f"{api}/patches/trigger",
            json={"description": "Pipeline validation timeout", "error_type": "pipeline_timeout"},
        ).json()
        assert t2["escalated_to_coding"] is True, t2
        assert WO_RE.match(t2["work_order_id"]), t2
        wo_id, run_id = t2["work_order_id"], t2["run_id"]

        # Test 3: the work orders list it.
        listing = http.get(f"{api}/patches/work-orders").json()
        assert listing["count"] == 1
        assert [w["work_order_id"] for w in listing["work_orders"]] == [wo_id]
        assert listing["work_orders"][0]["self_healing_run_id"] == run_id
        assert listing["stats"]["total_work_orders"] == 1 and listing["stats"]["queued"] == 1
        # No agent of any kind runs with --no-story: nothing claims the work order.
        assert listing["work_orders"][0]["leased_to"] is None and listing["work_orders"][0]["attempts"] == 0

        # Test 4 as the spec writes it, with no fix behind the claim: verification must not believe it.
        done = http.post(f"{api}/patches/work-orders/{wo_id}/complete", json={"tests_passed": True, "files_changed": 2})
        assert done.status_code == 200, done.text

        def run_status() -> str:
            status: str = http.get(f"{api}/patches/runs/{run_id}").json()["status"]
            return status

        wait_for(lambda: run_status() in ("completed", "failed", "needs_human", "cancelled"), timeout=30, interval=0.1)
        assert run_status() == "needs_human"

    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    for child in ("mendloop", "sample_service"):
        assert not alive(info[child]["pid"]), f"{child} still running after the demo stopped"


def _start_demo(state: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mendloop",
                "demo",
                "--no-story",
                "--port",
                str(free_port()),
                "--service-port",
                str(free_port()),
                "--state-dir",
                str(state),
            ],
            cwd=state.parent,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _demo_info(state: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """demo.json once the demo `proc` wrote it (its children are up then)."""

    def written() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return bool(json.loads((state / "demo.json").read_text())["demo_pid"] == proc.pid)
        except (OSError, ValueError, KeyError):
            return False

    wait_for(written, timeout=60, interval=0.05)
    info: dict[str, Any] = json.loads((state / "demo.json").read_text())
    return info


def test_kill_9_of_the_demo_takes_its_children_and_a_live_demo_holds_its_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    first = _start_demo(state, tmp_path / "first.out")
    children: list[int] = []
    try:
        info = _demo_info(state, first, tmp_path / "first.out")
        children = [info["mendloop"]["pid"], info["sample_service"]["pid"]]
        # A second demo on the same state directory is refused in one line, and touches nothing of the first's.
        head = _git(state / "sample_service", "rev-parse", "HEAD")
        second = subprocess.run(
            [
                *(sys.executable, "-m", "mendloop", "demo", "--no-story", "--port", str(free_port())),
                *("--service-port", str(free_port()), "--state-dir", str(state)),
            ],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0
        said = (second.stdout + second.stderr).strip().splitlines()
        assert len(said) == 1 and f"another demo (pid {first.pid}) is using {state}" in said[0], said
        assert all(alive(pid) for pid in children)
        assert _git(state / "sample_service", "rev-parse", "HEAD") == head
        assert json.loads((state / "demo.json").read_text())["demo_pid"] == first.pid

        first.kill()  # kill -9: none of the demo's own cleanup runs
        first.wait()
        wait_for(lambda: not any(alive(pid) for pid in children), timeout=10, interval=0.05)

        # Its lock died with it (the file is still there, with its pid): the next demo takes the state directory
        # over. That demo's first step, in this process: starting a whole third demo would add ten seconds.
        assert (state / "demo.lock").read_text().strip() == str(first.pid)
        lock = StateLock(state)
        lock.acquire()
        assert (state / "demo.lock").read_text().strip() == str(os.getpid())
        lock.release()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        for pid in children:  # a safety net only: the assertions above are the test
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
