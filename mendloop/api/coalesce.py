"""Identical reads that arrive together share one read of the database.

Twenty dashboards polling the same page ask for the same answer. While a read of it runs, the requests that arrive
for it wait for that read to end and are then answered together by one new read, begun after every one of them
arrived. So no answer is older than its request: this is not a cache, and a client that wrote and then reads sees
its write. Under load a page costs one read per read time, however many clients poll it, instead of one read per
client queued behind the rest on one event loop (issue 10: 20 clients, p99 <= 20 ms).

The key must name everything the answer depends on: the path, the query string and the caller's scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import anyio
from fastapi import Request, Response
from pydantic import BaseModel

from mendloop.api.access import credential_of
from mendloop.api.deps import route_path

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Key:
    running: asyncio.Future[Any] | None = None  # the read in progress
    next: asyncio.Future[Any] | None = None  # the read that starts when it ends; requests arriving now join it
    asked: list[Hashable] = field(default_factory=list)  # what `next` reads: each joined request's item


class ReadCoalescer:
    """`read(key, fn)`: fn's answer, from a read begun after this call; `batch(key, item, fn)`: the same for a read
    of many items (run details), where the requests that join a read add their item to it. One per API.

    `threads`: how many of these reads run at once, each in a thread of its own. Reads of SQLite are CPU in this
    process, under one GIL: twenty at once cost 2.3 times the CPU of the same twenty one after the other (20
    distinct run details: 4.4 against 1.9 ms each), so there it is 1. A PostgreSQL read waits on its server, so
    there a second thread works while the first waits."""

    def __init__(self, threads: int = 1) -> None:
        self._keys: dict[Hashable, _Key] = {}
        self._size = threads
        self._threads: anyio.CapacityLimiter | None = None  # made in the event loop, by the first read

    def __len__(self) -> int:
        """Keys with a read running or waiting (none once every read has ended: nothing is kept)."""
        return len(self._keys)

    async def read(self, key: Hashable, fn: Callable[[], T]) -> T:
        return await self.batch(key, None, lambda _items: fn())

    async def batch(self, key: Hashable, item: K, fn: Callable[[list[K]], T]) -> T:
        """fn(items)'s answer, where items are those of every request that joined this read (`item` among them,
        each once, in order of arrival); the caller picks its own part of the answer."""
        slot = self._keys.get(key)
        if slot is None:
            slot = self._keys[key] = _Key()
        if slot.next is None:
            task = asyncio.ensure_future(self._after(key, slot, slot.running, fn))
            # Every waiter may have gone (clients that disconnect): the outcome is still retrieved, not warned of.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            slot.next = task
        if item not in slot.asked:
            slot.asked.append(item)
        # A waiter that is cancelled leaves the read to the others.
        return cast(T, await asyncio.shield(slot.next))

    async def _after(
        self, key: Hashable, slot: _Key, before: asyncio.Future[Any] | None, fn: Callable[[list[Any]], T]
    ) -> T:
        if before is not None:
            await asyncio.wait([before])  # its outcome is its own waiters'
        # From here on, new arrivals wait for the next read, with items of their own.
        items, slot.asked = slot.asked, []
        slot.running, slot.next = asyncio.current_task(), None
        try:
            if self._threads is None:
                self._threads = anyio.CapacityLimiter(self._size)
            return await anyio.to_thread.run_sync(fn, items, limiter=self._threads)
        finally:
            if slot.next is None:  # nobody waits to read after this one
                del self._keys[key]


def _key(request: Request, *parts: Any) -> Hashable:
    """What the answer depends on, with the caller's scope: a scoped agent token sees its own repositories'."""
    credential = credential_of(request)
    scope = credential.claim_scope() if credential is not None else None
    return (*parts, scope)


async def shared_read(request: Request, fn: Callable[[], BaseModel]) -> Response:
    """fn's answer to this GET, shared with the identical GETs (path and query) that arrive while a read of it
    runs. They get the same bytes: the answer is turned into JSON once, in the read's thread, rather than once per
    request on the event loop (twenty requests sharing a page: 0.56 -> 0.47 ms of CPU each). The route declares
    its model with `response_model=`, for the schema."""
    reads: ReadCoalescer = request.app.state.reads
    key = _key(request, route_path(request.scope), request.scope.get("query_string", b""))
    return _json(await reads.read(key, lambda: _body(fn())))


async def shared_batch(
    request: Request, kind: str, item: K, fn: Callable[[list[K]], Mapping[K, BaseModel]]
) -> Response | None:
    """fn's answer for this GET's item, or None when fn found none for it, read with those of the GETs of the same
    `kind` that arrive while a read of that kind runs (`/patches/runs/{id}` for other ids): one read of all their
    items, begun after each arrived."""
    reads: ReadCoalescer = request.app.state.reads
    bodies = await reads.batch(_key(request, kind), item, lambda items: {k: _body(v) for k, v in fn(items).items()})
    body = bodies.get(item)
    return None if body is None else _json(body)


def _body(answer: BaseModel) -> bytes:
    return answer.model_dump_json().encode()


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")
