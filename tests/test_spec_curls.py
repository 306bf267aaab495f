"""The spec's four curl tests ("Testing the Workflow"), run with the real `curl` against `mendloop demo --no-story`
as a real subprocess, with nothing typed before them: the demo stages the spec's scenario on the sample service
(the database connection dropped, a 500 MB file's pipeline run failed on the timeout) before it reports ready.

The commands come from the spec's own text (tests/spec_testing_the_workflow.md, a verbatim copy of its section,
checked against the spec where it is at hand), changed in two places only: the spec's `localhost:8000` becomes
`localhost:<a free port>`, so this test never competes for 8000 with a demo someone runs on this machine; and
test 4's `wo_20251113_0001`, the spec's example id (ids carry the day they were made, and that day has passed),
becomes the work_order_id test 2 answered."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.config import Settings
from mendloop.demo.story import SPEC_BASE, SPEC_TESTS, SPEC_WORK_ORDER, spec_base
from tests.support import alive, free_port, git, in_ci, wait_for

REPO = Path(__file__).resolve().parent.parent
SPEC_COPY = Path(__file__).with_name("spec_testing_the_workflow.md")
# The spec itself lives beside the repository on the machine it was written for; elsewhere MENDLOOP_SPEC names it.
SPEC = Path(os.environ.get("MENDLOOP_SPEC", "/work/shared/spec/self-healing-coding-agent.md"))
SECTION_RE = re.compile(r"^## Testing the Workflow\n.*?(?=^## )", re.S | re.M)
TEST_RE = re.compile(r"^### (Test \d: [^\n]+)\n(.*?)(?=^### |\Z)", re.S | re.M)
BLOCK_RE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
FINAL = ("completed", "failed", "needs_human", "cancelled")


@dataclass
class SpecTest:
    title: str
    command: str  # the ```bash block, as the spec writes it
    expected: dict[str, Any] | None  # the ```json block after "Expected:", where the spec gives one


def spec_tests(text: str) -> list[SpecTest]:
    section = SECTION_RE.search(text + "\n## end\n")
    assert section is not None, "no '## Testing the Workflow' section"
    tests = []
    for title, body in TEST_RE.findall(section.group(0)):
        blocks = BLOCK_RE.findall(body)
        (command,) = [code.rstrip("\n") for lang, code in blocks if lang == "bash"]
        expected = [json.loads(code) for lang, code in blocks if lang == "json"]
        tests.append(SpecTest(title, command, expected[0] if expected else None))
    return tests


def _env() -> dict[str, str]:
    # No MENDLOOP_* of the caller's (the demo makes its own SQLite database), and no proxy: curl would send a
    # request for localhost through one.
    drop = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDLOOP_") and k.lower() not in drop}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _curl(command: str) -> Any:
    """The spec's command, run as typed into a shell: bash, the real curl. Its answer is JSON on stdout (curl's
    progress meter, which the spec's commands do not silence, goes to stderr)."""
    proc = subprocess.run(["bash", "-c", command], env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def test_the_copy_is_the_spec_s_section_verbatim() -> None:
    if not SPEC.is_file():
        pytest.skip(f"the spec is not at {SPEC} (set MENDLOOP_SPEC); the copy is checked where it is")
    section = SECTION_RE.search(SPEC.read_text(encoding="utf-8"))
    assert section is not None
    assert section.group(0) in SPEC_COPY.read_text(encoding="utf-8")


def test_the_demo_s_commands_are_the_spec_s_and_its_default_port_is_the_spec_s() -> None:
    tests = spec_tests(SPEC_COPY.read_text(encoding="utf-8"))
    assert [(t.title, t.command) for t in tests] == list(SPEC_TESTS)
    assert all(SPEC_BASE in t.command for t in tests) and SPEC_WORK_ORDER in tests[3].command
    # `mendloop demo` serves on the spec's port by default, on loopback, so its `http://localhost:8000` reaches it.
    from mendloop.cli.processes import demo

    assert inspect.signature(demo).parameters["port"].default == 8000
    assert Settings.model_fields["host"].default == "127.0.0.1"
    assert spec_base("http://127.0.0.1:8000") == SPEC_BASE == "http://localhost:8000"
    assert spec_base("http://127.0.0.1:18000") == "http://localhost:18000"


@dataclass
class RunningDemo:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    port: int
    output: Path


@pytest.fixture
def no_story_demo(tmp_path: Path) -> Iterator[RunningDemo]:
    if shutil.which("curl") is None:
        if in_ci():
            pytest.fail("curl is not installed; the spec's tests are curl commands")
        pytest.skip("curl is not installed; the spec's tests are curl commands")
    state, port, output = tmp_path / "demo", free_port(), tmp_path / "demo.out"
    argv = [sys.executable, "-m", "mendloop", "demo", "--no-story", "--port", str(port)]
    argv += ["--service-port", str(free_port()), "--state-dir", str(state)]
    with output.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    info: dict[str, Any] = {}
    try:
        # demo.json is written once both children are up and the scenario is staged: the demo's "ready".
        wait_for(lambda: (state / "demo.json").exists() or proc.poll() is not None, timeout=60, interval=0.05)
        assert proc.poll() is None, output.read_text()
        info = json.loads((state / "demo.json").read_text())
        # It prints the banner, what it staged and the commands right after; the last line comes before serving.
        wait_for(lambda: "serving; Ctrl-C stops both" in output.read_text() or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, output.read_text()
        yield RunningDemo(proc, info, port, output)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in ("mendloop", "sample_service"):  # a safety net only: the test asserts the demo stopped them
            pid = info.get(child, {}).get("pid")
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_the_spec_s_four_curl_tests_against_no_story(no_story_demo: RunningDemo) -> None:
    demo = no_story_demo
    api, svc = demo.info["mendloop"]["url"], demo.info["sample_service"]["url"]
    copy = Path(demo.info["sample_service"]["repo"])
    base = f"http://localhost:{demo.port}"
    t1, t2, t3, t4 = spec_tests(SPEC_COPY.read_text(encoding="utf-8"))
    commands = [t.command.replace(SPEC_BASE, base) for t in (t1, t2, t3, t4)]
    printed = demo.output.read_text()

    # The demo says what it staged, and prints the spec's commands with only the port changed ($WO for the id).
    assert "The spec's scenario, staged on the sample service" in printed, printed
    assert "the database connection dropped" in printed
    assert "archive_500mb.pdf (500 MB) failed on the timeout" in printed
    assert "a code cause in ingestion_pipeline.py" in printed
    for command in commands:
        assert command.replace(SPEC_WORK_ORDER, "$WO") in printed, (command, printed)

    with httpx.Client(timeout=30, trust_env=False) as http:
        # The scenario, as the service itself reports it before anything is typed; mendloop has no run yet.
        assert http.get(f"{svc}/admin/db/status").json()["connected"] is False
        failed = http.get(f"{svc}/admin/pipeline/runs").json()["last_failed"]
        assert (failed["file_path"], failed["size_mb"], failed["ok"]) == ("archive_500mb.pdf", 500, False), failed
        assert failed["modeled_seconds"] > failed["timeout_seconds"]
        assert set(http.get(f"{svc}/health").json()["problems"]) >= {"db_disconnected", "pipeline_failed"}
        assert http.get(f"{api}/patches/runs").json()["runs"] == []

        # Test 1: "Playbook runs, completes without escalation", and it healed the real dropped connection.
        a1 = _curl(commands[0])
        assert a1["success"] is True and a1["playbook_id"] == "database_reconnect", a1
        assert a1["status"] == "completed", a1
        assert a1["escalated_to_coding"] is False and a1["work_order_id"] is None, a1
        db = http.get(f"{svc}/admin/db/status").json()
        assert db["connected"] is True and db["reconnects"] == 1 and db["stale_connections"] == 0, db
        assert db["reconnect_failures_remaining"] == 0  # both refused reconnects were spent: the retry did the work
        steps = http.get(f"{api}/patches/runs/{a1['run_id']}").json()["steps"]
        reconnects = [s for s in steps if s["step_id"] == "reconnect"]
        # Two reconnects refused by the service, the third taken: the playbook's retry with backoff healed it.
        assert [(s["attempt"], s["status"]) for s in reconnects] == [(1, "failed"), (2, "failed"), (3, "succeeded")]
        (verify,) = [s for s in steps if s["step_id"] == "verify_connection"]
        assert verify["status"] == "succeeded", verify

        # Test 2: the spec's expected answer, field by field; the id has the spec's form, with today's date.
        a2 = _curl(commands[1])
        assert t2.expected is not None and set(t2.expected) <= set(a2), (t2.expected, a2)
        assert a2["escalated_to_coding"] is t2.expected["escalated_to_coding"] is True, a2
        id_form = re.escape(t2.expected["work_order_id"]).replace("20251113", r"\d{8}")
        assert re.fullmatch(id_form, a2["work_order_id"]), a2
        assert a2["playbook_id"] == "pipeline_timeout_fix" and a2["status"] == "awaiting_patch", a2
        wo_id, run_id = a2["work_order_id"], a2["run_id"]

        # Test 3: the work orders: the one test 2 made, waiting for an agent (none runs with --no-story).
        a3 = _curl(commands[2])
        assert a3["count"] == 1 and [w["work_order_id"] for w in a3["work_orders"]] == [wo_id], a3
        (wo,) = a3["work_orders"]
        assert wo["status"] == "queued" and wo["self_healing_run_id"] == run_id, wo
        assert wo["context"]["suspect_file"] == "ingestion_pipeline.py", wo["context"]
        assert wo["leased_to"] is None and wo["attempts"] == 0, wo
        assert a3["stats"]["total_work_orders"] == 1 and a3["stats"]["queued"] == 1, a3["stats"]

        # Test 4: the spec's completion, for the work order test 2 made. The claim is accepted and the run
        # resumes, but nobody changed the code: deploy, rerun, and verification sees the same timeout.
        assert SPEC_WORK_ORDER in commands[3]
        a4 = _curl(commands[3].replace(SPEC_WORK_ORDER, wo_id))
        assert a4["success"] is True and a4["work_order_id"] == wo_id and a4["self_healing_run_id"] == run_id, a4
        assert a4["patch_result"]["tests_passed"] is True and a4["patch_result"]["files_changed"] == 2, a4

        def run() -> dict[str, Any]:
            detail: dict[str, Any] = http.get(f"{api}/patches/runs/{run_id}").json()
            return detail

        wait_for(lambda: run()["status"] in FINAL, timeout=60, interval=0.1)
        detail = run()
        assert detail["status"] == "needs_human", detail["timeline"]
        assert detail["work_order"]["status"] == "failed", detail["work_order"]
        assert detail["work_order"]["fail_reason"] == "verification_failed", detail["work_order"]
        last_trust = detail["trust"]["changes"][-1]
        assert last_trust["reason"] == "failed_verification" and last_trust["new"] < last_trust["old"], detail["trust"]
        # What verification saw is the service's own rerun of the 500 MB file, timing out as before.
        rerun = http.get(f"{svc}/admin/pipeline/runs").json()["runs"][-1]
        assert (rerun["file_path"], rerun["ok"], rerun["trigger"]) == ("archive_500mb.pdf", False, "api"), rerun
        # Nothing was applied to the service's repository: the claim had no diff behind it.
        assert git(copy, "rev-list", "--count", "HEAD").strip() == "1"
        assert git(copy, "status", "--porcelain") == ""

    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(30) == 0
    for child in ("mendloop", "sample_service"):
        assert not alive(demo.info[child]["pid"]), f"{child} still running after the demo stopped"
