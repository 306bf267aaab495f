"""`/openapi.json` describes every answer: each operation documents a schema for its success and its errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mendloop.api.server import create_api
from mendloop.app import App
from mendloop.domain.states import FAIL_REASONS
from tests.support import settings_for


def _spec(tmp_path: Path) -> dict[str, Any]:
    app = App(settings_for(f"sqlite:///{tmp_path / 'o.db'}", tmp_path))
    spec: dict[str, Any] = create_api(app, manage=False).openapi()
    return spec


def test_every_route_documents_its_answers(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    schemas = spec["components"]["schemas"]
    checked = 0
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            responses = op["responses"]
            successes = [code for code in responses if code.startswith("2")]
            assert successes, where
            for code in successes:
                content = responses[code].get("content")
                if code == "204":
                    assert not content, where
                    continue
                assert content, f"{where} {code}: no content"
                for media, body in content.items():
                    schema = body.get("schema")
                    assert schema, f"{where} {code} {media}: no schema"
                    if media == "application/json":
                        # A named model, or a union of them: never a bare "any object".
                        refs = [schema] if "$ref" in schema else schema.get("anyOf", [])
                        assert refs and all("$ref" in r for r in refs), f"{where} {code}: {schema}"
                        for r in refs:
                            assert r["$ref"].rsplit("/", 1)[-1] in schemas, r
                    else:
                        assert schema == {"type": "string"}, where
            for code in ("400", "404", "409", "422"):
                # Errors are JSON everywhere, also on a route whose own answer is a diff or an event stream.
                error = responses[code]["content"]
                assert list(error) == ["application/json"], f"{where} {code}: {list(error)}"
                assert error["application/json"]["schema"]["$ref"].endswith("/ErrorOut"), where
            checked += 1
    assert checked >= 25


def test_answer_models_keep_the_spec_field_names(tmp_path: Path) -> None:
    schemas = _spec(tmp_path)["components"]["schemas"]
    work_order = schemas["WorkOrderOut"]["properties"]
    for field in (
        "work_order_id",
        "type",
        "description",
        "context",
        "status",
        "self_healing_run_id",
        "estimated_complexity",
        "priority",
        "created_at",
        "patch_result",
    ):
        assert field in work_order
    # Statuses are open strings (new states land in domain/), not a closed list in the API.
    assert work_order["status"]["type"] == "string" and "enum" not in work_order["status"]
    assert set(schemas["TriggerOut"]["properties"]) == {
        "success",
        "message",
        "run_id",
        "playbook_id",
        "status",
        "escalated_to_coding",
        "work_order_id",
        "created",
    }
    assert {"total_playbook_runs", "work_orders", "escalation_rate", "auto_fix_rate"} <= set(
        schemas["StatsOut"]["properties"]
    )
    reasons = schemas["FailRequest"]["properties"]["reason"]["enum"]
    assert tuple(reasons) == FAIL_REASONS
