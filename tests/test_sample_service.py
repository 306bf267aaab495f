"""End-to-end tests of examples/sample_service: faults are injected and healed through its HTTP API.

Every test starts the real service as a subprocess (stdlib only) on a free port with its own state
directory, and checks the effect of each capability through the API, serve.log and side_effects.jsonl.
Code faults are fixed in a temporary copy of the service directory, never in the repository.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port

pytestmark = pytest.mark.slow

SERVICE_DIR = Path(__file__).resolve().parent.parent / "examples" / "sample_service"
MB = 1024 * 1024
LOG_LINE = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} "

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never route 127.0.0.1 via a proxy


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def copy_service(dest: Path) -> Path:
    shutil.copytree(SERVICE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "state", ".git"))
    return dest


def run_unittests(service_dir: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-B", "-m", "unittest", "discover", "-s", "tests", "-v"],
        cwd=service_dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stderr


def run_stand_in(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-B", "fix_large_file_chunking.py", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class Service:
    def __init__(self, service_dir: Path, state_dir: Path, out_path: Path) -> None:
        self.service_dir = service_dir
        self.state_dir = state_dir
        self.out_path = out_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._out: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for _ in range(3):  # the free port may be taken between probing and binding
            self.port = free_port()
            self._out = open(self.out_path, "ab")  # closed in stop()
            self.proc = subprocess.Popen(
                [sys.executable, "-B", "service.py", "--port", str(self.port), "--state-dir", str(self.state_dir)],
                cwd=self.service_dir,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            try:
                self.wait_until(lambda h: True)
                return
            except AssertionError:
                if self.proc.poll() is None:
                    raise
                self._out.close()
        raise AssertionError(f"service did not start:\n{self.out_path.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._out is not None:
            self._out.close()

    def request(
        self, method: str, path: str, body: Any = None, *, key: str | None = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Idempotency-Key", key)
        try:
            with _OPENER.open(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, json.loads(err.read())

    def get(self, path: str) -> dict[str, Any]:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def post(self, path: str, body: Any = None, *, key: str | None = None, expect: int = 200) -> dict[str, Any]:
        status, resp = self.request("POST", path, body, key=key)
        assert status == expect, (path, status, resp)
        return resp

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool], deadline_s: float = 10.0) -> dict[str, Any]:
        """Poll /health until `predicate(health)` holds (connection errors count as not yet)."""
        deadline = time.monotonic() + deadline_s
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}")
            try:
                status, health = self.request("GET", "/health")
                if status == 200 and predicate(health):
                    return health
                last = health
            except (OSError, ValueError) as exc:  # refused / reset while (re)starting
                last = exc
            time.sleep(0.02)
        raise AssertionError(f"service not ready in {deadline_s}s (last: {last!r})")

    def restart(self, key: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        before = self.get("/health")
        resp = self.post("/admin/restart", key=key)
        after = self.wait_until(lambda h: h["boot_id"] != before["boot_id"])
        return resp, after

    def side_effects(self) -> list[dict[str, Any]]:
        path = self.state_dir / "side_effects.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.side_effects() if e["action"] == action]

    def serve_log(self) -> str:
        return (self.state_dir / "serve.log").read_text()


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def _start(service_dir: Path = SERVICE_DIR, name: str = "state") -> Service:
        svc = Service(service_dir, tmp_path / name, tmp_path / f"{name}.out")
        started.append(svc)
        svc.start()
        return svc

    yield _start
    for svc in started:
        svc.stop()


@pytest.fixture
def service(start_service: Callable[..., Service]) -> Service:
    return start_service()


def test_health_and_clean_json_errors(service: Service) -> None:
    health = service.get("/health")
    assert health["status"] == "ok"
    assert health["db_connected"] is True
    assert health["schema_valid"] is True
    assert health["pipeline_timeout_seconds"] == 300
    assert service.proc is not None
    assert health["pid"] == service.proc.pid
    assert health["code_version"] == sha12(SERVICE_DIR / "ingestion_pipeline.py")
    assert service.get("/admin/state")["config"] == {"pipeline_timeout_seconds": 300}

    status, body = service.request("GET", "/no/such/path")
    assert status == 404
    assert "error" in body
    status, body = service.request("POST", "/admin/faults/meteor_strike")
    assert status == 404
    assert "db_disconnect" in body["known_faults"]
    status, body = service.request("GET", "/admin/restart")
    assert status == 405
    assert body["allowed"] == ["POST"]
    status, body = service.request("POST", "/admin/config", raw=b'{"pipeline_timeout_seconds": ')
    assert (status, body["field"]) == (400, "body")
    status, body = service.request("POST", "/admin/config", raw=b"[1, 2]")
    assert (status, body["field"]) == (400, "body")
    for bad in ({}, {"pipeline_timeout_seconds": 0}, {"pipeline_timeout_seconds": "300"}):
        status, body = service.request("POST", "/admin/config", bad)
        assert status == 400
        assert body["field"] == "pipeline_timeout_seconds"
    status, body = service.request("POST", "/admin/faults/db_disconnect", {"reconnect_failures": -1})
    assert (status, body["field"]) == (400, "reconnect_failures")

    assert service.get("/health")["db_connected"] is True  # the rejected fault changed nothing
    assert service.side_effects() == []  # rejected requests have no side effects
    assert "Traceback" not in service.serve_log()


def test_db_disconnect_then_reconnect_with_backoff(service: Service) -> None:
    service.post("/admin/faults/db_disconnect", {"reconnect_failures": 2})
    health = service.get("/health")
    assert health["status"] == "degraded"
    assert health["db_connected"] is False
    assert re.search(LOG_LINE + r"ERROR: Database connection lost", service.serve_log(), re.MULTILINE)
    assert service.get("/admin/db/status")["connected"] is False

    assert service.post("/admin/db/close-stale")["closed"] == 2
    assert service.post("/admin/db/close-stale")["closed"] == 0

    statuses = []
    delay = 0.01
    for _ in range(5):  # exponential backoff between attempts
        status, body = service.request("POST", "/admin/db/reconnect")
        statuses.append(status)
        if status == 200:
            assert body["connected"] is True
            break
        assert body["connected"] is False
        time.sleep(delay)
        delay *= 2
    assert statuses == [503, 503, 200]

    db = service.get("/admin/db/status")
    assert db["connected"] is True
    assert db["reconnects"] == 1
    assert service.get("/health")["status"] == "ok"
    assert [e["status"] for e in service.actions("db.reconnect")] == [503, 503, 200]
    assert len(service.actions("fault.db_disconnect")) == 1
    assert [e["closed"] for e in service.actions("db.close_stale")] == [2, 0]


def test_memory_cleanup_keeps_the_critical_cache(service: Service) -> None:
    service.post("/admin/faults/fill_caches")
    health = service.get("/health")
    assert health["status"] == "degraded"
    assert "memory_over_limit" in health["problems"]
    caches = service.get("/admin/caches")
    by_name = {c["name"]: c for c in caches["caches"]}
    assert by_name["sessions"]["critical"] is True
    assert {n for n, c in by_name.items() if not c["critical"]} == {"thumbnails", "query_results", "page_renders"}
    assert caches["non_critical_bytes"] >= 30 * MB
    sessions_bytes = by_name["sessions"]["bytes"]
    assert sessions_bytes > 0

    status, body = service.request("POST", "/admin/caches/clear", {"include_critical": "no"})
    assert (status, body["field"]) == (400, "include_critical")
    cleared = service.post("/admin/caches/clear", {"include_critical": False})
    assert set(cleared["cleared"]) == {"thumbnails", "query_results", "page_renders"}
    assert cleared["freed_bytes"] == caches["non_critical_bytes"]
    after = service.get("/admin/caches")
    assert after["non_critical_bytes"] == 0
    assert {c["name"]: c["bytes"] for c in after["caches"]}["sessions"] == sessions_bytes

    memory = service.get("/admin/memory")
    assert {t["name"] for t in memory["background_tasks"] if t["status"] == "running"} == {
        "ingest_worker",
        "reindex",
        "thumbnail_warmup",
    }
    stopped = service.post("/admin/tasks/stop-background", {"priority": "low"})
    assert set(stopped["stopped"]) == {"reindex", "thumbnail_warmup"}
    memory = service.get("/admin/memory")
    running = {t["name"] for t in memory["background_tasks"] if t["status"] == "running"}
    assert running == {"ingest_worker"}
    assert memory["non_critical_cache_bytes"] == 0
    assert memory["cache_bytes"] == sessions_bytes
    assert service.get("/health")["status"] == "ok"
    assert service.actions("caches.clear")[0]["cleared"] == cleared["cleared"]


def test_schema_validate_backup_repair(service: Service) -> None:
    service.post("/admin/faults/corrupt_schema")
    assert service.get("/health")["schema_valid"] is False
    report = service.get("/admin/schema/validate")
    assert report["valid"] is False
    text = " ".join(report["problems"])
    assert "checksum" in text
    assert "page_count" in text
    assert re.search(LOG_LINE + r"ERROR: Schema validation failed", service.serve_log(), re.MULTILINE)

    backup = service.post("/admin/schema/backup")
    path = Path(backup["path"])
    assert path.is_file()
    assert path.resolve().is_relative_to(service.state_dir.resolve())
    saved = json.loads(path.read_text())
    assert saved["backup_id"] == backup["backup_id"]
    assert "checksum" not in saved["schema"]["columns"]  # the backup holds the schema as it was

    repaired = service.post("/admin/schema/repair")
    assert set(repaired["repaired"]) == {"checksum", "page_count"}
    fixed = service.get("/admin/schema/validate")
    assert (fixed["valid"], fixed["problems"]) == (True, [])
    assert service.get("/health")["status"] == "ok"
    assert [e["action"] for e in service.side_effects()] == ["fault.corrupt_schema", "schema.backup", "schema.repair"]


def test_low_timeout_is_a_config_fault(service: Service) -> None:
    fault = service.post("/admin/faults/low_timeout")
    assert fault["run"]["ok"] is False
    assert re.search(LOG_LINE + r"ERROR: Pipeline timeout after 20 seconds$", service.serve_log(), re.MULTILINE)
    assert service.get("/health")["pipeline_timeout_seconds"] == 20

    analysis = service.get("/admin/pipeline/timeout-analysis")
    assert analysis["cause"] == "config"
    assert analysis["recommended_timeout_seconds"] == 300
    assert analysis["details"]["file_size"] == "50MB"
    assert analysis["details"]["timeout_threshold"] == "20s"
    assert analysis["details"]["modeled_seconds"] < 300

    service.post("/admin/config", {"pipeline_timeout_seconds": analysis["recommended_timeout_seconds"]})
    rerun = service.post("/admin/pipeline/run")  # no body: re-runs the last failed file
    assert rerun["ok"] is True
    assert (rerun["file_path"], rerun["size_mb"], rerun["timeout_seconds"]) == ("report_50mb.pdf", 50, 300)
    assert 30 <= rerun["modeled_seconds"] <= 60
    assert service.get("/admin/pipeline/timeout-analysis")["cause"] == "none"
    assert service.get("/health")["status"] == "ok"
    assert re.search(LOG_LINE + r"INFO: Pipeline completed for report_50mb.pdf", service.serve_log(), re.MULTILINE)


def test_large_file_is_a_code_fault_fixed_by_the_stand_in(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    repo = copy_service(tmp_path / "repo")
    run_unittests(repo)  # the shipped tests pass on the buggy code
    svc = start_service(repo)

    fault = svc.post("/admin/faults/large_file")
    assert fault["run"]["ok"] is False
    assert fault["run"]["chunks"] == 8000
    assert re.search(LOG_LINE + r"ERROR: Pipeline timeout after 300 seconds$", svc.serve_log(), re.MULTILINE)
    analysis = svc.get("/admin/pipeline/timeout-analysis")
    assert analysis["cause"] == "code"
    assert analysis["suspect_file"] == "ingestion_pipeline.py"
    assert analysis["recommended_timeout_seconds"] is None
    details = analysis["details"]
    assert (details["file_size"], details["current_chunk_size"], details["timeout_threshold"]) == (
        "500MB",
        "64KB",
        "300s",
    )
    assert details["modeled_seconds"] > 300
    assert svc.post("/admin/pipeline/run")["ok"] is False  # retrying without a code change does not help

    old_version = svc.get("/health")["code_version"]
    fixed = run_stand_in(repo, str(repo))
    assert fixed.returncode == 0, fixed.stderr
    assert "patched" in fixed.stdout
    source = (repo / "ingestion_pipeline.py").read_text()
    assert "return CHUNK_SIZE_BYTES" not in source
    assert (repo / "tests" / "test_large_files.py").is_file()
    again = run_stand_in(repo)  # default path "."
    assert again.returncode == 0, again.stderr
    assert "already fixed" in again.stdout
    assert (repo / "ingestion_pipeline.py").read_text() == source
    assert "test_500mb_file_finishes_within_default_timeout" in run_unittests(repo)

    assert svc.get("/health")["code_version"] == old_version  # not deployed until restarted
    resp, health = svc.restart(key="deploy-1")
    assert resp["restarting"] is True
    assert health["code_version"] == sha12(repo / "ingestion_pipeline.py") != old_version
    assert svc.get("/admin/pipeline/timeout-analysis")["cause"] == "code"  # the old failed run is kept

    rerun = svc.post("/admin/pipeline/run")
    assert rerun["ok"] is True
    assert (rerun["file_path"], rerun["size_mb"]) == ("archive_500mb.pdf", 500)
    assert rerun["chunks"] == 200
    assert rerun["modeled_seconds"] <= 60
    assert svc.get("/admin/pipeline/timeout-analysis")["cause"] == "none"
    assert svc.get("/health")["status"] == "ok"
    assert "return CHUNK_SIZE_BYTES" in (SERVICE_DIR / "ingestion_pipeline.py").read_text()  # original untouched


def test_stand_in_fails_when_the_buggy_code_is_missing(tmp_path: Path) -> None:
    script = SERVICE_DIR / "fix_large_file_chunking.py"
    other = tmp_path / "other"
    other.mkdir()
    (other / "ingestion_pipeline.py").write_text("MB = 1 << 20\n\ndef chunk_size_for(n):\n    return n\n")
    for target in (other, tmp_path / "empty"):
        target.mkdir(exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-B", str(script), str(target)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 1
        assert proc.stderr.strip()
    assert (other / "ingestion_pipeline.py").read_text().endswith("return n\n")


def test_ingestion_data_fault_reset_then_retry(service: Service) -> None:
    service.post("/admin/faults/ingestion_failure", {"file_path": "book_123.pdf", "cause": "data"})
    assert re.search(
        LOG_LINE + r"ERROR: Ingestion failed for book_123\.pdf: Schema mismatch$", service.serve_log(), re.MULTILINE
    )
    assert service.get("/admin/ingestion/status")["failed"] == ["book_123.pdf"]
    analysis = service.get("/admin/ingestion/analysis")
    assert (analysis["cause"], analysis["file_path"]) == ("data", "book_123.pdf")
    assert "Schema mismatch" in analysis["error"]

    assert service.post("/admin/ingestion/retry", {"file_path": "book_123.pdf"})["ok"] is False  # still stuck
    assert service.post("/admin/ingestion/reset-state")["reset"] == ["book_123.pdf"]
    retry = service.post("/admin/ingestion/retry", {"file_path": "book_123.pdf"})
    assert retry["ok"] is True
    status = service.get("/admin/ingestion/status")
    assert "book_123.pdf" in status["completed"]
    assert status["failed"] == []
    assert service.get("/admin/ingestion/analysis")["cause"] == "none"
    assert service.get("/health")["status"] == "ok"
    status_code, body = service.request("POST", "/admin/ingestion/retry", {"file_path": "nope.pdf"})
    assert (status_code, body["field"]) == (404, "file_path")


def test_verification_data_fault_repair_then_rerun(service: Service) -> None:
    service.post("/admin/faults/verification_failure", {"cause": "data"})
    assert re.search(LOG_LINE + r"ERROR: Verification failed", service.serve_log(), re.MULTILINE)
    assert service.get("/admin/verification/analysis")["cause"] == "data"
    assert service.post("/admin/verification/rerun")["ok"] is False
    assert service.post("/admin/verification/repair-data")["repaired"] == ["doc-3"]
    assert service.post("/admin/verification/rerun")["ok"] is True
    assert service.get("/admin/verification/analysis")["cause"] == "none"
    assert service.get("/health")["status"] == "ok"


def test_code_and_logic_faults_need_code_patches(tmp_path: Path, start_service: Callable[..., Service]) -> None:
    repo = copy_service(tmp_path / "repo")
    svc = start_service(repo)
    svc.post("/admin/faults/ingestion_failure", {"file_path": "book_123.pdf", "cause": "code"})
    svc.post("/admin/faults/verification_failure", {"cause": "logic"})

    ingestion = svc.get("/admin/ingestion/analysis")
    assert ingestion["cause"] == "code"
    assert ingestion["details"]["suspect_file"] == "schema_validator.py"
    assert ingestion["details"]["fields"] == ["published_date"]
    verification = svc.get("/admin/verification/analysis")
    assert verification["cause"] == "logic"
    assert verification["details"]["suspect_file"] == "verification.py"

    # Data-level remedies do not help with code faults.
    assert svc.post("/admin/ingestion/reset-state")["reset"] == []
    assert svc.post("/admin/ingestion/retry", {"file_path": "book_123.pdf"})["ok"] is False
    assert svc.post("/admin/verification/repair-data")["repaired"] == []
    assert svc.post("/admin/verification/rerun")["ok"] is False

    validator = repo / "schema_validator.py"
    validator.write_text(validator.read_text().replace(r'r"^\d{4}/\d{2}/\d{2}$"', r'r"^\d{4}-\d{2}-\d{2}$"'))
    verifier = repo / "verification.py"
    verifier.write_text(
        verifier.read_text().replace('if not doc.get("page_count"):', 'if doc.get("page_count") is None:')
    )
    svc.restart()
    assert svc.post("/admin/ingestion/retry", {"file_path": "book_123.pdf"})["ok"] is True
    assert svc.post("/admin/verification/rerun")["ok"] is True
    assert svc.get("/health")["status"] == "ok"
    run_unittests(repo)


def test_idempotency_key_replays_without_a_second_side_effect(service: Service) -> None:
    first = service.post("/admin/faults/fill_caches", key="fill-1")
    second = service.post("/admin/faults/fill_caches", key="fill-1")
    assert (first["replayed"], second["replayed"]) == (False, True)
    assert {**second, "replayed": False} == first
    assert len(service.actions("fault.fill_caches")) == 1

    cleared = service.post("/admin/caches/clear", {"include_critical": False}, key="clear-1")
    replay = service.post("/admin/caches/clear", {"include_critical": False}, key="clear-1")
    assert replay["replayed"] is True
    assert replay["cleared"] == cleared["cleared"]
    assert replay["freed_bytes"] == cleared["freed_bytes"]
    entries = service.actions("caches.clear")
    assert len(entries) == 1
    assert entries[0]["idempotency_key"] == "clear-1"
    # The same key on another action is independent.
    assert service.post("/admin/tasks/stop-background", {"priority": "low"}, key="clear-1")["replayed"] is False

    # A failed attempt (503) is not stored: retrying with the same key really retries.
    service.post("/admin/faults/db_disconnect", {"reconnect_failures": 1})
    assert service.request("POST", "/admin/db/reconnect", key="rc-1")[0] == 503
    assert service.post("/admin/db/reconnect", key="rc-1")["replayed"] is False
    assert service.post("/admin/db/reconnect", key="rc-1")["replayed"] is True
    assert [e["status"] for e in service.actions("db.reconnect")] == [503, 200]
    assert service.get("/admin/db/status")["reconnects"] == 1


def test_restart_keeps_state_and_loads_a_new_process_image(service: Service) -> None:
    service.post("/admin/config", {"pipeline_timeout_seconds": 123})
    service.post("/admin/faults/fill_caches")
    before = service.get("/health")

    resp, after = service.restart(key="deploy-1")
    assert resp["restarting"] is True
    assert resp["pid"] == before["pid"]
    # os.execv replaces the process image in place: same pid (the supervisor keeps its handle), new boot.
    assert after["pid"] == before["pid"]
    assert after["boot_id"] != before["boot_id"]
    assert after["restarts"] == before["restarts"] + 1
    assert after["port"] == service.port
    assert after["pipeline_timeout_seconds"] == 123
    assert after["cache_bytes"] == before["cache_bytes"]
    assert service.get("/admin/state")["config"]["pipeline_timeout_seconds"] == 123

    replay = service.post("/admin/restart", key="deploy-1")
    assert replay["replayed"] is True
    time.sleep(0.3)  # give a (wrong) restart time to happen; the boot must not change
    assert service.get("/health")["boot_id"] == after["boot_id"]
    assert len(service.actions("restart")) == 1
    assert service.actions("restart")[0]["pid"] == before["pid"]
    assert re.search(LOG_LINE + r"INFO: Service started", service.serve_log(), re.MULTILINE)
    assert service.serve_log().count("Service started") == 2


def test_service_unittest_suite_passes(tmp_path: Path) -> None:
    output = run_unittests(copy_service(tmp_path / "repo"))
    assert re.search(r"Ran \d+ tests", output)
