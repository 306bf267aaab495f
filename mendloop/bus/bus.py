"""The event bus: events are written by the store in the transaction that caused them; after commit they are
fanned out here to in-process subscribers (the trigger waiters, the live stream, notifiers).

Subscribers run on the publisher's thread and must not block it: an asyncio subscriber hands the event over to
its loop with `call_soon_threadsafe` and returns at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from mendloop.domain.records import EventRecord

log = logging.getLogger(__name__)

Subscriber = Callable[[EventRecord], None]


class Bus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers = [*self._subscribers, fn]

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [s for s in self._subscribers if s is not fn]

        return unsubscribe

    def fan_out(self, events: Sequence[EventRecord]) -> None:
        subscribers = self._subscribers
        for event in events:
            for fn in subscribers:
                try:
                    fn(event)
                except Exception:
                    # One broken subscriber must not stop the others or the publisher.
                    log.exception("event subscriber failed on %s", event.type)

    def async_queue(
        self, loop: asyncio.AbstractEventLoop, *, maxsize: int = 1000
    ) -> tuple[asyncio.Queue[EventRecord], Callable[[], None]]:
        """A queue fed from any thread; a slow consumer loses the oldest events rather than blocking anyone."""
        queue: asyncio.Queue[EventRecord] = asyncio.Queue(maxsize=maxsize)

        def put(event: EventRecord) -> None:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

        def on_event(event: EventRecord) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(put, event)

        return queue, self.subscribe(on_event)
