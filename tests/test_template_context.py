"""The template context's schema (`playbooks/context_schema.py`) holds the code to it (issue 9, item 4): a real
playbook runs against a real HTTP server on 127.0.0.1 and real commands, its steps dump the scope they see, and
every key the code put there must be documented, every key documented as always there must be there. Adding a key
to a step's scope, a result or an event without documenting it fails here. The generated references
(docs/template-context.md, docs/configuration.md) must equal what the code generates."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from mendloop.app import App
from mendloop.cli import reference
from mendloop.config import load_settings
from mendloop.domain.states import RunStatus
from mendloop.playbooks import context_schema as schema
from mendloop.playbooks.templates import RESULT_SCOPE, STEP_SCOPE
from mendloop.preflight import check
from tests.support import drain, json_service, mendloop_argv, migrated_sqlite, write_playbooks

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# A command step that prints what its templates see, as JSON (its `facts`): the real scope, as the step loop
# built it, one name of the schema each.
DUMP_SCOPE = "{{ {" + ", ".join(f"'{n}': {n}" for n in sorted(STEP_SCOPE)) + "} | tojson }}"
ECHO = [PY, "-c", "import sys; print(sys.argv[1])"]


@pytest.fixture
def service() -> Iterator[tuple[list[str], str]]:
    """A service with its own field names; it records every request."""
    calls: list[str] = []

    def answer(method: str, path: str, _: Any) -> dict[str, Any]:
        calls.append(f"{method} {path}")
        return {"db_connected": True, "path": path}

    with json_service(answer) as url:
        yield calls, url


def _config(tmp_path: Path, base_url: str) -> Path:
    playbook = {
        "id": "every_kind",
        "type": "hybrid",
        "description": "One step of every kind, then the scope they leave.",
        "handles": {"error_types": ["importer_crash"]},
        "steps": [
            {"id": "call", "action": "http", "with": {"url": "{{ target.base_url }}/status"}},
            {"id": "facts", "action": "command", "with": {"argv": [PY, "-c", "print('{\"ok\": true}')"]}},
            {"id": "plain", "action": "command", "with": {"argv": [PY, "-c", "print('not json')"]}},
            {
                "id": "slow",
                "action": "command",
                "with": {"argv": [PY, "-c", "import time; time.sleep(30)"], "timeout": 0.5},
                "on_failure": "continue",
            },
            {"id": "cap_http", "action": "capability", "with": {"name": "svc.status", "args": {"deep": True}}},
            {"id": "cap_cmd", "action": "capability", "with": {"name": "svc.binding_scope", "args": {"n": 1}}},
            {"id": "nap", "action": "sleep", "with": {"seconds": 0}},
            {"id": "cause", "action": "diagnose", "with": {}},
            {
                "id": "check",
                "action": "verify",
                "with": {"check": {"capability": "svc.status"}, "expect": "result.outputs.connected == true"},
            },
            {"id": "dump", "action": "command", "with": {"argv": [*ECHO, DUMP_SCOPE]}},
        ],
    }
    write_playbooks(tmp_path / "playbooks", playbook)
    config = {
        "database_url": migrated_sqlite(tmp_path / "db.sqlite"),
        "playbook_dirs": ["playbooks"],
        "workers": 1,
        "default_target": "svc",
        "targets": {
            "svc": {
                "base_url": base_url,
                "vars": {"greeting": "hi"},
                "capabilities": {
                    "svc.status": {
                        "http": {"url": "{{ target.base_url }}/health/db"},
                        "outputs": {"connected": "result.json.db_connected"},
                    },
                    # The binding scope, dumped the same way.
                    "svc.binding_scope": {
                        "command": {
                            "argv": [
                                *ECHO,
                                "{{ {'args': args, 'target': target, 'idempotency_key': idempotency_key} | tojson }}",
                            ]
                        }
                    },
                },
            }
        },
        "watchers": [
            {
                "name": "importer",
                "paths": ["importer.log"],
                "patterns": [
                    {"name": "crash", "regex": r"Traceback \(most recent call last\)", "error_type": "importer_crash"}
                ],
            }
        ],
    }
    path = tmp_path / "mendloop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


TRACEBACK = """Traceback (most recent call last):
  File "/srv/importer/app.py", line 12, in main
    load(rows)
  File "/srv/importer/parse.py", line 40, in load
    int(row["rent"])
ValueError: invalid literal for int() with base 10: '12,50'"""


def _run_to_end(app: App, run_id: str) -> dict[str, Any]:
    drain(app)
    run = app.store.get_run(run_id)
    assert run.status is RunStatus.COMPLETED, run.error
    return run.outputs


def _check_outputs(outputs: dict[str, Any], actions: Mapping[str, str]) -> None:
    for step_id, output in outputs.items():
        names = schema.STEP_OUTPUTS[actions[step_id]]
        assert schema.undocumented(output, names) == [], (step_id, output)
        if step_id != "slow":  # a timed-out command leaves the fields of a timeout, documented as such
            assert schema.missing(output, names) == [], (step_id, output)


def test_the_real_scope_and_results_are_the_documented_ones(tmp_path: Path, service: tuple[list[str], str]) -> None:
    calls, base_url = service
    settings = load_settings(_config(tmp_path, base_url))
    app = App(settings).open(start_workers=False, start_watchers=False, upgrade=False)
    try:
        actions = {s.step.id: s.step.action for s in app.playbooks.by_id["every_kind"].steps}
        run, _ = app.remediation.trigger(
            error_type="importer_crash",
            description="rent.csv failed",
            file_path="data/rent.csv",
            context={"batch": 7},
        )
        # The top-level names are exactly the ones the step loop builds.
        assert set(app.workers.step_loop._scope(run)) == set(STEP_SCOPE)
        outputs = _run_to_end(app, run.id)
        assert "GET /status" in calls and "GET /health/db" in calls

        seen = outputs["dump"]["facts"]
        assert set(seen) == set(STEP_SCOPE)
        assert schema.undocumented(seen, schema.STEP_CONTEXT) == []
        assert schema.missing(seen, schema.STEP_CONTEXT) == []
        assert seen["event"]["file_path"] == "data/rent.csv" and seen["context"]["batch"] == 7
        assert seen["target"]["vars"] == {"greeting": "hi"}
        # Every earlier step's output, by its action's shape.
        _check_outputs(dict(seen["steps"]), actions)
        _check_outputs({k: v for k, v in outputs.items() if k != "dump"}, actions)
        assert outputs["slow"]["timed_out"] is True and outputs["slow"]["exit_code"] is None
        assert outputs["facts"]["json"] == {"ok": True} and "json" not in outputs["plain"]
        assert outputs["cap_http"]["outputs"]["connected"] is True
        assert outputs["check"]["passed"] is True
        assert schema.undocumented(outputs["check"]["result"], schema.RESULTS["capability"]) == []

        binding_scope = outputs["cap_cmd"]["facts"]
        assert schema.undocumented(binding_scope, schema.BINDING_CONTEXT) == []
        assert schema.missing(binding_scope, schema.BINDING_CONTEXT) == []
        assert binding_scope["args"] == {"n": 1}
    finally:
        app.close()


def test_a_detected_traceback_gives_the_documented_event(tmp_path: Path, service: tuple[list[str], str]) -> None:
    _, base_url = service
    settings = load_settings(_config(tmp_path, base_url))
    app = App(settings).open(start_workers=False, start_watchers=False, upgrade=False)
    try:
        detections = app.log_intake.detect_lines(
            [TRACEBACK], matcher=app.log_intake.matchers["importer"], source=str(tmp_path / "importer.log")
        )
        (outcome,) = app.intake.ingest(detections)
        assert outcome.run_id is not None
        outputs = _run_to_end(app, outcome.run_id)
        seen = outputs["dump"]["facts"]
        assert schema.undocumented(seen, schema.STEP_CONTEXT) == []
        assert schema.missing(seen, schema.STEP_CONTEXT) == []
        exception = seen["event"]["exception"]
        assert exception["type"] == "ValueError"
        assert [(f["file"], f["line"], f["function"]) for f in exception["frames"]] == [
            ("/srv/importer/app.py", 12, "main"),
            ("/srv/importer/parse.py", 40, "load"),
        ]
        documented = {n.name for n in schema.EVENT.children}
        assert {"event_type", "line", "pattern", "traceback", "exception"} <= set(seen["event"]) & documented
        assert "fingerprint" in seen["context"]
    finally:
        app.close()


def test_an_undocumented_key_is_found() -> None:
    """The checks the tests above rely on: a key nobody documented, and a documented one that went missing."""
    scope: dict[str, Any] = {n: {} for n in STEP_SCOPE}
    scope["run"] = {"id": "r", "escalated": False, "work_order_id": None, "patch": None, "component": None}
    scope["target"] = {"name": None, "colour": "red"}
    scope["event"] = {"exception": {"type": "E", "message": "m", "frames": [{"file": "f", "line": 1, "x": 2}]}}
    scope["surprise"] = 1
    assert sorted(schema.undocumented(scope, schema.STEP_CONTEXT)) == [
        "event.exception.frames[0].x",
        "surprise",
        "target.colour",
    ]
    missing = schema.missing(scope, schema.STEP_CONTEXT)
    assert "run.playbook_id" in missing and "event.exception.frames[0].function" in missing
    assert "context.error_type" in missing


def test_config_check_accepts_the_schema_names_and_nothing_else(tmp_path: Path) -> None:
    assert {n.name for n in schema.STEP_CONTEXT} == STEP_SCOPE and RESULT_SCOPE == {"result"}
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "reads_names",
            "type": "retry",
            "description": "d",
            "steps": [
                {"id": "a", "action": "command", "with": {"argv": ["true", "{{ event.exception.type }}"]}},
                {"id": "b", "action": "command", "with": {"argv": ["true", "{{ results.x }}"]}},
            ],
        },
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"playbook_dirs": ["pb"]}))
    lines = [p.message for p in check(load_settings(cfg)) if "reads_names" in p.message]
    assert len(lines) == 1 and "steps.1.with.argv.1 (b): unknown name results" in lines[0]


def test_the_checked_in_references_are_the_generated_ones() -> None:
    """Regenerate with `python -m mendloop.cli.reference --write` after changing the schema or the Settings."""
    for name, text in reference.generated().items():
        assert (ROOT / "docs" / name).read_text(encoding="utf-8") == text, f"docs/{name} is out of date"


def test_the_context_command_prints_the_reference() -> None:
    done = subprocess.run(
        mendloop_argv("playbooks", "context", "--markdown"), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == schema.markdown()
    assert "| `event.exception.frames[].file` | string |" in done.stdout
    assert "| `result.status_code` | integer |" in done.stdout
    plain = subprocess.run(mendloop_argv("playbooks", "context"), capture_output=True, text=True, timeout=60)
    assert "result.json: any" in plain.stdout and "steps.<id>: object" in plain.stdout


def test_the_configuration_reference_lists_every_key() -> None:
    text = reference.configuration_markdown()
    from mendloop.config import Settings

    for name in Settings.model_fields:
        assert f"| `{name}` |" in text
    assert "`MENDLOOP_DATABASE_URL`" in text and '`"sqlite:///./mendloop.db"`' in text
    assert "## TargetConfig" in text and "## CapabilityBinding" in text and "## HttpBinding" in text
    # Every top-level key has a description: an empty cell is a setting someone added without one.
    top = text.split("## Top-level keys", 1)[1].split("\n## ", 1)[0]
    empty = [line for line in top.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert empty == []
