"""Stand-in coding agent's fix for the sample service's verification bug (examples/sample_service/verification.py).

`verify_document()` tests `not doc.get("page_count")`, so a legitimately empty insert (`page_count == 0`) is
reported as "page_count missing" and verification fails on good data. The fix tells a missing page count (`None`
or absent) from zero, which is valid. Driven by `examples/agents/demo_fix.py --fixes bench/heal/fixes --fix
fix_empty_documents`."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import FixError, replace_once
from _common import find_target as _find

__all__ = ["REGRESSION_TEST", "SUMMARY", "TEST_PATH", "FixError", "find_target", "patch_source"]

TARGET = "verification.py"
TEST_PATH = os.path.join("tests", "test_empty_documents.py")
SUMMARY = "verify_document() accepts page_count 0 (an empty insert); only an absent page count is missing"
BUGGY = '    if not doc.get("page_count"):\n'
FIXED = '    if doc.get("page_count") is None:  # 0 is a real page count (an empty insert), not a missing one\n'

REGRESSION_TEST = '''"""Regression test: a document of 0 pages (an empty insert) verifies."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import verification  # noqa: E402


def doc(**fields):
    base = {"id": "doc-empty", "content": "", "page_count": 0, "checksum": verification.content_checksum("")}
    return {**base, **fields}


class EmptyDocumentsTest(unittest.TestCase):
    def test_zero_pages_verifies(self):
        self.assertEqual(verification.verify_document(doc()), [])

    def test_an_absent_page_count_is_missing(self):
        self.assertEqual(verification.verify_document(doc(page_count=None)), ["page_count missing"])

    def test_a_negative_page_count_is_invalid(self):
        self.assertEqual(verification.verify_document(doc(page_count=-1)), ["page_count invalid"])


if __name__ == "__main__":
    unittest.main()
'''


def find_target(repo_path: str) -> str:
    return _find(repo_path, TARGET)


def patch_source(source: str) -> tuple[str, bool]:
    """(new source, already fixed)."""
    if FIXED in source:
        return source, True
    return replace_once(source, BUGGY, FIXED, "verify_document()'s page_count check"), False
