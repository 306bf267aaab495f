"""Group commit for events that arrive one per request.

Every `POST /events` with a single event must be committed before its 2xx, but a transaction per request caps
intake at the database's commit rate and spends most of the time in per-transaction overhead. Here each
request hands its (already validated) detection to one writer thread and waits; the writer takes everything
pending (up to `max_batch`), records it with ONE `Intake.ingest` call (one transaction), and answers each
request with its own outcome. Requests that arrive while a transaction commits share the next one; an idle
server waits at most `max_wait` for company before committing a lone event.

A failed transaction is retried in halves when the failure may be one detection's fault (a constraint the row
breaks, a value the database refuses, a bug on an odd payload), so one bad event fails only its own request;
a failure of the database itself (unreachable, locked, misconfigured) fails every request of that batch at
once, each with the same error.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from mendloop.domain.records import Detection, DetectionOutcome
from mendloop.errors import MendloopError, StorageError
from mendloop.intake.service import Intake


@dataclass(slots=True)
class _Waiting:
    detection: Detection
    future: asyncio.Future[DetectionOutcome]
    loop: asyncio.AbstractEventLoop
    at: float


@dataclass(slots=True)
class BatcherStats:
    """Counters since start: how well requests share transactions."""

    transactions: int = 0  # committed
    events: int = 0  # detections in committed transactions
    failed: int = 0  # attempts that failed (a batch retried in halves counts each failed half)
    largest: int = 0  # most detections in one committed transaction


class IntakeBatcher:
    def __init__(self, intake: Intake, *, max_batch: int = 500, max_wait: float = 0.002) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.intake = intake
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait)
        self.stats = BatcherStats()
        self._pending: deque[_Waiting] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._idle = False  # the writer sleeps until the next event arrives
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="mendloop-intake-writer", daemon=True)
        self._thread.start()

    async def submit(self, detection: Detection) -> DetectionOutcome:
        """Record one detection; returns once the transaction holding it has committed. Raises what recording
        it raised (StorageError: the database failed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DetectionOutcome] = loop.create_future()
        # Redacted here, by each request, rather than by the writer: the one writer thread is the bottleneck, and
        # the scan overlaps with its commits.
        detection = self.intake.redact(detection)
        with self._cond:
            if self._closed:
                raise StorageError("intake is shutting down; retry on another server or later")
            self._pending.append(_Waiting(detection, future, loop, time.monotonic()))
            # Wake the writer only when it sleeps with nothing to do, or when a full batch is ready: waking it
            # on every arrival would cost a context switch per request.
            if self._idle or len(self._pending) == self.max_batch:
                self._cond.notify()
        # A request cancelled while it waits (its client went away) still has its event committed.
        return await future

    def close(self, timeout: float = 30) -> None:
        """Stop taking events, commit those already queued, and stop the writer."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the writer thread ----------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                results = self._record(batch)
            except BaseException as exc:  # never leave a request waiting for an answer that cannot come
                results = [exc] * len(batch)
            self._answer(batch, results)

    def _take(self) -> list[_Waiting] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._idle = True
                self._cond.wait()
                self._idle = False
            # A lone event waits a little for others (counted from its arrival, so a writer that was busy
            # committing the previous batch does not wait at all).
            deadline = self._pending[0].at + self.max_wait
            while len(self._pending) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(len(self._pending), self.max_batch)
            return [self._pending.popleft() for _ in range(n)]

    def _record(self, batch: Sequence[_Waiting]) -> list[DetectionOutcome | BaseException]:
        try:
            detections = [w.detection for w in batch]
            outcomes: list[DetectionOutcome | BaseException] = list(self.intake.ingest_redacted(detections))
        except Exception as exc:
            self.stats.failed += 1
            if len(batch) > 1 and _may_be_one_detections_fault(exc):
                half = len(batch) // 2
                return self._record(batch[:half]) + self._record(batch[half:])
            return [exc] * len(batch)
        self.stats.transactions += 1
        self.stats.events += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        return outcomes

    @staticmethod
    def _answer(batch: Sequence[_Waiting], results: Sequence[DetectionOutcome | BaseException]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiting, DetectionOutcome | BaseException]]] = {}
        for w, result in zip(batch, results, strict=True):
            by_loop.setdefault(w.loop, []).append((w, result))
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, answers)
            except RuntimeError:
                pass  # that server's loop has closed: nobody is waiting any more


def _settle(answers: Sequence[tuple[_Waiting, DetectionOutcome | BaseException]]) -> None:
    for w, result in answers:
        if w.future.done():
            continue
        if isinstance(result, BaseException):
            w.future.set_exception(result)
        else:
            w.future.set_result(result)


def _may_be_one_detections_fault(exc: BaseException) -> bool:
    """Constraint violations, values the database refuses, and bugs are worth retrying in halves; a database that
    is down, locked or missing a table fails every half the same way, so it is not retried."""
    if isinstance(exc, StorageError):
        return isinstance(exc.__cause__, sa.exc.IntegrityError | sa.exc.DataError)
    return not isinstance(exc, MendloopError)
