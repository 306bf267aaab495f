"""The state directory's lock: one live demo per `--state-dir`.

An `flock` on `<state>/demo.lock`, held for the demo's whole life on a descriptor its children do not inherit. The
kernel drops it when the demo's process ends, however it ends (`kill -9` included), so a lock left by a dead demo
never blocks the next one; the pid written into the file only names the holder in the refusal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mendloop.demo.common import DemoError

LOCK_NAME = "demo.lock"


class StateLock:
    def __init__(self, state: Path) -> None:
        self.path = state / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise DemoError naming the live demo that holds it."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Not O_TRUNC: the holder's pid must stay readable until we hold the lock ourselves.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"another demo (pid {holder})" if holder else "another demo"
            raise DemoError(f"{who} is using {self.path.parent}; stop it, or use another --state-dir") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays: removing it would let a third demo lock a fresh inode while a second waits on this one.
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    except (OSError, ValueError):
        return None
