"""The obvious fix of the importer's byte-order-mark bug, and a wrong one: the stand-in of a coding agent that
trusts what it sees (healing-benchmark scenario `importer-bom-bogus-fix`).

The error says `line 1: the header must be month,payee,amount,currency`, and the file's first line, printed,
reads exactly that: the byte order mark in front of it is invisible. So this "fix" compares the header ignoring
case and surrounding spaces, and adds a test that a `Month, Payee ,...` header is accepted. The test passes and
so do the importer's others; the file still fails, because U+FEFF is neither a space nor a capital. Only running
again what failed shows it: mendloop's verification must catch it, revert the commit and hand the incident to a
human. Driven by `examples/agents/demo_fix.py --fixes bench/heal/fixes --fix bogus_header_case`."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import FixError, replace_once
from _common import find_target as _find

__all__ = ["REGRESSION_TEST", "SUMMARY", "TEST_PATH", "FixError", "find_target", "patch_source"]

TARGET = "parsing.py"
TEST_PATH = os.path.join("tests", "test_header_case.py")
SUMMARY = "parse_rows() compares the header ignoring case and surrounding spaces"
BUGGY = "tuple(f.strip() for f in split_fields(lines[0])) != HEADER"
FIXED = "tuple(f.strip().lower() for f in split_fields(lines[0].strip())) != HEADER"

REGRESSION_TEST = '''"""A header in other case or with spaces around its names is accepted."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parsing  # noqa: E402


class HeaderCaseTest(unittest.TestCase):
    def test_a_header_in_capitals_with_spaces(self):
        rows = parsing.parse_rows("s.csv", " Month, Payee ,AMOUNT,Currency \\n2026-11,Bank fee,4.50,EUR\\n")
        self.assertEqual([(r.payee, r.amount_cents) for r in rows], [("Bank fee", 450)])


if __name__ == "__main__":
    unittest.main()
'''


def find_target(repo_path: str) -> str:
    return _find(repo_path, TARGET)


def patch_source(source: str) -> tuple[str, bool]:
    """(new source, already fixed)."""
    if FIXED in source:
        return source, True
    return replace_once(source, BUGGY, FIXED, "parse_rows()'s header check"), False
