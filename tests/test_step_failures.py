"""No error loops a run forever. Any exception while a step runs fails that step (its error and an event recorded)
and its on_failure decides; a run whose claims keep crashing the worker goes to needs_human after a bounded number
of tries. Real SQLite/PostgreSQL databases, real git repositories, real subprocesses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.app import App
from mendloop.domain.states import RunStatus, StepStatus, WorkOrderStatus
from mendloop.engine.step_loop import MAX_STALLED_CLAIMS
from mendloop.errors import MendloopError
from mendloop.playbooks.actions import registry
from mendloop.playbooks.actions.base import MAX_OUTPUT_DEPTH
from mendloop.storage import schema
from tests.support import api_server, drain, open_app, settings_for, wait_for, write_playbooks

PY = sys.executable
# Appends argv[2] as a line to the file argv[1].
MARK = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


def mark(log: Path, tag: str, **extra: Any) -> dict[str, Any]:
    return {"id": tag, "action": "command", "with": {"argv": [PY, "-c", MARK, str(log), tag]}, **extra}


def marks(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def make(database_url: str, tmp_path: Path, *playbooks: dict[str, Any], **settings: Any) -> App:
    write_playbooks(tmp_path / "pb", *playbooks)
    routing = {pb["id"]: pb["id"] for pb in playbooks}
    return open_app(
        settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing=routing, **settings)
    )


def events_of(app: App, run_id: str, kind: str) -> list[Any]:
    return [e for e in app.store.run_events(run_id) if e.type == kind]


def nested(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root


def depth(value: Any) -> int:
    n = 0
    while isinstance(value, dict) and value:
        value = next(iter(value.values()))
        n += 1
    return n


def _recurse(n: int) -> int:
    return _recurse(n + 1) + 1


def raising_recursion(_params: dict[str, Any], _ctx: Any) -> dict[str, Any]:
    return {"n": _recurse(0)}


def raising_git_error(_params: dict[str, Any], _ctx: Any) -> dict[str, Any]:
    # What mendloop's git module raises for a repository in the wrong state.
    raise MendloopError("/srv/repo: a git operation is in progress (MERGE_HEAD)")


# The action the tests replace: an `http` step stands for any action that raises what it should not.
CRASHING = {"recursion": raising_recursion, "git": raising_git_error}
EXPECTED_ERROR = {
    "recursion": "RecursionError: maximum recursion depth exceeded",
    "git": "MendloopError: /srv/repo: a git operation is in progress (MERGE_HEAD)",
}


@pytest.mark.parametrize("kind", ["recursion", "git"])
def test_an_action_raising_an_unexpected_error_fails_its_step(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setitem(registry.ACTIONS, "http", CRASHING[kind])
    log = tmp_path / "log"
    pb = {
        "id": "crashy",
        "type": "data_fix",
        "description": "d",
        "steps": [
            mark(log, "before"),
            # A retry policy does not retry an error the action did not expect: it would only repeat.
            {"id": "boom", "action": "http", "with": {"url": "http://127.0.0.1:9/"}, "retry": {"max_attempts": 3}},
            mark(log, "after"),
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="crashy", description="d")
        assert drain(app) == 1
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.FAILED
        assert done.error is not None and done.error.startswith(f"step 'boom' failed: {EXPECTED_ERROR[kind]}")
        steps = app.store.run_steps(run.id)
        assert [(s.step_id, s.status, s.attempt) for s in steps] == [
            ("before", StepStatus.SUCCEEDED, 1),
            ("boom", StepStatus.FAILED, 1),
        ]
        assert steps[1].error is not None and steps[1].error.startswith(EXPECTED_ERROR[kind])
        assert len(steps[1].error) <= 500
        (failed,) = events_of(app, run.id, "self_healing.step_failed")
        assert failed.payload["step_id"] == "boom"
        assert failed.payload["error_type"] == ("RecursionError" if kind == "recursion" else "MendloopError")
        assert EXPECTED_ERROR[kind] in failed.message
        (completed,) = events_of(app, run.id, "self_healing.completed")
        assert completed.payload["status"] == "failed" and EXPECTED_ERROR[kind] in completed.message
        assert marks(log) == ["before"]
    finally:
        app.close()


@pytest.mark.parametrize(
    ("policy", "status", "ran"),
    [
        ("continue", RunStatus.COMPLETED, ["after", "cleanup"]),
        ("needs_human", RunStatus.NEEDS_HUMAN, []),
        ("goto:cleanup", RunStatus.COMPLETED, ["cleanup"]),
        ("escalate", RunStatus.AWAITING_PATCH, []),
    ],
)
def test_on_failure_decides_after_an_unexpected_error(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    status: RunStatus,
    ran: list[str],
) -> None:
    monkeypatch.setitem(registry.ACTIONS, "http", raising_recursion)
    log = tmp_path / "log"
    pb = {
        "id": "policy",
        "type": "hybrid",
        "description": "d",
        "steps": [
            {"id": "boom", "action": "http", "with": {"url": "http://127.0.0.1:9/"}, "on_failure": policy},
            mark(log, "after"),
            mark(log, "cleanup"),
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="policy", description="d")
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is status, done.error
        boom = [s for s in app.store.run_steps(run.id) if s.step_id == "boom"]
        # With escalate, the escalation is recorded under the step's id too (key `...:boom:1:escalate`).
        expected = [StepStatus.FAILED, StepStatus.SUCCEEDED] if policy == "escalate" else [StepStatus.FAILED]
        assert [s.status for s in boom] == expected
        assert boom[0].error is not None and boom[0].error.startswith("RecursionError: maximum recursion depth")
        (failed,) = events_of(app, run.id, "self_healing.step_failed")
        assert failed.payload["error_type"] == "RecursionError" and failed.payload["step_id"] == "boom"
        assert marks(log) == ran
        if policy == "escalate":
            wo = app.store.get_work_order(done.coding_work_order_id or "")
            assert wo.status is WorkOrderStatus.QUEUED
            assert "RecursionError" in json.dumps(wo.context)
    finally:
        app.close()


def test_deeply_nested_context_fails_the_step_not_the_worker(database_url: str, tmp_path: Path) -> None:
    """A context 5000 levels deep: rendered into a string it fails the template; passed on as a value it fails
    the action that stringifies it. Either way the step fails, on_failure decides, the run ends."""
    log = tmp_path / "log"
    pb = {
        "id": "deep",
        "type": "data_fix",
        "description": "d",
        "steps": [
            {
                "id": "render",
                "action": "command",
                "with": {"argv": ["echo", "nest={{ context.nest }}"]},
                "on_failure": "continue",
            },
            {"id": "native", "action": "command", "with": {"argv": ["echo", "{{ context.nest }}"]}},
            mark(log, "never"),
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="deep", description="d")
        owner = "test:0:w"
        claimed = app.store.claim_run(owner, 60)
        assert claimed is not None and claimed.id == run.id
        # Stored JSON is read back by a decoder with the same recursion limit, so a context this deep reaches a
        # worker only in memory: hand the claimed run to the step loop with it.
        deep = dataclasses.replace(claimed, context={**claimed.context, "nest": nested(5000)})
        app.workers.step_loop.advance(deep, owner)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.FAILED
        assert done.error is not None and done.error.startswith("step 'native' failed: RecursionError:")
        steps = {s.step_id: s for s in app.store.run_steps(run.id)}
        assert steps["render"].status is StepStatus.FAILED
        assert steps["render"].error is not None and "nested too deeply to render" in steps["render"].error
        assert steps["native"].status is StepStatus.FAILED
        assert steps["native"].error is not None
        assert steps["native"].error.startswith("RecursionError: maximum recursion depth exceeded")
        assert "never" not in steps and not log.exists()
        (failed,) = events_of(app, run.id, "self_healing.step_failed")
        assert failed.payload["step_id"] == "native"
        (completed,) = events_of(app, run.id, "self_healing.completed")
        assert completed.payload["status"] == "failed"
    finally:
        app.close()


def test_a_deep_output_is_stored_cut_instead_of_crashing_the_commit(database_url: str, tmp_path: Path) -> None:
    levels = 400
    printer = f"import json\nd = 1\nfor _ in range({levels}): d = {{'a': d}}\nprint(json.dumps(d))"
    pb = {
        "id": "deepout",
        "type": "data_fix",
        "description": "d",
        "steps": [{"id": "print", "action": "command", "with": {"argv": [PY, "-c", printer]}}],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="deepout", description="d")
        drain(app)
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.COMPLETED, done.error
        (step,) = app.store.run_steps(run.id)
        assert step.status is StepStatus.SUCCEEDED and step.error is None
        facts = step.output["facts"]
        # The output dict is level 0 and "facts" level 1: the chain of "a" is cut where the limit is reached.
        assert depth(facts) == MAX_OUTPUT_DEPTH - 1
        cut: Any = facts
        while isinstance(cut, dict):
            cut = cut["a"]
        assert cut == f"… (cut: nested deeper than {MAX_OUTPUT_DEPTH} levels)"
        assert depth(done.outputs["print"]["facts"]) == MAX_OUTPUT_DEPTH - 1
    finally:
        app.close()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1", "invalid URL: Invalid port"),
        ("http://exa mple.com/health", "invalid URL: no valid host name"),
        ("ftp://example.com/file", "invalid URL: unsupported protocol 'ftp'"),
        ("example.com/health", "invalid URL: no http:// or https:// protocol"),
    ],
    ids=["unclosed-ipv6", "space-in-host", "ftp", "no-scheme"],
)
def test_a_url_that_cannot_be_called_fails_the_step_at_once(
    database_url: str, tmp_path: Path, url: str, why: str
) -> None:
    pb = {
        "id": "badurl",
        "type": "retry",
        "description": "d",
        "steps": [
            {
                "id": "call",
                "action": "http",
                "with": {"url": "{{ context.url }}"},
                # Not retried: asking again cannot fix the URL.
                "retry": {"max_attempts": 5, "backoff_seconds": 60},
                "on_failure": "needs_human",
            }
        ],
    }
    app = make(database_url, tmp_path, pb)
    try:
        run, _ = app.remediation.trigger(error_type="badurl", description="d", context={"url": url})
        assert drain(app) == 1
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.NEEDS_HUMAN
        assert done.error is not None and done.error.startswith(f"step 'call' failed: GET {url!r}: {why}")
        (step,) = app.store.run_steps(run.id)
        assert step.status is StepStatus.FAILED and step.attempt == 1
        assert step.error is not None and step.error.startswith(f"GET {url!r}: {why}")
        (completed,) = events_of(app, run.id, "self_healing.completed")
        assert completed.payload["status"] == "needs_human" and why in completed.message
        # An ActionError is an expected failure: no "unexpected error" event.
        assert events_of(app, run.id, "self_healing.step_failed") == []
    finally:
        app.close()


def test_a_run_whose_claims_keep_crashing_goes_to_needs_human(database_url: str, tmp_path: Path) -> None:
    """The step loop itself raises for this run (its stored playbook document no longer compiles, as after an
    upgrade that dropped an action): each claim crashes, is recorded, and the run stops after the bounded tries."""
    log = tmp_path / "log"
    pb = {"id": "stale", "type": "data_fix", "description": "d", "steps": [mark(log, "s")]}
    other = {"id": "fine", "type": "data_fix", "description": "d", "steps": [mark(log, "fine")]}
    app = make(database_url, tmp_path, pb, other)
    try:
        run, _ = app.remediation.trigger(error_type="stale", description="d")
        broken = {**run.playbook, "steps": [{"id": "s", "action": "teleport", "with": {}}]}
        engine = sa.create_engine(database_url)
        try:
            with engine.begin() as conn:
                # An older version's snapshot (this version's compiled playbooks are cached by version).
                conn.execute(
                    sa.update(schema.runs)
                    .where(schema.runs.c.id == run.id)
                    .values(playbook=broken, playbook_version="0-stale")
                )
        finally:
            engine.dispose()
        fine, _ = app.remediation.trigger(error_type="fine", description="d")
        claims = drain(app, limit=50)
        # MAX_STALLED_CLAIMS crashing claims, the one that gives up, and the other run's: never more.
        assert claims == MAX_STALLED_CLAIMS + 2
        done = app.store.get_run(run.id)
        assert done.status is RunStatus.NEEDS_HUMAN
        assert done.error is not None
        assert done.error.startswith(f"gave up after {MAX_STALLED_CLAIMS} claims in a row crashed the worker: ")
        assert "PlaybookError" in done.error and "steps.0.action" in done.error
        (step,) = app.store.run_steps(run.id)
        assert (step.step_id, step.action, step.status) == ("s", "teleport", StepStatus.FAILED)
        assert step.error is not None and step.error.startswith("PlaybookError: ")
        (failed,) = events_of(app, run.id, "self_healing.step_failed")
        assert failed.payload["stalled_claims"] == MAX_STALLED_CLAIMS and "PlaybookError" in failed.message
        (completed,) = events_of(app, run.id, "self_healing.completed")
        assert completed.payload["status"] == "needs_human" and "PlaybookError" in completed.message
        # The crashing run held no one up, and nothing else ran twice.
        assert app.store.run_status(fine.id) is RunStatus.COMPLETED
        assert marks(log) == ["fine"]
        assert drain(app) == 0
    finally:
        app.close()


# -- a detached HEAD in the target repository, met by the real patch pipeline ----------------------------------


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_a_detached_head_in_the_patch_pipeline_hands_the_run_to_a_human(
    database_url: str, tmp_path: Path, free_port: int
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text("VALUE = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "d",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "Set VALUE to 2"}},
                {"id": "after", "action": "command", "with": {"argv": [PY, "-c", "pass"]}},
            ],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"code": "code"},
        default_target="svc",
        targets={"svc": {"repository": str(repo)}},
    )
    app = open_app(settings, start_workers=True)
    try:
        with api_server(app, free_port) as client:
            run = client.post("/patches/trigger", json={"description": "d", "error_type": "code"}).json()
            assert run["status"] == "awaiting_patch"
            # Someone checks out a commit by hand while the agent works.
            git(repo, "checkout", "-q", "--detach", "HEAD")
            head = git(repo, "rev-parse", "HEAD")
            diff = "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
            done = client.post(
                f"/patches/work-orders/{run['work_order_id']}/complete",
                json={"tests_passed": True, "files_changed": 1, "diff": diff},
            )
            assert done.status_code == 200, done.text

            def settled() -> bool:
                status = client.get(f"/patches/runs/{run['run_id']}").json()["status"]
                return status in ("completed", "needs_human", "failed")

            wait_for(settled, timeout=30)
        final = app.store.get_run(run["run_id"])
        assert final.status is RunStatus.NEEDS_HUMAN
        assert final.error is not None and final.error.startswith("patch pipeline failed: MendloopError: ")
        assert "HEAD is detached" in final.error
        steps = app.store.run_steps(final.id)
        applied = [s for s in steps if s.step_id == "apply_patch"]
        assert [s.status for s in applied] == [StepStatus.FAILED]
        assert applied[0].error is not None and "HEAD is detached" in applied[0].error
        assert "after" not in {s.step_id for s in steps}
        (failed,) = events_of(app, final.id, "self_healing.step_failed")
        assert failed.payload["step_id"] == "apply_patch" and failed.payload["error_type"] == "MendloopError"
        (completed,) = events_of(app, final.id, "self_healing.completed")
        assert completed.payload["status"] == "needs_human" and "HEAD is detached" in completed.message
        # Nothing was applied; the repository is as the operator left it.
        assert git(repo, "rev-parse", "HEAD") == head and (repo / "app.py").read_text() == "VALUE = 1\n"
        assert git(repo, "status", "--porcelain") == ""
        # The held work order does not wait for a pipeline that gave up.
        wo = app.store.get_work_order(run["work_order_id"])
        assert wo.status is WorkOrderStatus.FAILED and wo.fail_reason == "needs_human"
    finally:
        app.close()


def test_a_trigger_context_nested_too_deep_is_refused_with_the_field(
    database_url: str, tmp_path: Path, free_port: int
) -> None:
    log = tmp_path / "log"
    app = make(
        database_url, tmp_path, {"id": "deep", "type": "data_fix", "description": "d", "steps": [mark(log, "x")]}
    )
    try:
        with api_server(app, free_port) as client:
            answer = client.post(
                "/patches/trigger", json={"description": "d", "error_type": "deep", "context": nested(40)}
            )
            assert answer.status_code == 422, answer.text
            assert answer.json()["field"] == "context" and "nested deeper than 32" in answer.json()["detail"]
            assert client.get("/patches/runs").json()["count"] == 0
            fine = client.post(
                "/patches/trigger",
                json={"description": "d", "error_type": "deep", "context": nested(8), "wait_seconds": 0},
            )
            assert fine.status_code == 200, fine.text
    finally:
        app.close()


def test_http_action_reports_a_url_error_without_a_request() -> None:
    """The check happens before any connection: a transport that would answer is never reached."""
    from mendloop.errors import ActionError
    from mendloop.playbooks.actions.http import call_http

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    client = httpx.Client(transport=httpx.MockTransport(answer))
    with pytest.raises(ActionError) as caught:
        call_http(
            client,
            method="GET",
            url="http://exa mple.com/",
            json_body=None,
            headers={},
            expect_status=[200],
            timeout=5,
            idempotency_key="k",
        )
    assert caught.value.retryable is False and "no valid host name" in caught.value.message
    assert seen == []
