"""Whether a patch's test run is good enough, judged against the same tests at the base commit: SWE-bench's rule.

PASS_TO_PASS: every test that passed at the base still passes (it neither fails nor disappears nor is skipped),
and the number of tests executed does not drop. FAIL_TO_PASS: every test the work order names as failing
(`failing_tests`) exists in the patched run and passes. A test that fails after the patch and did not fail at the
base is a new failure. A test that failed at the base too may keep failing only when the work order names the
tests the patch is to fix (otherwise a patch that fixes nothing would pass). Without a base run to compare with
(the tests could not run there, or the runner writes no report), the patched run must pass outright.

Tests are named `module.Class.test` (JUnit's `classname` + `.` + `name`); a named failing test may also be given
as a pytest node id (`tests/test_x.py::TestY::test_z`) or as unittest prints it (`test_z (test_x.TestY)`), and a
name without its class or leading packages matches (the rootdir decides whether pytest says `tests.test_x` or
`test_x`). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["passed", "failed", "error", "skipped"]
OUTCOMES: tuple[Outcome, ...] = ("passed", "failed", "error", "skipped")
_EXECUTED = frozenset({"passed", "failed", "error"})
_BAD = frozenset({"failed", "error"})
# How many offending tests a message lists before "and N more".
LISTED = 10

_UNITTEST_STYLE = re.compile(r"^(?P<name>[^\s()]+) \((?P<where>[^\s()]+)\)$")


@dataclass(frozen=True, slots=True)
class Verdict:
    """accepted, or rejected with a work order fail reason (`tests_failed`, `tests_regressed`, `tests_disabled`)
    and a message for a human listing the offending tests."""

    accepted: bool
    reason: str | None
    message: str
    regressed: tuple[str, ...] = ()
    disappeared: tuple[str, ...] = ()
    new_failures: tuple[str, ...] = ()
    unfixed: tuple[str, ...] = ()
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TestName:
    """A named test split into its parts: the dotted module/class path and the test's own name."""

    __test__ = False  # a value, not a pytest test class

    path: tuple[str, ...]
    name: str


def parse_name(text: str) -> TestName | None:
    """A test name in any of the accepted spellings, or None when it is not one."""
    text = text.strip()
    if not text:
        return None
    m = _UNITTEST_STYLE.match(text)
    if m:
        return _dotted(f"{m['where']}.{m['name']}")
    if "::" in text:
        file, *rest = text.split("::")
        if not rest or not all(rest):
            return None
        module = file[:-3] if file.endswith(".py") else file
        parts = tuple(p for p in module.replace("\\", "/").split("/") if p not in ("", "."))
        *classes, name = rest
        return TestName(path=(*parts, *classes), name=name)
    return _dotted(text)


def _dotted(text: str) -> TestName | None:
    # The parametrisation of a pytest id may hold dots ("test_x[1.5]"): split the path before it only.
    head, bracket, tail = text.partition("[")
    parts = head.split(".")
    if not all(parts):
        return None
    return TestName(path=tuple(parts[:-1]), name=parts[-1] + bracket + tail)


def matches(wanted: TestName, test_id: str) -> bool:
    """`wanted` names the test `test_id` (as a report names it): the same test name, and one path is a suffix of
    the other, the report's taken with or without its last part (a class a traceback does not name). Suffixes
    either way because the rootdir decides the module's name: `tests.test_x` under pytest, `test_x` under
    `unittest discover -s tests`."""
    have = parse_name(test_id)
    if have is None or have.name != wanted.name:
        return False
    if not wanted.path:
        return True
    return any(path and _suffix(path, wanted.path) for path in (have.path, have.path[:-1]))


def _suffix(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    n = min(len(a), len(b))
    return a[len(a) - n :] == b[len(b) - n :]


def executed(outcomes: Mapping[str, str]) -> int:
    return sum(1 for o in outcomes.values() if o in _EXECUTED)


def judge(
    base: Mapping[str, str] | None,
    patched: Mapping[str, str],
    failing_tests: Sequence[str] = (),
    *,
    patched_exit: int | None = 0,
) -> Verdict:
    """`base` and `patched`: test id → outcome, from the runs' reports (`base` None: no base run to compare with).
    `failing_tests`: the tests the patch must fix. `patched_exit`: the patched run's exit code."""
    base_executed = executed(base) if base is not None else None
    patched_executed = executed(patched)
    counts: dict[str, Any] = {
        "base_executed": base_executed,
        "patched_executed": patched_executed,
        "patched_passed": sum(1 for o in patched.values() if o == "passed"),
    }
    wanted = [(text, parse_name(text)) for text in dict.fromkeys(failing_tests)]
    unfixed = tuple(
        text
        for text, name in wanted
        if name is None or not any(o == "passed" and matches(name, tid) for tid, o in patched.items())
    )
    if base is None:
        failing = tuple(sorted(t for t, o in patched.items() if o in _BAD))
        if failing:
            return _reject("tests_failed", "tests fail and there is no base run to compare with", counts, failing)
        if unfixed:
            return _unfixed(unfixed, patched, counts)
        if patched_exit != 0:
            return _exit_without_failure(patched_exit, counts)
        return Verdict(True, None, f"{counts['patched_passed']} tests passed", counts=counts)

    named = {tid for tid in (*base, *patched) for _, n in wanted if n is not None and matches(n, tid)}
    passed_before = [t for t, o in base.items() if o == "passed"]
    regressed = tuple(sorted(t for t in passed_before if patched.get(t) in _BAD))
    disappeared = tuple(sorted(t for t in passed_before if patched.get(t) not in _BAD | {"passed"}))
    new_failures = tuple(
        sorted(t for t, o in patched.items() if o in _BAD and base.get(t) not in _BAD and t not in regressed)
    )
    if regressed:
        return _reject(
            "tests_regressed", "tests that passed at the base fail with the patch", counts, regressed, regressed=True
        )
    if disappeared:
        return _reject(
            "tests_disabled", "tests that passed at the base are skipped or gone with the patch", counts, disappeared
        )
    if patched_executed < (base_executed or 0):
        return Verdict(
            False,
            "tests_disabled",
            f"fewer tests ran with the patch ({patched_executed}) than at the base ({base_executed})",
            counts=counts,
        )
    if new_failures:
        return _reject("tests_failed", "tests fail with the patch that did not fail at the base", counts, new_failures)
    if unfixed:
        return _unfixed(unfixed, patched, counts)
    still = sorted(t for t, o in patched.items() if o in _BAD and t not in named)
    if still and not wanted:
        # Nothing names what the patch is to fix: tolerating the base's failures would accept a patch that fixes
        # nothing, so the patched run must pass outright, as by its exit code before.
        return _reject("tests_failed", "tests fail with the patch (and failed at the base)", counts, still)
    if patched_exit != 0 and not still:
        return _exit_without_failure(patched_exit, counts)
    message = f"{counts['patched_passed']} tests passed; none that passed at the base fails"
    if still:
        message += f"; {len(still)} failed at the base too: {_listing(still)}"
    return Verdict(True, None, message, counts=counts)


def _reject(
    reason: str, what: str, counts: dict[str, Any], tests: Sequence[str], *, regressed: bool = False
) -> Verdict:
    message = f"{what}: {_listing(tests)}"
    if reason == "tests_regressed" or regressed:
        return Verdict(False, reason, message, regressed=tuple(tests), counts=counts)
    if reason == "tests_disabled":
        return Verdict(False, reason, message, disappeared=tuple(tests), counts=counts)
    return Verdict(False, reason, message, new_failures=tuple(tests), counts=counts)


def _unfixed(unfixed: Sequence[str], patched: Mapping[str, str], counts: dict[str, Any]) -> Verdict:
    described = []
    for text in unfixed:
        name = parse_name(text)
        found = [o for tid, o in patched.items() if name is not None and matches(name, tid)]
        described.append(f"{text} ({', '.join(sorted(set(found))) if found else 'not run'})")
    return Verdict(
        False,
        "tests_failed",
        f"the failing tests the work order names do not pass with the patch: {_listing(described)}",
        unfixed=tuple(unfixed),
        counts=counts,
    )


def _exit_without_failure(code: int | None, counts: dict[str, Any]) -> Verdict:
    return Verdict(
        False,
        "tests_failed",
        f"the test command exited with {code} although its report shows no new failure",
        counts=counts,
    )


def _listing(tests: Iterable[str]) -> str:
    items = list(tests)
    shown = ", ".join(items[:LISTED])
    return shown + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


def failing_tests_of(context: Mapping[str, Any], extra: Iterable[str] = ()) -> list[str]:
    """The failing tests a work order names: its context's `failing_tests`, those its traceback names
    (`traceback.failing_tests`) and `extra` (the target's), deduplicated, in that order."""
    found: list[str] = list(extra)
    given = context.get("failing_tests")
    if isinstance(given, list):
        found += [t for t in given if isinstance(t, str)]
    tb = context.get("traceback")
    if isinstance(tb, Mapping) and isinstance(tb.get("failing_tests"), list):
        found += [t for t in tb["failing_tests"] if isinstance(t, str)]
    return [t for t in dict.fromkeys(found) if t.strip()][:100]


__all__ = ["OUTCOMES", "Outcome", "TestName", "Verdict", "executed", "failing_tests_of", "judge", "matches"]
