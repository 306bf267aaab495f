"""`make heal-bench`'s harness, run on three of its scenarios end to end, exactly as the bench runs them (its CLI,
a real `mendloop serve`, the real importer, its watcher, playbooks and embedded agent runner with the stand-in
agent, then each scenario's own probe), so the bench cannot rot unnoticed:

- importer-db-lost: healed by a playbook; the probe finds the service working, and, in the control arm where
  nothing heals it, broken;
- importer-csv-quoting: a code bug fixed through a work order ("fix supplied"); the probe imports rent.csv and a
  quoted file mendloop never saw;
- importer-bom-bogus-fix: the obvious fix is wrong; it passes the tests, is committed and deployed, and mendloop's
  verification must catch it: the commit reverted, the incident handed to a human, the probe still finding the
  file refused, and no false heal counted.

The stand-in fix modules are checked apart: each honest one makes its regression test pass where it failed on
the shipped code, and the bogus one leaves the failing input failing."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.heal import __main__ as heal_bench
from bench.heal.harness import (
    BENCH_FIXES,
    IMPORTER,
    QUICKSTART,
    SAMPLE,
    Stage,
    control_probe,
    free_port,
    importer_config,
    model_agent,
)
from bench.heal.scenarios import SCENARIOS, STATEMENT, by_name
from mendloop.config import load_settings
from mendloop.intake.lines import Line
from mendloop.intake.logs import LogIntake
from mendloop.intake.multiline import Grouper
from tests.support import wait_for

SCENARIOS_RUN = ("importer-db-lost", "importer-csv-quoting", "importer-bom-bogus-fix")
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def scenario(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in report["scenarios"] if s["scenario"] == name)
    return found


def test_the_suite_covers_every_fault_class() -> None:
    classes = [s.fault_class for s in SCENARIOS]
    assert len(SCENARIOS) >= 12
    for needed in ("connection loss", "resource exhaustion", "config timeout", "flapping", "bogus fix"):
        assert needed in classes, needed
    assert {"corrupt data", "corrupt schema"} & set(classes)
    bugs = [s for s in SCENARIOS if s.fault_class == "code bug"]
    assert len({s.fix for s in bugs}) >= 4 and all(s.fix for s in bugs)
    assert {s.service for s in SCENARIOS} == {"importer", "sample"}


def test_three_scenarios_end_to_end_judged_by_their_probes(tmp_path: Path) -> None:
    """One run of the bench's CLI (the control arm is tested on its own below, to keep this quick)."""
    out = tmp_path / "results.json"
    argv = ["--only", ",".join(SCENARIOS_RUN), "--out", str(out), "--keep", str(tmp_path / "runs"), "--no-control"]
    code = heal_bench.main(argv)
    report: dict[str, Any] = json.loads(out.read_text())
    assert code == 0, json.dumps(report, indent=1)[-4000:]
    overall = report["overall"]
    assert overall == {**overall, "scenarios": 3, "healed": 2, "escalated": 1, "false_heals": 0, "errors": 0}
    assert overall["mean_time_to_heal_seconds"] > 0
    assert report["agent"] == "stand-in: fix supplied per bug"

    # A playbook's heal, confirmed by the probe.
    db = scenario(report, "importer-db-lost")
    assert (db["healed"], db["escalated"], db["false_heal"], db["outcome"]) == (True, False, False, "healed")
    assert db["probe"]["healthy"] and db["time_to_heal_seconds"] is not None
    assert [r["playbook"] for r in db["runs"]] == ["database_reconnect"] and db["agent"] is None

    # A code bug fixed through a work order; the probe also tries a quoted file mendloop never saw.
    bug = scenario(report, "importer-csv-quoting")
    assert bug["healed"] and not bug["false_heal"] and bug["agent"] == "fix supplied (stand-in agent)"
    (run,) = bug["runs"]
    assert (run["playbook"], run["status"], run["escalated_to_coding"], run["work_order"]) == (
        "code_fix",
        "completed",
        True,
        "completed",
    )
    checks = {c["check"]: c["ok"] for c in bug["probe"]["checks"]}
    assert checks["rent.csv imports 3 rows, 223550 cents"] and checks["probe-quoted.csv imports 2 rows, 101200 cents"]
    assert bug["code_at_base"] is False

    # The obvious fix is wrong: it passed the tests and was committed (verification, not the test run, caught it),
    # then reverted; the incident is a human's; the probe still finds the file refused; no false heal.
    bogus = scenario(report, "importer-bom-bogus-fix")
    assert (bogus["healed"], bogus["escalated"], bogus["false_heal"], bogus["outcome"]) == (
        False,
        True,
        False,
        "escalated",
    )
    (run,) = bogus["runs"]
    assert run["status"] == "needs_human" and run["work_order"] == "failed"
    assert "verification failed at step 'verify_fix'" in run["error"]
    assert bogus["commits"][0].startswith("Revert ") and len(bogus["commits"]) == 3
    assert bogus["code_at_base"] is True and bogus["probe"]["healthy"] is False
    failed = [c["check"] for c in bogus["probe"]["checks"] if not c["ok"]]
    assert failed == ["statement.csv imports 2 rows, 330 cents", "probe-bom.csv imports 1 rows, 100 cents"]


def test_the_control_arm_leaves_the_fault_and_the_probe_sees_it(tmp_path: Path) -> None:
    """With nothing healing it (no mendloop runs), the same probe fails on the checks a heal must pass: a
    probe that passed here could not tell a heal from none."""
    (db,) = by_name(["importer-db-lost"])
    control = control_probe(db, tmp_path / "control")
    assert control["detects_fault"] is True, control
    assert "/healthz ok, database connected" in control["failed_checks"]
    assert "utilities.csv imports 2 rows, 11605 cents" in control["failed_checks"]


def _unittest(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-B", "-m", "unittest", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("service", "fix"),
    [
        (IMPORTER, "fix_bom_header"),
        (SAMPLE, "fix_iso_dates"),
        (SAMPLE, "fix_empty_documents"),
    ],
)
def test_each_honest_fix_makes_its_failing_regression_test_pass(tmp_path: Path, service: Path, fix: str) -> None:
    sys.path.insert(0, str(BENCH_FIXES))
    try:
        module = importlib.import_module(fix)
    finally:
        sys.path.remove(str(BENCH_FIXES))
    repo = tmp_path / "repo"
    shutil.copytree(service, repo, ignore=shutil.ignore_patterns("state", "__pycache__"))
    target = Path(module.find_target(str(repo)))
    test_file = target.parent / module.TEST_PATH
    test_file.write_text(module.REGRESSION_TEST)
    test_name = "tests." + test_file.stem
    assert _unittest(repo, test_name).returncode != 0  # a real bug: the regression test fails on the shipped code
    patched, already = module.patch_source(target.read_text())
    assert not already
    target.write_text(patched)
    assert module.patch_source(patched) == (patched, True)
    done = _unittest(repo, "discover", "-s", "tests")
    assert done.returncode == 0, done.stderr


def test_the_bogus_fix_passes_its_own_test_and_leaves_the_file_refused(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH_FIXES))
    try:
        bogus = importlib.import_module("bogus_header_case")
    finally:
        sys.path.remove(str(BENCH_FIXES))
    repo = tmp_path / "repo"
    shutil.copytree(IMPORTER, repo, ignore=shutil.ignore_patterns("state", "__pycache__"))
    target = repo / "parsing.py"
    target.write_text(bogus.patch_source(target.read_text())[0])
    (repo / bogus.TEST_PATH).write_text(bogus.REGRESSION_TEST)
    assert _unittest(repo, "discover", "-s", "tests").returncode == 0
    check = f"import parsing; parsing.parse_rows('statement.csv', {STATEMENT!r})"
    done = subprocess.run(
        [sys.executable, "-B", "-c", check], cwd=repo, capture_output=True, text=True, env=ENV, timeout=60, check=False
    )
    assert done.returncode != 0 and "the header must be" in done.stderr


def test_every_sample_fault_the_bench_injects_is_detected_by_the_quickstart_patterns(tmp_path: Path) -> None:
    """The sample service's real log lines for each fault the bench injects, matched by examples/quickstart.yaml's
    watcher: memory pressure was missed while its pattern wanted "146 MB" where the service writes "146MB"."""
    port, state = free_port(), tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-B", str(SAMPLE / "service.py"), "--port", str(port), "--state-dir", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 20, 0.05)
        faults = [
            ("db_disconnect", {}),
            ("fill_caches", {}),
            ("corrupt_schema", {}),
            ("low_timeout", {}),
            ("ingestion_failure", {"cause": "data"}),
            ("verification_failure", {"cause": "logic"}),
        ]
        for name, body in faults:
            assert httpx.post(f"{url}/admin/faults/{name}", json=body, timeout=10).status_code == 200, name
    finally:
        proc.terminate()
        proc.wait(10)
    intake = LogIntake(load_settings(QUICKSTART))
    grouper, lines, at = Grouper(), [], 0
    for raw in (state / "serve.log").read_text(encoding="utf-8").splitlines():
        lines.append(Line("serve.log", raw, at, at + len(raw) + 1, False, 0.0))
        at += len(raw) + 1
    records = [r.text for r in grouper.feed(lines) + grouper.flush()]
    found = intake.detect_lines(records, matcher=intake.matchers["sample_service"], source="test")
    assert [d.error_type for d in found] == [
        "database_connection",
        "memory_pressure",
        "schema_invalid",
        "pipeline_timeout",
        "schema_mismatch",
        "verification_failed",
    ]


@pytest.mark.parametrize("agent", ["openai", "aider"])
def test_with_a_model_url_the_code_bugs_go_to_that_model_through_a_valid_config(tmp_path: Path, agent: str) -> None:
    """MENDLOOP_BENCH_MODEL_URL wires the `openai` adapter (or aider) in the config the bench writes; no model
    runs here, so this checks that the config is one `serve` accepts, with the endpoint where the adapter reads
    it."""
    env = {
        "MENDLOOP_BENCH_MODEL_URL": "http://127.0.0.1:9/v1",
        "MENDLOOP_BENCH_MODEL": "qwen2.5-coder",
        "MENDLOOP_BENCH_AGENT": agent,
    }
    model = model_agent(env)
    assert model is not None and not model.stand_in and model.adapter == agent
    assert model_agent({}) is None
    (bug,) = by_name(["importer-csv-quoting"])
    stage = Stage(bug, tmp_path, model, {}, python=sys.executable, service_port=8301, api_port=8001)
    stage.repo.mkdir()
    path = tmp_path / "mendloop.yaml"
    path.write_text(yaml.safe_dump(importer_config(stage)))
    runner = load_settings(path).agent_runner
    assert runner.enabled and runner.adapter == agent and runner.repository == str(stage.repo)
    if agent == "openai":
        assert runner.argv[:4] == ["--base-url", "http://127.0.0.1:9/v1", "--model", "qwen2.5-coder"]
    else:
        assert runner.argv == ["--model", "openai/qwen2.5-coder"]
        assert dict(model.env)["OPENAI_API_BASE"] == "http://127.0.0.1:9/v1"
