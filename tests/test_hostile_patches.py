"""Hostile patches (issue 8, items 1 to 3): diffs that would neuter the tests, run code inside mendloop's own git calls,
or slip past the checks as "already applied". Each goes through the real pipeline (`patch_pipeline.apply_patch`,
and the server's `complete` path for the already-applied shortcut) against a real git repository, and must end as
`unsafe_patch` with a reason naming the path, the repository untouched and nothing written outside the worktree.
Positive controls show the checks are by section and by target, not blanket refusals."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mendloop.agents.patch_pipeline import apply_patch, revert
from mendloop.config import PatchPolicy
from mendloop.engine.held_patch import constraints_for
from mendloop.errors import PatchRejected
from tests.interpreters import python_for_tests
from tests.support import open_app, settings_for, wait_for, write_playbooks

PY = sys.executable
# The server runs a target's tests as uid 65534 when it is root: an interpreter that uid can start.
TEST_COMMAND = [python_for_tests(), "-c", "import app, sys; sys.exit(0 if app.VALUE < 10 else 1)"]

PYPROJECT = """[project]
name = "svc"
version = "1.0.0"

[tool.pytest.ini_options]
testpaths = ["tests"]

[tool.ruff]
line-length = 100
"""
SETUP_CFG = "[metadata]\nname = svc\n\n[tool:pytest]\ntestpaths = tests\n\n[flake8]\nmax-line-length = 100\n"
PACKAGE_JSON = json.dumps({"name": "svc", "version": "1.0.0", "scripts": {"test": "jest"}}, indent=2) + "\n"


def git(repo: Path, *args: str) -> str:
    safe = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "core.hooksPath=/dev/null"]
    done = subprocess.run(["git", "-C", str(repo), *safe, *args], capture_output=True, text=True, check=True)
    return done.stdout


def write(repo: Path, rel: str, text: str) -> None:
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    (repo / rel).write_text(text)


@pytest.fixture(autouse=True)
def isolated_git_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Outside the repository and every worktree: a hook or filter that ran would create it."""
    return tmp_path / "outside" / "ran"


def _hook(marker: Path) -> str:
    return f'#!/bin/sh\nmkdir -p {marker.parent}\necho "$0" >> {marker}\nexit 0\n'


@pytest.fixture
def repo(tmp_path: Path, marker: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    write(r, "app.py", "VALUE = 1\n")
    write(r, "pyproject.toml", PYPROJECT)
    write(r, "setup.cfg", SETUP_CFG)
    write(r, "package.json", PACKAGE_JSON)
    write(r, "conftest.py", "import pytest\n")
    write(r, "tox.ini", "[tox]\nenvlist = py3\n")
    write(r, "Makefile", "test:\n\tpytest\n")
    write(r, "pkg/__init__.py", "")
    write(r, "tool.sh", "echo tool\n")
    (r / "tool.sh").chmod(0o755)
    for hooks in (".githooks", "ci/hooks"):
        write(r, f"{hooks}/pre-commit", _hook(marker))
        (r / hooks / "pre-commit").chmod(0o755)
    git(r, "add", "-A")
    git(r, "commit", "-qm", "initial")
    git(r, "config", "core.hooksPath", ".githooks")
    return r


def diff_of(repo: Path, change: Callable[[Path], None]) -> str:
    """The git diff of `change` made to the repository's files; the repository is then put back as it was."""
    change(repo)
    git(repo, "add", "-A")
    out = git(repo, "diff", "--cached", "--no-ext-diff", "--no-textconv", "--src-prefix=a/", "--dst-prefix=b/")
    git(repo, "reset", "-q", "--hard", "HEAD")
    git(repo, "clean", "-qfdx")
    return out


def edit(rel: str, transform: Callable[[str], str]) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        write(repo, rel, transform((repo / rel).read_text() if (repo / rel).exists() else ""))

    return change


def append(rel: str, text: str) -> Callable[[Path], None]:
    return edit(rel, lambda old: old + text)


def package_json(**changes: Any) -> Callable[[Path], None]:
    def transform(old: str) -> str:
        data = json.loads(old)
        for key, value in changes.items():
            data[key] = value
        return json.dumps(data, indent=2) + "\n"

    return edit("package.json", transform)


def run_apply(repo: Path, diff: str, tmp_path: Path, policy: PatchPolicy | None = None) -> Any:
    parent = tmp_path / "worktrees"
    parent.mkdir(exist_ok=True)
    return apply_patch(
        repo,
        diff,
        base_commit=None,
        constraints=constraints_for(policy or PatchPolicy()),
        test_command=TEST_COMMAND,
        test_timeout=60,
        message="hostile",
        trailers={"Work-Order": "wo-1"},
        worktree_parent=parent,
    )


def assert_untouched(repo: Path, head: str, marker: Path, tmp_path: Path) -> None:
    assert not marker.exists(), marker.read_text()
    assert git(repo, "rev-parse", "HEAD").strip() == head
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert git(repo, "worktree", "list").count("\n") == 1
    assert not any((tmp_path / "worktrees").iterdir())


RAW_NO_CONTENT = {
    "mode_only_to_executable": ("app.py", "diff --git a/app.py b/app.py\nold mode 100644\nnew mode 100755\n"),
    "mode_only_exec_bit_removed": ("tool.sh", "diff --git a/tool.sh b/tool.sh\nold mode 100755\nnew mode 100644\n"),
    "header_only": ("app.py", "diff --git a/app.py b/app.py\n"),
    "context_only_hunk": ("app.py", "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n VALUE = 1\n"),
    "git_context_only_hunk": (
        "app.py",
        "diff --git a/app.py b/app.py\nindex 1111111..1111111 100644\n--- a/app.py\n+++ b/app.py\n"
        "@@ -1 +1 @@\n VALUE = 1\n",
    ),
    "rename_onto_itself": (
        "app.py",
        "diff --git a/app.py b/app.py\nsimilarity index 100%\nrename from app.py\nrename to app.py\n",
    ),
}

CHANGES: dict[str, tuple[str, Callable[[Path], None]]] = {
    # pyproject.toml: the test-runner tables, however they are spelled.
    "pyproject_addopts_collect_only": (
        "pyproject.toml",
        edit("pyproject.toml", lambda t: t.replace('testpaths = ["tests"]', 'addopts = "--collect-only"')),
    ),
    "pyproject_new_pytest_section": (
        "pyproject.toml",
        edit(
            "pyproject.toml",
            lambda t: (
                t.replace("[tool.pytest.ini_options]\ntestpaths", "[x]\ntestpaths")
                + '\n[tool.pytest.ini_options]\naddopts = "-k nothing"\n'
            ),
        ),
    ),
    "pyproject_coverage_fail_under": (
        "pyproject.toml",
        append("pyproject.toml", "\n[tool.coverage.report]\nfail_under = 0\n"),
    ),
    "pyproject_hatch_test_env": (
        "pyproject.toml",
        append("pyproject.toml", '\n[tool.hatch.envs.test.scripts]\ntest = "true"\n'),
    ),
    "pyproject_dotted_key_in_another_table": (
        "pyproject.toml",
        edit(
            "pyproject.toml",
            lambda t: t.replace("[tool.ruff]", '[tool]\npytest.ini_options.addopts = "-q"\n[tool.ruff]'),
        ),
    ),
    "pyproject_in_subdirectory": (
        "pkg/pyproject.toml",
        append("pkg/pyproject.toml", '[tool.pytest.ini_options]\naddopts = "--collect-only"\n'),
    ),
    "pyproject_unreadable_after": ("pyproject.toml", append("pyproject.toml", "\n[tool.pytest.ini_options\n")),
    # setup.cfg
    "setup_cfg_pytest_addopts": (
        "setup.cfg",
        edit("setup.cfg", lambda t: t.replace("testpaths = tests", "testpaths = tests\naddopts = --collect-only")),
    ),
    "setup_cfg_new_pytest_section": (
        "pkg/setup.cfg",
        append("pkg/setup.cfg", "[tool:pytest]\naddopts = --collect-only\n"),
    ),
    "setup_cfg_coverage": ("setup.cfg", append("setup.cfg", "\n[coverage:report]\nfail_under = 0\n")),
    "setup_cfg_section_removed": ("setup.cfg", edit("setup.cfg", lambda t: t.split("[tool:pytest]")[0])),
    # Whole files that configure how tests are found or run.
    "conftest_new_in_subdir": ("pkg/sub/conftest.py", append("pkg/sub/conftest.py", "collect_ignore_glob = ['*']\n")),
    "conftest_edit_root": ("conftest.py", append("conftest.py", "collect_ignore_glob = ['*']\n")),
    "pytest_ini_new": ("pytest.ini", append("pytest.ini", "[pytest]\naddopts = --collect-only\n")),
    "tox_ini_edit": ("tox.ini", append("tox.ini", "\n[testenv]\ncommands = true\n")),
    "tox_ini_new_in_subdir": ("pkg/tox.ini", append("pkg/tox.ini", "[testenv]\ncommands = true\n")),
    "noxfile_new": ("noxfile.py", append("noxfile.py", "import nox\n")),
    "makefile_edit": ("Makefile", edit("Makefile", lambda t: t.replace("pytest", "true"))),
    "gnumakefile_new": ("GNUmakefile", append("GNUmakefile", "test:\n\ttrue\n")),
    "make_include_new": ("build/rules.mk", append("build/rules.mk", "test:\n\ttrue\n")),
    "package_json_scripts": ("package.json", package_json(scripts={"test": "true"})),
    "package_json_jest_config": ("package.json", package_json(jest={"testMatch": []})),
    # Code that runs by itself: hooks, pre-commit, attributes naming drivers, Python start-up files.
    "githooks_pre_commit_edit": (".githooks/pre-commit", append(".githooks/pre-commit", "touch /tmp/x\n")),
    "configured_hooks_path_edit": ("ci/hooks/pre-commit", append("ci/hooks/pre-commit", "touch /tmp/x\n")),
    "husky_new": (".husky/pre-commit", append(".husky/pre-commit", "true\n")),
    "pre_commit_config": (".pre-commit-config.yaml", append(".pre-commit-config.yaml", "repos: []\n")),
    "gitattributes_filter": (".gitattributes", append(".gitattributes", "*.py filter=evil\n")),
    "gitattributes_in_subdir": ("pkg/.gitattributes", append("pkg/.gitattributes", "* diff=evil\n")),
    "pth_file": ("pkg/evil.pth", append("pkg/evil.pth", "import os; os.system('true')\n")),
    "pth_at_root": ("zzz.pth", append("zzz.pth", "import os\n")),
    "sitecustomize": ("sitecustomize.py", append("sitecustomize.py", "import os\n")),
    "sitecustomize_in_subdir": ("pkg/sitecustomize.py", append("pkg/sitecustomize.py", "import os\n")),
    "usercustomize": ("usercustomize.py", append("usercustomize.py", "import os\n")),
}


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_hostile_change_is_refused_and_the_repository_untouched(
    case: str, repo: Path, tmp_path: Path, marker: Path
) -> None:
    path, change = CHANGES[case]
    if case == "configured_hooks_path_edit":
        git(repo, "config", "core.hooksPath", "ci/hooks")
    diff = diff_of(repo, change)
    assert path in diff
    head = git(repo, "rev-parse", "HEAD").strip()
    with pytest.raises(PatchRejected) as caught:
        run_apply(repo, diff, tmp_path)
    assert caught.value.reason == "unsafe_patch"
    assert repr(path) in caught.value.message, caught.value.message
    assert_untouched(repo, head, marker, tmp_path)


@pytest.mark.parametrize("case", sorted(RAW_NO_CONTENT))
def test_a_diff_with_no_content_change_is_refused(case: str, repo: Path, tmp_path: Path, marker: Path) -> None:
    path, diff = RAW_NO_CONTENT[case]
    head = git(repo, "rev-parse", "HEAD").strip()
    with pytest.raises(PatchRejected) as caught:
        run_apply(repo, diff, tmp_path)
    assert caught.value.reason == "unsafe_patch"
    assert path in caught.value.message, caught.value.message
    assert_untouched(repo, head, marker, tmp_path)


@pytest.mark.parametrize("diff", ["", "   \n", "\n\n"])
def test_an_empty_diff_is_refused(diff: str, repo: Path, tmp_path: Path, marker: Path) -> None:
    head = git(repo, "rev-parse", "HEAD").strip()
    with pytest.raises(PatchRejected, match="empty diff") as caught:
        run_apply(repo, diff, tmp_path)
    assert caught.value.reason == "unsafe_patch"
    assert_untouched(repo, head, marker, tmp_path)


def test_configured_hooks_path_absolute_inside_the_repository(repo: Path, tmp_path: Path, marker: Path) -> None:
    git(repo, "config", "core.hooksPath", str(repo / "ci" / "hooks"))
    diff = diff_of(repo, append("ci/hooks/pre-commit", "touch /tmp/x\n"))
    head = git(repo, "rev-parse", "HEAD").strip()
    with pytest.raises(PatchRejected, match=r"'ci/hooks/pre-commit': forbidden path"):
        run_apply(repo, diff, tmp_path)
    assert_untouched(repo, head, marker, tmp_path)


# -- positive controls ---------------------------------------------------------------------------------------


ACCEPTED: dict[str, tuple[Callable[[Path], None], PatchPolicy]] = {
    "pyproject_project_version": (
        edit("pyproject.toml", lambda t: t.replace('version = "1.0.0"', 'version = "1.0.1"')),
        PatchPolicy(),
    ),
    "pyproject_other_tool": (edit("pyproject.toml", lambda t: t.replace("100", "120")), PatchPolicy()),
    "setup_cfg_metadata": (edit("setup.cfg", lambda t: t.replace("name = svc", "name = svc2")), PatchPolicy()),
    "package_json_version": (package_json(version="1.0.1"), PatchPolicy()),
    "conftest_allowed_by_target": (
        append("conftest.py", "FIXTURES = 1\n"),
        PatchPolicy(test_config_allowed=["conftest.py"]),
    ),
    "pyproject_pytest_allowed_by_target": (
        edit("pyproject.toml", lambda t: t.replace('testpaths = ["tests"]', 'testpaths = ["tests", "more"]')),
        PatchPolicy(test_config_allowed=["pyproject.toml"]),
    ),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_allowed_change_is_committed_without_running_hooks(case: str, repo: Path, tmp_path: Path, marker: Path) -> None:
    change, policy = ACCEPTED[case]
    diff = diff_of(repo, change)
    head = git(repo, "rev-parse", "HEAD").strip()
    result = run_apply(repo, diff, tmp_path, policy)
    assert git(repo, "rev-parse", "HEAD~1").strip() == head and result.commit != head
    assert "Work-Order: wo-1" in git(repo, "log", "-1", "--format=%B")
    assert not marker.exists()  # .githooks/pre-commit (core.hooksPath) did not run during mendloop's commit
    assert git(repo, "status", "--porcelain") == ""
    revert(repo, result.commit, trailers={"Work-Order": "wo-1"})
    assert not marker.exists()  # nor during its revert


def test_the_default_hooks_directory_does_not_run_either(repo: Path, tmp_path: Path, marker: Path) -> None:
    git(repo, "config", "--unset", "core.hooksPath")
    for name in ("pre-commit", "commit-msg", "post-commit", "post-checkout", "reference-transaction"):
        hook = repo / ".git" / "hooks" / name
        hook.write_text(_hook(marker))
        hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    run_apply(repo, diff_of(repo, edit("app.py", lambda _: "VALUE = 2\n")), tmp_path)
    assert not marker.exists()


def test_filters_named_by_attributes_do_not_run(repo: Path, tmp_path: Path, marker: Path) -> None:
    """The operator's repository names a filter driver its config defines: mendloop's git runs neither half."""
    write(repo, ".gitattributes", "*.py filter=evil\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "attributes")
    for half in ("clean", "smudge"):
        git(repo, "config", f"filter.evil.{half}", f"mkdir -p {marker.parent}; echo {half} >> {marker}; cat")
    git(repo, "config", "filter.evil.required", "true")
    diff = "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
    run_apply(repo, diff, tmp_path)
    assert not marker.exists()
    assert (repo / "app.py").read_text() == "VALUE = 2\n"


# -- through the server: the "already applied" shortcut comes after the checks -------------------------------


@pytest.fixture
def app(database_url: str, tmp_path: Path, repo: Path) -> Any:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "escalates, then verifies",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "fix"}},
                {
                    "id": "verify",
                    "action": "verify",
                    "with": {"check": {"command": {"argv": [PY, "-c", "pass"]}}, "expect": "result.exit_code == 0"},
                    "on_failure": "needs_human",
                },
            ],
        },
    )
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"code": "code"},
        default_target="svc",
        targets={"svc": {"repository": str(repo), "test_command": TEST_COMMAND, "test_timeout": 30}},
    )
    a = open_app(settings, start_workers=True)
    yield a
    a.close()


def _complete(client: httpx.Client, diff: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    run = client.post("/patches/trigger", json={"description": "d", "error_type": "code", "component": "svc"}).json()
    assert run["status"] == "awaiting_patch"
    done = client.post(
        f"/patches/work-orders/{run['work_order_id']}/complete",
        json={"tests_passed": True, "files_changed": 1, "diff": diff},
    )
    assert done.status_code < 500, done.text
    if done.status_code == 200:

        def settled() -> bool:
            status = client.get(f"/patches/runs/{run['run_id']}").json()["status"]
            return status in ("completed", "needs_human", "failed")

        wait_for(settled, timeout=30)
    detail = client.get(f"/patches/runs/{run['run_id']}").json()
    wo = client.get(f"/patches/work-orders/{run['work_order_id']}").json()
    return run, detail, wo


def _already_in_head(repo: Path) -> str:
    """Commit a pyproject addopts change as the operator would, and return the diff that makes it."""
    diff = diff_of(repo, edit("pyproject.toml", lambda t: t.replace('testpaths = ["tests"]', 'addopts = "-q"')))
    subprocess.run(["git", "-C", str(repo), "apply", "--index"], input=diff, text=True, check=True)
    git(repo, "commit", "-qm", "operator's own change")
    return diff


SERVER_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    # tool.sh is 100755 in HEAD: this diff reverse-applies, so the shortcut used to call it applied and tested.
    "mode_only_already_true": lambda r: (
        "tool.sh",
        "diff --git a/tool.sh b/tool.sh\nold mode 100644\nnew mode 100755\n",
    ),
    "context_only_already_true": lambda r: ("app.py", "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n VALUE = 1\n"),
    "already_applied_pytest_addopts": lambda r: ("pyproject.toml", _already_in_head(r)),
    "ci_config_already_in_head": lambda r: (
        ".github/workflows/ci.yml",
        _commit_and_diff(r, ".github/workflows/ci.yml"),
    ),
    "githooks_already_in_head": lambda r: (".githooks/pre-commit", _commit_and_diff(r, ".githooks/pre-commit")),
}


def _commit_and_diff(repo: Path, rel: str) -> str:
    diff = diff_of(repo, append(rel, "echo changed\n"))
    subprocess.run(["git", "-C", str(repo), "apply", "--index"], input=diff, text=True, check=True)
    git(repo, "commit", "-qm", "already there")
    return diff


@pytest.mark.parametrize("case", sorted(SERVER_CASES))
def test_server_checks_before_the_already_applied_shortcut(
    case: str, client: httpx.Client, repo: Path, marker: Path
) -> None:
    path, diff = SERVER_CASES[case](repo)
    head = git(repo, "rev-parse", "HEAD").strip()
    _run, detail, wo = _complete(client, diff)
    assert wo["status"] == "failed" and wo["fail_reason"] == "unsafe_patch", wo
    assert path in json.dumps(wo), wo
    assert detail["status"] == "needs_human"
    assert not any("already applied" in t["message"] for t in detail["timeline"])
    assert git(repo, "rev-parse", "HEAD").strip() == head
    assert git(repo, "status", "--porcelain") == ""
    assert not marker.exists()
