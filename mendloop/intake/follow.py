"""The tailer's loop: a pass on every inotify change and at least every poll interval, lines to a callback, and
checkpoints once the callback has handled them."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

from mendloop.intake.lines import Line
from mendloop.intake.tail import Tailer

log = logging.getLogger(__name__)


async def follow(
    tailer: Tailer,
    *,
    on_lines: Callable[[list[Line]], Awaitable[None] | None],
    stop: asyncio.Event,
    use_inotify: bool = True,
    poll_interval: float = 0.25,
    checkpoint_every: float = 1.0,
    hold: Callable[[], Mapping[str, int] | None] | None = None,
) -> None:
    """Deliver `tailer`'s lines to `on_lines` as they are written, until `stop` is set.

    A pass runs on every inotify change (through watchfiles, without debounce: ~2 ms from an append) and at least
    every `poll_interval` seconds, which also covers what inotify cannot see (network filesystems, the watch limit,
    a directory that does not exist yet). Offsets are checkpointed every `checkpoint_every` seconds, only after
    `on_lines` has returned, and once more on a clean stop; if `on_lines` raises, nothing more is checkpointed and
    the batch is read again after a restart. `hold` says, at each checkpoint, which delivered lines `on_lines` has
    not handled yet (see `Tailer.checkpoints`); when it returns None, that checkpoint is skipped.
    """
    wake = asyncio.Event()
    halt = _Halt(stop)
    relay = asyncio.create_task(_relay(stop, wake))
    watcher = asyncio.create_task(_watch(tailer, wake, halt, poll_interval)) if use_inotify else None
    loop = asyncio.get_running_loop()
    last_checkpoint = loop.time()
    try:
        while True:
            wake.clear()
            lines = tailer.poll()
            while True:
                if lines:
                    result = on_lines(lines)
                    if inspect.isawaitable(result):
                        await result
                if not tailer.backlog:
                    break
                await asyncio.sleep(0)  # a long backlog must not starve the rest of the loop
                lines = tailer.poll()
            if loop.time() - last_checkpoint >= checkpoint_every:
                _checkpoint(tailer, hold)
                last_checkpoint = loop.time()
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), poll_interval)
        _checkpoint(tailer, hold)
    finally:
        # Setting halt first lets the watch thread return within a millisecond instead of at its timeout.
        halt.set()
        relay.cancel()
        for task in (relay, watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _checkpoint(tailer: Tailer, hold: Callable[[], Mapping[str, int] | None] | None) -> None:
    held = hold() if hold is not None else None
    if hold is None or held is not None:
        tailer.checkpoint(held)


class _Halt(asyncio.Event):
    """Set when it is, or when any of `others` is: the watch thread polls `is_set()` on every step, so one event
    stops it both for the caller's stop and for a restart of the watch."""

    def __init__(self, *others: asyncio.Event) -> None:
        super().__init__()
        self._others = others

    def is_set(self) -> bool:
        return super().is_set() or any(e.is_set() for e in self._others)


async def _relay(stop: asyncio.Event, wake: asyncio.Event) -> None:
    await stop.wait()
    wake.set()


async def _watch(tailer: Tailer, wake: asyncio.Event, halt: asyncio.Event, poll_interval: float) -> None:
    """Set `wake` on every change inotify reports in the watched directories; restart the watch when the set of
    directories changes (one appears, a followed file is a symlink elsewhere). If inotify fails, polling remains."""
    from watchfiles import awatch  # here: a watcher that only polls never loads the inotify machinery

    # The watch thread returns this often even without changes, so a new directory is noticed.
    timeout_ms = max(10, int(poll_interval * 1000))
    failures = 0
    while not halt.is_set():
        wanted = [(d, r) for d, r in tailer.watch_dirs() if os.path.isdir(d)]
        if not wanted:
            await asyncio.sleep(poll_interval)
            continue
        restart = _Halt(halt)
        try:
            changes = awatch(
                *(d for d, _ in wanted),
                watch_filter=None,
                debounce=0,
                step=1,
                stop_event=restart,
                rust_timeout=timeout_ms,
                yield_on_timeout=True,
                recursive=any(r for _, r in wanted),
                ignore_permission_denied=True,
            )
            async with contextlib.aclosing(changes):
                async for batch in changes:
                    failures = 0
                    if batch:
                        wake.set()
                    if [(d, r) for d, r in tailer.watch_dirs() if os.path.isdir(d)] != wanted:
                        restart.set()
                        break
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Any failure of the watch (no inotify, the watch limit reached, a directory removed under it) leaves
            # the periodic pass to do the work until a retry succeeds; said loudly once, not on every retry.
            failures += 1
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(level, "watcher %s: inotify failed (%s); polling every %.2fs", tailer.name, e, poll_interval)
            await asyncio.sleep(min(30.0, poll_interval * 2**failures))
