"""Handing a worktree to the user an agent runs as (when the runner is root) and taking it back: ownership
without following symlinks, the directories that user must be able to enter, and putting back the worktree's
`.git` file, which an agent or a test could point elsewhere (at a config with hooks the runner's git would run)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from mendloop.errors import AgentError
from mendloop.infra.process import blocked_for


def give_tree(root: Path, owner: tuple[int, int]) -> None:
    """chown -R without following symlinks."""
    uid, gid = owner
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            try:
                os.lchown(os.path.join(dirpath, name), uid, gid)
            except FileNotFoundError:
                pass


def make_traversable(directory: Path) -> None:
    mode = directory.stat().st_mode
    os.chmod(directory, stat.S_IMODE(mode) | 0o111)


def check_reachable(path: Path, owner: tuple[int, int]) -> None:
    """The worktree must be reachable by the agent's user, or the agent cannot even start there."""
    blocked = blocked_for(path, owner)
    if blocked is not None:
        raise AgentError(
            "agent_error",
            f"{blocked} is not searchable by uid {owner[0]}: the agent cannot reach its worktree; "
            "set TMPDIR to a directory others can enter, or run without dropping privileges",
        )


def restore_file(path: Path, content: bytes) -> None:
    try:
        if path.is_symlink() or path.is_file():
            if path.read_bytes() == content and not path.is_symlink():
                return
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    except OSError:
        pass
    path.write_bytes(content)
