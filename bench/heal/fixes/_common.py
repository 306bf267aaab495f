"""What the stand-in fixes of the healing benchmark share: finding the one file a fix edits in a worktree.

Standard library only: `examples/agents/demo_fix.py --fixes bench/heal/fixes --fix NAME` imports these modules in
the agent's sandbox, where nothing but the standard library is installed."""

from __future__ import annotations

import os


class FixError(Exception):
    """The code the fix edits is not there as expected: the stand-in refuses to patch blindly."""


def find_target(repo_path: str, name: str) -> str:
    """Path of `name`: at the repository root, or the only one below it."""
    direct = os.path.join(repo_path, name)
    if os.path.isfile(direct):
        return direct
    found = []
    for root, dirs, files in os.walk(repo_path):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "state", "tests")]
        if name in files:
            found.append(os.path.join(root, name))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FixError(f"{name} not found under {repo_path}")
    raise FixError(f"several {name} files under {repo_path}: {', '.join(sorted(found))}")


def replace_once(source: str, old: str, new: str, what: str) -> str:
    """`source` with `old` replaced by `new`; `old` must occur exactly once."""
    count = source.count(old)
    if count != 1:
        raise FixError(f"{what}: expected the code to occur once, found it {count} times")
    return source.replace(old, new)
