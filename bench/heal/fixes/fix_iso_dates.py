"""Stand-in coding agent's fix for the sample service's date bug (examples/sample_service/schema_validator.py).

The metadata extractor sends ISO 8601 dates (`2024-05-01`), as the module's own comment says, but the pattern
wants `YYYY/MM/DD`, so every record with a `published_date` fails ingestion with a schema mismatch. The fix checks
the date as ISO 8601 with `date.fromisoformat` on the `YYYY-MM-DD` form (a real calendar date, not only digits).
Driven by `examples/agents/demo_fix.py --fixes bench/heal/fixes --fix fix_iso_dates`."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import FixError, replace_once
from _common import find_target as _find

__all__ = ["REGRESSION_TEST", "SUMMARY", "TEST_PATH", "FixError", "find_target", "patch_source"]

TARGET = "schema_validator.py"
TEST_PATH = os.path.join("tests", "test_iso_dates.py")
SUMMARY = "the published_date check accepts ISO 8601 dates (YYYY-MM-DD), as the metadata extractor sends them"
BUGGY_PATTERN = 'DATE_PATTERN = re.compile(r"^\\d{4}/\\d{2}/\\d{2}$")'
FIXED_PATTERN = 'DATE_PATTERN = re.compile(r"^\\d{4}-\\d{2}-\\d{2}$")'
BUGGY_CHECK = "    return isinstance(value, str) and DATE_PATTERN.match(value) is not None\n"
FIXED_CHECK = (
    "    if not isinstance(value, str) or DATE_PATTERN.match(value) is None:\n"
    "        return False\n"
    "    try:  # the form is right; the date must exist too (no 2024-02-30)\n"
    "        date.fromisoformat(value)\n"
    "    except ValueError:\n"
    "        return False\n"
    "    return True\n"
)

REGRESSION_TEST = '''"""Regression test: published_date is an ISO 8601 date, as the metadata extractor sends it."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import schema_validator  # noqa: E402


def record(published_date):
    return {
        "id": 123,
        "file_path": "book_123.pdf",
        "title": "Book",
        "page_count": 412,
        "ingested_at": "2026-11-26T10:00:00+00:00",
        "checksum": "0123456789abcdef",
        "published_date": published_date,
    }


class IsoDatesTest(unittest.TestCase):
    def test_an_iso_date_passes(self):
        self.assertEqual(schema_validator.validate_record(record("2024-05-01"), schema_validator.EXPECTED_SCHEMA), [])

    def test_other_forms_and_impossible_dates_fail(self):
        for bad in ("2024/05/01", "01-05-2024", "2024-02-30", "soon"):
            self.assertTrue(schema_validator.validate_record(record(bad), schema_validator.EXPECTED_SCHEMA), bad)


if __name__ == "__main__":
    unittest.main()
'''


def find_target(repo_path: str) -> str:
    return _find(repo_path, TARGET)


def patch_source(source: str) -> tuple[str, bool]:
    """(new source, already fixed)."""
    if FIXED_PATTERN in source and "date.fromisoformat(value)" in source:
        return source, True
    patched = replace_once(source, BUGGY_PATTERN, FIXED_PATTERN, "DATE_PATTERN")
    patched = replace_once(patched, BUGGY_CHECK, FIXED_CHECK, "_is_date()")
    return replace_once(
        patched, "from datetime import datetime\n", "from datetime import date, datetime\n", "imports"
    ), False
