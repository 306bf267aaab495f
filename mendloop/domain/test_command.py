"""The test command a patch is judged by: its argv, the variables it adds to the test process's environment
(`test_env`) and the directory it runs in, relative to the worktree's root (`test_cwd`).

One value, `TestCommand`, travels from the target's config (or `mendloop agent --test-command/--test-env/
--test-cwd`) through the work order's context to `agents/test_suite.py`; the rules on its parts are here so that
the config, the CLI and a runner reading a context all refuse the same things.

The names a test may not set are the ones mendloop itself sets for the test process (`PATH`, `HOME`,
`PYTHONDONTWRITEBYTECODE`, the `GIT_CONFIG_*` trio that lets git in a dropped-privilege worktree read its gitdir)
and mendloop's own `MENDLOOP_*`: overriding them would break the sandbox's assumptions or smuggle mendloop's
settings into code under test. Variables mendloop only passes through from its own environment (`LANG`, `TZ`,
`PYTHONPATH`, ...) are the operator's to set per target.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from mendloop.errors import InputError

RESERVED_NAMES = frozenset({"PATH", "HOME", "PYTHONDONTWRITEBYTECODE", "GIT_CONFIG_COUNT"})
RESERVED_PREFIXES = ("MENDLOOP_", "GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME_CHARS = 256
MAX_VALUE_CHARS = 32_768


def env_name_problem(name: str) -> str | None:
    """Why `name` cannot be a test_env variable, or None."""
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        return f"{name!r} is not a valid environment variable name (letters, digits, _; not starting with a digit)"
    if name.startswith("MENDLOOP_"):
        return f"{name}: MENDLOOP_* variables are mendloop's own and never reach the tests"
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
        return f"{name} is set by mendloop for the test process and cannot be overridden"
    return None


def env_value_problem(value: str) -> str | None:
    """Why `value` cannot be a test_env value, or None (exec refuses a NUL; a huge value is a mistake)."""
    if "\0" in value:
        return "the value contains a NUL character"
    if len(value) > MAX_VALUE_CHARS:
        return f"the value is longer than {MAX_VALUE_CHARS} characters"
    return None


def cwd_problem(cwd: str) -> str | None:
    """Why `cwd` cannot be a test_cwd (a directory relative to the worktree's root), or None."""
    if not cwd.strip():
        return "test_cwd is empty (leave it out to run the tests at the worktree's root)"
    if "\0" in cwd or "\\" in cwd:
        return f"test_cwd {cwd!r} contains a NUL or a backslash"
    path = PurePosixPath(cwd)
    if path.is_absolute():
        return f"test_cwd {cwd!r} is absolute; give a directory relative to the repository's root"
    if ".." in path.parts:
        return f"test_cwd {cwd!r} contains '..'; it must stay inside the repository"
    if path.parts and path.parts[0] == ".git":
        return f"test_cwd {cwd!r} is inside .git"
    return None


def normal_cwd(cwd: str | None) -> str | None:
    """`cwd` without `.` parts and trailing slashes; None for the root itself (`.`)."""
    if cwd is None:
        return None
    parts = PurePosixPath(cwd).parts
    return PurePosixPath(*parts).as_posix() if parts else None


@dataclass(frozen=True, slots=True)
class TestCommand:
    """argv, the extra environment (sorted (name, value) pairs: hashable, and one order for the cache key) and
    the directory the tests run in, relative to the worktree's root (None: the root)."""

    __test__ = False  # a value type, not a pytest test class

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None

    @classmethod
    def of(cls, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> TestCommand:
        """Checked: InputError naming the part (`test_command`, `test_env.NAME`, `test_cwd`)."""
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) and a for a in argv):
            raise InputError("the test command must be a non-empty list of strings", field="test_command")
        pairs: list[tuple[str, str]] = []
        for name, value in (env or {}).items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise InputError("test_env names and values must be strings", field=f"test_env.{name}")
            problem = env_name_problem(name) or env_value_problem(value)
            if problem is not None:
                raise InputError(problem, field=f"test_env.{name}")
            pairs.append((name, value))
        if cwd is not None:
            if not isinstance(cwd, str):
                raise InputError("test_cwd must be a string", field="test_cwd")
            problem = cwd_problem(cwd)
            if problem is not None:
                raise InputError(problem, field="test_cwd")
        return cls(tuple(argv), tuple(sorted(pairs)), normal_cwd(cwd))

    @classmethod
    def coerce(cls, value: TestCommand | Sequence[str]) -> TestCommand:
        """`value` itself, or a bare argv as a TestCommand with no env and the root as its directory."""
        return value if isinstance(value, TestCommand) else cls.of(value)

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> TestCommand | None:
        """From a work order's context (`test_command`, `test_env`, `test_cwd`); None when it names no test
        command. InputError when what it names is malformed."""
        argv = context.get("test_command")
        if argv is None or argv == []:
            return None
        if not isinstance(argv, list):
            raise InputError("the test command must be a non-empty list of strings", field="test_command")
        env = context.get("test_env")
        if env is not None and not isinstance(env, Mapping):
            raise InputError("test_env must be a mapping of names to values", field="test_env")
        return cls.of(argv, env, context.get("test_cwd"))

    @property
    def environ(self) -> dict[str, str]:
        return dict(self.env)

    def as_key(self) -> list[Any]:
        """What makes two runs of this command different, beyond the argv: part of the base-run cache key."""
        return [[list(pair) for pair in self.env], self.cwd]

    def shown(self) -> str:
        """The command line as an agent's prompt shows it: the argv, the variable *names* it adds (a value can be
        a credential, and the prompt goes to a model's vendor) and the directory it runs in."""
        line = f"`{' '.join(self.argv)}`"
        if self.env:
            line += " with " + ", ".join(name for name, _ in self.env) + " set"
        if self.cwd:
            line += f", run in `{self.cwd}/`"
        return line


__all__ = [
    "RESERVED_NAMES",
    "RESERVED_PREFIXES",
    "TestCommand",
    "cwd_problem",
    "env_name_problem",
    "env_value_problem",
    "normal_cwd",
]
