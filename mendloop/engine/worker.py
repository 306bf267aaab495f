"""Worker threads: claim a due run by lease, advance it, repeat; sleep until the next due run or a wake-up.

A lease keeper renews the leases of the runs this process is working on, so a long step never loses its run
while its worker is alive, and a killed worker's runs come back after `lease_seconds` at the latest.
At start, leases held by dead processes on this host are released at once.

A cancel watcher asks the database every `cancel_poll_seconds`, in one query for all the runs in flight here,
whether each is still this process's and not cancelled, and sets the run's cancel Event when it is not: the step
in flight stops (its program killed, its waits cut short), whichever process cancelled it (this server's API, the
CLI against another server: they share only the database).

An exception out of the step loop (the database, a bug: a step's own errors never get here) is recorded on the
run, whose lease is released for a prompt retry; the step loop hands a run whose claims keep crashing to a human
(`MAX_STALLED_CLAIMS`), so no run is re-claimed forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from mendloop.engine.step_loop import StepLoop, describe_error
from mendloop.errors import StorageError
from mendloop.storage.store import Store, default_owner, process_token

log = logging.getLogger(__name__)


def every(seconds: float, chore: Callable[[], object]) -> Callable[[], object]:
    """A housekeeping chore run at most once per `seconds` (on the monotonic clock: the housekeeping thread
    ticks every second, and a test's FakeClock must not stop the chore). The first tick runs it."""
    last: list[float] = []

    def tick() -> object:
        now = time.monotonic()
        if last and now - last[0] < seconds:
            return None
        last[:] = [now]
        return chore()

    return tick


class WorkerPool:
    def __init__(
        self,
        *,
        store: Store,
        step_loop: StepLoop,
        count: int,
        lease_seconds: float,
        poll_interval: float,
        clock: Callable[[], float],
        name: str = "w",
        housekeeping_interval: float = 1.0,
        max_concurrent: int = 0,
        shutdown_timeout: float = 20.0,
        cancel_poll_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.step_loop = step_loop
        self.count = count
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.clock = clock
        self.name = name
        # Closing: the workers claim nothing more and stop after the step in flight. Stop: every thread ends
        # (the lease keeper only after the workers, so a step that finishes during the shutdown keeps its lease).
        self._closing = threading.Event()
        self._stop = threading.Event()
        self.shutdown_timeout = shutdown_timeout
        step_loop.stopping = self._closing.is_set
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._held: dict[str, str] = {}  # run id -> owner
        self._cancels: dict[str, threading.Event] = {}  # run id -> its cancel, set by the watcher
        self.cancel_poll_seconds = cancel_poll_seconds
        self._held_lock = threading.Lock()
        # Periodic chores of whoever runs workers (e.g. returning lapsed work order leases to the queue).
        self.housekeeping: list[Callable[[], object]] = []
        self.housekeeping_interval = housekeeping_interval
        self.max_concurrent = max_concurrent

    def start(self) -> None:
        self.reclaim_dead()
        for i in range(self.count):
            owner = default_owner(f"{self.name}{i}")
            th = threading.Thread(target=self._loop, args=(owner,), name=f"mendloop-worker-{i}", daemon=True)
            th.start()
            self._threads.append(th)
        # Housekeeping runs with no worker too: an API-only `serve` (workers: 0) still writes events, incidents
        # and their count deltas, and nothing else may fold or prune them (every chore is safe beside another
        # process's, as among several `mendloop worker`s).
        chores = threading.Thread(target=self._housekeep, name="mendloop-housekeeping", daemon=True)
        chores.start()
        self._threads.append(chores)
        if self.count:
            keeper = threading.Thread(target=self._keep_leases, name="mendloop-lease-keeper", daemon=True)
            keeper.start()
            self._threads.append(keeper)
            watcher = threading.Thread(target=self._watch_cancels, name="mendloop-cancel-watcher", daemon=True)
            watcher.start()
            self._threads.append(watcher)

    def stop(self, timeout: float | None = None) -> None:
        """Graceful: claim nothing more, let the steps in flight finish for up to `timeout` (the settings'
        `control.shutdown_timeout_seconds`), then hand back every run still held by releasing its lease, so
        another worker resumes it at once instead of after `lease_seconds`. A step cut off by the timeout runs
        again there with the same idempotency key, as after a crash."""
        deadline = time.monotonic() + (self.shutdown_timeout if timeout is None else timeout)
        self._closing.set()
        self._wake_all()
        workers = [th for th in self._threads if th.name.startswith("mendloop-worker-")]
        with self._held_lock:
            in_flight = len(self._held)
        if in_flight:
            log.info(
                "shutdown: claiming nothing more; waiting up to %.0f s for %d step(s) in flight",
                max(0.0, deadline - time.monotonic()),
                in_flight,
            )
        for th in workers:
            th.join(max(0.0, deadline - time.monotonic()))
        with self._held_lock:
            still = sorted(set(self._held.values()))
        if still:
            log.warning("shutdown: %d step(s) still running after the timeout; handing their runs back", len(still))
            self._release(still)
        self._stop.set()
        for th in self._threads:
            if th not in workers:
                th.join(5)
        self._threads.clear()

    def _release(self, owners: list[str]) -> None:
        try:
            self.store.release_leases_of(owners)
        except StorageError as exc:
            # The leases then lapse after lease_seconds, and another worker takes the runs over.
            log.warning("shutdown: could not release the leases of %s: %s", ", ".join(owners), exc)

    def notify(self) -> None:
        """A run may be due: wake one idle worker. A worker that claims a run wakes the next (`run_once`), so a
        burst fans out one worker at a time and its end costs one empty claim. Waking every idle worker made each
        trigger cost up to `workers` claim transactions, all but one of them empty, under SQLite's one write lock."""
        with self._wake:
            self._wake.notify()

    def _wake_all(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def reclaim_dead(self) -> int:
        """Release the leases of processes on this host that no longer exist (a kill -9 before a restart)."""
        host = socket.gethostname()
        dead = []
        for owner in self.store.lease_owners():
            parts = owner.split(":")
            if len(parts) < 3 or parts[0] != host:
                continue
            token = parts[1]
            pid_text = token.split("-", 1)[0]
            if not pid_text.isdigit() or token == process_token():
                continue
            pid = int(pid_text)
            if pid == os.getpid() or not _alive(pid):
                dead.append(owner)
        n = self.store.release_leases_of(dead)
        if n:
            log.info("released %d run(s) held by dead workers", n)
        return n

    def run_once(self, owner: str) -> bool:
        """Claim and advance one run; False when nothing was due."""
        run = self.store.claim_run(owner, self.lease_seconds, max_concurrent=self.max_concurrent)
        if run is None:
            return False
        self.notify()  # there may be more: the next idle worker looks while this one runs its steps
        cancel = threading.Event()
        with self._held_lock:
            self._held[run.id] = owner
            self._cancels[run.id] = cancel
        try:
            self.step_loop.advance(run, owner, cancel)
        except Exception as exc:
            # A bug must not kill the worker, nor be retried silently forever: the run keeps the error, and its
            # claims are counted (`Run.stalled_claims`) until the step loop gives up on it.
            log.exception("worker %s: advancing run %s crashed", owner, run.id)
            self._record_crash(run.id, owner, describe_error(exc))
        finally:
            with self._held_lock:
                self._held.pop(run.id, None)
                self._cancels.pop(run.id, None)
        if self._closing.is_set():
            # The step loop stopped between steps for the shutdown: the run goes back to the queue now.
            self._release([owner])
        return True

    def _record_crash(self, run_id: str, owner: str, error: str) -> None:
        try:
            self.store.record_crash(run_id, owner, error)
        except Exception:
            # The database may be what failed; the lease then lapses and the next claim is counted all the same.
            log.exception("worker %s: could not record the crash of run %s", owner, run_id)

    def _loop(self, owner: str) -> None:
        while not self._closing.is_set():
            try:
                if self.run_once(owner):
                    continue
                due = self.store.next_due_at()
            except StorageError as exc:
                log.warning("worker %s: %s", owner, exc)
                due = None
            except Exception:
                # A bug must not kill the worker; the run's lease lapses and it is retried.
                log.exception("worker %s: unexpected error", owner)
                due = None
            wait = self.poll_interval
            if due is not None:
                wait = max(0.0, min(wait, due - self.clock()))
            if wait > 0:
                with self._wake:
                    self._wake.wait(wait)

    def _housekeep(self) -> None:
        while not self._stop.wait(self.housekeeping_interval):
            for chore in self.housekeeping:
                try:
                    chore()
                except StorageError as exc:
                    log.warning("housekeeping: %s", exc)
                except Exception:
                    log.exception("housekeeping failed")

    def cancel_in_flight(self, run_id: str) -> bool:
        """Stop the step of `run_id` now if it runs here (an in-process cancel need not wait for the watcher)."""
        with self._held_lock:
            cancel = self._cancels.get(run_id)
        if cancel is not None:
            cancel.set()
        return cancel is not None

    def check_cancels(self) -> int:
        """One look at the database for all the runs in flight: set the cancel of each that was cancelled or
        is no longer this process's. The number set."""
        with self._held_lock:
            held = dict(self._held)
            cancels = dict(self._cancels)
        stopped = self.store.stopped_runs(held)
        for run_id in stopped:
            # The Event of the claim the query saw; a newer claim of the same run has its own.
            cancels[run_id].set()
        return len(stopped)

    def _watch_cancels(self) -> None:
        # Until the workers are gone (`_stop`), not `_closing`: a step finishing during a shutdown is still
        # stopped by a cancel.
        while not self._stop.wait(self.cancel_poll_seconds):
            try:
                self.check_cancels()
            except StorageError as exc:
                log.warning("cancel watcher: %s", exc)
            except Exception:
                log.exception("cancel watcher failed")

    def _keep_leases(self) -> None:
        interval = self.lease_seconds / 3
        while not self._stop.wait(interval):
            with self._held_lock:
                held = dict(self._held)
            for run_id, owner in held.items():
                try:
                    self.store.extend_lease(run_id, owner, self.clock() + self.lease_seconds)
                except StorageError as exc:
                    log.warning("lease keeper: %s", exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
