#!/usr/bin/env python3
"""Stand-in for a coding agent: fix the CSV quoting bug in parsing.py.

    python3 fix_csv_quoting.py [REPO_PATH]

`split_fields()` splits a line on every comma, so a quoted field with a comma in it ("1,200.50") becomes two
fields and the import fails. The fix reads the line with the csv module, which knows quoting, and adds the
regression test `tests/test_quoted_fields.py`. Exit 0 when the fix was applied or was already there; exit 1 (with
a message on stderr) when the buggy code is not found. It neither runs tests nor commits. Standard library only;
`examples/agents/demo_fix.py --fixes DIR` drives it the way a coding agent's edit would be made.
"""

from __future__ import annotations

import os
import re
import sys

TARGET = "parsing.py"
TEST_PATH = os.path.join("tests", "test_quoted_fields.py")
SUMMARY = (
    'split_fields() now reads a line with the csv module, so a quoted field with a comma in it ("1,200.50") stays '
    "one field and rent.csv imports"
)

FUNCTION_RE = re.compile(r"^def split_fields\(.*?(?=^\S|\Z)", re.MULTILINE | re.DOTALL)
BUGGY_LINE_RE = re.compile(r'^(?P<indent>[ \t]+)return line\.split\(","\)[ \t]*$', re.MULTILINE)
FIXED_MARKER = "csv.reader"
FIXED_BODY = (
    '{indent}# The csv module knows quoting: a quoted field may hold commas ("1,200.50"), which a plain split\n'
    '{indent}# on "," cut in two.\n'
    "{indent}return next(csv.reader([line]), [])"
)

REGRESSION_TEST = '''"""Regression test: a quoted field with a comma in it is one field (rent.csv's "1,200.50")."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parsing  # noqa: E402


class QuotedFieldsTest(unittest.TestCase):
    def test_a_quoted_amount_with_a_thousands_separator(self):
        rows = parsing.parse_rows("rent.csv", 'month,payee,amount,currency\\n2026-11,Flat 3 rent,"1,200.50",EUR\\n')
        self.assertEqual([(r.payee, r.amount_cents) for r in rows], [("Flat 3 rent", 120050)])

    def test_a_quoted_payee_with_a_comma(self):
        rows = parsing.parse_rows("x.csv", 'month,payee,amount,currency\\n2026-11,"Smith, J.",12.00,EUR\\n')
        self.assertEqual(rows[0].payee, "Smith, J.")

    def test_the_shipped_inbox_imports(self):
        inbox = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "inbox")
        with open(os.path.join(inbox, "rent.csv"), encoding="utf-8") as fh:
            rows = parsing.parse_rows("rent.csv", fh.read())
        self.assertEqual(sum(r.amount_cents for r in rows), 95000 + 120050 + 8500)


if __name__ == "__main__":
    unittest.main()
'''


class FixError(Exception):
    pass


def find_target(repo_path: str) -> str:
    """Path of parsing.py: at the repository root, or the only one below it."""
    direct = os.path.join(repo_path, TARGET)
    if os.path.isfile(direct):
        return direct
    found = []
    for root, dirs, files in os.walk(repo_path):
        dirs[:] = [
            d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules", "venv", "state")
        ]
        if TARGET in files:
            found.append(os.path.join(root, TARGET))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FixError(f"{TARGET} not found under {repo_path}")
    raise FixError(f"several {TARGET} files under {repo_path}: {', '.join(sorted(found))}")


def patch_source(source: str) -> tuple[str, bool]:
    """Return (new source, already_fixed). Raises FixError when the buggy code is not there."""
    match = FUNCTION_RE.search(source)
    if match is None:
        raise FixError("function split_fields() not found in parsing.py")
    function = match.group(0)
    buggy = BUGGY_LINE_RE.search(function)
    if buggy is None:
        if FIXED_MARKER in function:
            return source, True
        raise FixError('split_fields() does not contain the expected `return line.split(",")`')
    fixed_function = (
        function[: buggy.start()] + FIXED_BODY.format(indent=buggy.group("indent")) + function[buggy.end() :]
    )
    patched = source[: match.start()] + fixed_function + source[match.end() :]
    if not re.search(r"^import csv$", patched, re.MULTILINE):
        # `import csv` first among the module's imports (after `from __future__`, which must stay first).
        first = re.search(r"^import \w+$", patched, re.MULTILINE)
        if first is None:
            raise FixError("parsing.py has no `import` line to put `import csv` beside; refusing to patch blindly")
        patched = patched[: first.start()] + "import csv\n" + patched[first.start() :]
    return patched, False


def apply_fix(repo_path: str = ".") -> list[str]:
    """Apply the fix and add the regression test; the files changed, relative to `repo_path`."""
    repo_path = os.path.abspath(repo_path)
    target = find_target(repo_path)
    with open(target, encoding="utf-8") as fh:
        new_source, already_fixed = patch_source(fh.read())
    changed = []
    if not already_fixed:
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(new_source)
        changed.append(os.path.relpath(target, repo_path))
    test_file = os.path.join(os.path.dirname(target), TEST_PATH)
    if not os.path.exists(test_file):
        os.makedirs(os.path.dirname(test_file), exist_ok=True)
        with open(test_file, "w", encoding="utf-8") as fh:
            fh.write(REGRESSION_TEST)
        changed.append(os.path.relpath(test_file, repo_path))
    return changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(__doc__.strip())  # noqa: T201 (a script's own output)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        changed = apply_fix(args[0] if args else ".")
    except (FixError, OSError) as exc:
        print(f"fix_csv_quoting: {exc}", file=sys.stderr)  # noqa: T201 (a script's own output)
        return 1
    print(f"{SUMMARY}; changed: {', '.join(changed)}" if changed else "already fixed: nothing to change")  # noqa: T201 (a script's own output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
