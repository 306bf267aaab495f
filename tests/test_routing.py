"""One routing table (issue 9, item 2): built from the playbooks' `handles`, overridden by `routing:`; two playbooks
claiming one type is a config error naming both; `GET /routing` and `mendloop routing` show the table."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.app import App
from mendloop.errors import ConfigError
from tests.support import api_server, mendloop_argv, open_app, settings_for, write_playbooks


def playbook(pid: str, *, error_types: Sequence[str] = (), event_types: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "data_fix",
        "description": "d",
        "handles": {"error_types": list(error_types), "event_types": list(event_types)},
        "steps": [{"id": "noop", "action": "sleep", "with": {"seconds": 0}}],
    }


def open_with(database_url: str, tmp_path: Path, *playbooks: dict[str, Any], **extra: Any) -> App:
    write_playbooks(tmp_path / "pb", *playbooks)
    return open_app(settings_for(database_url, tmp_path, playbook_dirs=[str(tmp_path / "pb")], **extra))


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    a = open_with(
        database_url,
        tmp_path,
        playbook("importer_fix", error_types=["import_failed"], event_types=["importer.failed"]),
        routing={"timeout": "importer_fix"},
    )
    yield a
    a.close()


def test_a_playbooks_own_error_type_routes_a_trigger(app: App, client: httpx.Client) -> None:
    # No routing entry: the playbook's handles.error_types is the route.
    answer = client.post(
        "/patches/trigger", json={"description": "d", "error_type": "import_failed", "wait_seconds": 0}
    )
    assert answer.status_code == 200, answer.text
    assert app.store.get_run(answer.json()["run_id"]).playbook_id == "importer_fix"


def test_routing_overrides_a_built_in_claim(app: App) -> None:
    ref = app.routing.for_error_type("timeout")
    assert ref is not None and ref.id == "importer_fix"  # pipeline_timeout_fix claims it; routing: wins
    detected = app.routing.for_detection(None, "importer.failed")
    assert detected is not None and detected.id == "importer_fix"


def test_get_routing_shows_every_route_and_its_source(client: httpx.Client) -> None:
    body = client.get("/routing").json()
    rows = {(r["kind"], r["key"]): (r["playbook"], r["source"]) for r in body["routes"]}
    assert body["count"] == len(body["routes"])
    assert rows[("error_type", "import_failed")] == ("importer_fix", "handles")
    assert rows[("error_type", "timeout")] == ("importer_fix", "routing")
    assert rows[("error_type", "database_connection")] == ("database_reconnect", "handles")
    assert rows[("event_type", "importer.failed")] == ("importer_fix", "handles")


def test_mendloop_routing_prints_the_table(app: App, free_port: int) -> None:
    with api_server(app, free_port):
        done = subprocess.run(
            [*mendloop_argv("routing", "--url", f"http://127.0.0.1:{free_port}")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if "import_failed" in x)
    assert "importer_fix" in line and "handles" in line


def test_two_playbooks_claiming_one_type_is_a_config_error_naming_both(database_url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        open_with(database_url, tmp_path, playbook("my_db", error_types=["database_connection"]))
    message = str(info.value)
    assert "'database_reconnect'" in message and "'my_db'" in message and "routing.database_connection" in message


def test_routing_settles_a_double_claim(database_url: str, tmp_path: Path) -> None:
    app = open_with(
        database_url,
        tmp_path,
        playbook("my_db", error_types=["database_connection"], event_types=["database.connection_lost"]),
        routing={"database_connection": "my_db", "database.connection_lost": "my_db"},
    )
    try:
        ref = app.routing.for_error_type("database_connection")
        assert ref is not None and ref.id == "my_db"
    finally:
        app.close()


def test_a_route_to_a_missing_playbook_names_the_key(database_url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routing\.oops: no playbook 'nowhere' is loaded"):
        open_with(database_url, tmp_path, playbook("x"), routing={"oops": "nowhere"})
