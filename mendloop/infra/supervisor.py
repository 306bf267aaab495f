"""A target's process that mendloop starts, adopts and restarts itself (`runs: {process: ...}`).

The process is the operator's service, not a child job of mendloop, so it is started differently from
`process.spawn` (whose groups are killed at mendloop's exit, and with `die_with_parent` even on `kill -9`):

- detached: its own session and process group (the leader's pid is the group's id), stdin /dev/null, stdout and
  stderr appended to its log file; it is never registered for killing at exit, so it outlives mendloop;
- no zombies: while this mendloop lives, a small thread waits on each process it started, so one that exits is
  reaped at once; after mendloop is gone the process is an orphan that init reaps;
- its pid goes to the pidfile; a new mendloop (or a second worker process) adopts the pid in the pidfile only when
  that process is alive (not a zombie) and its command line is the configured argv, so a pid reused by
  something else is never adopted or signalled;
- restart: SIGTERM to the group, `stop_timeout` seconds for the leader to exit, SIGKILL to the group, start again,
  then poll the health URL until it answers 2xx (or fail with an ActionError holding the log's tail). A pidfd of
  the pid is opened *before* the identity check, so the process checked is the one that is waited on and (when
  it is not a group leader: started by hand, say) signalled.

Start, adopt and restart run under an exclusive lock on `<pidfile>.lock`: two workers (or `serve` and `worker`)
never start two copies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from mendloop.config import ProcessRuns
from mendloop.errors import ActionError, StepCancelled
from mendloop.infra.process import CannotStart, check_startable, kill_group, pick_env

__all__ = ["Started", "Supervisor", "await_health", "default_state_dir"]

# Passed from mendloop's own environment; everything else the service needs is in `env:`. Never MENDLOOP_*
# (tokens, the database URL) nor the agents' API keys.
_PASSED_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "USER", "LOGNAME", "TMPDIR")
_LOG_TAIL_BYTES = 2000
_KILL_WAIT = 5.0


def default_state_dir() -> Path:
    """Where pidfiles and logs go when the config names none: $XDG_STATE_HOME/mendloop/supervised."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "mendloop" / "supervised"


@dataclass(frozen=True, slots=True)
class Started:
    pid: int
    restarted: bool  # False: adopted (or left alone because this idempotency key already restarted it)
    adopted_from: int | None = None  # the pid that was stopped, if any


class Supervisor:
    def __init__(self, target: str, spec: ProcessRuns, *, health_url: str | None, state_dir: Path | None = None):
        self.target = target
        self.spec = spec
        self.health_url = health_url
        # One file per service definition: the same argv and cwd under another config still finds its pidfile.
        digest = hashlib.sha256(json.dumps([spec.argv, spec.cwd]).encode()).hexdigest()[:10]
        base = (state_dir or default_state_dir()) / f"{target}-{digest}"
        self.pidfile = Path(spec.pidfile) if spec.pidfile else base.with_suffix(".pid")
        self.log = Path(spec.log) if spec.log else self.pidfile.with_suffix(".log")

    # -- what runs now ---------------------------------------------------------------------------------------------

    def current(self) -> int | None:
        """The pid of the live process the pidfile names, when it is this service (see module doc)."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        started = None
        identity = (_read(self._identity) or "").split()
        if len(identity) == 2 and identity[0] == str(pid) and identity[1].isdigit():
            started = int(identity[1])
        return pid if pid > 1 and self._is_ours(pid, started) else None

    @property
    def _identity(self) -> Path:
        """Beside the pidfile (which holds the pid alone, as `kill $(cat FILE)` expects): the pid and its start time."""
        return self.pidfile.with_name(self.pidfile.name + ".identity")

    def _is_ours(self, pid: int, started: int | None) -> bool:
        state, _ = _stat(pid)
        if state is None or state in ("Z", "X"):
            return False
        if started is not None:
            # mendloop started it: the pid and its start time (clock ticks since boot) name one process
            # for good, whatever its command line became (a pyenv shim execs the interpreter by its full path).
            return _start_time(pid) == started
        cmdline = _cmdline(pid)  # a pidfile the service or the operator wrote: its command line must be argv's
        return cmdline is not None and matches_argv(cmdline, self.spec.argv)

    # -- start, adopt, restart -------------------------------------------------------------------------------------

    def ensure(self) -> Started:
        """Adopt the running process, or start one. Does not wait for health."""
        with self._locked():
            pid = self.current()
            if pid is not None:
                return Started(pid, restarted=False)
            return Started(self._start(), restarted=True)

    def restart(self, *, idempotency_key: str | None = None) -> Started:
        """Stop the running process (if any) and start it again. A retry of a step that already restarted it
        (the same `idempotency_key`, the process it started still alive) restarts nothing."""
        with self._locked():
            pid = self.current()
            keyfile = self.pidfile.with_name(self.pidfile.name + ".restart-key")
            if idempotency_key and pid is not None and _read(keyfile) == idempotency_key:
                return Started(pid, restarted=False)
            if pid is not None:
                self._stop(pid)
            new = self._start()
            if idempotency_key:
                keyfile.write_text(idempotency_key)
            return Started(new, restarted=True, adopted_from=pid)

    def stop(self) -> int | None:
        """Stop the service; the pid it had, or None when none ran."""
        with self._locked():
            pid = self.current()
            if pid is not None:
                self._stop(pid)
            with contextlib.suppress(FileNotFoundError):
                self.pidfile.unlink()
            return pid

    def alive(self, pid: int) -> bool:
        state, _ = _stat(pid)
        return state is not None and state not in ("Z", "X")

    def log_tail(self) -> str:
        try:
            with self.log.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - _LOG_TAIL_BYTES))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _start(self) -> int:
        if self.health_url and _answers(self.health_url, 1.0):
            # Something serves the URL, and it is not the process the pidfile names: a second copy would fail to
            # bind, and its health check would be answered by the other one.
            raise ActionError(
                f"target {self.target!r}: {self.health_url} already answers, but no process mendloop supervises "
                f"runs (pidfile {self.pidfile}): stop the copy started outside mendloop, or write its pid there",
                retryable=False,
            )
        spec = self.spec
        env = {**pick_env(_PASSED_ENV), **{k: v for k, v in os.environ.items() if k.startswith("LC_")}, **spec.env}
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            check_startable(spec.argv[0], spec.cwd, env)
            with self.log.open("ab") as out:
                proc = subprocess.Popen(
                    spec.argv,
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except CannotStart as exc:
            raise ActionError(f"target {self.target!r}: {exc.message}", retryable=False) from exc
        except OSError as exc:
            raise ActionError(
                f"target {self.target!r}: cannot start {spec.argv[0]!r}: {exc.strerror or exc}", retryable=False
            ) from exc
        # Reap it whenever it exits, so a stopped service never lingers as a zombie of mendloop's.
        threading.Thread(target=proc.wait, name=f"reap-{self.target}-{proc.pid}", daemon=True).start()
        tmp = self.pidfile.with_name(self.pidfile.name + ".tmp")
        started = _start_time(proc.pid)
        if started is not None:
            ident = self._identity.with_name(self._identity.name + ".tmp")
            ident.write_text(f"{proc.pid} {started}\n")
            os.replace(ident, self._identity)
        tmp.write_text(f"{proc.pid}\n")
        os.replace(tmp, self.pidfile)  # never a half-written pidfile for the next mendloop to read
        return proc.pid

    def _stop(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            if self.current() != pid:
                return  # it exited (and the pid was reused) between the check and the pidfd
            _, pgrp = _stat(pid)
            group = pgrp == pid
            self._signal(fd, pid, signal.SIGTERM, group)
            if not _wait_exit(fd, self.spec.stop_timeout):
                self._signal(fd, pid, signal.SIGKILL, group)
                if not _wait_exit(fd, _KILL_WAIT):
                    raise ActionError(f"target {self.target!r}: pid {pid} survived SIGKILL", retryable=True)
            if group:
                kill_group(pid)  # what the leader left running in its group (workers holding the port)
        finally:
            os.close(fd)

    @staticmethod
    def _signal(fd: int, pid: int, signum: int, group: bool) -> None:
        try:
            if group:
                os.killpg(pid, signum)
            else:
                signal.pidfd_send_signal(fd, signum)
        except ProcessLookupError:
            pass

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.pidfile.with_name(self.pidfile.name + ".lock"), "a")
        except OSError as exc:
            raise ActionError(
                f"target {self.target!r}: cannot use the pidfile {self.pidfile}: {exc.strerror or exc}",
                retryable=False,
            ) from exc
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            except OSError as exc:  # the pidfile, the log or the key file: the config names a place we can't write
                raise ActionError(f"target {self.target!r}: {exc}", retryable=False) from exc
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def matches_argv(cmdline: list[str], argv: list[str]) -> bool:
    """True when `cmdline` (of /proc/PID/cmdline) is the process `argv` starts: argv itself, or, for a script run
    by its `#!` line, `INTERPRETER [ARG] SCRIPT ARGS...` where SCRIPT is argv[0] as the kernel found it."""
    if cmdline == argv or (cmdline[1:] == argv[1:] and cmdline and os.path.basename(cmdline[0]) == argv[0]):
        return True  # argv[0] found on PATH shows as its full path
    extra = len(cmdline) - len(argv)
    if extra not in (1, 2):
        return False
    script, rest = cmdline[extra], cmdline[extra + 1 :]
    return rest == argv[1:] and os.path.basename(script) == os.path.basename(argv[0])


def await_health(
    url: str,
    *,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    what: str = "the target",
    log_tail: Callable[[], str] | None = None,
    cancel: threading.Event | None = None,
) -> float:
    """Poll `url` until it answers 2xx; the seconds it took. Raises ActionError at the deadline, or as soon as
    `alive` says the process is gone (with the log's tail when given); StepCancelled once `cancel` is set."""
    stop = cancel if cancel is not None else threading.Event()
    started = time.monotonic()
    deadline = started + timeout
    pause = 0.05
    last = "no answer yet"
    with httpx.Client(follow_redirects=False) as client:
        while True:
            if stop.is_set():
                raise StepCancelled(f"stopped by the run's cancel while waiting for {what} to become healthy")
            if alive is not None and not alive():
                tail = log_tail() if log_tail else ""
                raise ActionError(
                    f"{what} exited before {url} answered" + (f"; its log ends: {tail.strip()[-800:]}" if tail else ""),
                    retryable=False,
                )
            remaining = deadline - time.monotonic()
            try:
                answer = client.get(url, timeout=max(0.1, min(2.0, remaining)))
                if 200 <= answer.status_code < 300:
                    return round(time.monotonic() - started, 3)
                last = f"HTTP {answer.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() + pause > deadline:
                raise ActionError(f"{what} did not become healthy within {timeout:g} s: {url} gave {last}")
            stop.wait(pause)  # a poll interval with a deadline, not a wait for a race; a cancel cuts it short
            pause = min(pause * 1.5, 0.5)


def _answers(url: str, timeout: float) -> bool:
    try:
        return 200 <= httpx.get(url, timeout=timeout, follow_redirects=False).status_code < 300
    except httpx.HTTPError:
        return False


def _wait_exit(pidfd: int, seconds: float) -> bool:
    """True once the process behind `pidfd` has exited (a pidfd turns readable then), within `seconds`."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(seconds * 1000))))


def _stat(pid: int) -> tuple[str | None, int | None]:
    """(state letter, process group) from /proc/PID/stat, or (None, None) when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None, None


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22): with the pid, an identity
    that a reused pid does not share."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", errors="surrogateescape") for part in raw.split(b"\0")[:-1]]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
