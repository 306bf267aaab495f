"""The one way mendloop runs another program: an argv list (never a shell), stdin closed or fed from bytes, a
session and process group of its own, and a timeout that SIGKILLs the whole group, grandchildren included.

Two entry points:

- `run(argv, ...)` waits for the program and returns a `Completed` (exit code, output, timed out, duration);
- `spawn(argv, ...)` starts a long-running child and returns a `Child` handle (poll, wait, stop, kill the group).

Output never goes through a pipe: stdout and stderr are written to files (anonymous temporary files unless a log
file is given), so a background child that inherited them cannot stall the wait and a program that writes a lot
cannot deadlock against us. `keep_bytes` bounds what is read back (the tail); `tail()` cuts text to a limit.

The group is killed only once its leader is known to have exited but is not yet reaped (`waitid(WNOWAIT)`): the
leader's pid is the group's id, and while the leader is an unreaped zombie that id cannot be reused by an unrelated
process, so `killpg` can never hit somebody else's group. Every running group is also registered and killed at
interpreter exit (`kill_live_groups`); with `die_with_parent` it is also registered with the group guard
(`group_guard.py`), one watcher per mendloop process that kills it when the mendloop process is gone (not merely the
thread that started it), so even a `kill -9` of mendloop takes its children with it.
"""

from __future__ import annotations

import atexit
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mendloop.errors import MendloopError
from mendloop.infra import group_guard

__all__ = [
    "CannotStart",
    "Child",
    "Completed",
    "blocked_for",
    "check_startable",
    "kill_group",
    "kill_live_groups",
    "pick_env",
    "run",
    "spawn",
    "tail",
]

DEFAULT_TAIL_CHARS = 4000
_POLL_FIRST = 0.005
_POLL_MAX = 0.05
_CANCEL_CHECK = 0.05


class CannotStart(MendloopError):
    """The program could not be started (not found, not executable, bad cwd)."""

    def __init__(self, program: str, strerror: str) -> None:
        super().__init__(f"cannot start {program!r}: {strerror}", program=program)
        self.program = program
        self.strerror = strerror


@dataclass(frozen=True)
class Completed:
    """How a program ended. `returncode` is None when it did not end by itself (timed out or cancelled);
    `stdout`/`stderr` are its output (only the last `keep_bytes` of each when that was given; with
    `merge_stderr` everything is in `stdout`)."""

    argv: tuple[str, ...]
    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    cancelled: bool
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def stdout_text(self, limit: int | None = None) -> str:
        return _decode(self.stdout, limit)

    def stderr_text(self, limit: int | None = None) -> str:
        return _decode(self.stderr, limit)


# -- process groups that must not outlive mendloop ---------------------------------------------------------------

# Re-entrant: a signal handler that stops a child may run while this thread is inside spawn().
_live_lock = threading.RLock()
_live_groups: set[int] = set()


def kill_group(pgid: int) -> None:
    """SIGKILL the process group `pgid`; a group that is gone already is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_live_groups() -> None:
    """Kill every process group started here that is still running (registered with atexit)."""
    with _live_lock:
        groups = list(_live_groups)
    for pgid in groups:
        kill_group(pgid)


def _at_exit() -> None:
    kill_live_groups()
    group_guard.release()  # every group is dead already: the guard stops without killing anything


atexit.register(_at_exit)


# -- a running child -----------------------------------------------------------------------------------------------


class Child:
    """A started program, leader of its own session and process group. Always end it with `wait_then_kill`,
    `stop` or `kill`: each reaps the leader and unregisters the group."""

    def __init__(self, proc: subprocess.Popen[bytes], argv: Sequence[str], started: float) -> None:
        self._proc = proc
        self.argv = tuple(argv)
        self.started = started
        self._reaped = False
        # A pidfd turns readable when the leader exits (it stays unreaped): waiting on it wakes at once,
        # without polling. The leader is our unreaped child here, so the pid cannot name anybody else yet.
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pass  # an old kernel: fall back to polling

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group's id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        """The exit code once the leader has exited (and reaped it), else None."""
        code = self._proc.poll()
        if code is not None:
            self._forget()
        return code

    def has_exited(self) -> bool:
        """True when the leader has exited; it stays an unreaped zombie, so its group id stays ours."""
        if self._proc.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # reaped elsewhere (SIGCHLD ignored): it has exited either way

    def wait_then_kill(
        self,
        timeout: float | None,
        *,
        cancel: threading.Event | None = None,
        kill_leftovers: bool = True,
    ) -> tuple[bool, bool]:
        """Wait for the leader up to `timeout` seconds (None: no limit) or until `cancel` is set. Then SIGKILL the
        group if the leader did not exit by itself, or - with `kill_leftovers` - whatever it left running in its
        group anyway. Reaps the leader. Returns (timed_out, cancelled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _POLL_FIRST
        timed_out = cancelled = False
        while not self.has_exited():
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
                break
            # With a pidfd, sleep until the exit itself (checking `cancel` every _CANCEL_CHECK); else poll.
            if self._pidfd is not None:
                wait = _CANCEL_CHECK if cancel is not None else None
            else:
                wait = pause
                pause = min(pause * 2, _POLL_MAX)
            if deadline is not None:
                wait = deadline - now if wait is None else min(wait, deadline - now)
            self._sleep_until_exit(wait)
        if timed_out or cancelled or kill_leftovers:
            self.kill_group()
        self._reap()
        return timed_out, cancelled

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the leader to exit by itself up to `timeout`; its exit code, or None if it is still running.
        Never kills anything."""
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._forget()
        return code

    def signal(self, signum: int) -> None:
        """Send `signum` to the leader only (a server, say, that shuts its own workers down on SIGTERM)."""
        if self._proc.returncode is None:
            try:
                self._proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL the whole group now, leader and descendants; does not reap."""
        if not self._reaped:
            kill_group(self.pid)

    def kill(self) -> None:
        """SIGKILL the whole group and reap the leader."""
        self.kill_group()
        self._reap()

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the leader, give it `grace` seconds to exit, then SIGKILL the group (whatever the leader left
        behind dies too) and reap. Returns the leader's exit code."""
        if not self.has_exited():
            self.signal(signal.SIGTERM)
            self.wait_then_kill(grace)
        else:
            self.kill()
        return self._proc.returncode

    def _sleep_until_exit(self, seconds: float | None) -> None:
        if self._pidfd is None:
            time.sleep(seconds if seconds is not None else _POLL_MAX)
            return
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        poller.poll(None if seconds is None else max(0, int(seconds * 1000) + 1))

    def _reap(self) -> None:
        # Unguarded before the reap: while the leader is an unreaped zombie its pid can't be anybody else's, so the
        # guard never holds a group id that was given away.
        group_guard.forget(self.pid)
        self._proc.wait()
        self._forget()

    def _forget(self) -> None:
        if not self._reaped:
            self._reaped = True
            with _live_lock:
                _live_groups.discard(self.pid)
            group_guard.forget(self.pid)
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


def spawn(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    stdin: IO[bytes] | int | None = None,
    stdout: IO[bytes] | int | None = None,
    stderr: IO[bytes] | int | None = None,
    run_as: tuple[int, int] | None = None,
    die_with_parent: bool = False,
) -> Child:
    """Start `argv` (no shell) in a new session. `stdin` defaults to /dev/null, `stdout`/`stderr` to /dev/null
    as well (pass a file to keep the output; `stderr=subprocess.STDOUT` merges). `env` None inherits mendloop's
    environment. `run_as` (uid, gid) drops to that user (needs root). `die_with_parent`: the group guard kills the
    group once this process is gone, even by `kill -9`, while the program (the group's leader) runs."""
    argv = list(argv)
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise MendloopError("argv must be a non-empty list of non-empty strings", argv=argv)
    kwargs: dict[str, Any] = {}
    if run_as is not None:
        kwargs.update(user=run_as[0], group=run_as[1], extra_groups=[])
    started = time.monotonic()
    # Registered before the fork can finish: a group that starts while kill_live_groups runs is still seen.
    with _live_lock:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=subprocess.DEVNULL if stdout is None else stdout,
                stderr=subprocess.DEVNULL if stderr is None else stderr,
                start_new_session=True,
                close_fds=True,
                **kwargs,
            )
        except OSError as exc:
            raise CannotStart(argv[0], exc.strerror or str(exc)) from exc
        _live_groups.add(proc.pid)
        if die_with_parent:
            group_guard.guard(proc.pid)
    return Child(proc, argv, started)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    merge_stderr: bool = False,
    keep_bytes: int | None = None,
    cancel: threading.Event | None = None,
    kill_leftovers: bool = True,
    run_as: tuple[int, int] | None = None,
    die_with_parent: bool = False,
) -> Completed:
    """Run `argv` to the end, or until `timeout` seconds or `cancel`; then its group is SIGKILLed.

    `input` is fed as stdin (else stdin is /dev/null). `keep_bytes` keeps only the last bytes of each stream
    (a bounded tail); None keeps everything. `kill_leftovers` (default) kills whatever the program left running
    in its group when it exits; False leaves such daemons alone (the group is still killed on timeout).
    Raises CannotStart when the program cannot be started; a non-zero exit is a result, not an error.
    """
    if timeout <= 0:
        raise MendloopError("the timeout must be positive", timeout=timeout)
    with _scratch_file() as out, _scratch_file() as err, _scratch_file() as feed:
        if input is not None:
            feed.write(input)
            feed.flush()
            feed.seek(0)
        child = spawn(
            argv,
            cwd=cwd,
            env=env,
            stdin=feed if input is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT if merge_stderr else err,
            run_as=run_as,
            die_with_parent=die_with_parent,
        )
        try:
            timed_out, cancelled = child.wait_then_kill(timeout, cancel=cancel, kill_leftovers=kill_leftovers)
        except BaseException:
            child.kill()  # KeyboardInterrupt mid-wait: nothing may outlive the call
            raise
        duration = time.monotonic() - child.started
        stdout = _read_back(out, keep_bytes)
        stderr = b"" if merge_stderr else _read_back(err, keep_bytes)
    return Completed(
        argv=child.argv,
        returncode=None if (timed_out or cancelled) else child.returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        cancelled=cancelled,
        duration=round(duration, 3),
    )


# -- helpers -------------------------------------------------------------------------------------------------------


def pick_env(names: Iterable[str], source: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The variables `names` from `source` (default: mendloop's environment) that are set, plus `extra`: what a
    child inherits when it must not see mendloop's secrets."""
    src = os.environ if source is None else source
    env = {k: src[k] for k in names if k in src}
    env.update(extra)
    return env


def tail(text: str, limit: int = DEFAULT_TAIL_CHARS) -> str:
    """The last `limit` characters of `text`, marked with a leading "…" when cut."""
    return text if len(text) <= limit else "…" + text[-limit:]


def blocked_for(path: Path, owner: tuple[int, int], *, file: bool = False) -> Path | None:
    """The first directory on the way to `path` that `owner` (uid, gid) cannot search (or `path` itself when
    `file` and it cannot execute it); None when nothing blocks."""
    uid, gid = owner

    def allowed(st: os.stat_result) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid == gid:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    resolved = path.resolve()
    for parent in reversed(resolved.parents):
        if not allowed(parent.stat()):
            return parent
    if (file or resolved.is_dir()) and not allowed(resolved.stat()):
        return resolved
    return None


def check_startable(
    program: str, cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Raise CannotStart when `program` could not be executed from `cwd` with `env`'s PATH: for a program started
    through something else (bwrap), which reports it only as an exit code."""
    if os.sep in program:
        target = os.path.join(cwd or os.getcwd(), program)
        if not os.path.exists(target):
            raise CannotStart(program, "No such file or directory")
        if os.path.isdir(target) or not os.access(target, os.X_OK):
            raise CannotStart(program, "Permission denied")
        return
    path = (os.environ if env is None else env).get("PATH") or os.defpath
    if shutil.which(program, path=path) is None:
        raise CannotStart(program, "No such file or directory")


def _scratch_file() -> IO[bytes]:
    return tempfile.TemporaryFile(prefix="mendloop-proc-")


def _read_back(fh: IO[bytes], keep_bytes: int | None) -> bytes:
    fh.flush()
    size = fh.seek(0, os.SEEK_END)
    fh.seek(0 if keep_bytes is None else max(0, size - keep_bytes))
    return fh.read()


def _decode(data: bytes, limit: int | None) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if limit is None else tail(text, limit)
