"""Tests that can start (issue 9, item 6): a target's `test_env` (variables added to the test process's environment)
and `test_cwd` (where the test command runs, relative to the worktree's root) reach every place the test command
does: the patch pipeline and the server's held patch, the work order's context (redacted), the remote agent runner,
`mendloop agent --test-env/--test-cwd`, the embedded runner, the prompt and the base-run cache key.

The project here is a real git repository whose one test reads `CALC_MODE` from its environment and
`data/expected.txt` relative to `pkg/`, its working directory: it passes only with both set. Real test processes
through the sandbox, a real server on 127.0.0.1, real `mendloop` CLI processes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.agents import adapters
from mendloop.agents.adapters import build_prompt
from mendloop.agents.agent_runner import AgentRunner, RunnerOptions
from mendloop.agents.embedded import EmbeddedRunner
from mendloop.agents.patch_pipeline import apply_patch, patcher
from mendloop.agents.patch_safety import Constraints, check_diff
from mendloop.agents.test_suite import Suite
from mendloop.domain.test_command import TestCommand
from mendloop.errors import AgentError, InputError, PatchRejected
from mendloop.infra.api_client import AgentClient
from mendloop.infra.sandbox import detect
from tests.interpreters import python_for_tests
from tests.support import (
    api_client,
    api_server,
    mendloop_argv,
    migrated_sqlite,
    open_app,
    settings_for,
    wait_for,
    write_playbooks,
)

PY = sys.executable
AGENTS = Path(__file__).resolve().parent / "agents"
UNITTEST = [python_for_tests(), "-m", "unittest", "discover", "-s", "tests"]
ENV = {"CALC_MODE": "strict"}
CWD = "pkg"

PROJECT = {
    "calc.py": "def add(a, b):\n    return a * b\n",
    "pkg/data/expected.txt": "5\n",
    "pkg/tests/test_calc.py": """
        import os
        import sys
        import unittest

        ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sys.path.insert(0, ROOT)

        import calc  # noqa: E402


        class AddTest(unittest.TestCase):
            def test_add(self):
                self.assertEqual(os.environ.get("CALC_MODE"), "strict")
                with open(os.path.join("data", "expected.txt")) as fh:  # relative to the tests' cwd: pkg/
                    expected = int(fh.read())
                self.assertEqual(calc.add(2, 3), expected)
        """,
    ".gitignore": "__pycache__/\n*.pyc\n",
}
FIXED = {"calc.py": "def add(a, b):\n    return a + b\n"}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "envproj"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    for rel, text in PROJECT.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(textwrap.dedent(text))
    git(path, "add", "-A")
    git(path, "commit", "-qm", "initial")
    return path


def diff_of(repo: Path, changes: dict[str, str]) -> str:
    for rel, text in changes.items():
        (repo / rel).write_text(text)
    git(repo, "add", "-A")
    diff = subprocess.run(
        ["git", "-C", str(repo), "diff", "--cached", "--no-color"], capture_output=True, text=True, check=True
    ).stdout
    git(repo, "reset", "-q", "--hard", "HEAD")
    return diff


def apply(repo: Path, tmp_path: Path, command: Any) -> Any:
    return apply_patch(
        repo,
        diff_of(repo, FIXED),
        base_commit=None,
        constraints=Constraints(),
        test_command=command,
        test_timeout=60,
        message="fix",
        trailers={"Work-Order": "wo_t"},
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        worktree_parent=tmp_path,
    )


# -- the patch pipeline ------------------------------------------------------------------------------------------


def test_the_fix_passes_only_with_the_targets_env_and_cwd(repo: Path, tmp_path: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    for command in (TestCommand.of(UNITTEST, ENV), TestCommand.of(UNITTEST, cwd=CWD), UNITTEST):
        with pytest.raises(PatchRejected) as caught:
            apply(repo, tmp_path, command)
        assert caught.value.reason == "tests_failed", (command, caught.value.message)
        assert git(repo, "rev-parse", "HEAD") == head

    result = apply(repo, tmp_path, TestCommand.of(UNITTEST, ENV, CWD))

    assert result.tests.passed and result.tests.report == "unittest" and result.tests.executed == 1
    assert git(repo, "rev-parse", "HEAD~1") == head and "a + b" in (repo / "calc.py").read_text()


def test_a_test_cwd_missing_from_the_worktree_is_test_env_error(repo: Path, tmp_path: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    for cwd in ("no/such/dir", "calc.py"):  # absent, and present but a file
        with pytest.raises(PatchRejected) as caught:
            apply(repo, tmp_path, TestCommand.of(UNITTEST, ENV, cwd))
        assert caught.value.reason == "test_env_error", caught.value.message
        assert "test_cwd" in caught.value.message and repr(cwd) in caught.value.message
        assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""


def test_a_symlinked_test_cwd_out_of_the_worktree_is_test_env_error(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "tests").mkdir(parents=True)
    (repo / "out").symlink_to(outside)
    git(repo, "add", "out")
    git(repo, "commit", "-qm", "a link out")
    with pytest.raises(PatchRejected) as caught:
        apply(repo, tmp_path, TestCommand.of(UNITTEST, ENV, "out"))
    assert caught.value.reason == "test_env_error"


def test_another_env_or_cwd_is_another_base_run(repo: Path, tmp_path: Path) -> None:
    for rel in ("data/expected.txt", "tests/test_calc.py"):  # the same tests in a second directory
        (repo / "pkg2" / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / "pkg2" / rel).write_text((repo / "pkg" / rel).read_text())
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the tests twice")
    sandbox = detect(None)
    base = git(repo, "rev-parse", "HEAD")
    diff = diff_of(repo, FIXED)
    summary = check_diff(diff, Constraints())

    def verify(command: TestCommand) -> bool:
        suite = Suite(repo, command, sandbox=sandbox, timeout=60, env={"PATH": "/usr/bin:/bin"}, workdir=tmp_path)
        return suite.verify(base, patcher(diff, summary)).base_cached

    assert verify(TestCommand.of(UNITTEST, ENV, CWD)) is False
    assert verify(TestCommand.of(UNITTEST, ENV, CWD)) is True  # the same command: the cached base
    assert verify(TestCommand.of(UNITTEST, {**ENV, "EXTRA": "1"}, CWD)) is False
    assert verify(TestCommand.of(UNITTEST, ENV, "pkg2")) is False
    assert verify(TestCommand.of(UNITTEST, ENV, "./pkg2/")) is True  # the same directory, written another way


# -- the server: the held patch, the context ---------------------------------------------------------------------


def _escalating_playbook(tmp_path: Path) -> None:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "escalates, then verifies",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "fix add"}},
                {
                    "id": "verify",
                    "action": "verify",
                    "with": {"check": {"command": {"argv": [PY, "-c", "pass"]}}, "expect": "result.exit_code == 0"},
                    "on_failure": "needs_human",
                },
            ],
        },
    )


def _settings(tmp_path: Path, repo: Path, **target: Any) -> Any:
    _escalating_playbook(tmp_path)
    return settings_for(
        migrated_sqlite(tmp_path / "mendloop.db"),
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"code": "code"},
        default_target="svc",
        agent_lease_seconds=3,
        targets={
            "svc": {
                "repository": str(repo),
                "test_command": UNITTEST,
                "test_timeout": 60,
                "work_orders": {"max_attempts": 1},
                **target,
            }
        },
    )


def _trigger(http: httpx.Client) -> tuple[str, str]:
    run = http.post("/patches/trigger", json={"description": "add is wrong", "error_type": "code"}).json()
    assert run["status"] == "awaiting_patch", run
    return run["run_id"], run["work_order_id"]


def _settle(http: httpx.Client, run_id: str, wo_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    done = ("completed", "needs_human", "failed")
    wait_for(lambda: http.get(f"/patches/runs/{run_id}").json()["status"] in done, timeout=60)
    return http.get(f"/patches/runs/{run_id}").json(), http.get(f"/patches/work-orders/{wo_id}").json()


def test_the_server_tests_a_held_patch_with_env_and_cwd_and_the_context_carries_them(
    repo: Path, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, repo, test_env={**ENV, "API_TOKEN": "t0k3n-value-not-for-agents"}, test_cwd=CWD)
    head = git(repo, "rev-parse", "HEAD")
    app = open_app(settings, start_workers=True)
    try:
        with api_client(app) as http:
            run_id, wo_id = _trigger(http)
            context = http.get(f"/patches/work-orders/{wo_id}").json()["context"]
            assert context["test_command"] == UNITTEST and context["test_cwd"] == CWD
            # Redacted like the rest of the context: the agent (and a remote runner) never sees the token.
            assert context["test_env"]["CALC_MODE"] == "strict"
            assert context["test_env"]["API_TOKEN"] == "[REDACTED]" and "t0k3n" not in json.dumps(context)
            answer = http.post(
                f"/patches/work-orders/{wo_id}/complete",
                json={"tests_passed": True, "files_changed": 1, "diff": diff_of(repo, FIXED)},
            )
            assert answer.status_code == 200, answer.text
            run, wo = _settle(http, run_id, wo_id)
    finally:
        app.close()
    assert run["status"] == "completed", run.get("error")
    assert wo["patch_result"]["applied"]["tests_passed"] is True
    assert git(repo, "rev-parse", "HEAD~1") == head


def test_the_server_records_a_missing_test_cwd_as_test_env_error(repo: Path, tmp_path: Path) -> None:
    app = open_app(_settings(tmp_path, repo, test_env=ENV, test_cwd="gone"), start_workers=True)
    try:
        with api_client(app) as http:
            run_id, wo_id = _trigger(http)
            http.post(
                f"/patches/work-orders/{wo_id}/complete",
                json={"tests_passed": True, "files_changed": 1, "diff": diff_of(repo, FIXED)},
            ).raise_for_status()
            run, wo = _settle(http, run_id, wo_id)
    finally:
        app.close()
    assert (wo["status"], wo["fail_reason"]) == ("failed", "test_env_error"), wo
    assert run["status"] == "needs_human" and "'gone'" in str(wo)


# -- the agent runner: from the context, from `mendloop agent`, embedded -------------------------------------------


@pytest.fixture
def served(tmp_path: Path, repo: Path, free_port: int) -> Iterator[Any]:
    """A server on 127.0.0.1 whose target is `repo`; the test passes its target's extra settings."""
    opened: list[Any] = []

    def start(**target: Any) -> tuple[httpx.Client, str]:
        app = open_app(_settings(tmp_path, repo, **target), start_workers=True)
        server = api_server(app, free_port)
        opened.append((app, server))
        return server.__enter__(), f"http://127.0.0.1:{free_port}"

    yield start
    for app, server in reversed(opened):
        server.__exit__(None, None, None)
        app.close()


def test_the_remote_runner_takes_env_and_cwd_from_the_context(served: Any, repo: Path, tmp_path: Path) -> None:
    http, url = served(test_env=ENV, test_cwd=CWD)
    run_id, wo_id = _trigger(http)
    seen = tmp_path / "seen.json"
    runner = AgentRunner(
        AgentClient(url),
        RunnerOptions(
            repo=repo,
            adapter=adapters.create("command", [PY, str(AGENTS / "fix_calc.py"), str(seen)]),
            agent_timeout=30,
            wait_seconds=5,
            run_as=None,
            test_timeout=60,
            environ={**os.environ, "MENDLOOP_SANDBOX": "off"},  # the agent writes what it saw outside its tree
        ),
    )
    try:
        assert runner.run(once=True) == 1
    finally:
        runner.client.close()
    outcome = runner.outcomes[-1]
    assert outcome.status == "completed", outcome.message
    assert outcome.tests is not None and outcome.tests.passed and outcome.tests.executed == 1
    prompt = json.loads(seen.read_text())["prompt"]
    assert f"run the tests itself afterwards: `{' '.join(UNITTEST)}` with CALC_MODE set, run in `pkg/`." in prompt
    run, _wo = _settle(http, run_id, wo_id)
    assert run["status"] == "completed", run.get("error")


def test_a_malformed_env_in_the_context_is_needs_human_for_the_runner(repo: Path) -> None:
    options = RunnerOptions(repo=repo, adapter=adapters.create("command", [PY, "-c", "pass"]))
    for ctx, shown in (
        ({"test_command": UNITTEST, "test_env": {"PATH": "/evil"}}, "test_env.PATH"),
        ({"test_command": UNITTEST, "test_cwd": "../up"}, "test_cwd"),
        ({"test_command": UNITTEST, "test_env": ["A=1"]}, "test_env"),
    ):
        with pytest.raises(AgentError) as caught:
            options.tests_for(ctx)
        assert caught.value.reason == "needs_human" and shown in caught.value.message
    assert options.tests_for({"test_command": UNITTEST, "test_env": ENV, "test_cwd": CWD}) == TestCommand.of(
        UNITTEST, ENV, CWD
    )
    # The runner's own command comes whole: the context's env and cwd belong to the context's command.
    own = RunnerOptions(repo=repo, adapter=options.adapter, test_command=["pytest"])
    assert own.tests_for({"test_command": UNITTEST, "test_env": ENV, "test_cwd": CWD}) == TestCommand.of(["pytest"])


def test_mendloop_agent_takes_test_env_and_test_cwd(served: Any, repo: Path) -> None:
    http, url = served()  # the target itself has neither: only the command line's make the tests pass
    run_id, wo_id = _trigger(http)
    done = subprocess.run(
        mendloop_argv(
            "agent",
            "--repo",
            str(repo),
            "--adapter",
            "command",
            "--url",
            url,
            "--once",
            "--wait",
            "5",
            "--run-as",
            "none",
            "--test-command",
            shlex.join(UNITTEST),
            "--test-env",
            "CALC_MODE=strict",
            "--test-env",
            "UNUSED=a=b",
            "--test-cwd",
            CWD,
            "--",
            PY,
            str(AGENTS / "fix_calc.py"),
        ),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    run, wo = _settle(http, run_id, wo_id)
    assert wo["status"] == "completed" and wo["patch_result"]["tests_passed"] is True, wo
    assert run["status"] == "completed", run.get("error")


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--test-env", "PATH=/tmp/evil"], "--test-env: PATH is set by mendloop"),
        (["--test-env", "NOVALUE"], "--test-env: 'NOVALUE' is not NAME=VALUE"),
        (["--test-env", "MENDLOOP_DATABASE_URL=x"], "--test-env: MENDLOOP_DATABASE_URL: MENDLOOP_* variables"),
        (["--test-cwd", "/abs"], "--test-cwd: test_cwd '/abs' is absolute"),
        (["--test-cwd", "a/../.."], "--test-cwd: test_cwd 'a/../..' contains '..'"),
    ],
)
def test_mendloop_agent_refuses_a_bad_test_env_or_cwd(repo: Path, args: list[str], shown: str) -> None:
    done = subprocess.run(
        mendloop_argv(
            "agent", "--repo", str(repo), "--adapter", "command", "--test-command", "pytest", *args, "--", PY
        ),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"error: {shown}" in done.stderr, done.stderr


def test_mendloop_agent_refuses_env_or_cwd_without_its_own_test_command(repo: Path) -> None:
    done = subprocess.run(
        mendloop_argv("agent", "--repo", str(repo), "--adapter", "command", "--test-cwd", "pkg", "--", PY),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode != 0 and "error: --test-env and --test-cwd go with --test-command" in done.stderr


def test_the_embedded_runner_takes_them_from_its_section(repo: Path, tmp_path: Path) -> None:
    settings = settings_for(
        migrated_sqlite(tmp_path / "mendloop.db"),
        tmp_path,
        port=18123,
        agent_runner={
            "enabled": True,
            "repository": str(repo),
            "adapter": "command",
            "argv": [PY, "-c", "pass"],
            "test_command": UNITTEST,
            "test_env": ENV,
            "test_cwd": "./pkg",
        },
    )
    embedded = EmbeddedRunner(settings)
    try:
        assert embedded.runner.options.tests_for({}) == TestCommand.of(UNITTEST, ENV, CWD)
    finally:
        embedded.client.close()


# -- the config: one line per problem, naming the field ------------------------------------------------------------


def test_config_check_names_each_bad_test_env_and_cwd(tmp_path: Path) -> None:
    cfg = tmp_path / "mendloop.yaml"
    targets = {
        "abs": {"test_command": ["pytest"], "test_cwd": "/srv/app"},
        "up": {"test_command": ["pytest"], "test_cwd": "sub/../../elsewhere"},
        "badname": {"test_command": ["pytest"], "test_env": {"2FAST": "1"}},
        "path": {"test_command": ["pytest"], "test_env": {"PATH": "/opt/bin", "FINE": "ok"}},
        "home": {"test_command": ["pytest"], "test_env": {"HOME": "/root"}},
        "runner_own": {"test_command": ["pytest"], "test_env": {"MENDLOOP_API_TOKENS": "[]"}},
    }
    cfg.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path}/m.db", "targets": targets}))
    done = subprocess.run(
        mendloop_argv("config", "check", "-c", str(cfg)),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in done.stderr and len(lines) == 6, done.stderr
    expected = {
        "targets.abs.test_cwd": "is absolute",
        "targets.up.test_cwd": "contains '..'",
        "targets.badname.test_env.2FAST": "not a valid environment variable name",
        "targets.path.test_env.PATH": "PATH is set by mendloop",
        "targets.home.test_env.HOME": "HOME is set by mendloop",
        "targets.runner_own.test_env.MENDLOOP_API_TOKENS": "MENDLOOP_* variables are mendloop's own",
    }
    for field, why in expected.items():
        assert any(f": {field}: " in line and why in line for line in lines), (field, lines)


def test_the_rules_in_one_place() -> None:
    command = TestCommand.of(["pytest", "-q"], {"B": "2", "A": "1"}, "./pkg/sub/")
    assert command.cwd == "pkg/sub" and command.env == (("A", "1"), ("B", "2"))
    assert TestCommand.of(["pytest"], cwd=".").cwd is None  # the root
    for env, cwd, field in (
        ({"GIT_CONFIG_COUNT": "1"}, None, "test_env.GIT_CONFIG_COUNT"),
        ({"GIT_CONFIG_KEY_0": "x"}, None, "test_env.GIT_CONFIG_KEY_0"),
        ({"A-B": "1"}, None, "test_env.A-B"),
        ({"A": "nul\0"}, None, "test_env.A"),
        ({}, "", "test_cwd"),
        ({}, ".git/hooks", "test_cwd"),
    ):
        with pytest.raises(InputError) as caught:
            TestCommand.of(["pytest"], env, cwd)
        assert caught.value.field == field
    shown = build_prompt({"work_order_id": "wo_1"}, files=[], test_command=command, constraints={})
    assert "afterwards: `pytest -q` with A, B set, run in `pkg/sub/`." in shown
    assert "=1" not in shown  # names only: a value may be a credential
