"""Where a followed log file has been read up to: the values a watcher checkpoints and a store persists."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

HEAD_BYTES = 1024
"""How much of a file's beginning its identity hashes."""


@dataclass(frozen=True)
class FileIdentity:
    """Which file, whatever its name: `head_hash` is the sha1 hex of its first `min(HEAD_BYTES, offset)` bytes, where
    offset is the checkpoint's, so the hash of a growing file is stable once it has 1 KiB and a file whose inode was
    recycled, or that was truncated and rewritten in place, does not match."""

    dev: int
    inode: int
    head_hash: str


@dataclass
class Checkpoint:
    """Everything before `offset` in the file `identity` at `path` has been delivered; `offset` is a line boundary."""

    path: str
    identity: FileIdentity
    offset: int

    def key(self) -> tuple[str, int, int, str, int]:
        """Equal for equal checkpoints, and sortable: a store skips saving a set it saved last."""
        return (self.path, self.identity.dev, self.identity.inode, self.identity.head_hash, self.offset)


def head_hash(head: bytes) -> str:
    """The `head_hash` of a file whose first bytes (at most HEAD_BYTES of them) are `head`."""
    return hashlib.sha1(head, usedforsecurity=False).hexdigest()
