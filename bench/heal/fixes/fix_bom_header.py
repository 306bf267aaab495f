"""Stand-in coding agent's fix for the importer's byte-order-mark bug (examples/importer_service/parsing.py).

A spreadsheet's "CSV UTF-8" export starts with a UTF-8 byte order mark, which Python reads as the character
U+FEFF glued to the first header field: `"\\ufeffmonth" != "month"`, so `parse_rows()` refuses the header of a
file that is fine. The fix drops one leading BOM before the lines are split. Its regression test parses such a
file. Driven by `examples/agents/demo_fix.py --fixes bench/heal/fixes --fix fix_bom_header`."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import FixError, replace_once
from _common import find_target as _find

__all__ = ["REGRESSION_TEST", "SUMMARY", "TEST_PATH", "FixError", "find_target", "patch_source"]

TARGET = "parsing.py"
TEST_PATH = os.path.join("tests", "test_bom_header.py")
SUMMARY = "parse_rows() drops a leading UTF-8 byte order mark, so a spreadsheet's CSV export's header is read"
BUGGY = "    lines = text.splitlines()\n"
FIXED = (
    '    # A spreadsheet\'s "CSV UTF-8" export starts with a byte order mark (U+FEFF), which is not part of the\n'
    "    # header's first field.\n"
    '    lines = text.removeprefix("\\ufeff").splitlines()\n'
)

REGRESSION_TEST = '''"""Regression test: a CSV file starting with a UTF-8 byte order mark imports."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parsing  # noqa: E402


class ByteOrderMarkTest(unittest.TestCase):
    def test_a_leading_bom_is_not_part_of_the_header(self):
        rows = parsing.parse_rows("s.csv", "\\ufeffmonth,payee,amount,currency\\n2026-11,Bank fee,4.50,EUR\\n")
        self.assertEqual([(r.payee, r.amount_cents) for r in rows], [("Bank fee", 450)])

    def test_a_bom_elsewhere_is_still_refused(self):
        with self.assertRaises(ValueError):
            parsing.parse_rows("s.csv", "month,payee,amount,currency\\n\\ufeff2026-11,Bank fee,4.50,EUR\\n")


if __name__ == "__main__":
    unittest.main()
'''


def find_target(repo_path: str) -> str:
    return _find(repo_path, TARGET)


def patch_source(source: str) -> tuple[str, bool]:
    """(new source, already fixed)."""
    if 'removeprefix("\\ufeff")' in source:
        return source, True
    return replace_once(source, BUGGY, FIXED, "parse_rows()"), False
