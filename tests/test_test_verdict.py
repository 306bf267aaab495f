"""Tests against the base (SWE-bench's FAIL_TO_PASS / PASS_TO_PASS): a patch is accepted only if no test that passed
at the base fails or disappears, the number of tests run does not drop, and the named failing tests pass.

The pure rule (domain/test_verdict.py), the JUnit reader's defences, the shipped unittest runner's report, and the
rule at work on real git repositories: a pytest project through `apply_patch`, a unittest project through the
server (the recorded fail reason), both with real test processes through the sandbox."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.agents import test_suite
from mendloop.agents.patch_pipeline import apply_patch, patcher
from mendloop.agents.patch_safety import Constraints, check_diff
from mendloop.agents.test_suite import ReportSetting, Suite, parse_junit, plan
from mendloop.domain.states import FAIL_REASONS, RETRYABLE_FAIL_REASONS
from mendloop.domain.test_verdict import failing_tests_of, judge, matches, parse_name
from mendloop.errors import PatchRejected
from mendloop.infra import traceback
from mendloop.infra.sandbox import detect
from tests.interpreters import python_for_tests
from tests.support import api_client, migrated_sqlite, open_app, settings_for, wait_for, write_playbooks

PY = sys.executable
RUNNER = Path(test_suite.__file__).with_name("unittest_junit.py")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def make_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(textwrap.dedent(text))
    git(path, "add", "-A")
    git(path, "commit", "-qm", "initial")
    return path


def diff_of(repo: Path, changes: dict[str, str | None]) -> str:
    """The diff that makes `changes` (None deletes), computed by git and undone again."""
    for rel, text in changes.items():
        if text is None:
            (repo / rel).unlink()
        else:
            (repo / rel).write_text(textwrap.dedent(text))
    git(repo, "add", "-A")
    diff = subprocess.run(
        ["git", "-C", str(repo), "diff", "--cached", "--no-color"], capture_output=True, text=True, check=True
    ).stdout
    git(repo, "reset", "-q", "--hard", "HEAD")
    return diff


def assert_untouched(repo: Path, head: str) -> None:
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert git(repo, "rev-parse", "HEAD") == head


# -- the rule, pure ------------------------------------------------------------------------------------------------

BASE = {"t.A.test_ok": "passed", "t.A.test_also": "passed", "t.A.test_bug": "failed"}


def test_a_regression_a_disappearance_and_a_drop_in_count_are_each_refused() -> None:
    regressed = judge(BASE, {**BASE, "t.A.test_ok": "failed", "t.A.test_bug": "passed"})
    assert (regressed.accepted, regressed.reason, regressed.regressed) == (False, "tests_regressed", ("t.A.test_ok",))
    assert "t.A.test_ok" in regressed.message
    skipped = judge(BASE, {**BASE, "t.A.test_also": "skipped"})
    assert (skipped.reason, skipped.disappeared) == ("tests_disabled", ("t.A.test_also",))
    gone = judge(BASE, {"t.A.test_ok": "passed", "t.A.test_bug": "passed"})
    assert (gone.reason, gone.disappeared) == ("tests_disabled", ("t.A.test_also",))
    fewer = judge(BASE, {"t.A.test_ok": "passed", "t.A.test_also": "passed"})  # the failing one vanished
    assert fewer.reason == "tests_disabled" and "fewer tests ran" in fewer.message
    assert judge(BASE, {}).reason == "tests_disabled"  # --collect-only: nothing ran


def test_named_failing_tests_must_pass_and_exist() -> None:
    fixed = {**BASE, "t.A.test_bug": "passed"}
    assert judge(BASE, fixed, ["t.py::A::test_bug"]).accepted
    unfixed = judge(BASE, BASE, ["A.test_bug"])
    assert (unfixed.accepted, unfixed.reason, unfixed.unfixed) == (False, "tests_failed", ("A.test_bug",))
    missing = judge(BASE, fixed, ["t.A.test_nowhere"])
    assert missing.reason == "tests_failed" and "not run" in missing.message
    # A test that failed at the base too may keep failing when the patch fixes the named one (PASS_TO_PASS) ...
    two_bugs = {**BASE, "t.A.test_other_bug": "failed"}
    assert judge(two_bugs, {**two_bugs, "t.A.test_bug": "passed"}, ["t.A.test_bug"], patched_exit=1).accepted
    # ... but with nothing named, a patch that fixes nothing and breaks nothing is no fix.
    nothing = judge(BASE, BASE, patched_exit=1)
    assert (nothing.accepted, nothing.reason) == (False, "tests_failed") and "t.A.test_bug" in nothing.message
    new_failure = judge(BASE, {**fixed, "t.A.test_new": "error"})
    assert (new_failure.reason, new_failure.new_failures) == ("tests_failed", ("t.A.test_new",))


def test_without_a_base_report_the_patched_run_must_pass_outright() -> None:
    assert judge(None, {"a.test_x": "passed"}).accepted
    assert judge(None, {"a.test_x": "failed"}).reason == "tests_failed"
    assert judge(None, {"a.test_x": "passed"}, patched_exit=1).reason == "tests_failed"


def test_test_names_match_across_spellings() -> None:
    report_id = "tests.test_calc.CalcTest.test_sub"
    for spelling in (
        "tests/test_calc.py::CalcTest::test_sub",
        "tests/test_calc.py::test_sub",  # a traceback names no class
        "test_calc.CalcTest.test_sub",
        "test_sub (tests.test_calc.CalcTest)",
    ):
        name = parse_name(spelling)
        assert name is not None and matches(name, report_id), spelling
    assert matches(parse_name("tests/test_calc.py::CalcTest::test_sub"), "test_calc.CalcTest.test_sub")  # type: ignore[arg-type]
    assert not matches(parse_name("tests/test_other.py::test_sub"), report_id)  # type: ignore[arg-type]
    assert not matches(parse_name("tests/test_calc.py::test_add"), report_id)  # type: ignore[arg-type]


def test_a_traceback_through_a_test_file_names_the_failing_test() -> None:
    text = (
        "Traceback (most recent call last):\n"
        '  File "tests/test_calc.py", line 9, in test_sub\n'
        "    self.assertEqual(calc.sub(5, 3), 2)\n"
        '  File "calc.py", line 2, in sub\n'
        "    return a + b\n"
        "AssertionError: 8 != 2\n"
    )
    parsed = traceback.parse(text)
    assert parsed is not None
    context = {"traceback": parsed.as_dict(), "failing_tests": ["tests/test_calc.py::test_other"]}
    assert failing_tests_of(context, ["cfg.test_x"]) == [
        "cfg.test_x",
        "tests/test_calc.py::test_other",
        "tests/test_calc.py::test_sub",
    ]
    assert traceback.is_test_file("pkg/foo_test.py") and not traceback.is_test_file("pkg/foo.py")


def test_the_new_reasons_are_fail_reasons_and_env_errors_are_not_retried() -> None:
    assert {"tests_regressed", "tests_disabled", "test_env_error"} <= set(FAIL_REASONS)
    assert "test_env_error" not in RETRYABLE_FAIL_REASONS


# -- the report: planning, reading, the shipped unittest runner ----------------------------------------------------


def test_the_report_argument_follows_the_runner(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    auto = ReportSetting()
    assert plan(["pytest", "-q", "--", "t"], auto, report, RUNNER).argv == [
        "pytest",
        f"--junitxml={report}",
        "-q",
        "--",
        "t",
    ]
    py = plan(["/x/python3.11", "-m", "pytest", "-q"], auto, report, RUNNER)
    assert (py.kind, py.argv[3]) == ("pytest", f"--junitxml={report}")
    ut = plan(["python3", "-m", "unittest", "discover", "-s", "tests"], auto, report, RUNNER)
    assert ut.kind == "unittest" and ut.argv == [
        "python3",
        str(RUNNER),
        "--junit-xml",
        str(report),
        "discover",
        "-s",
        "tests",
    ]
    assert plan(["make", "test"], auto, report, RUNNER).kind == "none"
    custom = plan(
        ["npx", "jest"], ReportSetting.from_value({"format": "junit", "path_arg": "--out={path}"}), report, RUNNER
    )
    assert custom.argv == ["npx", "jest", f"--out={report}"]
    assert plan(["pytest"], ReportSetting.from_value("none"), report, RUNNER).report is None


def test_hostile_or_broken_reports_are_refused() -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        b"<testsuite><testcase classname='c' name='&b;'/></testsuite>"
    )
    for data, why in (
        (laughs, "DOCTYPE"),
        (b"<testsuite><testcase", "not XML"),
        (b"<html/>", "root"),
        (b"<testsuite>" + b" " * (test_suite.MAX_REPORT_BYTES + 1) + b"</testsuite>", "larger"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_junit(data)
    ok = parse_junit(
        b"<testsuites><testsuite><testcase classname='m.C' name='t1'/><testcase classname='m.C' name='t2'>"
        b"<failure/></testcase><testcase classname='m.C' name='t2'><error/></testcase>"
        b"<testcase name='t3'><skipped/></testcase></testsuite></testsuites>"
    )
    assert ok == {"m.C.t1": "passed", "m.C.t2": "error", "t3": "skipped"}


def test_the_unittest_runner_reports_pass_fail_error_and_skip(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_mix.py").write_text(
        textwrap.dedent(
            """
            import unittest

            class Mix(unittest.TestCase):
                def test_pass(self):
                    pass

                def test_fail(self):
                    self.assertEqual(1, 2)

                def test_error(self):
                    raise KeyError("boom")

                @unittest.skip("not today")
                def test_skip(self):
                    pass

                def test_sub(self):
                    for i in range(2):
                        with self.subTest(i=i):
                            self.assertEqual(i, 0)
            """
        )
    )
    (project / "tests" / "test_broken.py").write_text("import no_such_module\n")
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [python_for_tests(), str(RUNNER), "--junit-xml", str(report), "discover", "-s", "tests"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr
    assert "FAILED" in done.stderr  # unittest's own text output is kept
    outcomes = parse_junit(report.read_bytes())
    assert outcomes == {
        "test_mix.Mix.test_pass": "passed",
        "test_mix.Mix.test_fail": "failed",
        "test_mix.Mix.test_error": "error",
        "test_mix.Mix.test_skip": "skipped",
        "test_mix.Mix.test_sub": "failed",
        "unittest.loader._FailedTest.test_broken": "error",
    }
    assert "KeyError" in report.read_text()
    passing = subprocess.run(
        [python_for_tests(), str(RUNNER), "--junit-xml", str(report), "test_mix.Mix.test_pass"],
        cwd=project / "tests",
        capture_output=True,
    )
    assert passing.returncode == 0 and parse_junit(report.read_bytes()) == {"test_mix.Mix.test_pass": "passed"}


# -- a pytest project through apply_patch --------------------------------------------------------------------------

PYTEST_PROJECT = {
    "app.py": "def value():\n    return 1\n\n\ndef double(x):\n    return x * 3\n",
    "tests/test_app.py": """
        import os
        import app

        def test_value():
            assert app.value() == 1

        def test_value_again():
            assert app.value() + 1 == 2

        def test_double():
            assert app.double(2) == 4

        def test_count():
            counter = os.environ.get("COUNTER")
            if counter:
                with open(counter, "a") as fh:
                    fh.write("ran\\n")
        """,
}
PYTEST = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
# The venv's plugins (hypothesis, schemathesis) take seconds to import; the small project needs none of them.
QUICK_PYTEST = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONDONTWRITEBYTECODE": "1"}
FIX_DOUBLE = {"app.py": "def value():\n    return 1\n\n\ndef double(x):\n    return x * 2\n"}


@pytest.fixture
def py_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "pyproj", PYTEST_PROJECT)


def apply_py(repo: Path, diff: str, tmp_path: Path, **options: Any) -> Any:
    return apply_patch(
        repo,
        diff,
        base_commit=None,
        **{
            "constraints": Constraints(tests_may_change=True),
            "test_command": PYTEST,
            "test_timeout": 60,
            "message": "fix",
            "trailers": {"Work-Order": "wo_t"},
            "env": QUICK_PYTEST,
            "worktree_parent": tmp_path,
            **options,
        },
    )


def _test_file(transform: Any) -> dict[str, str | None]:
    return {"tests/test_app.py": transform(textwrap.dedent(PYTEST_PROJECT["tests/test_app.py"]))}


PYTEST_REJECTIONS: dict[str, tuple[dict[str, str | None], str, str]] = {
    "breaks_a_passing_test": (
        {"app.py": "def value():\n    return 5\n\n\ndef double(x):\n    return x * 2\n"},
        "tests_regressed",
        "test_value",
    ),
    "skips_every_test": (
        _test_file(lambda t: "import pytest\npytestmark = pytest.mark.skip\n" + t),
        "tests_disabled",
        "skipped",
    ),
    "renames_a_test_away": (
        _test_file(lambda t: t.replace("def test_value_again", "def check_value_again")),
        "tests_disabled",
        "test_value_again",
    ),
    "deletes_the_tests": ({"tests/test_app.py": None}, "tests_disabled", "test_value"),
    # Exits before pytest writes its report, with status 0: the old exit-code rule called that a pass.
    "exits_0_at_import": ({"app.py": "import os\nos._exit(0)\n"}, "tests_failed", "wrote no report"),
    "leaves_the_named_test_failing": (
        {"app.py": "def value():\n    return 1\n\n\ndef double(x):\n    return x * 3  # TODO\n"},
        "tests_failed",
        "test_double",
    ),
}


@pytest.mark.parametrize("case", sorted(PYTEST_REJECTIONS))
def test_the_base_rule_rejects_and_leaves_the_repository(py_repo: Path, tmp_path: Path, case: str) -> None:
    changes, reason, shown = PYTEST_REJECTIONS[case]
    head = git(py_repo, "rev-parse", "HEAD")
    diff = diff_of(py_repo, changes)
    with pytest.raises(PatchRejected) as caught:
        apply_py(py_repo, diff, tmp_path, failing_tests=["tests/test_app.py::test_double"])
    assert caught.value.reason == reason, caught.value.message
    assert shown in caught.value.message
    assert_untouched(py_repo, head)


def test_a_patch_that_fixes_the_named_test_is_committed(py_repo: Path, tmp_path: Path) -> None:
    head = git(py_repo, "rev-parse", "HEAD")
    result = apply_py(py_repo, diff_of(py_repo, FIX_DOUBLE), tmp_path, failing_tests=["tests/test_app.py::test_double"])
    assert result.tests.passed and result.tests.report == "pytest"
    assert (result.tests.executed, result.tests.base_executed) == (4, 4)
    assert git(py_repo, "rev-parse", "HEAD~1") == head and "x * 2" in (py_repo / "app.py").read_text()


def test_the_base_run_is_cached_per_base_commit(py_repo: Path, tmp_path: Path) -> None:
    counts = tmp_path / "counts"
    counts.mkdir()
    counter = counts / "runs"
    sandbox = detect(None)

    def suite() -> Suite:
        env = {"COUNTER": str(counter), "PATH": "/usr/bin:/bin", **QUICK_PYTEST}
        return Suite(py_repo, PYTEST, sandbox=sandbox, timeout=60, env=env, workdir=tmp_path, writable=[counts])

    base = git(py_repo, "rev-parse", "HEAD")
    first = diff_of(py_repo, FIX_DOUBLE)
    summary = check_diff(first, Constraints())
    assert not suite().verify(base, patcher(first, summary)).base_cached
    assert counter.read_text().count("ran") == 2  # the base and the patched run
    second = diff_of(py_repo, {"app.py": FIX_DOUBLE["app.py"] + "# another fix\n"})
    again = suite().verify(base, patcher(second, check_diff(second, Constraints())))
    assert again.base_cached and again.base_executed == 4
    assert counter.read_text().count("ran") == 3  # only the patched run: the base came from the cache


def test_an_unreachable_test_program_is_test_env_error(py_repo: Path, tmp_path: Path) -> None:
    # In the repository, so the tests' worktree (and the sandbox) holds them: a file that can't be run (the
    # shell's 126), and a runnable script whose interpreter can't be.
    (py_repo / "ci").mkdir()
    (py_repo / "ci" / "runner").write_text("#!/bin/sh\nexit 0\n")
    (py_repo / "ci" / "runner").chmod(0o644)
    (py_repo / "ci" / "tests.sh").write_text("#!ci/runner\n")
    (py_repo / "ci" / "tests.sh").chmod(0o755)
    git(py_repo, "add", "ci")
    git(py_repo, "commit", "-qm", "ci scripts")
    head = git(py_repo, "rev-parse", "HEAD")
    diff = diff_of(py_repo, FIX_DOUBLE)
    for argv in (
        ["/nonexistent/python3", "-m", "pytest"],
        ["sh", "-c", "exit 127"],
        ["sh", "-c", "exit 126"],
        ["ci/runner"],
        ["ci/tests.sh"],
    ):
        with pytest.raises(PatchRejected, match="environment is broken") as caught:
            apply_py(py_repo, diff, tmp_path, test_command=argv)
        assert caught.value.reason == "test_env_error"
        if argv[0].startswith("ci/"):  # found, and refused for what it is: not a missing file
            assert re.search(r"exit code 126|[Pp]ermission denied", str(caught.value)), caught.value
        assert_untouched(py_repo, head)


# -- a unittest project through the server: the recorded reason ---------------------------------------------------

UNITTEST_PROJECT = {
    "calc.py": "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a + b\n",
    "tests/test_calc.py": """
        import unittest

        import calc


        class CalcTest(unittest.TestCase):
            def test_add(self):
                self.assertEqual(calc.add(2, 3), 5)

            def test_add_zero(self):
                self.assertEqual(calc.add(0, 3), 3)

            def test_sub(self):
                self.assertEqual(calc.sub(5, 3), 2)
        """,
}
CALC_FIXED = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"


@pytest.fixture
def calc_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "calc", UNITTEST_PROJECT)


@pytest.fixture
def database(tmp_path: Path) -> str:
    """SQLite only: what is tested here is the patch pipeline, which no database dialect changes."""
    return migrated_sqlite(tmp_path / "mendloop.db")


@pytest.fixture
def server(database: str, tmp_path: Path, calc_repo: Path) -> Any:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "escalates, then verifies",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "fix sub"}},
                {
                    "id": "verify",
                    "action": "verify",
                    "with": {"check": {"command": {"argv": [PY, "-c", "pass"]}}, "expect": "result.exit_code == 0"},
                    "on_failure": "needs_human",
                },
            ],
        },
    )
    target = {
        "repository": str(calc_repo),
        "test_command": [python_for_tests(), "-m", "unittest", "discover", "-s", "tests"],
        "test_timeout": 60,
        "failing_tests": ["tests/test_calc.py::CalcTest::test_sub"],
        "patch": {"tests_may_change": True},
    }
    settings = settings_for(
        database,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"code": "code"},
        default_target="svc",
        targets={"svc": target},
    )
    a = open_app(settings, start_workers=True)
    yield a
    a.close()


@pytest.fixture
def http(server: Any) -> Any:
    with api_client(server) as c:
        yield c


def complete(http: httpx.Client, diff: str, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    run = http.post("/patches/trigger", json={"description": "d", "error_type": "code", "component": "svc"}).json()
    assert run["status"] == "awaiting_patch", run
    done = http.post(
        f"/patches/work-orders/{run['work_order_id']}/complete",
        json={"tests_passed": True, "files_changed": 1, "diff": diff, **extra},
    )
    assert done.status_code == 200, done.text
    wait_for(
        lambda: http.get(f"/patches/runs/{run['run_id']}").json()["status"] in ("completed", "needs_human", "failed"),
        timeout=60,
    )
    return http.get(f"/patches/runs/{run['run_id']}").json(), http.get(
        f"/patches/work-orders/{run['work_order_id']}"
    ).json()


def _calc_tests(transform: Any) -> dict[str, str | None]:
    return {"tests/test_calc.py": transform(textwrap.dedent(UNITTEST_PROJECT["tests/test_calc.py"]))}


SERVER_REJECTIONS: dict[str, tuple[dict[str, str | None], str, str]] = {
    "breaks_add": ({"calc.py": CALC_FIXED.replace("a + b", "a * b")}, "tests_regressed", "test_add"),
    "skips_a_test": (
        _calc_tests(lambda t: t.replace("    def test_add_zero", "    @unittest.skip('later')\n    def test_add_zero")),
        "tests_disabled",
        "test_add_zero",
    ),
    "does_not_fix_sub": ({"calc.py": UNITTEST_PROJECT["calc.py"] + "# looked at it\n"}, "tests_failed", "test_sub"),
}


@pytest.mark.parametrize("case", sorted(SERVER_REJECTIONS))
def test_the_server_records_why_the_base_rule_rejected(http: httpx.Client, calc_repo: Path, case: str) -> None:
    changes, reason, shown = SERVER_REJECTIONS[case]
    head = git(calc_repo, "rev-parse", "HEAD")
    run, wo = complete(http, diff_of(calc_repo, changes))
    assert (wo["status"], wo["fail_reason"]) == ("failed", reason), wo
    assert run["status"] == "needs_human"
    assert shown in str(wo)
    assert_untouched(calc_repo, head)


def test_the_server_applies_a_fix_of_the_named_test(http: httpx.Client, calc_repo: Path) -> None:
    head = git(calc_repo, "rev-parse", "HEAD")
    run, wo = complete(http, diff_of(calc_repo, {"calc.py": CALC_FIXED}))
    assert run["status"] == "completed", run["error"]
    assert wo["status"] == "completed" and wo["patch_result"]["applied"]["tests_passed"] is True
    assert "3 tests passed" in wo["patch_result"]["applied"]["tests_message"]
    assert git(calc_repo, "rev-parse", "HEAD~1") == head


def test_a_commit_already_made_is_judged_on_what_it_changes(http: httpx.Client, calc_repo: Path) -> None:
    """The completion names a commit on the branch; its diff says only calc.py, the commit also changes CI."""
    innocent = diff_of(calc_repo, {"calc.py": CALC_FIXED})
    (calc_repo / "calc.py").write_text(CALC_FIXED)
    (calc_repo / ".github" / "workflows").mkdir(parents=True)
    (calc_repo / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    git(calc_repo, "add", "-A")
    run = http.post("/patches/trigger", json={"description": "d", "error_type": "code", "component": "svc"}).json()
    git(calc_repo, "commit", "-qm", f"fix\n\nWork-Order: {run['work_order_id']}")
    head = git(calc_repo, "rev-parse", "HEAD")
    done = http.post(
        f"/patches/work-orders/{run['work_order_id']}/complete",
        json={"tests_passed": True, "files_changed": 1, "diff": innocent, "applied_commit": head},
    )
    assert done.status_code == 200, done.text
    wait_for(lambda: http.get(f"/patches/runs/{run['run_id']}").json()["status"] == "needs_human", timeout=30)
    wo = http.get(f"/patches/work-orders/{run['work_order_id']}").json()
    assert wo["fail_reason"] == "unsafe_patch" and ".github/workflows/ci.yml" in str(wo), wo
    assert_untouched(calc_repo, head)


def test_a_broken_test_environment_is_recorded_as_such(database: str, tmp_path: Path, calc_repo: Path) -> None:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "escalates",
            "steps": [{"id": "escalate", "action": "escalate", "with": {"description": "fix"}}],
        },
    )
    settings = settings_for(
        database,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"code": "code"},
        default_target="svc",
        targets={
            "svc": {"repository": str(calc_repo), "test_command": [str(tmp_path / "no-python"), "-m", "unittest"]}
        },
    )
    head = git(calc_repo, "rev-parse", "HEAD")
    app = open_app(settings, start_workers=True)
    try:
        with api_client(app) as client:
            _run, wo = complete(client, diff_of(calc_repo, {"calc.py": CALC_FIXED}))
    finally:
        app.close()
    assert (wo["status"], wo["fail_reason"]) == ("failed", "test_env_error"), wo
    assert "environment is broken" in str(wo)
    assert_untouched(calc_repo, head)


TRACEBACK_THROUGH_A_TEST = (
    "Traceback (most recent call last):\n"
    '  File "tests/test_calc.py", line 14, in test_sub\n'
    "    self.assertEqual(calc.sub(5, 3), 2)\n"
    '  File "calc.py", line 6, in sub\n'
    "    return a + b\n"
    "AssertionError: 8 != 2\n"
)


def test_a_test_named_by_the_failures_traceback_must_pass(database: str, tmp_path: Path, calc_repo: Path) -> None:
    """No target list this time: the failing test comes from the traceback the failure brought (a frame in a test
    file), through the work order's context to the verdict. A diff that leaves it failing is refused for that
    reason; the real fix lands."""
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "escalates",
            "steps": [{"id": "escalate", "action": "escalate", "with": {"description": "fix sub"}}],
        },
    )
    target = {
        "repository": str(calc_repo),
        "test_command": [python_for_tests(), "-m", "unittest", "discover", "-s", "tests"],
        "test_timeout": 60,
    }
    settings = settings_for(
        database,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"code": "code"},
        default_target="svc",
        targets={"svc": target},
    )
    app = open_app(settings, start_workers=True)
    head = git(calc_repo, "rev-parse", "HEAD")
    diffs = {
        "no_fix": diff_of(calc_repo, {"calc.py": UNITTEST_PROJECT["calc.py"] + "# looked at it\n"}),
        "fix": diff_of(calc_repo, {"calc.py": CALC_FIXED}),
    }
    outcomes = {}
    try:
        with api_client(app) as http:
            for name, diff in diffs.items():
                body = {"description": TRACEBACK_THROUGH_A_TEST, "error_type": "code", "component": "svc"}
                wo_id = http.post("/patches/trigger", json=body).json()["work_order_id"]
                wo_url = f"/patches/work-orders/{wo_id}"
                assert http.get(wo_url).json()["context"]["failing_tests"] == ["tests/test_calc.py::test_sub"]
                done = http.post(f"{wo_url}/complete", json={"tests_passed": True, "files_changed": 1, "diff": diff})
                assert done.status_code == 200, done.text
                wait_for(lambda u=wo_url: http.get(u).json()["status"] in ("completed", "failed"), 60)  # type: ignore[misc]
                outcomes[name] = http.get(wo_url).json()
                if name == "no_fix":
                    assert_untouched(calc_repo, head)
    finally:
        app.close()
    refused = outcomes["no_fix"]
    assert (refused["status"], refused["fail_reason"]) == ("failed", "tests_failed")
    assert "the failing tests the work order names do not pass" in str(refused["patch_result"])
    assert "test_sub" in str(refused["patch_result"])
    assert outcomes["fix"]["status"] == "completed", outcomes["fix"]["patch_result"]
    assert git(calc_repo, "rev-parse", "HEAD~1") == head
