"""Run stdlib `unittest` like `python -m unittest ARGS` and write a JUnit XML report of every test's outcome.

    python unittest_junit.py --junit-xml REPORT [ARGS...]

mendloop runs this file by its path under the *target's* interpreter, which may not have mendloop installed: it
imports nothing but the standard library. ARGS are `python -m unittest`'s (none or `discover ...`: discovery;
module, class or test names: those). The exit code is unittest's (0: every test passed). The report holds one
`<testcase classname=... name=...>` per test, with a `<failure>`, `<error>` or `<skipped>` child when it did not
pass, like pytest's `--junitxml`; a test whose module cannot be imported is an error, as unittest reports it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import unittest
import xml.etree.ElementTree as ET
from types import TracebackType
from typing import Any

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
# A single failure's text in the report; the report's own size is capped by its reader.
_MAX_TEXT = 4000


class _Recording(unittest.TextTestResult):
    """unittest's text result that also keeps every test's outcome, successes included."""

    records: list[tuple[str, str, str, str]]  # (test id, outcome, message, details)

    def __init__(self, stream: Any, descriptions: bool, verbosity: int, **kw: Any) -> None:
        super().__init__(stream, descriptions, verbosity, **kw)
        self.records = []
        self._started: dict[str, float] = {}

    def _note(self, test: unittest.TestCase, outcome: str, message: str = "", details: str = "") -> None:
        self.records.append((test.id(), outcome, message[:_MAX_TEXT], details[-_MAX_TEXT:]))

    def _text(self, err: _ExcInfo) -> tuple[str, str]:
        kind, value, _tb = err
        return f"{kind.__name__}: {value}", "".join(traceback.format_exception(*err))

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._note(test, "passed")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._note(test, "failed", *self._text(err))

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self._note(test, "error", *self._text(err))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._note(test, "skipped", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._note(test, "skipped", "expected failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._note(test, "failed", "unexpected success")

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            # The test as a whole fails; unittest calls addSuccess only when every subtest passed.
            outcome = "failed" if issubclass(err[0], test.failureException) else "error"
            self._note(test, outcome, *self._text(err))


def _write(path: str, result: _Recording, seconds: float) -> None:
    merged: dict[str, tuple[str, str, str]] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    for test_id, outcome, message, details in result.records:
        old = merged.get(test_id)
        if old is None or rank[outcome] > rank[old[0]]:
            merged[test_id] = (outcome, message, details)
    counts = {k: sum(1 for o, _, _ in merged.values() if o == k) for k in rank}
    suite = ET.Element(
        "testsuite",
        name="unittest",
        tests=str(len(merged)),
        failures=str(counts["failed"]),
        errors=str(counts["error"]),
        skipped=str(counts["skipped"]),
        time=f"{seconds:.3f}",
    )
    for test_id, (outcome, message, details) in merged.items():
        classname, _, name = test_id.rpartition(".")
        case = ET.SubElement(suite, "testcase", classname=classname, name=name)
        if outcome == "failed":
            ET.SubElement(case, "failure", message=message).text = details
        elif outcome == "error":
            ET.SubElement(case, "error", message=message).text = details
        elif outcome == "skipped":
            ET.SubElement(case, "skipped", message=message)
    root = ET.Element("testsuites")
    root.append(suite)
    tmp = f"{path}.tmp"
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--junit-xml":
        sys.stderr.write("usage: unittest_junit.py --junit-xml REPORT [unittest args...]\n")
        return 2
    report, args = argv[1], argv[2:]
    # As `python -m unittest` does: the current directory comes first on the path.
    sys.path.insert(0, os.getcwd())
    started = time.monotonic()
    results: list[_Recording] = []

    class Runner(unittest.TextTestRunner):
        def __init__(self, **kw: Any) -> None:
            super().__init__(resultclass=_Recording, **kw)

        def run(self, test: Any) -> Any:
            result = super().run(test)
            if isinstance(result, _Recording):
                results.append(result)
            return result

    program = unittest.main(module=None, argv=["python -m unittest", *args], testRunner=Runner, exit=False)
    if not results:
        return 5
    _write(report, results[0], time.monotonic() - started)
    return 0 if program.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
