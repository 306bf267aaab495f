"""Which files a tailer follows: the regular files its glob patterns match, the directories whose changes concern
them, and the file a rotation left next to a path (renamed, or copied before a truncation)."""

from __future__ import annotations

import glob
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from mendloop.domain.checkpoints import HEAD_BYTES, Checkpoint, head_hash

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")

_MAGIC = re.compile(r"[*?\[]")


def expand(patterns: Iterable[str]) -> dict[str, os.stat_result]:
    """Path → stat of every regular file matching one of `patterns` now."""
    found: dict[str, os.stat_result] = {}
    for pattern in patterns:
        for p in glob.glob(pattern, recursive=True):
            path = os.path.normpath(p)
            if path in found:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished between the listing and the stat: the next pass sees what replaced it
            if stat.S_ISREG(st.st_mode):
                found[path] = st
    return found


def pattern_roots(patterns: Iterable[str]) -> dict[str, bool]:
    """Directory → recursive, for the fixed part of each pattern: where a file matching it can appear."""
    dirs: dict[str, bool] = {}
    for pattern in patterns:
        parts = Path(pattern).parts
        fixed: list[str] = []
        for part in parts:
            if _MAGIC.search(part):
                break
            fixed.append(part)
        globbed_dirs = len(fixed) < len(parts) - 1
        root = str(Path(*fixed)) if len(fixed) < len(parts) else str(Path(*fixed).parent)
        dirs[root] = dirs.get(root, False) or globbed_dirs
    return dirs


def head_matches(path: str, cp: Checkpoint) -> bool:
    """The file at `path` is at least as long as `cp`'s offset and begins as the checkpointed file did."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(min(HEAD_BYTES, cp.offset))
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    return size >= cp.offset and head_hash(head) == cp.identity.head_hash


def siblings(path: str, exclude: set[str]) -> list[tuple[str, os.stat_result]]:
    """Regular files next to `path` that a rotation could have produced, newest first."""
    directory, base = os.path.split(path)
    out: list[tuple[str, os.stat_result]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name == base or entry.path in exclude or entry.name.endswith(_COMPRESSED):
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append((os.path.normpath(entry.path), st))
    except OSError:
        return []
    out.sort(key=lambda item: item[1].st_mtime_ns, reverse=True)
    return out


def rotated_copy(path: str, cp: Checkpoint, current: os.stat_result | None, *, exclude: set[str]) -> str | None:
    """The file that holds what was at `path` when `cp` was taken: renamed (same inode) or, if the file at
    `path` is the checkpointed inode truncated in place, copied (same first bytes)."""
    found = siblings(path, exclude)
    for sib, st in found:
        if (st.st_dev, st.st_ino) == (cp.identity.dev, cp.identity.inode) and head_matches(sib, cp):
            return sib
    if current is None or (current.st_dev, current.st_ino) != (cp.identity.dev, cp.identity.inode):
        return None
    stem = os.path.basename(path).split(".", 1)[0]
    for sib, _st in found:
        if os.path.basename(sib).startswith(stem) and head_matches(sib, cp):
            return sib
    return None
