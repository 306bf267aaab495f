"""Patch safety: decide from the diff text alone whether a patch may touch the repository at all.

An agent's diff is hostile input. `check_diff` parses it with unidiff, and also reads the git extended header
lines (modes, renames, copies, binary markers) that unidiff keeps as free text, so a patch cannot hide a
symlink, a chmod or a rename target behind the parser. `mendloop.agents.patch_pipeline` then cross-checks the
paths with git's own reading of the same diff before anything is applied.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

from unidiff.patch import PatchSet

from mendloop.agents.patch_paths import DEFAULT_FORBIDDEN, DEFAULT_TEST_CONFIG, DEFAULT_TEST_PATHS, SECTION_CONFIG
from mendloop.errors import PatchRejected

# The default lists (patch_paths.py) are part of this module's answer: importers may take them from here.
__all__ = [
    "DEFAULT_FORBIDDEN",
    "DEFAULT_TEST_CONFIG",
    "DEFAULT_TEST_PATHS",
    "MAX_DIFF_CHARS",
    "SECTION_CONFIG",
    "Constraints",
    "PatchSummary",
    "check_config_sections",
    "check_diff",
    "check_paths_in_worktree",
]

# Far beyond any reviewable patch; stops a multi-megabyte blob from reaching the parser.
MAX_DIFF_CHARS = 5_000_000

_DEV_NULL = "/dev/null"
_REGULAR = "100644"
_EXECUTABLE = "100755"
_SYMLINK = "120000"
_GITLINK = "160000"

# Header lines are matched on the raw text because unidiff keeps most of them as free text. None of these
# prefixes can start a hunk body line (those start with " ", "+", "-" or "\\"), so the scan needs no hunk tracking.
_MODE_LINE = re.compile(r"^(old mode|new mode|new file mode|deleted file mode)[ \t]+(\S*)")
_INDEX_LINE = re.compile(r"^index [0-9a-fA-F]+\.\.[0-9a-fA-F]+[ \t]+(\S+)")
# git apply also accepts the historical "rename old"/"rename new" spellings; they must not slip past.
_RENAME_COPY_LINE = re.compile(r"^(rename|copy) (from|to|old|new) (.*)$")
_MOVE_SIDE = {"from": "from", "old": "from", "to": "to", "new": "to"}


@dataclass(frozen=True)
class Constraints:
    """What a patch may touch.

    Patterns are globs matched against repository-relative paths: `*` and `?` stay within one path component,
    `**` spans any number of them, `[...]` is a character class. As in .gitignore, a pattern without a "/"
    matches the file name at any depth (`*.lock` also catches `web/yarn.lock`) and a leading "/" anchors a
    pattern at the repository root. Forbidden and test patterns ignore case, because on a case-insensitive
    checkout `.GITHUB/x.yml` is `.github/x.yml`; allowed patterns do not, so they never widen by accident.
    """

    allowed_paths: tuple[str, ...] = ("**",)
    forbidden_paths: tuple[str, ...] = DEFAULT_FORBIDDEN
    max_files: int = 10
    max_changed_lines: int = 400
    tests_may_change: bool = False
    test_paths: tuple[str, ...] = DEFAULT_TEST_PATHS
    test_config_paths: tuple[str, ...] = DEFAULT_TEST_CONFIG
    # Test-runner configuration this target lets a patch change anyway (e.g. "conftest.py", "pyproject.toml").
    test_config_allowed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("allowed_paths", "forbidden_paths", "test_paths", "test_config_paths", "test_config_allowed"):
            _validate_patterns(name, getattr(self, name))
        for name in ("max_files", "max_changed_lines"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.tests_may_change, bool):
            raise ValueError(f"tests_may_change: must be true or false, got {self.tests_may_change!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Constraints:
        """Build from a config mapping whose keys are the field names; a given key replaces its default."""
        if not isinstance(data, Mapping):
            raise ValueError(f"constraints: must be a mapping, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise ValueError(f"{key}: unknown constraint; known: {', '.join(known)}")
        kwargs: dict[str, Any] = {}
        for key in ("allowed_paths", "forbidden_paths", "test_paths", "test_config_paths", "test_config_allowed"):
            if key in data:
                value = data[key]
                # A bare string would otherwise be iterated as one pattern per character.
                if isinstance(value, str) or not isinstance(value, list | tuple):
                    raise ValueError(f"{key}: must be a list of glob patterns, got {value!r}")
                kwargs[key] = tuple(value)
        for key in ("max_files", "max_changed_lines", "tests_may_change"):
            if key in data:
                kwargs[key] = data[key]
        return cls(**kwargs)


@dataclass(frozen=True)
class PatchSummary:
    """What a patch touches. `files` lists every path it reads or writes (rename and copy sources included)
    in order of appearance; `created` exist only after it, `deleted` only before it."""

    files: tuple[str, ...]
    added: int
    removed: int
    created: tuple[str, ...]
    deleted: tuple[str, ...]
    # Files whose test-runner sections must be compared at the base and patched (check_config_sections).
    sectioned: tuple[str, ...] = ()


def check_diff(diff: str, constraints: Constraints) -> PatchSummary:
    """Accept a diff only if every path, mode and size in it is within `constraints`; else PatchRejected."""
    if not diff.strip():
        _reject("empty diff", rule="empty")
    if "\x00" in diff:
        _reject("diff contains a NUL byte", rule="nul")
    if len(diff) > MAX_DIFF_CHARS:
        _reject(f"diff is larger than {MAX_DIFF_CHARS} characters", rule="size")
    try:
        diff.encode("utf-8")
    except UnicodeEncodeError:
        _reject("diff is not valid UTF-8 text", rule="encoding")

    header_paths = _scan_header_lines(diff)
    try:
        patch = PatchSet(diff)
    except Exception as exc:  # any parser failure on hostile input is a rejection, never a crash
        _reject(f"not a valid unified diff: {exc}", rule="parse")
    if not patch:
        _reject("no file changes found: not a unified diff", rule="parse")

    for path in header_paths:
        _check_path(path, constraints)

    files: list[str] = []
    created: list[str] = []
    deleted: list[str] = []
    for patched in patch:
        entry = _entry(patched)
        for path in entry.paths:
            _check_path(path, constraints)
            if path in files:
                _reject(f"{path!r}: appears more than once in the diff", path=path, rule="duplicate")
            files.append(path)
        created.extend(entry.created)
        deleted.extend(entry.deleted)
        _require_content(patched, entry)

    sectioned = tuple(
        path
        for path in files
        if path.rsplit("/", 1)[-1].lower() in SECTION_CONFIG
        and _first_match(path, constraints.test_config_allowed, ignore_case=True) is None
    )

    if len(files) > constraints.max_files:
        _reject(f"too many files: {len(files)} > max_files {constraints.max_files}", rule="max_files")
    added, removed = int(patch.added), int(patch.removed)
    if added + removed > constraints.max_changed_lines:
        _reject(
            f"too many changed lines: {added + removed} > max_changed_lines {constraints.max_changed_lines}",
            rule="max_changed_lines",
        )
    return PatchSummary(
        files=tuple(files),
        added=added,
        removed=removed,
        created=tuple(created),
        deleted=tuple(deleted),
        sectioned=sectioned,
    )


def check_config_sections(path: str, before: str | None, after: str | None) -> None:
    """Reject a change to the test-runner sections (SECTION_CONFIG) of `path` between `before` and `after` (None:
    the file does not exist on that side). A change elsewhere in the file is fine; a file that cannot be read on the
    patched side is rejected, since what the test runner would make of it is unknown."""
    name = path.rsplit("/", 1)[-1].lower()
    keys = SECTION_CONFIG.get(name)
    if keys is None:
        return
    try:
        old = _sections(name, before, keys) if before is not None else {}
    except ValueError:
        old = {}  # unreadable at the base: every test-runner section the patch leaves counts as its change
    if after is None:
        new: dict[str, Any] = {}
    else:
        try:
            new = _sections(name, after, keys)
        except ValueError as exc:
            _reject(f"{path!r}: cannot read the patched file ({exc})", path=path, rule="test_config")
    changed = sorted(key for key in {*old, *new} if old.get(key) != new.get(key))
    if changed:
        _reject(
            f"{path!r}: changes test-runner configuration ({', '.join(changed)}); "
            "allow it with the target's patch.test_config_allowed",
            path=path,
            rule="test_config",
        )


def _sections(name: str, text: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The parts of a config file that SECTION_CONFIG names, by key; ValueError when it does not parse."""
    if name == "setup.cfg":
        parser = configparser.RawConfigParser(strict=False, interpolation=None)
        try:
            parser.read_string(text)
        except configparser.Error as exc:
            raise ValueError(str(exc).splitlines()[0]) from None
        found: dict[str, Any] = {}
        for section in parser.sections():
            if any(_compile(key, True).fullmatch(section.strip()) for key in keys):
                found[section.strip().lower()] = dict(parser.items(section))
        return found
    try:
        data: Any = tomllib.loads(text) if name == "pyproject.toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError("not a table at the top level")
    found = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            found[key] = node
    return found


def _require_content(patched: Any, entry: _Entry) -> None:
    """A file entry must change what the file holds or where it is: a mode-only entry, one whose hunks hold only
    context, or a rename onto itself changes nothing a test could judge, and is_applied would call it applied."""
    if entry.created or entry.deleted or len(set(entry.paths)) > 1:
        return
    info = [str(line) for line in (patched.patch_info or [])]
    if any(line.startswith(("new file mode", "deleted file mode")) for line in info):
        return
    if int(patched.added) + int(patched.removed) == 0:
        path = entry.paths[0]
        _reject(f"{path!r}: no content change (mode-only or empty hunks)", path=path, rule="no_content")


def check_paths_in_worktree(worktree: Path, files: Iterable[str]) -> None:
    """Reject paths that reach outside `worktree` through a symlinked parent, or that are symlinks themselves.

    check_diff sees only text; a committed `sub -> /elsewhere` link makes the harmless-looking `sub/x.py`
    a write outside the repository, so every existing parent is resolved on the real filesystem.
    """
    root = os.path.realpath(worktree)
    for rel in files:
        parts = rel.split("/")
        if os.path.isabs(rel) or ".." in parts or "" in parts:
            _reject(f"{rel!r}: not a plain relative path", path=rel, rule="path")
        current = root
        for depth, component in enumerate(parts[:-1], start=1):
            current = os.path.join(current, component)
            if not os.path.lexists(current):
                break  # nothing below a missing directory can exist yet
            shown = "/".join(parts[:depth])
            real = os.path.realpath(current)
            if not _is_within(real, root):
                _reject(
                    f"{rel!r}: parent {shown!r} resolves outside the worktree (to {real})",
                    path=rel,
                    rule="symlink_escape",
                )
            if any(_is_dot_git(p) for p in os.path.relpath(real, root).split(os.sep)):
                _reject(f"{rel!r}: parent {shown!r} resolves into .git", path=rel, rule="git_dir")
            if not os.path.isdir(real):
                _reject(f"{rel!r}: parent {shown!r} is not a directory", path=rel, rule="path")
        if os.path.islink(os.path.join(root, rel)):
            _reject(f"{rel!r}: is a symlink in the worktree", path=rel, rule="symlink")


@dataclass(frozen=True)
class _Entry:
    paths: tuple[str, ...]
    created: tuple[str, ...]
    deleted: tuple[str, ...]


def _entry(patched: Any) -> _Entry:
    """The paths one unidiff PatchedFile reads or writes, with git's rename/copy headers taken into account."""
    if patched.is_binary_file:
        _reject(f"{_display(patched)}: binary file", rule="binary")
    source = _side(patched.source_file, "a/")
    target = _side(patched.target_file, "b/")
    if source is None and target is None:
        _reject("a file entry has /dev/null on both sides", rule="dev_null")
    for mode in (patched.source_mode, patched.target_mode):
        if mode in (_SYMLINK, _GITLINK):
            _check_mode("index", mode, target or source or "?")

    info = [str(line).rstrip("\r\n") for line in (patched.patch_info or [])]
    is_git = bool(info) and info[0].startswith("diff --git ")
    moves: dict[str, str] = {}
    if is_git:
        _require_header(info[0], source if source is not None else target, target if target is not None else source)
        for line in info:
            match = _RENAME_COPY_LINE.match(line)
            if match:
                key = f"{match.group(1)} {_MOVE_SIDE[match.group(2)]}"
                if key in moves:
                    _reject(f"{_display(patched)}: repeated {key!r} header", rule="inconsistent_header")
                moves[key] = match.group(3)

    if source is None:
        assert target is not None
        return _Entry(paths=(target,), created=(target,), deleted=())
    if target is None:
        return _Entry(paths=(source,), created=(), deleted=(source,))
    if moves:
        kind = "rename" if "rename from" in moves or "rename to" in moves else "copy"
        if moves.get(f"{kind} from") != source or moves.get(f"{kind} to") != target or len(moves) != 2:
            _reject(
                f"{target!r}: {kind} header does not match the diff --git line",
                path=target,
                rule="inconsistent_header",
            )
        deleted = (source,) if kind == "rename" else ()
        return _Entry(paths=(source, target), created=(target,), deleted=deleted)
    if source != target:
        # Without rename/copy headers git picks one of the two names by its own rules; never guess which.
        _reject(f"{source!r} vs {target!r}: old and new names differ without a rename header", rule="names_differ")
    # In a plain (non-git) diff a lone "-0,0" hunk creates the file, as git apply treats it (see RECIPES.md).
    created = (target,) if not is_git and patched.is_added_file else ()
    return _Entry(paths=(target,), created=created, deleted=())


def _side(name: str | None, prefix: str) -> str | None:
    """The repository-relative path on one side of a file entry, or None for /dev/null."""
    if name is None or name == "":
        _reject("a file entry has no file name", rule="path")
    if name == _DEV_NULL:
        return None
    if name.startswith('"'):
        _reject(f"{name}: quoted path (git escapes unusual characters; such names are not accepted)", rule="quoted")
    if name.startswith("/"):
        _reject(f"{name!r}: absolute path", path=name, rule="absolute")
    if not name.startswith(prefix):
        _reject(f"{name!r}: file names must carry git's {prefix!r} prefix", path=name, rule="prefix")
    return name[len(prefix) :]


def _scan_header_lines(diff: str) -> list[str]:
    """Reject unsafe modes, binary patches and inconsistent git headers anywhere in the diff; return the
    rename, copy and ---/+++ paths of git headers, which unidiff does not (fully) report, for checking."""
    paths: list[str] = []
    current = "?"
    block: _GitBlock | None = None
    # split("\n"), not splitlines(): git splits on "\n" only, and so must we to see the lines git sees.
    for raw in diff.split("\n"):
        line = raw.rstrip("\r")
        if line.startswith("diff --git "):
            if block is not None:
                paths.extend(block.finish())
            current = line[len("diff --git ") :]
            if '"' in current:
                _reject(f"{current}: quoted path (git escapes unusual characters)", rule="quoted")
            block = _GitBlock(line)
            continue
        if block is not None:
            # Until its first hunk a git header's ---/+++ lines name the files, and git honours them even where
            # unidiff reads only the diff --git line; after it they may be content, and git ignores them.
            if line.startswith("@@"):
                paths.extend(block.finish())
                block = None
            elif line.startswith("--- "):
                block.minus = _header_name(line[4:])
            elif line.startswith("+++ "):
                block.plus = _header_name(line[4:])
        if line.startswith("GIT binary patch") or line.startswith("Binary files "):
            _reject(f"{current}: binary file", rule="binary")
        mode_line = _MODE_LINE.match(line)
        if mode_line:
            _check_mode(mode_line.group(1), mode_line.group(2), current)
            continue
        index_line = _INDEX_LINE.match(line)
        if index_line:
            _check_mode("index", index_line.group(1), current)
            continue
        move = _RENAME_COPY_LINE.match(line)
        if move:
            path = move.group(3)
            if path.startswith('"'):
                _reject(f"{path}: quoted path in a {move.group(1)} header", rule="quoted")
            if path.startswith("/"):
                _reject(f"{path!r}: absolute path in a {move.group(1)} header", path=path, rule="absolute")
            paths.append(path)
    if block is not None:
        paths.extend(block.finish())
    return paths


class _GitBlock:
    """One `diff --git` header and the ---/+++ names that follow it before the first hunk."""

    def __init__(self, header: str) -> None:
        self.header = header
        self.minus: str | None = None
        self.plus: str | None = None

    def finish(self) -> list[str]:
        if self.minus is None and self.plus is None:
            return []
        if self.minus is None or self.plus is None:
            _reject(f"{self.header}: a --- line without its +++ line or the reverse", rule="inconsistent_header")
        old = _side(self.minus, "a/")
        new = _side(self.plus, "b/")
        if old is None and new is None:
            _reject(f"{self.header}: /dev/null on both sides", rule="dev_null")
        _require_header(self.header, old if old is not None else new, new if new is not None else old)
        return [p for p in (old, new) if p is not None]


def _require_header(header: str, old: str | None, new: str | None) -> None:
    # git checks its ---/+++ names against this line, and unidiff takes its names from it: only when all of
    # them agree do both parsers mean the same files.
    if header != f"diff --git a/{old} b/{new}":
        _reject(f"{header}: file names do not match the ---/+++ lines or are ambiguous", rule="inconsistent_header")


def _header_name(text: str) -> str:
    # git ends a name containing spaces with a tab; what follows a tab is a timestamp.
    return text.split("\t", 1)[0]


def _check_mode(kind: str, mode: str, where: str) -> None:
    if mode == _SYMLINK:
        _reject(f"{where}: symlink (mode {mode})", rule="symlink")
    if mode == _GITLINK:
        _reject(f"{where}: submodule (mode {mode})", rule="submodule")
    if mode == _EXECUTABLE and kind in ("new mode", "new file mode"):
        _reject(f"{where}: made executable (mode {mode})", rule="executable")
    if mode not in (_REGULAR, _EXECUTABLE):
        _reject(f"{where}: unsupported file mode {mode!r}", rule="mode")


def _check_path(path: str, constraints: Constraints) -> None:
    if not path:
        _reject("empty file name", rule="path")
    if path.startswith('"'):
        _reject(f"{path}: quoted path", rule="quoted")
    if any(unicodedata.category(ch).startswith("C") or ch in "\u2028\u2029" for ch in path):
        _reject(f"{path!r}: control or invisible character in path", path=path, rule="control_char")
    if path.startswith("/"):
        _reject(f"{path!r}: absolute path", path=path, rule="absolute")
    if path.startswith("-"):
        _reject(f"{path!r}: starts with '-' (would read as a command-line option)", path=path, rule="dash")
    if "\\" in path:
        _reject(f"{path!r}: backslash in path", path=path, rule="backslash")
    parts = path.split("/")
    if ".." in parts:
        _reject(f"{path!r}: '..' component escapes the repository", path=path, rule="dotdot")
    if "" in parts or "." in parts:
        _reject(f"{path!r}: empty or '.' path component", path=path, rule="path")
    if any(_is_dot_git(p) for p in parts):
        _reject(f"{path!r}: inside .git/", path=path, rule="git_dir")
    pattern = _first_match(path, constraints.forbidden_paths, ignore_case=True)
    if pattern is not None:
        _reject(f"{path!r}: forbidden path (matches {pattern!r})", path=path, rule="forbidden")
    if _first_match(path, constraints.allowed_paths, ignore_case=False) is None:
        _reject(f"{path!r}: not in allowed_paths", path=path, rule="not_allowed")
    pattern = _first_match(path, constraints.test_config_paths, ignore_case=True)
    if pattern is not None and _first_match(path, constraints.test_config_allowed, ignore_case=True) is None:
        _reject(
            f"{path!r}: test-runner configuration (matches {pattern!r}); "
            "allow it with the target's patch.test_config_allowed",
            path=path,
            rule="test_config",
        )
    if not constraints.tests_may_change:
        pattern = _first_match(path, constraints.test_paths, ignore_case=True)
        if pattern is not None:
            _reject(
                f"{path!r}: test file (matches {pattern!r}) and tests_may_change is false",
                path=path,
                rule="test_file",
            )


def _is_dot_git(component: str) -> bool:
    # Windows and macOS checkouts treat ".git.", ".GIT" and the 8.3 name "git~1" as the .git directory.
    name = component.rstrip(". ").lower()
    return name in (".git", "git~1")


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _display(patched: Any) -> str:
    return str(patched.target_file if patched.target_file not in (None, _DEV_NULL) else patched.source_file)


def _first_match(path: str, patterns: Iterable[str], *, ignore_case: bool) -> str | None:
    for pattern in patterns:
        if _compile(pattern, ignore_case).fullmatch(path):
            return pattern
    return None


@lru_cache(maxsize=1024)
def _compile(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    anchored = pattern.startswith("/")
    body = pattern[1:] if anchored else pattern
    out: list[str] = []
    if not anchored and "/" not in body:
        out.append("(?:.*/)?")
    i, n = 0, len(body)
    while i < n:
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif body[i] == "*":
            out.append("[^/]*")
            i += 1
        elif body[i] == "?":
            out.append("[^/]")
            i += 1
        elif body[i] == "[":
            end = body.find("]", i + 2 if body[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end == -1:
                out.append(re.escape("["))
                i += 1
                continue
            inner = body[i + 1 : end]
            negate = inner.startswith("!")
            inner = inner[1:] if negate else inner
            inner = inner.replace("\\", "\\\\").replace("^", "\\^")
            # A class never matches "/", so it cannot cross a path component.
            out.append(f"(?!/)[{'^' if negate else ''}{inner}]")
            i = end + 1
        else:
            out.append(re.escape(body[i]))
            i += 1
    return re.compile("".join(out), re.IGNORECASE if ignore_case else 0)


def _validate_patterns(name: str, patterns: Any) -> None:
    if not isinstance(patterns, tuple) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{name}: must be a list of non-empty glob patterns, got {patterns!r}")
    for pattern in patterns:
        try:
            _compile(pattern, False)
        except re.error as exc:
            raise ValueError(f"{name}: invalid pattern {pattern!r}: {exc}") from None


def _reject(message: str, **fields: Any) -> NoReturn:
    raise PatchRejected("unsafe_patch", message, **fields)
