"""The six built-in playbooks against the real sample service, on SQLite and PostgreSQL.

Each test starts examples/sample_service as a subprocess on a free 127.0.0.1 port with its own state directory,
injects a fault through `POST /admin/faults/<name>`, and lets mendloop (an `App` with its worker threads, bound to
the service by examples/quickstart.yaml) heal it. The repair is judged through the service itself (its admin API,
`side_effects.jsonl`, schema backups on disk), not by mendloop's own account. Code faults are patched in a copy of
the service directory, so the checkout is never modified.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.app import App
from mendloop.domain.records import Run
from mendloop.domain.states import RUN_SETTLED, RunStatus, StepStatus, WorkOrderStatus
from tests.support import free_port, open_app, settings_for, wait_for, wait_status

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SERVICE_DIR = ROOT / "examples" / "sample_service"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
TARGET = "sample_service"
MB = 1024 * 1024
# The idempotency key mendloop sends with every call: run_id:step_id:attempt.
KEY = re.compile(r"^(?P<run>run_\d{8}_\d{6}_\d{6}):(?P<step>[a-z][a-z0-9_.-]*):(?P<attempt>[1-9]\d*)$")
# Trust with the default weights (mendloop/domain/trust.py): starts at 1.0; an incident multiplies it by 0.75, a
# verified fix moves it halfway to 1, a failed verification multiplies it by 0.6.
AFTER_INCIDENT = 0.75
AFTER_VERIFIED_FIX = 0.875
AFTER_FAILED_VERIFICATION = 0.45


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class SampleService:
    """The sample service as a subprocess, and a client for its admin API."""

    def __init__(self, service_dir: Path, state_dir: Path, out_path: Path) -> None:
        self.service_dir = service_dir
        self.state_dir = state_dir
        self.out_path = out_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(timeout=10, trust_env=False)  # never route 127.0.0.1 through a proxy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for _ in range(3):  # the probed port may be taken before the service binds it
            self.port = free_port()
            with self.out_path.open("ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-B", "service.py", "--port", str(self.port), "--state-dir", str(self.state_dir)],
                    cwd=self.service_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_for(self._answers, timeout=15)
                return
            except AssertionError:
                if self.proc.poll() is None:
                    raise
        raise AssertionError(f"the sample service did not start:\n{self.out_path.read_text(errors='replace')}")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the sample service exited with {self.proc.returncode}")
        try:
            return self.client.get(self.url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def get(self, path: str) -> dict[str, Any]:
        resp = self.client.get(self.url + path)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        body: dict[str, Any] = resp.json()
        return body

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = self.client.post(self.url + path, json=body or {})
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        answer: dict[str, Any] = resp.json()
        return answer

    def inject(self, fault: str, **body: Any) -> dict[str, Any]:
        answer = self.post(f"/admin/faults/{fault}", body)
        assert answer["injected"] is True
        return answer

    def side_effects(self) -> list[dict[str, Any]]:
        path = self.state_dir / "side_effects.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.side_effects() if e["action"] == action]


@dataclass
class Rig:
    service: SampleService
    app: App

    def trigger(self, error_type: str, description: str, **kw: Any) -> str:
        run, created = self.app.remediation.trigger(error_type=error_type, description=description, **kw)
        assert created
        return run.id

    def settle(self, run_id: str) -> Run:
        """Wait until the run finishes or parks for a patch (polling with a deadline)."""
        wait_status(self.app, run_id, *RUN_SETTLED, timeout=30)
        return self.app.store.get_run(run_id)

    def steps(self, run_id: str) -> list[tuple[str, int, StepStatus]]:
        return [(s.step_id, s.attempt, s.status) for s in self.app.store.run_steps(run_id)]

    def trust(self) -> float:
        return self.app.store.trust_score(TARGET)

    def trust_moves(self, run_id: str) -> list[tuple[str, float, float]]:
        return [(c.reason, c.old, c.new) for c in self.app.store.trust_history(TARGET, run_id=run_id)]

    def work_orders(self) -> int:
        return self.app.store.list_work_orders()[1]

    def run_effects(self, run_id: str) -> list[dict[str, Any]]:
        """The service's side effects caused by this run; each idempotency key at most once per action, and each
        the key of a step attempt mendloop recorded. Every side effect other than the test's fault injections
        carries a key of this run."""
        effects = self.service.side_effects()
        for e in effects:
            if not e["action"].startswith("fault."):
                assert (e["idempotency_key"] or "").startswith(run_id + ":"), e
        mine = [e for e in effects if (e["idempotency_key"] or "").startswith(run_id + ":")]
        pairs = [(e["action"], e["idempotency_key"]) for e in mine]
        assert len(pairs) == len(set(pairs)), f"an idempotency key was applied twice: {pairs}"
        recorded = {s.idempotency_key: s for s in self.app.store.run_steps(run_id)}
        for e in mine:
            match = KEY.match(e["idempotency_key"])
            assert match is not None and match["run"] == run_id, e
            step = recorded.get(e["idempotency_key"])
            assert step is not None, f"no recorded step attempt for {e['idempotency_key']}"
            assert (step.step_id, step.attempt) == (match["step"], int(match["attempt"]))
        return mine


def copy_service(dest: Path) -> Path:
    shutil.copytree(SERVICE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "state", ".git"))
    return dest


def quickstart_targets(base_url: str) -> dict[str, Any]:
    config = yaml.safe_load(QUICKSTART.read_text())
    config.pop("database_url")
    config["targets"][TARGET]["base_url"] = base_url
    return config


@pytest.fixture
def rig(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """Start the sample service (from the checkout, or from a given copy) and an App healing it."""
    services: list[SampleService] = []
    apps: list[App] = []

    def _make(service_dir: Path = SERVICE_DIR) -> Rig:
        service = SampleService(service_dir, tmp_path / "state", tmp_path / "service.out")
        services.append(service)
        service.start()
        config = quickstart_targets(service.url)
        settings = settings_for(
            database_url, tmp_path, targets=config["targets"], default_target=config["default_target"]
        )
        app = open_app(settings, start_workers=True)
        apps.append(app)
        return Rig(service, app)

    yield _make
    for app in apps:
        app.close()
    for service in services:
        service.stop()


def assert_completed_without_escalation(r: Rig, run: Run) -> None:
    assert run.status is RunStatus.COMPLETED, run.error
    assert not run.escalated and run.coding_work_order_id is None
    assert r.work_orders() == 0
    assert r.trust() == AFTER_VERIFIED_FIX
    assert r.trust_moves(run.id) == [
        ("incident", 1.0, AFTER_INCIDENT),
        ("verified_fix", AFTER_INCIDENT, AFTER_VERIFIED_FIX),
    ]
    assert r.service.get("/health")["status"] == "ok"


# -- retry: database_reconnect ----------------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [0, 2], ids=["first-try", "two-refusals"])
def test_database_reconnect_backs_off_and_retries_until_connected(rig: Callable[..., Rig], failures: int) -> None:
    r = rig()
    r.service.inject("db_disconnect", reconnect_failures=failures)
    assert r.service.get("/admin/db/status")["connected"] is False

    run_id = r.trigger("database_connection", "Database connection lost")
    run = r.settle(run_id)
    assert_completed_without_escalation(r, run)

    db = r.service.get("/admin/db/status")
    assert db["connected"] is True
    assert (db["reconnects"], db["stale_connections"], db["reconnect_failures_remaining"]) == (1, 0, 0)

    ok, failed = StepStatus.SUCCEEDED, StepStatus.FAILED
    tries = failures + 1
    assert r.steps(run_id) == [
        ("close_stale_connections", 1, ok),
        ("backoff", 1, ok),
        *[("reconnect", n, failed) for n in range(1, tries)],
        ("reconnect", tries, ok),
        ("verify_connection", 1, ok),
    ]
    attempts = [s for s in r.app.store.run_steps(run_id) if s.step_id == "reconnect"]
    assert [s.output["status_code"] for s in attempts] == [503] * failures + [200]
    # Exponential backoff between the attempts: 0.2 s, then 0.4 s, each ±20 % jitter.
    gaps = [b.started_at - a.finished_at for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.2 * 2**n * 0.8 for n, gap in enumerate(gaps)), gaps

    effects = r.run_effects(run_id)
    reconnects = [e for e in effects if e["action"] == "db.reconnect"]
    assert [(e["status"], e["idempotency_key"]) for e in reconnects] == [
        (503 if n < tries else 200, f"{run_id}:reconnect:{n}") for n in range(1, tries + 1)
    ]
    assert [e["idempotency_key"] for e in effects if e["action"] == "db.close_stale"] == [
        f"{run_id}:close_stale_connections:1"
    ]


# -- cache clear: memory_cleanup --------------------------------------------------------------------------------


def test_memory_cleanup_empties_non_critical_caches_keeps_sessions_and_stops_low_priority_tasks(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.service.inject("fill_caches")
    before = {c["name"]: c for c in r.service.get("/admin/caches")["caches"]}
    assert before["sessions"]["critical"] is True and before["sessions"]["bytes"] == 12 * MB
    assert r.service.get("/admin/memory")["over_limit"] is True

    run_id = r.trigger("memory_pressure", "Memory pressure: caches over the limit")
    run = r.settle(run_id)
    assert_completed_without_escalation(r, run)

    caches = r.service.get("/admin/caches")
    sizes = {c["name"]: c["bytes"] for c in caches["caches"]}
    assert sizes == {"sessions": 12 * MB, "thumbnails": 0, "query_results": 0, "page_renders": 0}
    assert caches["non_critical_bytes"] == 0
    memory = r.service.get("/admin/memory")
    tasks = {t["name"]: t["status"] for t in memory["background_tasks"]}
    assert tasks == {"ingest_worker": "running", "reindex": "stopped", "thumbnail_warmup": "stopped"}
    assert (memory["non_critical_cache_bytes"], memory["over_limit"]) == (0, False)

    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("caches.clear", f"{run_id}:clear_caches:1"),
        ("tasks.stop_background", f"{run_id}:stop_background_tasks:1"),
    ]
    assert effects[0]["include_critical"] is False
    assert set(effects[0]["cleared"]) == {"thumbnails", "query_results", "page_renders"}
    assert (effects[1]["priority"], set(effects[1]["stopped"])) == ("low", {"reindex", "thumbnail_warmup"})


# -- data fix: schema_recovery ----------------------------------------------------------------------------------


def test_schema_recovery_backs_up_the_broken_schema_then_repairs_it(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.service.inject("corrupt_schema")
    assert r.service.get("/admin/schema/validate")["valid"] is False

    run_id = r.trigger("schema_invalid", "Schema validation failed")
    run = r.settle(run_id)
    assert_completed_without_escalation(r, run)

    report = r.service.get("/admin/schema/validate")
    assert (report["valid"], report["problems"]) == (True, [])
    backups = list((r.service.state_dir / "schema_backups").glob("*.json"))
    assert len(backups) == 1
    saved = json.loads(backups[0].read_text())
    assert "checksum" not in saved["schema"]["columns"]  # the schema as it was before the repair
    assert saved["schema"]["columns"]["page_count"]["type"] == "text"

    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("schema.backup", f"{run_id}:backup_schema:1"),
        ("schema.repair", f"{run_id}:apply_fix:1"),
    ]
    assert Path(effects[0]["path"]) == backups[0]
    assert set(effects[1]["repaired"]) == {"checksum", "page_count"}


# -- data fix: ingestion_replay ---------------------------------------------------------------------------------


def test_ingestion_replay_data_cause_resets_and_retries_without_escalation(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.service.inject("ingestion_failure", file_path="book_123.pdf", cause="data")
    assert r.service.get("/admin/ingestion/status")["failed"] == ["book_123.pdf"]

    # No file_path in the trigger: the playbook takes it from the service's analysis.
    run_id = r.trigger("ingestion_failed", "Ingestion failed: Schema mismatch")
    run = r.settle(run_id)
    assert_completed_without_escalation(r, run)
    skipped = {s for s, _, status in r.steps(run_id) if status is StepStatus.SKIPPED}
    assert skipped == {"escalate_code_fix", "deploy_patch", "wait_healthy"}

    status = r.service.get("/admin/ingestion/status")
    assert "book_123.pdf" in status["completed"] and status["failed"] == []
    assert r.service.get("/admin/ingestion/analysis?file_path=book_123.pdf")["cause"] == "none"

    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("caches.clear", f"{run_id}:clear_cache:1"),
        ("ingestion.reset_state", f"{run_id}:reset_state:1"),
        ("ingestion.retry", f"{run_id}:retry_ingestion:1"),
    ]
    assert effects[1]["reset"] == ["book_123.pdf"]
    assert (effects[2]["file_path"], effects[2]["ok"]) == ("book_123.pdf", True)


def test_ingestion_replay_code_cause_escalates_then_the_patch_is_deployed_and_verified(
    rig: Callable[..., Rig], tmp_path: Path
) -> None:
    repo = copy_service(tmp_path / "repo")
    r = rig(repo)
    r.service.inject("ingestion_failure", file_path="book_123.pdf", cause="code")
    boot = r.service.get("/health")["boot_id"]

    run_id = r.trigger("ingestion_failed", "Ingestion failed for book_123.pdf", file_path="book_123.pdf")
    run = r.settle(run_id)
    assert run.status is RunStatus.AWAITING_PATCH, run.error
    assert run.escalated and run.coding_work_order_id
    wo = r.app.store.get_work_order(run.coding_work_order_id)
    assert (wo.status, wo.self_healing_run_id, wo.playbook_id) == (WorkOrderStatus.QUEUED, run_id, "ingestion_replay")
    assert wo.description.startswith("Fix schema validation logic (Schema mismatch")
    assert wo.context["error_type"] == "ingestion_failed"
    assert wo.context["analysis"]["cause"] == "code"
    assert wo.context["analysis"]["details"]["suspect_file"] == "schema_validator.py"
    assert r.trust() == AFTER_INCIDENT
    assert r.run_effects(run_id) == []  # parked before touching the service
    assert r.service.get("/admin/ingestion/status")["failed"] == ["book_123.pdf"]

    # The coding agent's patch: the date check wants ISO dates.
    validator = repo / "schema_validator.py"
    validator.write_text(validator.read_text().replace(r'r"^\d{4}/\d{2}/\d{2}$"', r'r"^\d{4}-\d{2}-\d{2}$"'))
    r.app.remediation.complete_work_order(wo.id, tests_passed=True, files_changed=1, diff_url=None)
    run = r.settle(run_id)
    assert run.status is RunStatus.COMPLETED, run.error

    health = r.service.get("/health")
    assert health["boot_id"] != boot and health["status"] == "ok"
    assert health["code_versions"]["schema_validator.py"] == sha12(validator)
    assert "book_123.pdf" in r.service.get("/admin/ingestion/status")["completed"]
    assert r.trust() == AFTER_VERIFIED_FIX
    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("restart", f"{run_id}:deploy_patch:1"),
        ("caches.clear", f"{run_id}:clear_cache:1"),
        ("ingestion.reset_state", f"{run_id}:reset_state:1"),
        ("ingestion.retry", f"{run_id}:retry_ingestion:1"),
    ]
    assert (effects[3]["file_path"], effects[3]["ok"]) == ("book_123.pdf", True)


# -- hybrid: pipeline_timeout_fix -------------------------------------------------------------------------------


def test_pipeline_timeout_config_cause_raises_the_timeout_without_escalation(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.service.inject("low_timeout")
    assert r.service.get("/admin/config")["pipeline_timeout_seconds"] == 20

    run_id = r.trigger("pipeline_timeout", "ERROR: Pipeline timeout after 20 seconds")
    run = r.settle(run_id)
    assert_completed_without_escalation(r, run)
    assert ("escalate_code_fix", 1, StepStatus.SKIPPED) in r.steps(run_id)

    assert r.service.get("/admin/config")["pipeline_timeout_seconds"] == 300
    assert r.service.get("/admin/pipeline/timeout-analysis")["cause"] == "none"
    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("config.update", f"{run_id}:increase_timeout:1"),
        ("pipeline.run", f"{run_id}:rerun_pipeline:1"),
    ]
    assert (effects[0]["previous"], effects[0]["pipeline_timeout_seconds"]) == (20, 300)
    assert (effects[1]["file_path"], effects[1]["ok"], effects[1]["timeout_seconds"]) == ("report_50mb.pdf", True, 300)


def _escalated_pipeline_timeout(r: Rig) -> tuple[str, str]:
    """Inject the large-file fault, let the playbook escalate; returns the run id and the work order id."""
    r.service.inject("large_file")
    run_id = r.trigger("pipeline_timeout", "ERROR: Pipeline timeout after 300 seconds")
    run = r.settle(run_id)
    assert run.status is RunStatus.AWAITING_PATCH, run.error
    assert run.escalated and run.coding_work_order_id
    wo = r.app.store.get_work_order(run.coding_work_order_id)
    assert (wo.status, wo.self_healing_run_id, wo.playbook_id) == (
        WorkOrderStatus.QUEUED,
        run_id,
        "pipeline_timeout_fix",
    )
    assert wo.description == "Code patch required for: pipeline_timeout (ingestion_pipeline.py)"
    assert (wo.priority, wo.estimated_complexity) == ("high", "medium")
    assert wo.context["error_type"] == "pipeline_timeout"
    assert wo.context["suspect_file"] == "ingestion_pipeline.py"
    analysis = wo.context["analysis"]
    assert (analysis["file_size"], analysis["current_chunk_size"], analysis["timeout_threshold"]) == (
        "500MB",
        "64KB",
        "300s",
    )
    assert (analysis["file_path"], analysis["chunks"]) == ("archive_500mb.pdf", 8000)
    assert analysis["modeled_seconds"] > 300
    assert ("increase_timeout", 1, StepStatus.SKIPPED) in r.steps(run_id)
    assert r.service.get("/admin/config")["pipeline_timeout_seconds"] == 300  # the config was left alone
    assert r.run_effects(run_id) == []
    assert r.trust() == AFTER_INCIDENT
    types = [e.type for e in r.app.store.run_events(run_id)]
    assert {"coding_agent.work_order_created", "self_healing.escalated"} <= set(types)
    assert "self_healing.completed" not in types
    return run_id, wo.id


def test_pipeline_timeout_code_cause_escalates_and_a_deployed_patch_restores_trust(
    rig: Callable[..., Rig], tmp_path: Path
) -> None:
    repo = copy_service(tmp_path / "repo")
    r = rig(repo)
    before = r.service.get("/health")
    run_id, wo_id = _escalated_pipeline_timeout(r)

    fix = subprocess.run(
        [sys.executable, "-B", "fix_large_file_chunking.py"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert fix.returncode == 0, fix.stderr
    assert r.service.get("/health")["code_version"] == before["code_version"]  # not deployed yet
    answer = r.app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=2, diff_url=None)
    assert answer["status"] == "completed"
    run = r.settle(run_id)
    assert run.status is RunStatus.COMPLETED, run.error

    after = r.service.get("/health")
    assert after["boot_id"] != before["boot_id"]
    assert after["restarts"] == before["restarts"] + 1
    assert after["code_version"] == sha12(repo / "ingestion_pipeline.py") != before["code_version"]
    assert after["status"] == "ok"
    # The deploy step returned only once the new process answered: the boot it saw is the one running now.
    (deploy,) = [s for s in r.app.store.run_steps(run_id) if s.step_id == "deploy_patch"]
    assert (deploy.output["json"]["old_boot_id"], deploy.output["json"]["boot_id"]) == (
        before["boot_id"],
        after["boot_id"],
    )
    last = r.service.get("/admin/pipeline/runs")["runs"][-1]
    assert (last["file_path"], last["ok"], last["chunks"]) == ("archive_500mb.pdf", True, 200)
    assert r.service.get("/admin/pipeline/timeout-analysis")["cause"] == "none"

    assert r.trust() == AFTER_VERIFIED_FIX
    assert r.trust_moves(run_id) == [
        ("incident", 1.0, AFTER_INCIDENT),
        ("verified_fix", AFTER_INCIDENT, AFTER_VERIFIED_FIX),
    ]
    messages = [e.message for e in r.app.store.run_events(run_id)]
    assert "Trust restored: 0.75 → 0.88" in messages
    assert f"Run {run_id} completed: pipeline_timeout_fix finished after the coding agent's patch" in messages
    assert any(m.startswith("Code patch applied by the coding agent (2 files changed)") for m in messages)
    assert r.app.store.get_work_order(wo_id).status is WorkOrderStatus.COMPLETED

    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("restart", f"{run_id}:deploy_patch:1"),
        ("pipeline.run", f"{run_id}:rerun_pipeline:1"),
    ]
    assert effects[1]["ok"] is True
    assert "return CHUNK_SIZE_BYTES" in (SERVICE_DIR / "ingestion_pipeline.py").read_text()  # checkout untouched


def test_pipeline_timeout_claimed_fix_that_was_never_applied_needs_a_human(rig: Callable[..., Rig]) -> None:
    r = rig()  # no code is changed: the checkout is only restarted, never written
    before = r.service.get("/health")
    run_id, wo_id = _escalated_pipeline_timeout(r)

    r.app.remediation.complete_work_order(wo_id, tests_passed=True, files_changed=1, diff_url=None)
    run = r.settle(run_id)
    assert run.status is RunStatus.NEEDS_HUMAN
    assert "verification failed" in (run.error or "")

    after = r.service.get("/health")
    assert after["boot_id"] != before["boot_id"]  # deployed ...
    assert after["code_version"] == before["code_version"]  # ... the same code
    last = r.service.get("/admin/pipeline/runs")["runs"][-1]
    assert (last["file_path"], last["ok"], last["chunks"]) == ("archive_500mb.pdf", False, 8000)
    assert r.service.get("/admin/pipeline/timeout-analysis")["cause"] == "code"

    assert r.trust() == AFTER_FAILED_VERIFICATION
    assert r.trust_moves(run_id) == [
        ("incident", 1.0, AFTER_INCIDENT),
        ("failed_verification", AFTER_INCIDENT, AFTER_FAILED_VERIFICATION),
    ]
    assert "Trust lowered: 0.75 → 0.45" in [e.message for e in r.app.store.run_events(run_id)]
    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("restart", f"{run_id}:deploy_patch:1"),
        ("pipeline.run", f"{run_id}:rerun_pipeline:1"),
    ]
    assert effects[1]["ok"] is False


# -- code patch: verification_fix -------------------------------------------------------------------------------


def test_verification_fix_data_cause_repairs_the_data_without_escalation(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.service.inject("verification_failure", cause="data")
    assert r.service.get("/admin/verification/analysis")["cause"] == "data"

    run_id = r.trigger("verification_failed", "Verification failed for doc-3")
    run = r.settle(run_id)
    assert_completed_without_escalation(r, run)
    assert ("escalate_code_fix", 1, StepStatus.SKIPPED) in r.steps(run_id)

    analysis = r.service.get("/admin/verification/analysis")
    assert analysis["cause"] == "none"
    assert analysis["details"]["last_run"]["ok"] is True
    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("verification.repair_data", f"{run_id}:repair_data:1"),
        ("verification.rerun", f"{run_id}:rerun_verification:1"),
    ]
    assert (effects[0]["repaired"], effects[0]["unrepairable"]) == (["doc-3"], [])
    assert (effects[1]["ok"], effects[1]["problems"]) == (True, 0)


def test_verification_fix_logic_cause_escalates_then_the_patch_is_deployed_and_verified(
    rig: Callable[..., Rig], tmp_path: Path
) -> None:
    repo = copy_service(tmp_path / "repo")
    r = rig(repo)
    r.service.inject("verification_failure", cause="logic")
    boot = r.service.get("/health")["boot_id"]

    run_id = r.trigger("verification_failed", "Verification failed for doc-empty")
    run = r.settle(run_id)
    assert run.status is RunStatus.AWAITING_PATCH, run.error
    assert run.escalated and run.coding_work_order_id
    assert ("repair_data", 1, StepStatus.SKIPPED) in r.steps(run_id)
    wo = r.app.store.get_work_order(run.coding_work_order_id)
    assert (wo.status, wo.self_healing_run_id, wo.playbook_id) == (WorkOrderStatus.QUEUED, run_id, "verification_fix")
    assert wo.context["analysis"]["cause"] == "logic"
    assert wo.context["analysis"]["details"]["suspect_file"] == "verification.py"
    assert r.run_effects(run_id) == []
    assert r.trust() == AFTER_INCIDENT

    # The coding agent's patch: a page count of 0 is a value, not a missing one.
    verifier = repo / "verification.py"
    verifier.write_text(
        verifier.read_text().replace('if not doc.get("page_count"):', 'if doc.get("page_count") is None:')
    )
    r.app.remediation.complete_work_order(wo.id, tests_passed=True, files_changed=1, diff_url=None)
    run = r.settle(run_id)
    assert run.status is RunStatus.COMPLETED, run.error

    health = r.service.get("/health")
    assert health["boot_id"] != boot and health["status"] == "ok"
    assert health["code_versions"]["verification.py"] == sha12(verifier)
    assert r.service.get("/admin/verification/analysis")["cause"] == "none"
    assert r.trust() == AFTER_VERIFIED_FIX
    effects = r.run_effects(run_id)
    assert [(e["action"], e["idempotency_key"]) for e in effects] == [
        ("restart", f"{run_id}:deploy_patch:1"),
        ("verification.rerun", f"{run_id}:rerun_verification:1"),
    ]
    assert effects[1]["ok"] is True
