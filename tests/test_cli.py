"""The CLI as a user runs it: real subprocesses against a real `mendloop serve`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import mendloop_argv, serve_process, write_playbooks

pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        mendloop_argv(*args),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_a_malformed_playbook_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: broken\ntype: teleport\ndescription: x\nsteps: [{id: a, action: sleep, with: {seconds: 1}}]\n")
    r = run_cli("playbooks", "validate", str(bad))
    assert r.returncode == 2  # a configuration problem, like a bad config file
    assert r.stderr.strip().count("\n") == 0
    assert str(bad) in r.stderr and "type" in r.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text("id: m\ntype: retry\ndescription: x\nsteps: [{id: a, action: command, with: {}}]\n")
    r = run_cli("playbooks", "validate", str(missing))
    assert r.returncode == 2 and "steps.0" in r.stderr and "argv" in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("id: [unclosed\n")
    r = run_cli("playbooks", "validate", str(broken))
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr
    good = Path(__file__).parents[1] / "mendloop/playbooks/builtin/pipeline_timeout_fix.yaml"
    r = run_cli("playbooks", "validate", str(good), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == "pipeline_timeout_fix"


def test_config_schema_and_bad_config(tmp_path: Path) -> None:
    r = run_cli("config", "schema")
    schema = json.loads(r.stdout)
    assert {"database_url", "routing", "targets", "trust"} <= set(schema["properties"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: many\n")
    r = run_cli("config", "check", "--config", str(cfg))
    assert r.returncode == 2 and "workers" in r.stderr and str(cfg) in r.stderr


def test_serve_refuses_a_public_address_without_tokens(tmp_path: Path) -> None:
    r = run_cli(
        "serve", "--host", "0.0.0.0", "--port", "1", env={"MENDLOOP_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    )
    assert r.returncode == 1 and "without tokens" in r.stderr and "mendloop tokens create" in r.stderr


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["db", "upgrade"], ["worker"]])
def test_a_database_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path: Path, command: list[str]) -> None:
    url = f"sqlite:///{tmp_path}/missing/dir/x.db"
    r = run_cli(*command, env={"MENDLOOP_DATABASE_URL": url})
    assert r.returncode == 2, r.stderr
    # (Logged warnings aside: the configuration's, the sandbox's.)
    lines = [line for line in r.stderr.splitlines() if line.strip() and " WARNING " not in line]
    assert lines == [f"error: cannot open or upgrade the database {url}: unable to open database file"]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_client_commands_against_a_running_server(tmp_path: Path, free_port: int) -> None:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "patchy",
            "type": "code_patch",
            "description": "escalates",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {}},
                {"id": "after", "action": "sleep", "with": {"seconds": 0}},
            ],
        },
    )
    cfg = tmp_path / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": f"sqlite:///{tmp_path}/m.db",
                "playbook_dirs": ["pb"],
                "routing": {"patchy": "patchy"},
                "poll_interval": 0.05,
            }
        )
    )
    url = f"http://127.0.0.1:{free_port}"
    with serve_process(cfg, free_port, log=tmp_path / "serve.log"):
        r = run_cli("trigger", "-e", "patchy", "-d", "broken", "--url", url, "--json")
        assert r.returncode == 0, r.stderr
        answer: dict[str, Any] = json.loads(r.stdout)
        assert answer["escalated_to_coding"] is True
        wo = answer["work_order_id"]
        r = run_cli("work-orders", "list", "--url", url)
        assert r.returncode == 0 and wo in r.stdout and "queued=1" in r.stdout
        r = run_cli("work-orders", "show", wo, "--url", url, "--json")
        assert json.loads(r.stdout)["self_healing_run_id"] == answer["run_id"]
        r = run_cli("work-orders", "complete", wo, "--tests-passed", "--files-changed", "1", "--url", url)
        assert r.returncode == 0 and "completed" in r.stdout
        r = run_cli("runs", "show", answer["run_id"], "--url", url)
        assert r.returncode == 0 and f"Escalated to coding agent (work order {wo})" in r.stdout
        r = run_cli("runs", "list", "--url", url, "--json")
        assert json.loads(r.stdout)["runs"][0]["run_id"] == answer["run_id"]
        r = run_cli("playbooks", "list", "--url", url)
        assert "pipeline_timeout_fix" in r.stdout
        r = run_cli("trigger", "-e", "nope", "-d", "x", "--url", url)
        assert r.returncode == 1 and "422" in r.stderr and "known" in r.stderr
        r = run_cli("runs", "show", "run_nope", "--url", url)
        assert r.returncode == 1 and "404" in r.stderr
    r = run_cli("runs", "list", "--url", url)
    assert r.returncode == 1 and "cannot reach mendloop" in r.stderr and r.stderr.count("\n") == 1
