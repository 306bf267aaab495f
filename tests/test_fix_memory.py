"""The memory of past fixes, end to end: an incident whose traceback goes through a real repository is escalated,
the agent's diff (a stand-in for the agent: a fixed diff posted to /complete) is tested and committed by the patch
pipeline, verification passes and the incident is resolved. Then it recurs: the second work order's context (and
its prompt) shows the first fix (commit, diff summary, verified, how long it held), the recurrence is flagged as a
regression on the incident, the run and the timeline, naming the commit, and costs more trust than a plain
recurrence. A failure with another fingerprint through the same file and function finds the fix too.
`GET /incidents/{id}/history` and `mendloop incidents history` show it; bad ids are a 404 or a 422 naming the
field. Real git, real subprocesses, a real server for the CLI; SQLite file and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command

from mendloop.agents.adapters.prompt import build_prompt
from mendloop.app import App
from mendloop.domain import fix_memory, notifications, trust
from mendloop.domain.fix_memory import Fix
from mendloop.domain.states import RunStatus
from mendloop.storage import migrate
from mendloop.storage import schema as t
from tests.interpreters import python_for_tests
from tests.support import api_server, git, open_app, settings_for, wait_for, wait_status, write_playbooks

PY = sys.executable
TEST_PY = python_for_tests()
# A token of a shape the redactor masks (it must not reach the memory as the agent wrote it).
SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "app.py").write_text("def ratio(total, count):\n    return total / count\n\n\nVALUE = 1\n")
    (r / "server.py").write_text("from app import ratio\n\n\ndef handle(a, b):\n    return ratio(a, b)\n")
    (r / "check.py").write_text("import app, sys\nsys.exit(0 if app.VALUE < 10 else 1)\n")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "initial")
    return r


FIX = (
    "--- a/app.py\n+++ b/app.py\n@@ -2,4 +2,4 @@ def ratio(total, count):\n"
    "     return total / count\n \n \n-VALUE = 1\n+VALUE = 2\n"
)


@pytest.fixture
def app(database_url: str, tmp_path: Path, repo: Path) -> Any:
    check = "import sys; sys.path.insert(0, sys.argv[1]); import app; sys.exit(0 if app.VALUE == 2 else 1)"
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "escalates to a coding agent, then verifies the repository's state",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "Fix the division by zero"}},
                {
                    "id": "verify",
                    "action": "verify",
                    "with": {
                        "check": {"command": {"argv": [PY, "-c", check, str(repo)]}},
                        "expect": "result.exit_code == 0",
                    },
                    "on_failure": "needs_human",
                },
            ],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"ZeroDivisionError": "code", "OtherError": "code"},
        default_target="svc",
        targets={"svc": {"repository": str(repo), "test_command": [TEST_PY, "check.py"], "test_timeout": 30}},
        storm={"once_within_seconds": 0},
        workers=1,
    )
    a = open_app(settings, start_workers=True)
    yield a
    a.close()


def _traceback(repo: Path, error: str, message: str) -> str:
    return (
        "Traceback (most recent call last):\n"
        f'  File "{repo}/server.py", line 10, in handle\n'
        "    answer = ratio(a, b)\n"
        # A hostile frame from the logs: longer than the index takes, in multi-byte characters.
        f'  File "/srv/{"é" * 3000}.py", line 1, in {"ƒ" * 2000}\n'
        "    x\n"
        f'  File "{repo}/app.py", line 2, in ratio\n'
        "    return total / count\n"
        f"{error}: {message}"
    )


def _detect(client: httpx.Client, repo: Path, error: str = "ZeroDivisionError") -> dict[str, Any]:
    message = "division by zero" if error == "ZeroDivisionError" else "another failure"
    body = {
        "event_type": "app.error",
        "component": "svc",
        "payload": {"error_type": error, "traceback": _traceback(repo, error, message)},
        "message": f"ERROR {error}: {message}",
    }
    r = client.post("/events", json=body)
    assert r.status_code == 202, r.text
    answer: dict[str, Any] = r.json()["events"][0] if "events" in r.json() else r.json()
    assert answer["run_id"], answer
    return answer


def _work_order(client: httpx.Client, run_id: str) -> dict[str, Any]:
    def escalated() -> bool:
        return bool(client.get(f"/patches/runs/{run_id}").json().get("work_order"))

    wait_for(escalated, timeout=30)
    wo_id = client.get(f"/patches/runs/{run_id}").json()["work_order"]["work_order_id"]
    answer: dict[str, Any] = client.get(f"/patches/work-orders/{wo_id}").json()
    return answer


def _fix_first(app: App, client: httpx.Client, repo: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The first occurrence, escalated, fixed by the (stand-in) agent's diff, committed and verified."""
    first = _detect(client, repo)
    wo = _work_order(client, first["run_id"])
    assert wo["context"]["past_fixes"] == []  # nothing was ever fixed here
    assert "regression" not in wo["context"]
    summary = f"set VALUE to 2 (token {SECRET})"
    r = client.post(
        f"/patches/work-orders/{wo['work_order_id']}/complete",
        json={"tests_passed": True, "files_changed": 1, "diff": FIX, "summary": summary},
    )
    assert r.status_code == 200, r.text
    assert wait_status(app, first["run_id"], RunStatus.COMPLETED, RunStatus.NEEDS_HUMAN, timeout=60) is (
        RunStatus.COMPLETED
    )
    commit = git(repo, "rev-parse", "HEAD")
    inc = client.get(f"/incidents/{first['incident_id']}").json()
    assert inc["status"] == "resolved" and inc["resolved_commit"] == commit and inc["regressions"] == 0
    return first, wo, commit


def _moves(app: App, run_id: str) -> list[tuple[str, float, float, int | None]]:
    h = t.trust_history.c
    q = sa.select(h.reason, h.old, h.new, h.recurrences).where(h.run_id == run_id).order_by(h.id)
    with app.store.engine.connect() as conn:
        return [(str(r), float(o), float(n), c) for r, o, n, c in conn.execute(q)]


def test_a_recurrence_shows_the_first_fix_and_is_flagged_a_regression(
    app: App, client: httpx.Client, repo: Path
) -> None:
    first, _, commit = _fix_first(app, client, repo)
    again = _detect(client, repo)
    assert again["incident_id"] == first["incident_id"]
    wo = _work_order(client, again["run_id"])
    context = wo["context"]

    # The first fix, as the second work order's context shows it.
    [past] = context["past_fixes"]
    assert past["run_id"] == first["run_id"] and past["matched"] == "same_fingerprint"
    assert past["commit"] == commit and past["work_order_id"]
    assert past["diff"] == {"files": ["app.py"], "added": 1, "removed": 1}
    assert past["verified"] is True and past["reverted"] is False
    assert past["recurred_at"] is not None and past["still_holding"] is False
    assert past["held_seconds"] == pytest.approx(past["recurred_at"] - past["fixed_at"], abs=0.01)
    assert past["held_seconds"] > 0
    assert "Fix the division by zero" in past["what_was_done"] and "set VALUE to 2" in past["what_was_done"]
    assert SECRET not in str(wo)  # the agent's summary was redacted before it was remembered

    # The regression: on the run (and so its work order), the incident and the timeline, naming the commit.
    assert context["regression"]["commit"] == commit
    assert context["regression"]["resolved_by_run"] == first["run_id"]
    run = client.get(f"/patches/runs/{again['run_id']}").json()
    assert run["context"]["regression"]["commit"] == commit
    inc = client.get(f"/incidents/{first['incident_id']}").json()
    assert inc["regressions"] == 1 and inc["regressed_commit"] == commit and inc["recurrences"] == 1
    events = client.get("/events/recent", params={"event_type": "incident.regressed"}).json()["events"]
    assert [(e["run_id"], e["payload"]["commit"]) for e in events] == [(again["run_id"], commit)]
    assert commit[:12] in events[0]["message"]
    assert any(commit[:12] in i["message"] and "regressed" in i["message"] for i in run["timeline"])

    # Trust: the regression move replaces the recurrence move and takes a larger share of the score.
    moves = _moves(app, again["run_id"])
    assert [(r, c) for r, _, _, c in moves] == [("incident", None), ("regression", 1)]
    _, old, new, _ = moves[1]
    share = (old - new) / old
    plain = trust.recurrence_weight(1, app.settings.trust.incident_weight)
    assert share == pytest.approx(trust.regression_weight(1, app.settings.trust.incident_weight), abs=0.01)
    assert share > plain + 0.1

    # The prompt an agent gets fences both as data.
    prompt = build_prompt(wo, files=[], test_command=None, constraints=context["constraints"])
    section = prompt.split("### Past fixes", 1)[1]
    assert section.split("\n", 2)[1].startswith("```") and commit in section.split("```", 2)[1]
    assert "### This failure is a regression" in prompt

    # The history: the incident's own fix, nothing related (no other incident).
    h = client.get(f"/incidents/{first['incident_id']}/history").json()
    assert h["regressions"] == 1 and h["regressed_commit"] == commit
    assert [(f["run_id"], f["commit"], f["matched"]) for f in h["fixes"]] == [(first["run_id"], commit, "own")]
    assert "set VALUE to 2 (token " in h["fixes"][0]["what_was_done"] and SECRET not in str(h)
    assert h["related"] == []


def test_a_plain_recurrence_after_a_fix_that_was_not_verified_is_no_regression(
    app: App, client: httpx.Client, repo: Path
) -> None:
    # The agent's diff passes the tests (3 < 10) but not verification (it wants 2): reverted, nothing resolved.
    first = _detect(client, repo)
    wo = _work_order(client, first["run_id"])
    r = client.post(
        f"/patches/work-orders/{wo['work_order_id']}/complete",
        json={"tests_passed": True, "files_changed": 1, "diff": FIX.replace("VALUE = 2", "VALUE = 3")},
    )
    assert r.status_code == 200, r.text
    assert wait_status(app, first["run_id"], RunStatus.COMPLETED, RunStatus.NEEDS_HUMAN, timeout=60) is (
        RunStatus.NEEDS_HUMAN
    )
    h = client.get(f"/incidents/{first['incident_id']}/history").json()
    [fix] = h["fixes"]
    assert fix["verified"] is False and fix["reverted"] is True and fix["held_seconds"] is None
    assert fix["commit"] and fix["diff"]["files"] == ["app.py"]
    # The incident stayed open: the next detection counts on it, so its run waits on the first (no new run yet);
    # an operator resolves it, and its recurrence is a plain one.
    client.post(f"/incidents/{first['incident_id']}/resolve")
    again = _detect(client, repo)
    wo2 = _work_order(client, again["run_id"])
    assert "regression" not in wo2["context"]
    [past] = wo2["context"]["past_fixes"]
    assert past["verified"] is False and past["reverted"] is True
    assert [r for r, _, _, _ in _moves(app, again["run_id"])] == ["incident", "recurrence"]
    assert client.get(f"/incidents/{first['incident_id']}").json()["regressions"] == 0


def test_another_fingerprint_through_the_same_code_finds_the_fix(app: App, client: httpx.Client, repo: Path) -> None:
    first, _, commit = _fix_first(app, client, repo)
    other = _detect(client, repo, "OtherError")
    assert other["incident_id"] != first["incident_id"]
    wo = _work_order(client, other["run_id"])
    [past] = wo["context"]["past_fixes"]
    assert past["matched"] == "same_code" and past["commit"] == commit
    assert past["shared_frames"] == 3  # server.py:handle, app.py:ratio and the hostile one, cut to fit the index
    assert past["still_holding"] is True and past["recurred_at"] is None and past["held_seconds"] >= 0
    assert "regression" not in wo["context"]
    assert [r for r, _, _, _ in _moves(app, other["run_id"])] == ["incident"]
    # Each incident's history names the other's fix as related.
    h = client.get(f"/incidents/{other['incident_id']}/history").json()
    assert h["fixes"] == [] and h["related"] == []  # its own work order has no fix yet: no frames of its own
    h = client.get(f"/incidents/{first['incident_id']}/history").json()
    assert [f["commit"] for f in h["fixes"]] == [commit]


def test_bad_ids_are_named_and_the_cli_shows_the_history(
    app: App, client: httpx.Client, repo: Path, free_port: int
) -> None:
    missing = client.get("/incidents/inc_19700101_9999/history")
    assert missing.status_code == 404 and "inc_19700101_9999" in missing.text and "incident" in missing.text
    long = client.get("/incidents/" + "x" * 65 + "/history")
    assert long.status_code == 422 and "incident_id" in long.text
    first, _, commit = _fix_first(app, client, repo)
    cli = "from mendloop.cli.incidents import incidents_cli; incidents_cli()"
    env = {**os.environ, "COLUMNS": "250"}
    with api_server(app, free_port):
        url = f"http://127.0.0.1:{free_port}"
        shown = subprocess.run(
            [PY, "-c", cli, "history", first["incident_id"], "--url", url],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        bad = subprocess.run(
            [PY, "-c", cli, "history", "inc_19700101_9999", "--url", url],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    assert shown.returncode == 0, shown.stderr
    assert first["run_id"] in shown.stdout and commit[:12] in shown.stdout and "+1/-1" in shown.stdout
    assert "0 regressions" in shown.stdout
    assert bad.returncode != 0 and "inc_19700101_9999" in (bad.stderr + bad.stdout)
    assert len((bad.stderr + bad.stdout).strip().splitlines()) == 1


def test_the_migration_upgrades_a_database_with_an_incident_and_downgrades(empty_database_url: str) -> None:
    engine = sa.create_engine(empty_database_url)
    try:
        migrate.upgrade(engine, "0011")
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO incidents (id, fingerprint, status, error_type, event_type, component, source,"
                    " title, sample, count, first_seen, last_seen, resolved_at, last_run_id, last_run_at, absorbed,"
                    " recurrences, resolved_by_run, resolved_commit)"
                    " VALUES ('inc_20261101_0001', 'fp1', 'resolved', 'x', 'app.error', 'svc', 'webhook',"
                    " 't', 's', 7, 10.0, 20.0, 30.0, 'run_1', NULL, 2, 1, 'run_1', 'abc')"
                )
            )
        migrate.upgrade(engine)
        assert migrate.current(engine) == migrate.head()
        with engine.connect() as conn:
            row = conn.execute(sa.select(t.incidents)).one()
            assert conn.execute(sa.select(sa.func.count()).select_from(t.fixes)).scalar_one() == 0
        assert (row.recurrences, row.resolved_commit, row.regressions, row.regressed_commit) == (1, "abc", 0, None)
        with engine.begin() as conn:
            cfg = migrate._config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0011")
        assert not {"fixes", "fix_frames"} & set(sa.inspect(engine).get_table_names())
        migrate.upgrade(engine)
        assert {"fixes", "fix_frames"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


# -- the decisions, as pure functions --------------------------------------------------------------------------


def _fix(i: int, *, fingerprint: str | None = "fp", frames: tuple[tuple[str, str], ...] = (), at: float = 0) -> Fix:
    return Fix(
        id=i,
        run_id=f"run_{i}",
        incident_id="inc",
        fingerprint=fingerprint,
        component="svc",
        work_order_id=None,
        playbook_id="code",
        summary="s",
        commit="c" * 40,
        files=("app.py",),
        added=1,
        removed=1,
        verified=True,
        reverted=False,
        fixed_at=at,
        recurred_at=None,
        frames=frames,
    )


def test_ranking_puts_the_same_fingerprint_first_then_shared_frames_then_newest_and_is_bounded() -> None:
    a, b = ("app.py", "ratio"), ("server.py", "handle")
    candidates = [
        _fix(1, fingerprint="other", frames=(a,), at=5),
        _fix(2, fingerprint="other", frames=(a, b), at=1),
        _fix(3, fingerprint="fp", at=0),
        _fix(4, fingerprint="fp", at=2),
        _fix(5, fingerprint="other", frames=(("x.py", "f"),), at=9),  # shares nothing: not shown
        _fix(3, fingerprint="fp", at=0),  # found both ways: once
    ]
    ranked = fix_memory.rank(candidates, fingerprint="fp", frames=[a, b])
    assert [(f.id, why, n) for f, why, n in ranked] == [
        (4, "same_fingerprint", 0),
        (3, "same_fingerprint", 0),
        (2, "same_code", 2),
        (1, "same_code", 1),
    ]
    many = [_fix(i, at=i) for i in range(20)]
    assert [f.id for f, _, _ in fix_memory.rank(many, fingerprint="fp", frames=[])] == [19, 18, 17, 16, 15]
    assert fix_memory.rank(many, fingerprint="fp", frames=[], exclude_run="run_19")[0][0].id == 18


def test_regression_rule_and_weight() -> None:
    assert notifications.severity_of("incident.regressed", {}) == "error"  # a reopening alone is a warning
    assert notifications.severity_of("incident.reopened", {}) == "warning"
    assert fix_memory.is_regression(resolved_by_run="run_1", resolved_commit="abc")
    assert not fix_memory.is_regression(resolved_by_run="run_1", resolved_commit=None)  # a playbook-only fix
    assert not fix_memory.is_regression(resolved_by_run=None, resolved_commit=None)  # an operator's word
    for k in range(1, 12):
        assert trust.regression_weight(k, 0.25) >= trust.recurrence_weight(k, 0.25)
        assert trust.regression_weight(k, 0.25) <= trust.MAX_RECURRENCE_WEIGHT
    assert trust.regression_weight(1, 0.25) == pytest.approx(0.4375)
    assert trust.regression_weight(0, 0.25) == 0.0


def test_diff_stat_and_frames() -> None:
    diff = (
        "--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2 @@\n--- a removed line that looks like a header\n+b\n c\n"
        "--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+x\n\\ No newline at end of file\n"
    )
    assert fix_memory.diff_stat(diff) == (("x.py", "new.py"), 2, 1)
    tb = {
        "frames": [
            {"file": "/srv/app/server.py", "repository_path": "server.py", "function": "handle"},
            {"file": "/usr/lib/python3/json/__init__.py", "repository_path": None, "function": "loads"},
            {"file": "/srv/app/server.py", "repository_path": "server.py", "function": "handle"},
            {"file": "x", "function": None},
        ]
    }
    assert fix_memory.frames_of(tb) == [("/usr/lib/python3/json/__init__.py", "loads"), ("server.py", "handle")]
    long = fix_memory.frames_of({"frames": [{"file": "é" * 3000, "function": "ƒ" * 2000}]})
    assert [(len(p.encode()), len(f.encode())) for p, f in long] == [(1000, 300)]
    assert fix_memory.frames_of(None) == [] and fix_memory.frames_of({"frames": "no"}) == []
