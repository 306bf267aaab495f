"""The hybrid and code-patch built-ins decide a failure's cause from mendloop's own evidence when the service has no
analysis endpoint (issue 9, item 1): a traceback into the target's repository is code, a timeout against its
configured limit is config; an analysis capability, where bound, refines that. The rules are pure
(`domain/cause.py`); the runs below go through the real engine against a real HTTP server on 127.0.0.1 and a real
git repository."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mendloop.app import App
from mendloop.domain import cause
from mendloop.domain.states import RunStatus, StepStatus
from tests.support import drain, json_service, open_app, settings_for

# -- the rules -----------------------------------------------------------------------------------------------------


def test_a_traceback_into_the_repository_is_code_and_names_the_innermost_frame() -> None:
    found = cause.from_evidence(
        cause.Evidence(
            repository_frames=(cause.Suspect("app/main.py", 10, "main"), cause.Suspect("app/csv.py", 42, "parse")),
            other_frames=2,
            exception="ValueError: bad",
            observed_seconds=300,  # a traceback into the code outweighs the timeout
        )
    )
    assert found.cause == cause.CODE and found.suspect == cause.Suspect("app/csv.py", 42, "parse")
    assert "app/csv.py:42 in parse" in found.details and "ValueError: bad" in found.details


@pytest.mark.parametrize(
    ("observed", "limit", "cap", "want", "raised"),
    [
        (300, None, None, cause.CONFIG, 600.0),  # the message names the limit it hit
        (300, 300, None, cause.CONFIG, 600.0),
        (310, 300, 450, cause.CONFIG, 450.0),  # capped
        (120, 300, None, cause.UNKNOWN, None),  # under its limit: the limit did not stop it
        (300, 300, 300, cause.UNKNOWN, None),  # already at the most allowed
    ],
)
def test_a_timeout_against_its_configured_limit_is_config(
    observed: float, limit: float | None, cap: float | None, want: str, raised: float | None
) -> None:
    found = cause.from_evidence(cause.Evidence(observed_seconds=observed, limit_seconds=limit), max_timeout_seconds=cap)
    assert (found.cause, found.recommended_timeout_seconds) == (want, raised)


def test_a_traceback_only_through_libraries_or_no_evidence_is_unknown() -> None:
    libraries = cause.from_evidence(cause.Evidence(other_frames=3, exception="KeyError: 'x'"))
    assert libraries.cause == cause.UNKNOWN and "outside the repository" in libraries.details
    nothing = cause.from_evidence(cause.Evidence())
    assert nothing.cause == cause.UNKNOWN and "nothing to decide from" in nothing.details


def test_an_analysis_refines_the_evidence_and_keeps_its_own_fields() -> None:
    found = cause.from_evidence(cause.Evidence(observed_seconds=300))
    refined, outputs = cause.refine(found, {"cause": "code", "suspect_file": "pipe.py", "error": "chunks"})
    assert refined.cause == "code" and refined.source == "analysis"
    assert outputs["suspect_file"] == "pipe.py" and outputs["error"] == "chunks"
    assert outputs["recommended_timeout_seconds"] == 600.0  # the evidence's figure, the analysis gave none
    same, outputs = cause.refine(found, {"status": "ok"})  # an answer without a cause leaves the evidence's
    assert same is found and outputs["cause"] == cause.CONFIG and outputs["status"] == "ok"


# -- through the engine ----------------------------------------------------------------------------------------------


class Service:
    """A service mendloop has never seen: its own endpoint names, and an analysis endpoint only when asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.timeout = 300
        self.analysis: dict[str, Any] | None = None
        self.rerun_ok = True


@pytest.fixture
def service() -> Iterator[tuple[Service, str]]:
    state = Service()

    def answer(method: str, path: str, body: Any) -> dict[str, Any]:
        if method == "GET":
            state.calls.append(("GET", path, None))
            return state.analysis or {} if path == "/why" else {"up": True}
        state.calls.append(("POST", path, body or {}))
        if path == "/settings":
            state.timeout = int(body["pipeline_timeout_seconds"])
            return {"saved": True}
        return {"finished": state.rerun_ok}

    with json_service(answer) as url:
        yield state, url


def _app(database_url: str, tmp_path: Path, url: str, *, analysis: bool = False, repo: Path | None = None) -> App:
    capabilities: dict[str, Any] = {
        "pipeline.set_timeout": {"http": {"method": "POST", "url": "{{ target.base_url }}/settings"}},
        "pipeline.rerun": {
            "http": {"method": "POST", "url": "{{ target.base_url }}/jobs/again"},
            "outputs": {"ok": "result.json.finished"},
        },
        "verify": {
            "http": {"method": "POST", "url": "{{ target.base_url }}/jobs/again"},
            "outputs": {"ok": "result.json.finished"},
        },
        "health": {"http": {"url": "{{ target.base_url }}/up"}},
        "deploy": {"http": {"method": "POST", "url": "{{ target.base_url }}/deploy"}},
    }
    if analysis:
        capabilities["pipeline.analyze_timeout"] = {"http": {"url": "{{ target.base_url }}/why"}}
    target: dict[str, Any] = {"base_url": url, "capabilities": capabilities}
    if repo is not None:
        target["repository"] = str(repo)
    settings = settings_for(database_url, tmp_path, default_target="svc", targets={"svc": target})
    return open_app(settings)


def test_pipeline_timeout_fix_without_an_analysis_endpoint_raises_the_limit(
    database_url: str, tmp_path: Path, service: tuple[Service, str]
) -> None:
    state, url = service
    app = _app(database_url, tmp_path, url)
    try:
        run, _ = app.remediation.trigger(
            error_type="pipeline_timeout",
            description="ERROR: Pipeline timeout after 300 seconds",
            event_payload={"seconds": "300", "line": "ERROR: Pipeline timeout after 300 seconds"},
        )
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.COMPLETED, done.error
        assert state.timeout == 600 and not done.escalated
        steps = {s.step_id: s for s in app.store.run_steps(run.id)}
        diagnosis = steps["analyze_timeout"].output
        assert diagnosis["outputs"]["cause"] == "config" and diagnosis["outputs"]["source"] == "evidence"
        assert diagnosis["analysis"] is None  # nothing bound, nothing called
        assert not any(path == "/why" for _, path, _ in state.calls)
        assert steps["escalate_code_fix"].status is StepStatus.SKIPPED
    finally:
        app.close()


def test_a_bound_analysis_that_finds_code_escalates_instead(
    database_url: str, tmp_path: Path, service: tuple[Service, str]
) -> None:
    state, url = service
    state.analysis = {"cause": "code", "suspect_file": "pipeline/chunks.py", "details": "64 KB chunks"}
    app = _app(database_url, tmp_path, url, analysis=True)
    try:
        run, _ = app.remediation.trigger(
            error_type="pipeline_timeout", description="timeout", event_payload={"seconds": "300"}
        )
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.AWAITING_PATCH and done.escalated
        assert state.timeout == 300  # the evidence alone said config: the analysis knew better
        wo = app.store.get_work_order(done.coding_work_order_id)
        assert "pipeline/chunks.py" in wo.description
    finally:
        app.close()


def _repo(path: Path) -> Path:
    (path / "importer").mkdir(parents=True)
    (path / "importer" / "parse.py").write_text("def amount(text):\n    return float(text)\n")
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def _traceback(repo: Path) -> str:
    return (
        "Traceback (most recent call last):\n"
        '  File "/srv/importer/importer/main.py", line 7, in run\n'  # another host's path, not in the repository
        "    rows = load(path)\n"
        f'  File "{repo}/importer/parse.py", line 2, in amount\n'
        "    return float(text)\n"
        "ValueError: could not convert string to float: '\"1'\n"
    )


def test_code_fix_escalates_a_traceback_into_the_repository_naming_the_frame(
    database_url: str, tmp_path: Path, service: tuple[Service, str]
) -> None:
    _, url = service
    repo = _repo(tmp_path / "repo")
    app = _app(database_url, tmp_path, url, repo=repo)
    try:
        tb = _traceback(repo)
        run, _ = app.remediation.trigger(
            error_type="unhandled_exception", description="Import failed", event_payload={"traceback": tb}
        )
        drain(app)
        done = app.store.get_run(run.id)
        assert done.playbook_id == "code_fix" and done.status is RunStatus.AWAITING_PATCH
        wo = app.store.get_work_order(done.coding_work_order_id)
        assert "importer/parse.py (amount, line 2)" in " ".join(wo.description.split())
        outputs = {s.step_id: s for s in app.store.run_steps(run.id)}["diagnose"].output["outputs"]
        assert (outputs["cause"], outputs["suspect_file"], outputs["suspect_line"]) == ("code", "importer/parse.py", 2)
    finally:
        app.close()


def test_code_fix_does_not_patch_a_traceback_only_through_libraries(
    database_url: str, tmp_path: Path, service: tuple[Service, str]
) -> None:
    state, url = service
    repo = _repo(tmp_path / "repo")
    app = _app(database_url, tmp_path, url, repo=repo)
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/json/decoder.py", line 337, in decode\n'
        "    obj, end = self.raw_decode(s, idx=_w(s, 0).end())\n"
        "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n"
    )
    try:
        state.rerun_ok = False
        run, _ = app.remediation.trigger(
            error_type="exception", description="bad input", event_payload={"traceback": tb}
        )
        drain(app)
        done = app.store.get_run(run.id)
        assert not done.escalated and done.status is RunStatus.NEEDS_HUMAN  # verified, still failing: a human
        assert ("POST", "/jobs/again", {}) in state.calls
        outputs = {s.step_id: s for s in app.store.run_steps(run.id)}["diagnose"].output["outputs"]
        assert outputs["cause"] == "unknown" and "outside the repository" in outputs["details"]
    finally:
        app.close()
