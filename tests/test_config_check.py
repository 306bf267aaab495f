"""`mendloop config check` does everything `serve` does at startup and reports every problem (issue 9, item 3);
`serve` prints the same one-line messages and exits 2, never a traceback. Real CLI processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support import mendloop_argv, write_playbooks


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mendloop_argv(*args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=os.environ
    )


def write_config(tmp_path: Path, **cfg: Any) -> Path:
    path = tmp_path / "mendloop.yaml"
    path.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path}/m.db", **cfg}))
    return path


def errors_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_every_schema_error_at_once_one_line_each(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        workers="many",
        watchers=[{"name": "app", "paths": ["app.log"], "patterns": [{"name": "bad", "regex": "ERROR: (unclosed"}]}],
    )
    for command in (["config", "check", "-c", str(cfg)], ["serve", "-c", str(cfg), "--port", "1"]):
        r = cli(*command)
        assert r.returncode == 2, r.stderr
        lines = errors_of(r.stderr)
        assert len(lines) == 2 and "Traceback" not in r.stderr
        assert any("workers" in x for x in lines)
        assert any("watchers.0.patterns.0.regex" in x and "not a valid regex" in x for x in lines)


def test_every_wiring_problem_at_once_and_serve_says_the_same(tmp_path: Path) -> None:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "importer_fix",
            "type": "data_fix",
            "description": "d",
            "handles": {"error_types": ["import_failed"]},
            "steps": [
                {"id": "reopen", "action": "capability", "with": {"name": "db.reopen"}},
                {"id": "flush", "action": "capability", "optional": True, "with": {"name": "cache.flush"}},
                {"id": "note", "action": "sleep", "with": {"seconds": "{{ contxt.delay }}"}},
            ],
        },
    )
    cfg = write_config(
        tmp_path,
        playbook_dirs=["pb"],
        routing={"timeout": "no_such_playbook"},
        default_target="importer",
        targets={"importer": {"capabilities": {}}},
        watchers=[
            {
                "name": "app",
                "paths": ["app.log"],
                "patterns": [{"name": "odd", "regex": "odd thing", "error_type": "routes_nowhere"}],
            }
        ],
    )
    checked = cli("config", "check", "-c", str(cfg))
    assert checked.returncode == 2, checked.stderr
    lines = errors_of(checked.stderr)
    assert any("routing.timeout: no playbook 'no_such_playbook' is loaded" in x for x in lines)
    assert any("'importer_fix'" in x and "not bound on target 'importer': db.reopen (step reopen)" in x for x in lines)
    assert not any("cache.flush" in x for x in lines)  # optional
    assert any("steps.2.with.seconds (note): unknown name contxt" in x for x in lines)
    assert len(lines) == 3
    warnings = [x for x in checked.stderr.splitlines() if x.startswith("warning: ")]
    assert any("watchers.app.patterns.0 (odd)" in x and "route to no playbook" in x for x in warnings)
    # The built-ins nobody bound are only available, not chosen: warnings, not errors.
    assert any(
        x.startswith("warning: built-in playbooks that can't run here:") and "memory_cleanup" in x for x in warnings
    )

    served = cli("serve", "-c", str(cfg), "--port", "1")
    assert served.returncode == 2 and "Traceback" not in served.stderr
    assert errors_of(served.stderr) == lines


def test_a_clean_config_is_ok(tmp_path: Path) -> None:
    quickstart = Path(__file__).parents[1] / "examples" / "quickstart.yaml"
    r = cli("config", "check", "-c", str(quickstart))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ") and "error" not in r.stderr
