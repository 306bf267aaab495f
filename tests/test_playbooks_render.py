"""`mendloop playbooks render FILE --event EVENT.json` (issue 9, item 4): a playbook's steps as they would run for an
event, rendered against the event and the config's target, and never run: a real HTTP server on 127.0.0.1 that
every step and binding points at sees zero requests, and a command that would create a file creates nothing."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mendloop.config import load_settings
from mendloop.playbooks import dry_run
from mendloop.playbooks.loader import compile_document
from mendloop.playbooks.templates import Templates
from tests.support import json_service, mendloop_argv

EVENT = {
    "error_type": "importer_crash",
    "description": "Import failed for rent.csv",
    "file": "rent 2026/../x.csv",
    "severity": "error",
}


@pytest.fixture
def server() -> Iterator[tuple[list[str], str]]:
    seen: list[str] = []

    def answer(method: str, path: str, _: Any) -> dict[str, Any]:
        seen.append(f"{method} {path}")
        return {}

    with json_service(answer) as url:
        yield seen, url


def _files(tmp_path: Path, base_url: str) -> tuple[Path, Path, Path, Path]:
    marker = tmp_path / "ran"
    playbook = {
        "id": "importer_fix",
        "type": "hybrid",
        "description": "Everything a render shows.",
        "handles": {"error_types": ["importer_crash"]},
        "steps": [
            {"id": "close_stale", "action": "capability", "optional": True, "with": {"name": "db.close_stale"}},
            {
                "id": "inspect",
                "action": "http",
                "with": {"url": "{{ target.base_url }}/files/{{ event.file }}?by={{ target.vars.team }}"},
            },
            {
                "id": "touch",
                "action": "command",
                "with": {"argv": ["python3", "-c", "import sys; open(sys.argv[1], 'w')", str(marker)]},
            },
            {
                "id": "reimport",
                "action": "capability",
                "with": {"name": "importer.retry", "args": {"file": "{{ event.file }}", "mode": "strict"}},
            },
            {
                "id": "only_warnings",
                "action": "capability",
                "when": "event.severity == 'warning'",
                "with": {"name": "importer.retry"},
            },
            {
                "id": "raise_limit",
                "action": "capability",
                "when": "steps.inspect.json.cause == 'config'",
                "with": {"name": "importer.retry", "args": {"limit": "{{ steps.inspect.json.limit * 2 }}"}},
            },
            {
                "id": "check",
                "action": "verify",
                "with": {"check": {"capability": "importer.status"}, "expect": "result.outputs.ok == true"},
            },
        ],
    }
    pb = tmp_path / "importer_fix.yaml"
    pb.write_text(yaml.safe_dump(playbook, sort_keys=False))
    config = tmp_path / "mendloop.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "default_target": "importer",
                "targets": {
                    "importer": {
                        "base_url": base_url,
                        "vars": {"team": "data"},
                        "capabilities": {
                            "importer.retry": {
                                "http": {"method": "POST", "url": "{{ target.base_url }}/retry/{{ args.file }}"}
                            },
                            "importer.status": {
                                "command": {
                                    "argv": ["python3", "-c", "import sys; open(sys.argv[1], 'w')", str(marker)]
                                },
                                "expect": "result.json.ok",
                            },
                        },
                    }
                },
            }
        )
    )
    event = tmp_path / "event.json"
    event.write_text(json.dumps(EVENT))
    return pb, config, event, marker


def _render(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mendloop_argv("playbooks", "render", *args),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_render_shows_every_step_as_it_would_run_and_runs_nothing(
    tmp_path: Path, server: tuple[list[str], str]
) -> None:
    seen, base_url = server
    pb, config, event, marker = _files(tmp_path, base_url)
    done = _render(str(pb), "--event", str(event), "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["playbook"] == "importer_fix" and plan["target"] == "importer"
    steps = {s["id"]: s for s in plan["steps"]}

    assert steps["close_stale"]["status"] == "skipped: not bound"
    assert "'db.close_stale' is not bound" in steps["close_stale"]["notes"][0]
    # Data in a URL is percent-encoded into its place, as the http action would send it (`/` and `..` included).
    assert steps["inspect"]["call"] == {
        "kind": "http",
        "method": "GET",
        "url": f"{base_url}/files/rent%202026%2F..%2Fx.csv?by=data",
    }
    assert steps["touch"]["call"]["argv"][-1] == str(marker)
    # A capability shows its binding's call: method and URL, and the args as the JSON body.
    reimport = steps["reimport"]["call"]
    assert (reimport["method"], reimport["url"]) == ("POST", f"{base_url}/retry/rent%202026%2F..%2Fx.csv")
    assert reimport["json"] == {"file": EVENT["file"], "mode": "strict"}
    assert reimport["capability"] == "importer.retry"
    assert steps["only_warnings"]["status"] == "skipped: when is false"
    assert steps["only_warnings"]["when_value"] is False
    # What an earlier step will answer is not guessed.
    assert steps["raise_limit"]["status"] == "depends on steps.inspect"
    assert steps["raise_limit"]["when_value"] is None
    assert steps["raise_limit"]["with"]["args"]["limit"] == "<depends on steps.inspect>"
    check = steps["check"]
    assert check["status"] == "would run" and check["with"]["expect"] == "result.outputs.ok == true"
    assert check["call"]["kind"] == "command" and check["call"]["expect"] == "result.json.ok"

    # Nothing ran: no request reached the service, no process made the file.
    assert seen == []
    assert not marker.exists()

    text = _render(str(pb), "--event", str(event), "--config", str(config))
    assert text.returncode == 0, text.stderr
    assert "nothing was run" in text.stdout
    assert "1. close_stale (capability) [optional]: skipped: not bound" in text.stdout
    assert f"calls: POST {base_url}/retry/rent%202026%2F..%2Fx.csv  (capability importer.retry)" in text.stdout
    assert "when: steps.inspect.json.cause == 'config'  -> depends on steps.inspect" in text.stdout
    assert seen == [] and not marker.exists()


def test_bad_event_json_is_one_line_naming_the_file(tmp_path: Path, server: tuple[list[str], str]) -> None:
    _, base_url = server
    pb, config, _, _ = _files(tmp_path, base_url)
    bad = tmp_path / "bad.json"
    bad.write_text('{"error_type": ')
    done = _render(str(pb), "--event", str(bad), "--config", str(config))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: not valid JSON") and "Traceback" not in done.stderr
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    done = _render(str(pb), "--event", str(listed))
    assert done.returncode == 2 and done.stderr.strip() == f"error: {listed}: the event must be a JSON object, not list"
    done = _render(str(pb), "--event", str(tmp_path / "absent.json"))
    assert done.returncode == 2 and f"error: {tmp_path / 'absent.json'}: cannot read" in done.stderr


def test_a_bad_playbook_or_target_names_the_problem(tmp_path: Path, server: tuple[list[str], str]) -> None:
    _, base_url = server
    pb, config, event, _ = _files(tmp_path, base_url)
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump({"id": "b", "type": "retry", "description": "d", "steps": [{"id": "s", "action": "http"}]})
    )
    done = _render(str(broken), "--event", str(event))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {broken}: playbook 'b': Value error, action 'http' needs with.url" or (
        str(broken) in done.stderr and "steps.0" in done.stderr
    )
    done = _render(str(pb), "--event", str(event), "--config", str(config), "--target", "nope")
    assert done.returncode == 2 and done.stderr.strip() == "error: --target: no target 'nope' (known: importer)"


def test_refusals_and_missing_names_show_as_the_step_would_fail(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"targets": {"t": {"capabilities": {}}}, "default_target": "t"}))
    document = {
        "id": "refused",
        "type": "retry",
        "description": "d",
        "steps": [
            # An argv item led by data that starts with '-' is refused by the command action: shown, not run.
            {"id": "opt", "action": "command", "with": {"argv": ["git", "log", "{{ event.flag }}"]}},
            # A name the event lacks fails a strict `with` template.
            {"id": "missing", "action": "command", "with": {"argv": ["echo", "{{ event.nothing.here }}"]}},
            {"id": "unbound", "action": "capability", "with": {"name": "db.reconnect"}},
            {"id": "wait", "action": "sleep", "with": {"seconds": "{{ event.delay }}"}},
        ],
    }
    pb = compile_document(document, source="refused.yaml", templates=Templates())
    plan = dry_run.plan(pb, {"flag": "--output=/tmp/x", "delay": 3}, load_settings(cfg))
    steps = {s.id: s for s in plan.steps}
    assert steps["opt"].status == "would fail" and "starts with '-'" in steps["opt"].problems[0]
    assert steps["missing"].status == "would fail" and "with.argv.1" in steps["missing"].problems[0]
    assert steps["unbound"].status == "would fail"
    assert steps["unbound"].problems == [
        "capability 'db.reconnect' is not bound on target 't': bind it under targets.t.capabilities"
    ]
    assert steps["wait"].status == "would run" and steps["wait"].params == {"seconds": 3}


def test_a_condition_on_the_run_after_an_escalation_is_not_guessed(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({}))
    document = {
        "id": "escalating",
        "type": "code_patch",
        "description": "d",
        "steps": [
            {"id": "before", "action": "sleep", "when": "not run.escalated", "with": {"seconds": 0}},
            {"id": "fix", "action": "escalate", "with": {"description": "fix {{ event.file }}"}},
            {"id": "deploy", "action": "sleep", "when": "run.escalated", "with": {"seconds": 0}},
        ],
    }
    pb = compile_document(document, source="escalating.yaml", templates=Templates())
    steps = {s.id: s for s in dry_run.plan(pb, {"file": "a.py"}, load_settings(cfg)).steps}
    # Before any escalation the run's fields are known; after one they are not.
    assert steps["before"].when_value is True and steps["before"].status == "would run"
    assert steps["fix"].params == {"description": "fix a.py"}
    assert steps["deploy"].when_value is None and steps["deploy"].depends_on == ["run"]
    assert steps["deploy"].status == "depends on run (an earlier step escalates)"
