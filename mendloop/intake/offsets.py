"""Where a watcher's checkpoints survive a restart: the OffsetStore protocol, in memory, and in a JSON file (the
forwarder's; the server's are in the database, `mendloop.storage.watcher_offsets`)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from mendloop.domain.checkpoints import Checkpoint, FileIdentity
from mendloop.errors import StorageError


class OffsetStore(Protocol):
    """Where a watcher's checkpoints survive a restart. `save` replaces the watcher's whole set: a file no longer
    followed (deleted) loses its checkpoint."""

    def load(self, watcher: str) -> dict[str, Checkpoint]: ...

    def save(self, watcher: str, checkpoints: Iterable[Checkpoint]) -> None: ...


class MemoryOffsetStore:
    """Checkpoints held in memory: for tests, and for a watcher that may re-read or skip after a restart."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Checkpoint]] = {}

    def load(self, watcher: str) -> dict[str, Checkpoint]:
        # Copies: a caller's changes must not leak into what was saved.
        return {p: Checkpoint(c.path, c.identity, c.offset) for p, c in self._data.get(watcher, {}).items()}

    def save(self, watcher: str, checkpoints: Iterable[Checkpoint]) -> None:
        self._data[watcher] = {c.path: Checkpoint(c.path, c.identity, c.offset) for c in checkpoints}


class JsonFileOffsetStore:
    """Checkpoints of every watcher in one JSON file, replaced atomically (write, fsync, rename) so a crash leaves
    either the old set or the new one, never half of either. One process per file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": 1, "watchers": {}}
        except OSError as e:
            raise StorageError(f"cannot read the offsets file {self.path}: {e}", path=str(self.path)) from e
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise StorageError(f"the offsets file {self.path} is not valid JSON: {e}", path=str(self.path)) from e
        if not isinstance(data, dict) or not isinstance(data.get("watchers"), dict):
            raise StorageError(f"the offsets file {self.path} has an unknown layout", path=str(self.path))
        return data

    def load(self, watcher: str) -> dict[str, Checkpoint]:
        rows = self._read()["watchers"].get(watcher, [])
        out: dict[str, Checkpoint] = {}
        try:
            for row in rows:
                cp = checkpoint_of_json(row)
                out[cp.path] = cp
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"the offsets file {self.path} has a bad entry: {e!r}", path=str(self.path)) from e
        return out

    def save(self, watcher: str, checkpoints: Iterable[Checkpoint]) -> None:
        data = self._read()
        data["watchers"][watcher] = [checkpoint_json(c) for c in checkpoints]
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename is durable only once the directory entry is.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def checkpoint_json(c: Checkpoint) -> dict[str, Any]:
    """A checkpoint as the offsets file and the forwarder's spool hold it."""
    return {
        "path": c.path,
        "dev": c.identity.dev,
        "inode": c.identity.inode,
        "head_hash": c.identity.head_hash,
        "offset": c.offset,
    }


def checkpoint_of_json(row: Any) -> Checkpoint:
    """The checkpoint `checkpoint_json` wrote; KeyError, TypeError or ValueError if `row` is not one."""
    identity = FileIdentity(int(row["dev"]), int(row["inode"]), str(row["head_hash"]))
    return Checkpoint(str(row["path"]), identity, int(row["offset"]))
