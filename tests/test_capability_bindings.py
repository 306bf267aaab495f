"""Built-in playbooks reused by binding capabilities only (issue 9, item 1): a binding brings its own success
condition (`expect`) and output mapping (`outputs`), built-ins read normalised `result.outputs`, and a step the
service has no capability for is `optional`: skipped, with the reason in the timeline, and never a failure.

The service here is one mendloop has never seen: a real HTTP server on 127.0.0.1 with its own field names
(`db_connected`, `cache_bytes`) and no `db.close_stale` or `tasks.stop_background`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mendloop.api import views
from mendloop.app import App
from mendloop.domain.states import RunStatus, StepStatus
from mendloop.errors import PlaybookError
from mendloop.playbooks.loader import compile_document
from mendloop.playbooks.templates import Templates
from tests.support import drain, json_service, open_app, settings_for, wait_status, write_playbooks


class Importer:
    """The foreign service's state and the calls it received."""

    def __init__(self) -> None:
        self.connected = False
        self.cache_bytes = 4096
        self.reconnect_answer = "reconnected"
        self.calls: list[str] = []


@pytest.fixture
def importer() -> Iterator[tuple[Importer, str]]:
    state = Importer()

    def answer(method: str, path: str, _: Any) -> dict[str, Any]:
        state.calls.append(f"{method} {path}")
        if method == "GET":
            return {"db_connected": state.connected} if path == "/health/db" else {"cache_bytes": state.cache_bytes}
        if path == "/db/reopen":
            state.connected = state.reconnect_answer == "reconnected"
            return {"status": state.reconnect_answer}
        state.cache_bytes = 0
        return {"cleared": True}

    with json_service(answer) as url:
        yield state, url


def bindings(**extra: Any) -> dict[str, Any]:
    base = {
        "db.reconnect": {"http": {"method": "POST", "url": "{{ target.base_url }}/db/reopen"}},
        "db.status": {
            "http": {"url": "{{ target.base_url }}/health/db"},
            "outputs": {"connected": "result.json.db_connected"},
        },
        "cache.clear": {"http": {"method": "POST", "url": "{{ target.base_url }}/cache/flush"}},
        "memory.status": {
            "http": {"url": "{{ target.base_url }}/stats"},
            "outputs": {"non_critical_cache_bytes": "result.json.cache_bytes"},
        },
    }
    base.update(extra)
    return base


def app_for(database_url: str, tmp_path: Path, base_url: str, capabilities: dict[str, Any], **kw_app: Any) -> App:
    settings = settings_for(
        database_url,
        tmp_path,
        default_target="importer",
        routing={"database_connection": "database_reconnect", "cache_overflow": "memory_cleanup"},
        targets={"importer": {"base_url": base_url, "capabilities": capabilities}},
    )
    return open_app(settings, **kw_app)


def timeline_of(app: App, run_id: str) -> list[str]:
    run = app.store.get_run(run_id)
    return [line.message for line in views.timeline(run, app.store.run_steps(run_id), app.store.run_events(run_id))]


def test_database_reconnect_heals_a_service_with_other_field_names(
    database_url: str, tmp_path: Path, importer: tuple[Importer, str]
) -> None:
    state, url = importer
    app = app_for(database_url, tmp_path, url, bindings(), start_workers=True)  # it sleeps between steps
    try:
        run, _ = app.remediation.trigger(error_type="database_connection", description="db lost")
        wait_status(app, run.id, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.NEEDS_HUMAN)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.COMPLETED, done.error
        assert state.connected and "POST /db/reopen" in state.calls
        steps = {s.step_id: s for s in app.store.run_steps(run.id)}
        assert steps["close_stale_connections"].status is StepStatus.SKIPPED
        assert steps["verify_connection"].output["result"]["outputs"]["connected"] is True
        lines = timeline_of(app, run.id)
        assert (
            "Step skipped: close stale connections (optional capability 'db.close_stale' is not bound "
            "for target 'importer')" in lines
        )
        assert "Verification passed: verify connection" in lines
    finally:
        app.close()


def test_memory_cleanup_without_background_tasks_is_a_success_not_a_failure(
    database_url: str, tmp_path: Path, importer: tuple[Importer, str]
) -> None:
    state, url = importer
    app = app_for(database_url, tmp_path, url, bindings())
    try:
        run, _ = app.remediation.trigger(error_type="cache_overflow", description="cache full")
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.COMPLETED, done.error
        assert state.cache_bytes == 0
        skipped = [s.step_id for s in app.store.run_steps(run.id) if s.status is StepStatus.SKIPPED]
        assert skipped == ["identify_caches", "stop_background_tasks"]
    finally:
        app.close()


def test_a_binding_expect_judges_the_services_own_answer(
    database_url: str, tmp_path: Path, importer: tuple[Importer, str]
) -> None:
    state, url = importer
    state.reconnect_answer = "refused"  # HTTP 200, yet the service says no
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "reopen",
            "type": "retry",
            "description": "d",
            "steps": [{"id": "reopen", "action": "capability", "with": {"name": "db.reconnect"}}],
        },
    )
    reconnect = {
        "http": {"method": "POST", "url": "{{ target.base_url }}/db/reopen"},
        "expect": "result.json.status == 'reconnected'",
    }
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        default_target="importer",
        routing={"reopen": "reopen"},
        targets={"importer": {"base_url": url, "capabilities": bindings(**{"db.reconnect": reconnect})}},
    )
    app = open_app(settings)
    try:
        run, _ = app.remediation.trigger(error_type="reopen", description="d")
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.FAILED
        assert "expected result.json.status == 'reconnected'" in (done.error or "")
        assert '"status": "refused"' in (done.error or "")
    finally:
        app.close()


def test_only_a_capability_step_can_be_optional() -> None:
    doc = {
        "id": "bad",
        "type": "retry",
        "description": "d",
        "steps": [{"id": "s", "action": "sleep", "optional": True, "with": {"seconds": 0}}],
    }
    with pytest.raises(PlaybookError, match="optional: only a capability step") as info:
        compile_document(doc, source="bad.yaml", templates=Templates())
    assert info.value.file == "bad.yaml" and "steps.0" in str(info.value.field)
