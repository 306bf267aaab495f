"""Log watchers: every configured watcher follows its files (`Tailer`), groups tracebacks (`Grouper`), matches its
patterns (`LogIntake`) and hands each batch's detections to a sink: the server's intake (`WatcherService`), or the
forwarder's spool (`mendloop watch`, see forwarder.py).

Nothing is lost or counted twice across a restart: a file is checkpointed only up to what the sink has taken (a
traceback still being grouped holds its file's checkpoint back), and the server's sink commits the checkpoint in
the same transaction as the events it read. A sink that fails (the database is down) is retried with backoff;
nothing is checkpointed past it meanwhile.

Each detection carries the log lines around it (`log_context`, see log_context.py): the lines of its file before
its record, the record's own lines, and the after-lines read with it; after-lines read later are attached to its
stored event (`on_after`), never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mendloop.config import Settings, WatcherConfig
from mendloop.domain.checkpoints import Checkpoint
from mendloop.domain.records import Detection
from mendloop.intake.follow import follow
from mendloop.intake.lines import Line
from mendloop.intake.log_context import Awaiting, Contexts
from mendloop.intake.logs import LogIntake
from mendloop.intake.matcher import RecordingMatcher
from mendloop.intake.multiline import Grouper, Record, parse_json
from mendloop.intake.offsets import OffsetStore
from mendloop.intake.service import Intake, aggregate_indexed
from mendloop.intake.tail import Tailer
from mendloop.storage.watcher_offsets import DbOffsetStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """What one pass of a watcher found: the detections of each file (in file order), the span of the records read
    from each file (offset of the first, end of the last), and the checkpoints to save once the sink has them."""

    watcher: str
    detections: dict[str, list[Detection]]
    spans: dict[str, tuple[int, int]]
    checkpoints: list[Checkpoint]

    @property
    def count(self) -> int:
        return sum(d.count for ds in self.detections.values() for d in ds)

    def all(self) -> list[Detection]:
        return [d for ds in self.detections.values() for d in ds]


Sink = Callable[[Batch], Sequence[int | None] | None]
"""Takes a batch durably (or raises): called on the watcher's own thread. It may return the stored event id of each
detection of `batch.all()` (None for one it stored none for); then after-lines read later reach those events
through the pipeline's `on_after`. None: it cannot say (the forwarder), and only the after-lines read with a
detection travel with it."""

AfterSink = Callable[[Mapping[int, list[str]]], object]
"""Attaches after-lines to stored events: {event id: the whole `after` list}."""


@dataclass
class WatcherStats:
    files: int = 0
    lines: int = 0
    detections: int = 0
    errors: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _PathState:
    grouper: Grouper | None
    last_end: int = -1  # end of the last line fed (of whichever file was at the path)
    pending_from: int | None = None  # where the group still held by the grouper starts, in the current file


@dataclass
class _Taken:
    batch: Batch | None
    # For each detection of `batch.all()`, the context collecting its after-lines (None: nothing to collect).
    awaiting: list[Awaiting | None] = field(default_factory=list)


class _Stopped(Exception):
    """A sink was still failing when the watcher was told to stop: nothing more may be checkpointed."""


class _TolerantOffsets:
    """A failed periodic checkpoint (database briefly away) is logged, not fatal: the next one catches up."""

    def __init__(self, inner: OffsetStore, stats: WatcherStats, name: str) -> None:
        self.inner = inner
        self.stats = stats
        self.name = name

    def load(self, watcher: str) -> dict[str, Checkpoint]:
        return self.inner.load(watcher)

    def save(self, watcher: str, checkpoints: Iterable[Checkpoint]) -> None:
        try:
            self.inner.save(watcher, checkpoints)
        except Exception as e:
            self.stats.errors += 1
            self.stats.last_error = f"checkpoint: {e}"
            log.warning("watcher %s: cannot save its checkpoint (%s); will retry", self.name, e)


class WatchPipeline:
    """One watcher, from files to its sink. `run(stop)` follows until `stop` is set, then hands over whatever is
    still grouped and checkpoints."""

    def __init__(
        self,
        config: WatcherConfig,
        *,
        log_intake: LogIntake,
        offsets: OffsetStore,
        sink: Sink,
        source: str | None = None,
        group_timeout: float = 0.5,
        poll_interval: float = 0.25,
        checkpoint_every: float = 1.0,
        use_inotify: bool = True,
        retry_max: float = 5.0,
        stats: WatcherStats | None = None,
        on_after: AfterSink | None = None,
        after_idle: float | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.source = source or f"watcher:{config.name}"
        self.matcher = log_intake.matchers.get(config.name)
        self.log_intake = log_intake
        self.sink = sink
        self.stats = stats or WatcherStats()
        self.group_timeout = group_timeout
        self.poll_interval = poll_interval
        self.checkpoint_every = checkpoint_every
        self.use_inotify = use_inotify
        self.retry_max = retry_max
        self.tailer = Tailer(
            config.name,
            config.paths,
            offsets=_TolerantOffsets(offsets, self.stats, config.name),
            start_at=config.start_at,
            max_line_bytes=config.max_line_bytes,
        )
        self._paths: dict[str, _PathState] = {}
        self._lock = asyncio.Lock()
        self._busy = False  # a batch is between being read and being taken by the sink
        self._broken = False  # a batch was never taken: no checkpoint may pass it
        self._kick: asyncio.Event | None = None
        lines = config.context_lines
        self.contexts = Contexts(lines.before, lines.after, lines.idle_seconds if after_idle is None else after_idle)
        self.on_after = on_after

    # -- running ---------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Follow until `stop`; returns after a clean stop, raises if the watcher failed (then nothing past the
        last batch its sink took was checkpointed)."""
        self._kick = asyncio.Event()
        follower = asyncio.create_task(
            follow(
                self.tailer,
                on_lines=lambda lines: self._handle(lines, None, stop),
                stop=stop,
                use_inotify=self.use_inotify,
                poll_interval=self.poll_interval,
                checkpoint_every=self.checkpoint_every,
                hold=self.hold,
            )
        )
        flusher = asyncio.create_task(self._flush_loop(stop))
        tasks = {follower, flusher}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = flusher.exception() if flusher.done() else None
            if failed is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
                raise failed
            await follower
            self._kick.set()
            await flusher
            # A clean stop: what is still grouped goes now, and the checkpoint covers everything read.
            await self._handle([], "all", stop)
            held = self.hold()
            if held is not None:
                self.tailer.checkpoint(held)
        except _Stopped:
            log.warning("watcher %s: a batch was not handed over; it is read again at the next start", self.name)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self.tailer.close()

    def hold(self) -> dict[str, int] | None:
        """Offsets the checkpoint must not pass (the start of each file's group still being grouped); None while a
        batch is on its way to the sink, or after one never got there."""
        followed = self.tailer.files
        self.stats.files = len(followed)
        if self._busy or self._broken:
            return None
        # Paths no longer followed (rotated away, deleted) with nothing held: forget them.
        gone = set(self._paths) - set(followed)
        for path in gone:
            if self._paths[path].pending_from is None:
                del self._paths[path]
                self.contexts.forget(path)
        return {p: st.pending_from for p, st in self._paths.items() if st.pending_from is not None}

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        """Hand over groups quiet for `group_timeout` (a traceback at the end of a file) as soon as they are due."""
        assert self._kick is not None
        while not stop.is_set():
            deadline = self._next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            if timeout is None or timeout > 0:
                self._kick.clear()
                waits = [asyncio.create_task(self._kick.wait()), asyncio.create_task(stop.wait())]
                try:
                    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                continue
            await self._handle([], "due", stop)
            await asyncio.sleep(0)

    def _next_deadline(self) -> float | None:
        due = [d for st in self._paths.values() if st.grouper and (d := st.grouper.next_deadline()) is not None]
        if (after := self.contexts.next_deadline()) is not None:
            due.append(after)
        return min(due) if due else None

    # -- one batch -------------------------------------------------------------------------------------------

    async def _handle(self, lines: Sequence[Line], flush: Literal["due", "all"] | None, stop: asyncio.Event) -> None:
        async with self._lock:
            if self._broken:
                raise _Stopped
            self._busy = True
            try:
                taken = self._take(lines, flush)
                batch = taken.batch
                if batch is not None and batch.detections:
                    ids = await self._deliver(batch, stop)
                    self.contexts.stored(taken.awaiting, ids)
                self._attach_after(everything=flush == "all")
            except BaseException:
                # Lines were taken from the tailer (and groups from the groupers) that no sink has: from here on
                # nothing may be checkpointed; the watcher restarts from its last checkpoint.
                self._broken = True
                raise
            finally:
                self._busy = False
        if self._kick is not None and (
            self.contexts.awaiting or any(st.pending_from is not None for st in self._paths.values())
        ):
            self._kick.set()

    def _take(self, lines: Sequence[Line], flush: Literal["due", "all"] | None) -> _Taken:
        """Lines → records → detections, and the checkpoints that hold once the sink has them."""
        self.stats.lines += len(lines)
        self.stats.files = len(self.tailer.files)
        records: list[Record] = []
        read_at = time.time()
        for path, seg in _segments(lines):
            self.contexts.touched(path, read_at)
            st = self._paths.get(path)
            if st is None:
                grouper = Grouper(group_timeout=self.group_timeout) if self.config.multiline else None
                st = self._paths[path] = _PathState(grouper)
            if seg[0].offset < st.last_end and st.grouper is not None:
                # Another file at this path now (rotated, truncated): what the old one left grouped ends here.
                records.extend(st.grouper.flush())
                st.pending_from = None
            st.last_end = seg[-1].end_offset
            if st.grouper is None:
                records.extend(_single(line) for line in seg)
                continue
            was_pending = st.grouper.pending > 0
            out = st.grouper.feed(seg)
            records.extend(out)
            if not st.grouper.pending:
                st.pending_from = None
            elif out:
                # Records tile the lines: the group still held starts where the last record emitted ended.
                st.pending_from = out[-1].end_offset
            elif not was_pending:
                st.pending_from = seg[0].offset
        if flush is not None:
            # A hair past now: a group due at exactly `deadline` is flushed even if float rounding says otherwise.
            now = None if flush == "all" else time.time() + 0.001
            for st in self._paths.values():
                if st.grouper is not None and st.grouper.pending:
                    out = st.grouper.flush(now)
                    if out:
                        records.extend(out)
                        st.pending_from = None
        if not records:
            return _Taken(None)
        by_path: dict[str, list[Record]] = {}
        for r in records:
            by_path.setdefault(r.path, []).append(r)
        detections: dict[str, list[Detection]] = {}
        spans: dict[str, tuple[int, int]] = {}
        awaiting: list[Awaiting | None] = []
        with_context = self.matcher is not None and self.contexts.enabled
        for path, recs in by_path.items():
            spans[path] = (min(r.offset for r in recs), max(r.end_offset for r in recs))
            view = RecordingMatcher(self.matcher) if with_context and self.matcher is not None else None
            found = self.log_intake.detect_lines(
                [r.text for r in recs], matcher=view or self.matcher, source=self.source, extra={"file": path}
            )
            if view is not None and len(view.matches) == len(found):
                awaiting += self.contexts.attach(path, recs, found, [m.line_start for m in view.matches], read_at)
            else:
                awaiting += [None] * len(found)
            if found:
                detections[path] = found
        held = {p: st.pending_from for p, st in self._paths.items() if st.pending_from is not None}
        return _Taken(Batch(self.name, detections, spans, self.tailer.checkpoints(held)), awaiting)

    def _attach_after(self, *, everything: bool) -> None:
        """Hand over the after-lines of every context that is due (all of them when the watcher stops)."""
        updates = self.contexts.due(time.time(), everything=everything)
        if not updates or self.on_after is None:
            return
        try:
            self.on_after(updates)
        except Exception as e:
            # The events are stored already; their after-lines are a courtesy, not worth a retry loop.
            self.stats.errors += 1
            self.stats.last_error = f"after-lines: {e}"[:500]
            log.warning("watcher %s: cannot attach after-lines to %d event(s): %s", self.name, len(updates), e)

    async def _deliver(self, batch: Batch, stop: asyncio.Event) -> Sequence[int | None] | None:
        delay = 0.1
        while True:
            try:
                ids = self.sink(batch)
            except Exception as e:
                self.stats.errors += 1
                self.stats.last_error = str(e)[:500]
                if stop.is_set():
                    raise _Stopped from e
                log.warning("watcher %s: cannot hand over %d detection(s): %s; retrying", self.name, batch.count, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, self.retry_max)
                continue
            self.stats.detections += batch.count
            return ids


def _segments(lines: Sequence[Line]) -> Iterator[tuple[str, list[Line]]]:
    """Runs of consecutive lines of one path, each without a restart of the file (an offset going back)."""
    seg: list[Line] = []
    for line in lines:
        if seg and (line.path != seg[-1].path or line.offset < seg[-1].end_offset):
            yield seg[0].path, seg
            seg = []
        seg.append(line)
    if seg:
        yield seg[0].path, seg


def _single(line: Line) -> Record:
    text, obj = parse_json(line.text)
    return Record(line.path, text, 1, line.offset, line.end_offset, line.ts, obj)


# -- the server's watchers -----------------------------------------------------------------------------------


class WatcherService:
    """Every configured watcher on ONE background thread with its own event loop; each batch's detections go
    through `aggregate` and `Intake.ingest` in one transaction that also commits the watcher's checkpoint."""

    def __init__(
        self,
        *,
        settings: Settings,
        intake: Intake,
        log_intake: LogIntake,
        offsets: DbOffsetStore,
        use_inotify: bool = True,
        group_timeout: float = 0.5,
        poll_interval: float = 0.25,
        checkpoint_every: float = 1.0,
        restart_delay: float = 1.0,
    ) -> None:
        """`offsets.write(conn, watcher, checkpoints)` commits a checkpoint in the transaction of its events."""
        self.settings = settings
        self.intake = intake
        self.log_intake = log_intake
        self.offsets = offsets
        self.use_inotify = use_inotify
        self.group_timeout = group_timeout
        self.poll_interval = poll_interval
        self.checkpoint_every = checkpoint_every
        self.restart_delay = restart_delay
        self.stats: dict[str, WatcherStats] = {w.name: WatcherStats() for w in settings.watchers}
        self._configs = {w.name: w for w in settings.watchers}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    def pipeline(self, name: str) -> WatchPipeline:
        config = self._configs[name]
        return WatchPipeline(
            config,
            log_intake=self.log_intake,
            offsets=self.offsets,
            sink=self._sink(name),
            group_timeout=self.group_timeout,
            poll_interval=self.poll_interval,
            checkpoint_every=self.checkpoint_every,
            use_inotify=self.use_inotify,
            stats=self.stats[name],
            on_after=self.intake.attach_after,
        )

    def _sink(self, name: str) -> Sink:
        def take(batch: Batch) -> list[int | None]:
            detections, into = aggregate_indexed(batch.all())
            if not detections:
                return []  # nothing matched: the periodic checkpoint covers these lines
            outcomes = self.intake.ingest(
                detections, also=lambda conn: self.offsets.write(conn, name, batch.checkpoints)
            )
            return [outcomes[i].event_id for i in into]

        return take

    def start(self) -> WatcherService:
        if self._thread is not None:
            return self
        # watchfiles says "N changes detected" at INFO on every append: not a server log's business.
        quiet = logging.getLogger("watchfiles")
        quiet.setLevel(max(logging.WARNING, quiet.getEffectiveLevel()))
        self._thread = threading.Thread(target=self._main, name="mendloop-watchers", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self, timeout: float = 15) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("watchers did not stop within %.0f s", timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{name: {files, lines, detections, errors, last_error}}: for GET /health."""
        return {name: s.as_dict() for name, s in self.stats.items()}

    def _main(self) -> None:
        try:
            asyncio.run(self._run_all())
        except BaseException as e:  # pragma: no cover - a bug in the loop itself
            self._failure = e
            log.exception("watchers stopped")
        finally:
            self._ready.set()

    async def _run_all(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            pipelines = {name: self.pipeline(name) for name in self._configs}
        except BaseException as e:
            self._failure = e
            raise
        finally:
            self._ready.set()
        await asyncio.gather(*(self._supervise(name, p, self._stop) for name, p in pipelines.items()))

    async def _supervise(self, name: str, pipeline: WatchPipeline, stop: asyncio.Event) -> None:
        await supervise(name, pipeline, lambda: self.pipeline(name), stop, self.stats[name], self.restart_delay)


async def supervise(
    name: str,
    pipeline: WatchPipeline,
    make: Callable[[], WatchPipeline],
    stop: asyncio.Event,
    stats: WatcherStats,
    restart_delay: float = 1.0,
) -> None:
    """Run one watcher until `stop`; after an unexpected failure, start it afresh from its last checkpoint."""
    current: WatchPipeline | None = pipeline
    while not stop.is_set():
        if current is not None:
            try:
                await current.run(stop)
            except Exception as e:
                stats.errors += 1
                stats.last_error = str(e)[:500]
                log.exception("watcher %s failed; restarting it from its last checkpoint", name)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), restart_delay)
        if stop.is_set():
            return
        try:
            current = make()
        except Exception as e:
            stats.errors += 1
            stats.last_error = str(e)[:500]
            log.exception("watcher %s cannot restart", name)
            current = None
