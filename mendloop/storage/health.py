"""The write probe behind `/health`: a thread that writes a heartbeat row every few seconds and keeps what
`/health` reports, so the request itself does no I/O.

A read (`SELECT 1`) succeeds on a database that cannot be written: a full disk, a read-only file or mount, a lock
held by another process, a PostgreSQL server in recovery or with `default_transaction_read_only`. Only a write
shows those, and a write must not be on the request path (it waits for the writer lock behind a storm of
intake). On SQLite a nearly full disk counts as a failed write too (`disk_problem`): the probe's own one-row
update can still succeed there while every real write fails. The probe's age is measured on the monotonic clock:
the App's clock may be a test's FakeClock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from mendloop.domain.pauses import Pause
from mendloop.errors import MendloopError
from mendloop.storage import schema as t
from mendloop.storage.incidents import IncidentStore, StormCounts
from mendloop.storage.store import Store

log = logging.getLogger(__name__)

_HEARTBEAT = "health:write_probe"
# Below this much free space on its filesystem SQLite is as good as full: the probe's one-row update still fits
# in pages the file already has, while a batch of events, a new run or the WAL's growth does not.
MIN_FREE_BYTES = 1 << 20


def disk_problem(path: Path | None, min_free: int = MIN_FREE_BYTES) -> str | None:
    """What is wrong with the free space beside the SQLite file `path`, in one line (None: nothing)."""
    if path is None:
        return None
    try:
        fs = os.statvfs(path.parent if str(path.parent) else ".")
    except OSError as exc:
        return f"database error: cannot read the free space of {path.parent}: {exc.strerror}"
    free = fs.f_bavail * fs.f_frsize
    if free < min_free:
        return f"database error: the disk of {path} is full ({free:,} bytes free; writes need at least {min_free:,})"
    return None


@dataclass(frozen=True, slots=True)
class ProbeState:
    """What the last probes found. `last_ok_at`/`last_attempt_at` are monotonic seconds (None: never)."""

    last_ok_at: float | None
    last_attempt_at: float | None
    error: str | None
    storm: StormCounts | None
    # Paused components (`*`: all), read with the storm counters.
    pauses: tuple[Pause, ...] = ()


class WriteProbe:
    def __init__(self, store: Store, incidents: IncidentStore, *, interval: float, max_age: float) -> None:
        self.store = store
        self.incidents = incidents
        self.interval = interval
        self.max_age = max_age
        self._state = ProbeState(None, None, None, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def probe_once(self) -> ProbeState:
        """One heartbeat write, then the storm counters (reads); the new state."""
        attempt = time.monotonic()
        seq = t.sequences
        try:
            with self.store.db.write() as tx:
                tx.conn.execute(self.store.db.insert(seq).values(name=_HEARTBEAT, value=0).on_conflict_do_nothing())
                tx.conn.execute(sa.update(seq).where(seq.c.name == _HEARTBEAT).values(value=int(time.time())))
        except MendloopError as exc:
            return self._failed(attempt, exc.message)
        full = disk_problem(self.store.db.sqlite_file)
        if full is not None:
            return self._failed(attempt, full)
        storm = self._state.storm
        try:
            storm = self.incidents.storm_counts()
        except MendloopError as exc:
            log.warning("health: reading the storm counters failed: %s", exc.message)
        pauses = self._state.pauses
        try:
            pauses = tuple(sorted(self.store.pauses.current().values(), key=lambda p: p.scope))
        except MendloopError as exc:
            log.warning("health: reading the pauses failed: %s", exc.message)
        self._state = ProbeState(time.monotonic(), attempt, None, storm, pauses)
        return self._state

    def _failed(self, attempt: float, error: str) -> ProbeState:
        self._state = ProbeState(self._state.last_ok_at, attempt, error, self._state.storm, self._state.pauses)
        log.warning("health: the write probe failed: %s", error)
        return self._state

    def state(self) -> ProbeState:
        return self._state

    def last_write_age(self) -> float | None:
        ok = self._state.last_ok_at
        return None if ok is None else time.monotonic() - ok

    def problem(self) -> str | None:
        """Why writes look broken, or None. A probe stuck in a write (waiting on a lock) shows as an old write."""
        s = self._state
        if s.error is not None:
            return f"error: the last write failed: {s.error}"
        age = self.last_write_age()
        if age is None:
            return "error: no successful write yet"
        if age > self.max_age:
            return f"error: no successful write for {age:.1f} s (health.max_write_age_seconds is {self.max_age:g})"
        return None

    def start(self) -> WriteProbe:
        self.probe_once()  # /health has an answer from the first request on
        self._thread = threading.Thread(target=self._loop, name="mendloop-health-probe", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.probe_once()
            except Exception:  # a probe must never die: /health would freeze at its last answer
                log.exception("health: the write probe raised")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A probe waiting on a locked database (SQLite's busy timeout) is a daemon thread: don't wait it out.
            self._thread.join(2)
            self._thread = None
