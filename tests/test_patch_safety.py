"""Patch safety: hostile diffs are rejected by check_diff with a message naming the path and the rule, good
diffs are summarised correctly, and a symlinked parent in a real repository stops a patch before git sees it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mendloop.agents.patch_pipeline import apply_patch
from mendloop.agents.patch_safety import (
    DEFAULT_FORBIDDEN,
    Constraints,
    PatchSummary,
    check_diff,
    check_paths_in_worktree,
)
from mendloop.errors import PatchRejected

# --- diff builders ---------------------------------------------------------------------------------------------


def modify(path: str, old: str = "old", new: str = "new") -> str:
    return (
        f"diff --git a/{path} b/{path}\nindex 1111111..2222222 100644\n--- a/{path}\n+++ b/{path}\n"
        f"@@ -1 +1 @@\n-{old}\n+{new}\n"
    )


def create(path: str, lines: tuple[str, ...] = ("x = 1",), mode: str = "100644") -> str:
    body = "".join(f"+{line}\n" for line in lines)
    return (
        f"diff --git a/{path} b/{path}\nnew file mode {mode}\nindex 0000000..1111111\n--- /dev/null\n+++ b/{path}\n"
        f"@@ -0,0 +1,{len(lines)} @@\n{body}"
    )


def delete(path: str, lines: tuple[str, ...] = ("x = 1",)) -> str:
    body = "".join(f"-{line}\n" for line in lines)
    return (
        f"diff --git a/{path} b/{path}\ndeleted file mode 100644\nindex 1111111..0000000\n--- a/{path}\n+++ /dev/null\n"
        f"@@ -1,{len(lines)} +0,0 @@\n{body}"
    )


def rename(source: str, target: str, *, kind: str = "rename", words: tuple[str, str] = ("from", "to")) -> str:
    return (
        f"diff --git a/{source} b/{target}\nsimilarity index 100%\n"
        f"{kind} {words[0]} {source}\n{kind} {words[1]} {target}\n"
    )


GIT_BINARY = (
    "diff --git a/logo.png b/logo.png\nnew file mode 100644\nindex 0000000..5fbd5ce\n"
    "GIT binary patch\nliteral 4\nLcmZ?wWMlvU00;m8\n\nliteral 0\nHcmV?d00001\n\n"
)

DEFAULT = Constraints()
ONLY_SRC = Constraints(allowed_paths=("src/**",))

# (id, diff, constraints, expected message fragment as a regex)
HOSTILE: list[tuple[str, str, Constraints, str]] = [
    ("dotdot_escape", modify("../outside.py"), DEFAULT, r"'\.\./outside\.py': '\.\.' component"),
    ("dotdot_nested", modify("src/../../etc/passwd"), DEFAULT, r"'\.\.' component escapes the repository"),
    ("absolute_path", "--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-a\n+b\n", DEFAULT, r"'/etc/passwd': absolute"),
    ("absolute_after_prefix", modify("/etc/passwd"), DEFAULT, r"'/etc/passwd': absolute path"),
    ("git_config_write", modify(".git/config"), DEFAULT, r"'\.git/config': inside \.git/"),
    ("git_hook_in_nested_dir", create("vendor/.git/hooks/post-commit"), DEFAULT, r"inside \.git/"),
    ("git_dir_case_folded", modify(".GIT/config"), DEFAULT, r"'\.GIT/config': inside \.git/"),
    (
        "git_dir_created_from_dev_null",
        "--- /dev/null\n+++ b/.git/hooks/pre-commit\n@@ -0,0 +1 @@\n+x\n",
        DEFAULT,
        r"inside \.git/",
    ),
    ("symlink_creation", create("link", ("/etc/passwd",), mode="120000"), DEFAULT, r"symlink \(mode 120000\)"),
    (
        "file_turned_symlink",
        "diff --git a/app.py b/app.py\nold mode 100644\nnew mode 120000\n",
        DEFAULT,
        r"a/app\.py b/app\.py: symlink \(mode 120000\)",
    ),
    (
        "binary_file",
        "diff --git a/logo.png b/logo.png\nnew file mode 100644\nindex 0000000..1111111\n"
        "Binary files /dev/null and b/logo.png differ\n",
        DEFAULT,
        r"logo\.png: binary file",
    ),
    ("git_binary_patch", GIT_BINARY, DEFAULT, r"logo\.png: binary file"),
    (
        "chmod_plus_x",
        "diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n",
        DEFAULT,
        r"run\.sh: made executable \(mode 100755\)",
    ),
    (
        "chmod_plus_x_crlf",
        "diff --git a/run.sh b/run.sh\r\nold mode 100644\r\nnew mode 100755\r\n",
        DEFAULT,
        r"made executable",
    ),
    ("new_executable_file", create("tool.py", mode="100755"), DEFAULT, r"tool\.py: made executable"),
    (
        "odd_mode",
        "diff --git a/x.py b/x.py\nold mode 100644\nnew mode 0100755\n",
        DEFAULT,
        r"unsupported file mode '0100755'",
    ),
    (
        "forbidden_workflow",
        modify(".github/workflows/x.yml"),
        DEFAULT,
        r"'\.github/workflows/x\.yml': forbidden path \(matches '\.github/\*\*'\)",
    ),
    ("forbidden_workflow_case", modify(".GitHub/workflows/x.yml"), DEFAULT, r"forbidden path"),
    ("forbidden_gitlab_ci", modify(".gitlab-ci.yml"), DEFAULT, r"'\.gitlab-ci\.yml': forbidden path"),
    ("forbidden_poetry_lock", modify("poetry.lock"), DEFAULT, r"'poetry\.lock': forbidden path"),
    ("forbidden_nested_lock", modify("web/yarn.lock"), DEFAULT, r"'web/yarn\.lock': forbidden path"),
    ("forbidden_package_lock", modify("package-lock.json"), DEFAULT, r"'package-lock\.json': forbidden path"),
    ("forbidden_dotenv", create(".env", ("TOKEN=x",)), DEFAULT, r"'\.env': forbidden path \(matches '\.env'\)"),
    ("forbidden_nested_dotenv", modify("services/api/.env.production"), DEFAULT, r"forbidden path"),
    ("forbidden_private_key", create("deploy/server.pem"), DEFAULT, r"'deploy/server\.pem': forbidden path"),
    ("forbidden_mendloop_yaml", modify("mendloop.yaml"), DEFAULT, r"'mendloop\.yaml': forbidden path"),
    ("forbidden_mendloop_variant", modify("config/mendloop-prod.yaml"), DEFAULT, r"forbidden path"),
    ("forbidden_gitmodules", modify(".gitmodules"), DEFAULT, r"'\.gitmodules': forbidden path"),
    (
        "forbidden_via_plain_creation",
        "--- a/.github/workflows/evil.yml\n+++ b/.github/workflows/evil.yml\n@@ -0,0 +1 @@\n+on: push\n",
        DEFAULT,
        r"forbidden path",
    ),
    (
        "test_edit",
        modify("tests/test_app.py"),
        DEFAULT,
        r"'tests/test_app\.py': test file \(matches 'tests/\*\*'\) and tests_may_change is false",
    ),
    ("test_creation_nested", create("pkg/tests/test_new.py"), DEFAULT, r"test file"),
    ("test_module_anywhere", modify("src/app_test.py"), DEFAULT, r"test file"),
    ("conftest_edit", modify("conftest.py"), DEFAULT, r"'conftest\.py': test-runner configuration"),
    # Was accepted as a good diff: it changes no content, so it is now refused like any mode-only diff.
    (
        "exec_bit_removed_only",
        "diff --git a/run.sh b/run.sh\nold mode 100755\nnew mode 100644\n",
        DEFAULT,
        r"'run\.sh': no content change",
    ),
    ("outside_allowed_paths", modify("docs/readme.md"), ONLY_SRC, r"'docs/readme\.md': not in allowed_paths"),
    (
        "too_many_files",
        "".join(modify(f"src/m{i}.py") for i in range(11)),
        DEFAULT,
        r"too many files: 11 > max_files 10",
    ),
    (
        "too_many_lines",
        create("src/big.py", tuple(f"x{i} = {i}" for i in range(401))),
        DEFAULT,
        r"too many changed lines: 401 > max_changed_lines 400",
    ),
    ("empty_diff", "", DEFAULT, r"^empty diff$"),
    ("blank_diff", " \n\n\t\n", DEFAULT, r"^empty diff$"),
    ("nul_byte", modify("src/app.py", new="x = '\x00'"), DEFAULT, r"NUL byte"),
    ("garbage_text", "Sure! Here is the fix you asked for:\nreplace old with new\n", DEFAULT, r"no file changes found"),
    (
        "truncated_hunk",
        "--- a/src/x.py\n+++ b/src/x.py\n@@ -1,3 +1,3 @@\n-a\n+b\n",
        DEFAULT,
        r"not a valid unified diff",
    ),
    (
        "submodule",
        "diff --git a/vendor/lib b/vendor/lib\nnew file mode 160000\nindex 0000000..1234567\n"
        "--- /dev/null\n+++ b/vendor/lib\n@@ -0,0 +1 @@\n+Subproject commit 1234567\n",
        DEFAULT,
        r"vendor/lib: submodule \(mode 160000\)",
    ),
    (
        "submodule_bump",
        "diff --git a/vendor/lib b/vendor/lib\nindex 1234567..89abcde 160000\n",
        DEFAULT,
        r"submodule \(mode 160000\)",
    ),
    ("rename_to_dotdot", rename("app.py", "../app.py"), DEFAULT, r"'\.\./app\.py': '\.\.' component"),
    (
        "rename_target_hidden_in_header",
        "diff --git a/app.py b/app2.py\nsimilarity index 100%\nrename from app.py\nrename to ../evil.py\n",
        DEFAULT,
        r"'\.\./evil\.py': '\.\.' component",
    ),
    ("rename_old_new_spelling", rename("app.py", "../x.py", words=("old", "new")), DEFAULT, r"'\.\.' component"),
    (
        "rename_inconsistent_header",
        "diff --git a/app.py b/app2.py\nsimilarity index 100%\nrename from app.py\nrename to app3.py\n",
        DEFAULT,
        r"rename header does not match",
    ),
    ("rename_out_of_ci", rename(".github/workflows/ci.yml", "ci.yml"), DEFAULT, r"forbidden path"),
    ("copy_from_secret", rename(".env", "public.txt", kind="copy"), DEFAULT, r"'\.env': forbidden path"),
    (
        "quoted_path",
        'diff --git "a/t\\303\\251st.py" "b/t\\303\\251st.py"\nindex 1..2 100644\n'
        '--- "a/t\\303\\251st.py"\n+++ "b/t\\303\\251st.py"\n@@ -1 +1 @@\n-a\n+b\n',
        DEFAULT,
        r"quoted path",
    ),
    ("quoted_plain_diff", '--- "a/x\\ty.py"\n+++ "b/x\\ty.py"\n@@ -1 +1 @@\n-a\n+b\n', DEFAULT, r"quoted path"),
    ("control_character", modify("src/a\x1b[31m.py"), DEFAULT, r"control or invisible character"),
    ("bidi_override", modify("src/evil\u202eyp.py"), DEFAULT, r"control or invisible character"),
    ("option_injection", modify("--upload-pack=touch x"), DEFAULT, r"starts with '-'"),
    ("backslash", modify("src\\..\\..\\x.py"), DEFAULT, r"backslash"),
    ("missing_prefix", "--- src/x.py\n+++ src/x.py\n@@ -1 +1 @@\n-a\n+b\n", DEFAULT, r"'a/' prefix"),
    (
        "names_differ_without_rename",
        "--- a/src/x.py\n+++ b/src/y.py\n@@ -1 +1 @@\n-a\n+b\n",
        DEFAULT,
        r"names differ without a rename header",
    ),
    # unidiff names the file from the diff --git line; git honours the --- line too and would read .env.
    (
        "minus_line_smuggles_a_source",
        "diff --git a/app.py b/app.py\nindex 1..2 100644\n--- a/.env\n+++ b/app.py\n@@ -1 +1 @@\n-a\n+b\n",
        DEFAULT,
        r"file names do not match the ---/\+\+\+ lines",
    ),
    (
        "ambiguous_header_names",
        "diff --git a/x b/y b/x b/y\nnew file mode 100644\nindex 0000000..e69de29\n",
        DEFAULT,
        r"file names do not match the ---/\+\+\+ lines or are ambiguous",
    ),
    ("dev_null_both_sides", "--- /dev/null\n+++ /dev/null\n@@ -0,0 +1 @@\n+a\n", DEFAULT, r"/dev/null on both sides"),
    ("duplicate_path", modify("src/app.py") + modify("src/app.py", "new", "newer"), DEFAULT, r"appears more than once"),
]


@pytest.mark.parametrize(("diff", "constraints", "expected"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_diff_is_rejected(diff: str, constraints: Constraints, expected: str) -> None:
    with pytest.raises(PatchRejected, match=expected) as caught:
        check_diff(diff, constraints)
    assert caught.value.reason == "unsafe_patch"


GOOD: list[tuple[str, str, Constraints, PatchSummary]] = [
    ("modify", modify("src/app.py"), DEFAULT, PatchSummary(("src/app.py",), 1, 1, (), ())),
    (
        "create_and_delete",
        create("src/new.py", ("a = 1", "b = 2")) + delete("src/old.py"),
        DEFAULT,
        PatchSummary(("src/new.py", "src/old.py"), 2, 1, ("src/new.py",), ("src/old.py",)),
    ),
    (
        "empty_new_file",
        "diff --git a/src/e.py b/src/e.py\nnew file mode 100644\nindex 0000000..e69de29\n",
        DEFAULT,
        PatchSummary(("src/e.py",), 0, 0, ("src/e.py",), ()),
    ),
    (
        "rename_with_edit",
        "diff --git a/src/a.py b/src/b.py\nsimilarity index 80%\nrename from src/a.py\n"
        "rename to src/b.py\nindex 1111111..2222222 100644\n--- a/src/a.py\n+++ b/src/b.py\n@@ -1 +1 @@\n-a\n+b\n",
        DEFAULT,
        PatchSummary(("src/a.py", "src/b.py"), 1, 1, ("src/b.py",), ("src/a.py",)),
    ),
    (
        "plain_diff_creation_without_dev_null",
        "--- a/new.txt\n+++ b/new.txt\n@@ -0,0 +1 @@\n+hello\n",
        DEFAULT,
        PatchSummary(("new.txt",), 1, 0, ("new.txt",), ()),
    ),
    (
        "sql_comment_lines_are_content",
        "diff --git a/db/q.sql b/db/q.sql\nindex 1..2 100644\n--- a/db/q.sql\n"
        "+++ b/db/q.sql\n@@ -1,2 +1,2 @@\n--- old comment\n+++ new comment\n select 1;\n",
        DEFAULT,
        PatchSummary(("db/q.sql",), 1, 1, (), ()),
    ),
    (
        "edit_in_executable_file",
        "diff --git a/run.sh b/run.sh\nindex 1111111..2222222 100755\n--- a/run.sh\n"
        "+++ b/run.sh\n@@ -1 +1 @@\n-a\n+b\n",
        DEFAULT,
        PatchSummary(("run.sh",), 1, 1, (), ()),
    ),
    (
        "tests_allowed_when_configured",
        modify("tests/test_app.py"),
        Constraints(tests_may_change=True),
        PatchSummary(("tests/test_app.py",), 1, 1, (), ()),
    ),
    (
        "inside_allowed_paths",
        modify("src/pkg/deep/mod.py"),
        ONLY_SRC,
        PatchSummary(("src/pkg/deep/mod.py",), 1, 1, (), ()),
    ),
    (
        "at_the_limits",
        "".join(modify(f"src/m{i}.py") for i in range(10)),
        Constraints(max_changed_lines=20),
        PatchSummary(tuple(f"src/m{i}.py" for i in range(10)), 10, 10, (), ()),
    ),
    (
        "preamble_text_is_ignored",
        "Fix the off-by-one.\n\n" + modify("src/app.py"),
        DEFAULT,
        PatchSummary(("src/app.py",), 1, 1, (), ()),
    ),
]


@pytest.mark.parametrize(("diff", "constraints", "summary"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_diff_is_accepted_with_summary(diff: str, constraints: Constraints, summary: PatchSummary) -> None:
    assert check_diff(diff, constraints) == summary


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("**", "a/b/c.py", True),
        ("src/**", "src/a/b.py", True),
        ("src/**", "lib/src/a.py", False),
        ("src/*.py", "src/a.py", True),
        ("src/*.py", "src/sub/a.py", False),
        ("src/**/*.py", "src/a.py", True),
        ("src/**/*.py", "src/x/y/a.py", True),
        ("*.py", "deep/er/a.py", True),  # no "/" in the pattern: the file name at any depth
        ("/app.py", "app.py", True),  # a leading "/" anchors at the root
        ("/app.py", "sub/app.py", False),
        ("src/[ab].py", "src/a.py", True),
        ("src/[!ab].py", "src/c.py", True),
        ("src/[!ab].py", "src/a.py", False),
        ("src/?.py", "src/ab.py", False),
        ("SRC/**", "src/a.py", False),  # allowed patterns are case-sensitive
    ],
)
def test_allowed_path_globs(pattern: str, path: str, matches: bool) -> None:
    constraints = Constraints(allowed_paths=(pattern,), forbidden_paths=(), test_paths=())
    if matches:
        assert check_diff(modify(path), constraints).files == (path,)
    else:
        with pytest.raises(PatchRejected, match="not in allowed_paths"):
            check_diff(modify(path), constraints)


def test_constraints_from_mapping() -> None:
    built = Constraints.from_mapping(
        {"allowed_paths": ["src/**", "lib/**"], "max_files": 3, "max_changed_lines": 50, "tests_may_change": True}
    )
    assert built == Constraints(
        allowed_paths=("src/**", "lib/**"), max_files=3, max_changed_lines=50, tests_may_change=True
    )
    assert built.forbidden_paths == DEFAULT_FORBIDDEN
    assert Constraints.from_mapping({}) == Constraints()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"allowed_path": ["src/**"]}, "allowed_path"),
        ({"allowed_paths": "src/**"}, "allowed_paths"),
        ({"forbidden_paths": [""]}, "forbidden_paths"),
        ({"test_paths": [1]}, "test_paths"),
        ({"max_files": 0}, "max_files"),
        ({"max_files": True}, "max_files"),
        ({"max_changed_lines": "400"}, "max_changed_lines"),
        ({"tests_may_change": "yes"}, "tests_may_change"),
    ],
)
def test_constraints_from_mapping_names_the_bad_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}: "):
        Constraints.from_mapping(data)


# --- the filesystem under the paths ------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
    done = subprocess.run(["git", "-C", str(repo), *identity, *args], check=True, capture_output=True, text=True)
    return done.stdout


def make_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


@pytest.fixture
def repo_with_escape(tmp_path: Path) -> tuple[Path, Path]:
    """A repository whose committed `sub` is a symlink to a directory outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = make_repo(tmp_path / "repo", {"app.py": "VALUE = 1\n"})
    os.symlink(outside, repo / "sub")
    os.symlink(".git", repo / "gitdir")
    os.symlink("app.py", repo / "alias.py")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "links")
    return repo, outside


def test_symlinked_parent_pointing_outside_is_rejected(repo_with_escape: tuple[Path, Path], tmp_path: Path) -> None:
    repo, outside = repo_with_escape
    diff = create("sub/x.py", ("print('escaped')",))
    summary = check_diff(diff, Constraints())  # the text alone looks harmless
    with pytest.raises(PatchRejected, match=r"'sub/x\.py': parent 'sub' resolves outside the worktree") as caught:
        check_paths_in_worktree(repo, summary.files)
    assert caught.value.reason == "unsafe_patch"

    head = git(repo, "rev-parse", "HEAD")
    parent = tmp_path / "worktrees"
    parent.mkdir()
    with pytest.raises(PatchRejected, match="resolves outside the worktree"):
        apply_patch(
            repo,
            diff,
            base_commit=None,
            constraints=Constraints(),
            test_command=None,
            test_timeout=10,
            message="escape",
            trailers={"Work-Order": "wo_x"},
            worktree_parent=parent,
        )
    assert list(outside.iterdir()) == []
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "HEAD") == head
    assert list(parent.iterdir()) == []


def test_symlinked_parent_into_dot_git_is_rejected(repo_with_escape: tuple[Path, Path]) -> None:
    repo, _ = repo_with_escape
    with pytest.raises(PatchRejected, match=r"parent 'gitdir' resolves into \.git"):
        check_paths_in_worktree(repo, ["gitdir/hooks/post-commit"])


def test_symlink_target_is_rejected(repo_with_escape: tuple[Path, Path]) -> None:
    repo, _ = repo_with_escape
    with pytest.raises(PatchRejected, match=r"'alias\.py': is a symlink"):
        check_paths_in_worktree(repo, ["alias.py"])


def test_plain_paths_in_worktree_pass(repo_with_escape: tuple[Path, Path]) -> None:
    repo, _ = repo_with_escape
    check_paths_in_worktree(repo, ["app.py", "new/deep/file.py"])
