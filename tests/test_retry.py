"""Retry a failed run from a chosen step: a new run of the same playbook document and context starts at that step
with the earlier steps' outputs carried over (they are not run again), and the old run's timeline links to it.
Real commands that count their own runs, both backends, the CLI against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from mendloop.app import App
from mendloop.domain.states import RunStatus
from tests.support import api_client, api_server, drain, mendloop_argv, open_app, settings_for, write_playbooks

PY = sys.executable


def _app(database_url: str, tmp_path: Path) -> App:
    log, gate = tmp_path / "ran.log", tmp_path / "gate"
    note = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "flaky",
            "type": "retry",
            "description": "the second step fails until the gate exists",
            "steps": [
                {
                    "id": "look",
                    "action": "command",
                    "with": {"argv": [PY, "-c", note + "; print('{\"n\": 41}')", str(log), "look"]},
                },
                {
                    "id": "act",
                    "action": "command",
                    "with": {
                        "argv": [
                            PY,
                            "-c",
                            note + "; import os; sys.exit(0 if os.path.exists(sys.argv[4]) else 3)",
                            str(log),
                            "act {{ steps.look.json.n + 1 }}",
                            "unused",
                            str(gate),
                        ]
                    },
                },
                {"id": "after", "action": "command", "with": {"argv": [PY, "-c", note, str(log), "after"]}},
            ],
        },
    )
    settings = settings_for(
        database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], routing={"flaky": "flaky"}, default_target="svc",
        targets={"svc": {}},
    )  # fmt: skip
    return open_app(settings)


def _ran(tmp_path: Path) -> list[str]:
    return (tmp_path / "ran.log").read_text().splitlines()


def test_a_failed_run_is_retried_from_a_step_with_the_earlier_outputs(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        first, _ = app.remediation.trigger(error_type="flaky", description="d", component="svc")
        drain(app)
        assert app.store.run_status(first.id) is RunStatus.FAILED
        assert _ran(tmp_path) == ["look", "act 42"]
        trust_before = app.store.trust_score("svc")
        (tmp_path / "gate").write_text("open")
        with api_client(app) as client:
            answer = client.post(f"/patches/runs/{first.id}/retry", json={"from_step": "act"})
            assert answer.status_code == 200, answer.text
            new_id = answer.json()["run_id"]
            assert new_id != first.id and answer.json()["current_step"] == "act"
            drain(app)
            detail = client.get(f"/patches/runs/{new_id}").json()
            old = client.get(f"/patches/runs/{first.id}").json()
        assert detail["status"] == "completed", detail["error"]
        # `look` did not run again; `act` read its carried-over output (41 + 1).
        assert _ran(tmp_path) == ["look", "act 42", "act 42", "after"]
        new = app.store.get_run(new_id)
        assert new.outputs["look"] == app.store.get_run(first.id).outputs["look"]
        assert new.context["retry_of"] == first.id and new.context["retry_from"] == "act"
        assert [s.step_id for s in app.store.run_steps(new_id)] == ["act", "after"]
        assert old["status"] == "failed"  # the old run stays as it ended
        assert any(f"retried from step 'act' as run {new_id}" in t["message"] for t in old["timeline"])
        assert app.store.trust_score("svc") == trust_before  # the same incident is not counted twice
    finally:
        app.close()


def test_a_retry_from_the_first_step_carries_nothing(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        first, _ = app.remediation.trigger(error_type="flaky", description="d")
        drain(app)
        again = app.remediation.retry_run(first.id, "look")
        assert again.outputs == {} and again.step_index == 0
    finally:
        app.close()


def test_bad_retries_are_refused_naming_the_field(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    try:
        (tmp_path / "gate").write_text("open")
        done, _ = app.remediation.trigger(error_type="flaky", description="d")
        drain(app)
        assert app.store.run_status(done.id) is RunStatus.COMPLETED
        with api_client(app) as client:
            unknown = client.post(f"/patches/runs/{done.id}/retry", json={"from_step": "nope"})
            assert unknown.status_code == 409  # a completed run is refused before its steps are looked at
            (tmp_path / "gate").unlink()
            failed, _ = app.remediation.trigger(error_type="flaky", description="d2")
            drain(app)
            bad: dict[str, Any] = {"from_step": "nope"}
            unknown = client.post(f"/patches/runs/{failed.id}/retry", json=bad)
            assert unknown.status_code == 422 and unknown.json()["field"] == "from_step"
            missing = client.post(f"/patches/runs/{failed.id}/retry", json={})
            assert missing.status_code == 422 and missing.json()["field"] == "from_step"
            assert client.post("/patches/runs/run_nope/retry", json={"from_step": "act"}).status_code == 404
    finally:
        app.close()


def test_the_cli_retries(database_url: str, tmp_path: Path, free_port: int) -> None:
    app = _app(database_url, tmp_path)
    try:
        first, _ = app.remediation.trigger(error_type="flaky", description="d")
        drain(app)
        with api_server(app, free_port):
            base = f"http://127.0.0.1:{free_port}"
            cli = subprocess.run(
                mendloop_argv("runs", "retry", first.id, "--from-step", "after", "--url", base),
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert cli.returncode == 0, cli.stderr
        assert f"{first.id} retried from after as run_" in cli.stdout
        drain(app)
        assert _ran(tmp_path)[-1] == "after"
    finally:
        app.close()
