"""Throwaway git worktrees: a detached checkout of one commit in a fresh directory outside the repository, always
removed on exit; and the sweep that removes the ones a crash or a kill -9 left behind.

A worktree's directory holds a lock file its process keeps locked (flock) while it uses it; the kernel drops the
lock when that process dies, however it dies. So the sweep can tell a dead process's worktree from a live one's
(another runner's, another server's) at once, without guessing from its age."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mendloop.errors import MendloopError
from mendloop.infra import git

WORKTREE_PREFIX = "mendloop-wt-"

_OWNER_MARKER = "mendloop-repo"
_LIVE_LOCK = "mendloop-live.lock"


@contextmanager
def worktree(repo: Path, commit: str, *, parent: Path | None = None) -> Iterator[Path]:
    """A detached worktree at `commit` in a fresh directory outside the repository, always removed on exit."""
    root = git.toplevel(repo)
    sha = git.resolve(root, commit)
    container = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    base = Path(tempfile.mkdtemp(prefix=WORKTREE_PREFIX, dir=container)).resolve()
    path = base / "worktree"
    live = os.open(base / _LIVE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(live, fcntl.LOCK_EX)  # a fresh file: nobody else can hold it yet
        if is_within(base, root.resolve()):
            raise MendloopError(f"worktree directory {base} is inside the repository {root}")
        # prune_stale removes only directories that say which repository they belong to.
        (base / _OWNER_MARKER).write_text(str(git.common_dir(root)))
        git.run(root, "worktree", "add", "--detach", str(path), sha, timeout=git.CHECKOUT_TIMEOUT)
        yield path
    finally:
        try:
            _remove_worktree(root, path, base)
        finally:
            os.close(live)


def prune_stale(repo: Path, *, max_age_hours: float = 24.0, parent: Path | None = None) -> int:
    """Remove mendloop's worktrees of `repo` whose process is gone (left by a crash or a kill -9): at once when
    the directory has its live lock (see the module), after `max_age_hours` when it has none (made before the lock
    existed); and forget registrations whose directories are gone. Returns how many directories were removed."""
    root = git.toplevel(repo)
    common = str(git.common_dir(root))
    cutoff = time.time() - max_age_hours * 3600
    git.run(root, "worktree", "prune")
    removed: set[Path] = set()
    for path in _linked_worktrees(root):
        base = path.parent
        if base.name.startswith(WORKTREE_PREFIX) and _abandoned(base, cutoff):
            _remove_worktree(root, path, base)
            removed.add(base)
    container = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    for base in container.glob(WORKTREE_PREFIX + "*"):
        if base in removed or base.is_symlink() or not base.is_dir() or not _abandoned(base, cutoff):
            continue
        try:
            owner = (base / _OWNER_MARKER).read_text()
        except OSError:
            continue  # not recognisably ours: leave it alone
        if owner == common:
            _force_rmtree(base)
            removed.add(base)
    git.run(root, "worktree", "prune")
    return len(removed)


def is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _linked_worktrees(root: Path) -> list[Path]:
    out = git.text(git.run(root, "worktree", "list", "--porcelain").stdout)
    paths = [Path(line[len("worktree ") :]) for line in out.splitlines() if line.startswith("worktree ")]
    return [p for p in paths if p.resolve() != root.resolve()]


def _remove_worktree(root: Path, path: Path, base: Path) -> None:
    # Each step may fail on its own (dir half-created, registration missing); the next one covers for it.
    if path.exists():
        git.run(root, "worktree", "remove", "--force", "--force", str(path), check=False, timeout=git.CHECKOUT_TIMEOUT)
    _force_rmtree(base)
    git.run(root, "worktree", "prune", check=False)


def _force_rmtree(path: Path) -> None:
    def retry_writable(func: Callable[..., Any], failed: str, _exc: Any) -> None:
        # Tests may leave read-only directories behind; make the parent writable and try once more.
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)
        except OSError:
            pass

    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=retry_writable)


def _abandoned(base: Path, cutoff: float) -> bool:
    """No live process holds the worktree directory `base` (or, without a live lock, it is older than `cutoff`)."""
    try:
        fd = os.open(base / _LIVE_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _mtime(base) < cutoff
    except OSError:
        return False  # not ours to judge (a symlink, no permission): leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock we may just have taken
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")
