"""The second example service, examples/importer_service: its admin API through real HTTP on 127.0.0.1 (a real
process, a real SQLite file), the log it writes (read by mendloop's own grouper and the patterns of its
mendloop.yaml), its own unittest tests, and its stand-in fix driven by examples/agents/demo_fix.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mendloop.config import load_settings
from mendloop.intake import log_prefix
from mendloop.intake.lines import Line
from mendloop.intake.logs import LogIntake
from mendloop.intake.multiline import Grouper
from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "examples" / "importer_service"
DEMO_FIX = ROOT / "examples" / "agents" / "demo_fix.py"
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass
class Importer:
    proc: subprocess.Popen[bytes]
    url: str
    state: Path

    @property
    def log(self) -> str:
        return (self.state / "importer.log").read_text(encoding="utf-8")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def post(self, path: str, body: object = None, *, content: bytes | None = None) -> httpx.Response:
        if content is not None:
            return httpx.post(self.url + path, content=content, timeout=10)
        return httpx.post(self.url + path, json=body, timeout=10)


def start(directory: Path, state: Path, port: int | None = None) -> Importer:
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, str(directory / "importer.py"), "--port", str(port), "--state-dir", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"importer exited {proc.returncode}"
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 20, 0.05)
    return Importer(proc, url, state)


def stop(importer: Importer) -> None:
    if importer.proc.poll() is None:
        importer.proc.terminate()
        try:
            importer.proc.wait(10)
        except subprocess.TimeoutExpired:
            importer.proc.kill()
            importer.proc.wait()


@pytest.fixture
def importer(tmp_path: Path) -> Iterator[Importer]:
    running = start(SERVICE, tmp_path / "state")
    try:
        yield running
    finally:
        stop(running)


def test_healthz_names_the_process_and_its_boot(importer: Importer) -> None:
    health = importer.get("/healthz").json()
    assert health["pid"] == importer.proc.pid
    assert len(health["boot_id"]) == 12 and health["db"] == "connected" and health["status"] == "ok"


def test_imports_store_rows_and_the_quoting_bug_logs_a_real_traceback(importer: Importer) -> None:
    ok = importer.post("/imports/run", {"file": "utilities.csv"})
    assert ok.status_code == 200
    assert ok.json() == {"ok": True, "rows": 2, "error": None, "file": "utilities.csv", "total_cents": 4210 + 7395}
    bad = importer.post("/imports/run", {"file": "rent.csv"})
    assert bad.status_code == 500
    assert bad.json()["ok"] is False and bad.json()["rows"] == 0
    assert bad.json()["error"].startswith("ValueError: rent.csv, line 3: expected 4 fields")
    log = importer.log
    head, _, rest = log.partition("Import failed for rent.csv:\n")
    assert head.endswith("ERROR [importer.csv] ")  # Python logging's line, then the traceback on its own lines
    assert rest.startswith("Traceback (most recent call last):\n")
    assert 'parsing.py", line' in rest and "in parse_rows" in rest
    assert "\nValueError: rent.csv, line 3: expected 4 fields" in rest
    assert importer.get("/imports").json()["stored"] == {"utilities.csv": 2}


def test_a_dropped_connection_fails_imports_until_reopened(importer: Importer) -> None:
    assert importer.get("/ops/db").json() == {"db_connected": True}
    assert importer.post("/faults/drop-db").json() == {"dropped": True}
    assert importer.get("/ops/db").json() == {"db_connected": False}
    assert importer.get("/healthz").json()["db"] == "lost"
    failed = importer.post("/imports/run", {"file": "utilities.csv"})
    assert failed.status_code == 503 and failed.json()["error"] == "database connection lost"
    assert "ERROR [importer.db] Lost connection to the database: Cannot operate on a closed database." in importer.log
    assert importer.post("/ops/db/reopen").json() == {"db_connected": True}
    # The retry redoes the newest failed import, and only once.
    retried = importer.post("/imports/retry", {})
    assert retried.status_code == 200 and retried.json()["file"] == "utilities.csv" and retried.json()["rows"] == 2
    nothing = importer.post("/imports/retry", {})
    assert nothing.status_code == 409 and nothing.json()["error"] == "no failed import to retry"


def test_filling_the_cache_overflows_and_a_flush_empties_it(importer: Importer) -> None:
    filled = importer.post("/faults/fill-cache").json()
    assert filled["bytes"] > filled["limit"]
    assert importer.get("/ops/cache").json() == {"bytes": filled["bytes"], "limit": filled["limit"]}
    assert f"ERROR [importer.cache] Cache overflow: {filled['bytes']} bytes held, limit {filled['limit']} bytes" in (
        importer.log
    )
    assert importer.post("/ops/cache/flush").json() == {"flushed_bytes": filled["bytes"], "bytes": 0}
    assert importer.get("/ops/cache").json()["bytes"] == 0


def test_bad_input_is_a_4xx_naming_the_field(importer: Importer) -> None:
    for body in ({"file": "../etc/passwd.csv"}, {"file": 3}, {}, {"file": "rent.txt"}):
        answer = importer.post("/imports/run", body)
        assert answer.status_code == 400 and answer.json()["field"] == "file", body
    missing = importer.post("/imports/run", {"file": "nope.csv"})
    assert missing.status_code == 404 and missing.json()["field"] == "file"
    assert missing.json()["inbox"] == ["rent.csv", "utilities.csv"]
    for content in (b"{not json", b"[1, 2]", b'"x"'):
        answer = importer.post("/imports/run", content=content)
        assert answer.status_code == 400 and answer.json()["field"] == "body"
    wrong = importer.get("/imports/run")
    assert wrong.status_code == 405 and wrong.json()["allowed"] == ["POST"]
    unknown = importer.get("/admin/analysis")
    assert unknown.status_code == 404
    # No analysis endpoint of any kind: mendloop decides causes from its own evidence.
    assert not [e for e in unknown.json()["endpoints"] if "analy" in e]
    assert importer.get("/healthz").status_code == 200  # none of it hurt the process


def test_the_last_failure_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start(SERVICE, state)
    try:
        first.post("/faults/drop-db")
        first.post("/imports/run", {"file": "utilities.csv"})
        port = int(first.url.rsplit(":", 1)[1])
    finally:
        stop(first)
    second = start(SERVICE, state, port)
    try:
        assert second.get("/healthz").json()["pid"] != first.proc.pid
        retried = second.post("/imports/retry", {})  # a fresh connection: the retry of the failure succeeds
        assert retried.status_code == 200 and retried.json()["file"] == "utilities.csv"
    finally:
        stop(second)


def test_its_log_is_what_the_configs_watcher_detects(importer: Importer) -> None:
    """The importer's real log lines, grouped by mendloop's grouper and matched by the patterns of
    examples/importer_service/mendloop.yaml: the three faults become the three error types the built-ins route."""
    importer.post("/faults/drop-db")
    importer.post("/imports/run", {"file": "utilities.csv"})
    importer.post("/ops/db/reopen")
    importer.post("/faults/fill-cache")
    importer.post("/imports/run", {"file": "rent.csv"})
    text = importer.log
    settings = load_settings(SERVICE / "mendloop.yaml")
    intake = LogIntake(settings)
    grouper = Grouper()
    lines, at = [], 0
    for raw in text.splitlines():
        lines.append(Line("importer.log", raw, at, at + len(raw) + 1, False, 0.0))
        at += len(raw) + 1
    records = [r.text for r in grouper.feed(lines) + grouper.flush()]
    found = intake.detect_lines(records, matcher=intake.matchers["importer"], source="test")
    assert [d.error_type for d in found] == ["database_connection", "cache_overflow", "unhandled_exception"]
    db, cache, crash = found
    assert db.payload["file"] == "utilities.csv" and db.component == "importer"
    assert int(cache.payload["bytes"]) > int(cache.payload["limit"])
    assert crash.event_type == "error.exception"
    assert crash.payload["exception"]["type"] == "ValueError"
    assert [f["function"] for f in crash.payload["exception"]["frames"]][-2:] == ["run", "parse_rows"]
    # The default prefix recognition agrees with the watcher's own `prefix:`: the message is what is left.
    line = next(r for r in records if "Lost connection" in r)
    assert log_prefix.strip(line).startswith("Lost connection to the database:")


def test_its_own_tests_pass_as_shipped() -> None:
    done = subprocess.run(
        [sys.executable, "-B", "-m", "unittest", "discover", "-s", "tests"],
        cwd=SERVICE,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Ran 8 tests" in done.stderr


def copy_service(tmp_path: Path) -> Path:
    copy = tmp_path / "importer"
    shutil.copytree(SERVICE, copy, ignore=shutil.ignore_patterns("state", "__pycache__"))
    return copy


def run_demo_fix(copy: Path, tmp_path: Path, *, tests_may_change: bool) -> dict[str, object]:
    work_order = tmp_path / "work_order.json"
    work_order.write_text(json.dumps({"context": {"constraints": {"tests_may_change": tests_may_change}}}))
    result = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-B", str(DEMO_FIX), "--fixes", str(SERVICE)],
        cwd=copy,
        capture_output=True,
        text=True,
        env={**ENV, "WORKTREE": str(copy), "WORK_ORDER": str(work_order), "RESULT_FILE": str(result)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(result.read_text())
    return answer


def test_the_stand_in_agent_fixes_the_bug_and_adds_its_regression_test(tmp_path: Path) -> None:
    copy = copy_service(tmp_path)
    answer = run_demo_fix(copy, tmp_path, tests_may_change=True)
    assert answer["changed"] == ["parsing.py", os.path.join("tests", "test_quoted_fields.py")]
    assert str(answer["summary"]).startswith("split_fields() now reads a line with the csv module")
    assert "csv.reader" in (copy / "parsing.py").read_text()
    tests = subprocess.run(
        [sys.executable, "-B", "-m", "unittest", "discover", "-s", "tests"],
        cwd=copy,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert tests.returncode == 0 and "Ran 11 tests" in tests.stderr, tests.stderr
    # The fixed code imports rent.csv, "1,200.50" and all.
    fixed = start(copy, tmp_path / "state")
    try:
        answer_run = fixed.post("/imports/run", {"file": "rent.csv"}).json()
        assert answer_run == {
            "ok": True,
            "rows": 3,
            "error": None,
            "file": "rent.csv",
            "total_cents": 95000 + 120050 + 8500,
        }
    finally:
        stop(fixed)
    assert run_demo_fix(copy, tmp_path, tests_may_change=True)["summary"] == "already fixed: nothing to change"


def test_the_regression_test_fails_on_the_shipped_code(tmp_path: Path) -> None:
    """The regression test the fix adds is a real one: against the unfixed parsing.py it fails."""
    copy = copy_service(tmp_path)
    spec = importlib.util.spec_from_file_location("fix_csv_quoting", SERVICE / "fix_csv_quoting.py")
    assert spec is not None and spec.loader is not None
    fix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fix)
    (copy / fix.TEST_PATH).write_text(fix.REGRESSION_TEST)
    done = subprocess.run(
        [sys.executable, "-B", "-m", "unittest", "tests.test_quoted_fields"],
        cwd=copy,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert done.returncode != 0 and "FAILED (errors=3)" in done.stderr, done.stderr


def test_without_leave_to_change_tests_only_the_code_changes(tmp_path: Path) -> None:
    copy = copy_service(tmp_path)
    assert run_demo_fix(copy, tmp_path, tests_may_change=False)["changed"] == ["parsing.py"]
    assert not (copy / "tests" / "test_quoted_fields.py").exists()
