"""Schema of the `documents` table and validation of ingested records against it."""

from __future__ import annotations

import copy
import re
from datetime import datetime

EXPECTED_SCHEMA: dict = {
    "table": "documents",
    "columns": {
        "id": {"type": "integer", "required": True},
        "file_path": {"type": "text", "required": True},
        "title": {"type": "text", "required": True},
        "page_count": {"type": "integer", "required": True},
        "ingested_at": {"type": "timestamp", "required": True},
        "checksum": {"type": "text", "required": True},
        "published_date": {"type": "date", "required": False},
    },
}

# Dates arrive from the metadata extractor as ISO 8601 strings (YYYY-MM-DD).
DATE_PATTERN = re.compile(r"^\d{4}/\d{2}/\d{2}$")


def expected_schema() -> dict:
    return copy.deepcopy(EXPECTED_SCHEMA)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object) -> bool:
    return isinstance(value, str)


def _is_timestamp(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_date(value: object) -> bool:
    return isinstance(value, str) and DATE_PATTERN.match(value) is not None


TYPE_CHECKS = {
    "integer": _is_integer,
    "text": _is_text,
    "timestamp": _is_timestamp,
    "date": _is_date,
}


def schema_problems(schema: dict) -> list[dict]:
    """Differences between `schema` and the expected schema, one dict per problem."""
    problems: list[dict] = []
    if not isinstance(schema, dict):
        return [{"column": None, "problem": "not_a_schema", "message": "schema is not an object"}]
    if schema.get("table") != EXPECTED_SCHEMA["table"]:
        problems.append(
            {
                "column": None,
                "problem": "wrong_table",
                "message": f"table is {schema.get('table')!r}, expected {EXPECTED_SCHEMA['table']!r}",
            }
        )
    columns = schema.get("columns") if isinstance(schema.get("columns"), dict) else {}
    for name, spec in EXPECTED_SCHEMA["columns"].items():
        actual = columns.get(name)
        if not isinstance(actual, dict):
            problems.append({"column": name, "problem": "missing", "message": f"missing column {name!r}"})
            continue
        if actual.get("type") != spec["type"]:
            problems.append(
                {
                    "column": name,
                    "problem": "wrong_type",
                    "message": f"column {name!r} has type {actual.get('type')!r}, expected {spec['type']!r}",
                }
            )
        if bool(actual.get("required")) != spec["required"]:
            problems.append(
                {
                    "column": name,
                    "problem": "wrong_required",
                    "message": f"column {name!r} required={actual.get('required')!r}, "
                    f"expected {spec['required']!r}",
                }
            )
    for name in columns:
        if name not in EXPECTED_SCHEMA["columns"]:
            problems.append({"column": name, "problem": "unexpected", "message": f"unexpected column {name!r}"})
    return problems


def validate_schema(schema: dict) -> list[str]:
    """Human-readable schema problems; empty when the schema is as expected."""
    return [p["message"] for p in schema_problems(schema)]


def validate_record(record: dict, schema: dict) -> list[str]:
    """Check one `documents` record against `schema`; returns a list of problems."""
    problems: list[str] = []
    columns = schema.get("columns", {}) if isinstance(schema, dict) else {}
    for name, spec in columns.items():
        if name not in record or record[name] is None:
            if spec.get("required"):
                problems.append(f"{name}: required column missing")
            continue
        check = TYPE_CHECKS.get(spec.get("type"))
        if check is None:
            problems.append(f"{name}: unknown column type {spec.get('type')!r}")
        elif not check(record[name]):
            problems.append(f"{name}: expected {spec['type']}, got {record[name]!r}")
    for name in record:
        if name not in columns:
            problems.append(f"{name}: column not in schema")
    return problems
