"""The group guard: one small watcher process per mendloop process that SIGKILLs the process groups registered
with it once mendloop is gone, even by `kill -9`, when no cleanup of mendloop's own can run.

Why one watcher for the process rather than one per child: a command step used to start a Python shim that forked
a watcher and exec'd the program, about 6 ms of CPU per step before the program ran, which alone capped command
steps near 150 runs/s on two cores. Now the program is started directly (subprocess's fast vfork path) and its
group id is written to the guard's stdin: `+PGID` once it is started, `-PGID` once it ended and mendloop stops
caring for what it left behind.

The guard learns of mendloop's end from a pidfd of its parent (opened while its parent still was mendloop, so it
can't name a reused pid) and from the end of its stdin. It reads every line mendloop wrote before acting, so a group
mendloop unregistered is never killed. It runs in a session of its own, so a signal to mendloop's process group
(a terminal's ^C, a supervisor's group kill) doesn't take the guard with it. If the guard dies anyway, the next
registration starts a new one and hands it every group still running.

What is left: the moments between a child's fork and its registration (a `kill -9` of mendloop then leaves that
child running); microseconds, against the shim's own window between its fork and its prctl.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

__all__ = ["forget", "guard", "release"]

_SOURCE = r"""
import os, select, signal, sys
parent = int(sys.argv[1])
groups = set()
buf = b""
def end(kill):
    if kill:
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
    os._exit(0)
def take(data):
    global buf
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        if line == b"q":
            end(False)
        elif line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
try:
    pidfd = os.pidfd_open(parent)
except (AttributeError, OSError):
    pidfd = None
if os.getppid() != parent:
    end(True)
poller = select.poll()
poller.register(0, select.POLLIN)
if pidfd is not None:
    poller.register(pidfd, select.POLLIN)
while True:
    ready = dict(poller.poll())
    if 0 in ready:
        data = os.read(0, 65536)
        if not data:
            end(True)
        take(data)
    elif pidfd in ready:
        # Mendloop is gone: what it wrote is all in the pipe already; read it, then kill what is still registered.
        while select.select([0], [], [], 0)[0]:
            data = os.read(0, 65536)
            if not data:
                break
            take(data)
        end(True)
"""

_lock = threading.RLock()
_guarded: set[int] = set()
_proc: subprocess.Popen[bytes] | None = None
_pid: int | None = None  # the process the guard watches: a fork of mendloop needs a guard of its own


def guard(pgid: int) -> bool:
    """Register the group `pgid` (its leader just started and is not reaped); False when no guard could start,
    and the group then dies with mendloop only through its exit handlers."""
    with _lock:
        _guarded.add(pgid)
        return _send(f"+{pgid}\n")


def forget(pgid: int) -> None:
    """The group's leader has ended: what the group left running may outlive mendloop."""
    with _lock:
        if pgid in _guarded:
            _guarded.discard(pgid)
            _send(f"-{pgid}\n", start=False)


def release() -> None:
    """At mendloop's own exit, after its exit handlers killed its groups: the guard stops without killing."""
    with _lock:
        if _proc is not None and _pid == os.getpid():
            _send("q\n", start=False)
            # Not waited for: it ends on the line by itself, and a process on its way out has no use for the wait
            # (under load it was seconds added to every exit).
            _close(wait=False)


def _send(line: str, *, start: bool = True) -> bool:
    for _ in range(2):
        if _proc is None or _pid != os.getpid() or _proc.poll() is not None:
            if not start or not _start():
                return False
            # A new guard knows nothing yet: hand it every group still running, this one included.
            line = "".join(f"+{g}\n" for g in sorted(_guarded))
        assert _proc is not None and _proc.stdin is not None
        try:
            os.write(_proc.stdin.fileno(), line.encode())
            return True
        except OSError:
            _close()
    return False


def _start() -> bool:
    global _proc, _pid
    try:
        _proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SOURCE, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except OSError:
        _proc = None
        return False
    _pid = os.getpid()
    return True


def _close(*, wait: bool = True) -> None:
    global _proc
    if _proc is not None:
        if _proc.stdin is not None:
            try:
                _proc.stdin.close()
            except OSError:
                pass
        if wait and _pid == os.getpid():
            try:
                _proc.wait(5)
            except subprocess.TimeoutExpired:
                _proc.kill()
                _proc.wait()
        _proc = None
