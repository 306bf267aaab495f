"""Caps on open server-sent event streams: in total and per client.

A stream holds a connection, a task and a bus subscription for as long as the client wants; without a cap a few
clients could hold them all (1,000 streams were all held). A client is its bearer token when it sends one (many
clients behind one proxy share an address), else its address. The counts live in the event loop's thread only
(acquire and release run there), so they need no lock.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from mendloop.api import auth


@dataclass(frozen=True, slots=True)
class Refusal:
    setting: str
    value: int
    message: str


@dataclass
class StreamSlots:
    max_total: int
    max_per_client: int
    _open: Counter[str] = field(default_factory=Counter)
    _total: int = 0

    @staticmethod
    def client_of(request: Request) -> str:
        token = auth.bearer_token(request.headers.get("authorization"))
        if token is not None:
            # Kept in memory only, but a digest all the same: the counter is no place for a credential.
            return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
        return "addr:" + (request.client.host if request.client is not None else "?")

    def acquire(self, client: str) -> Refusal | None:
        """Take a slot for `client`; the refusal (which cap, its value) when none is free."""
        if self._total >= self.max_total:
            return Refusal(
                "limits.max_sse_streams", self.max_total, f"{self._total} event streams are open, the most allowed"
            )
        if self._open[client] >= self.max_per_client:
            return Refusal(
                "limits.max_sse_streams_per_client",
                self.max_per_client,
                f"this client has {self._open[client]} event streams open, the most allowed",
            )
        self._open[client] += 1
        self._total += 1
        return None

    def release(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]
        self._total -= 1

    @property
    def total(self) -> int:
        return self._total


class HeldStream(EventSourceResponse):
    """An event stream that gives its slot back when it ends, however it ends (the client leaving before the
    first event included: a generator that never started runs no `finally`)."""

    def __init__(self, content: Any, *, release: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._release: Callable[[], None] | None = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()
