"""uvicorn's HTTP protocol with a deadline on request headers.

uvicorn closes a kept-alive connection that stays idle (`timeout_keep_alive`) and answers 503 past
`limit_concurrency`, but it has no timeout on reading a request: a client that opens a connection and sends its
headers one byte at a time (slowloris), or nothing at all, holds the connection for ever (300 such connections
were all held). Here a connection must complete each request's headers within `header_timeout` seconds of
connecting, or of its request's first byte; otherwise it is closed. A request whose headers are complete is the
application's (a long body upload or an event stream is not cut).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


def header_timeout_protocol(header_timeout: float) -> type[asyncio.Protocol] | None:
    """A protocol class for `uvicorn.Config(http=...)`; None when httptools (uvicorn's default parser, in
    `uvicorn[standard]`) is missing, and then uvicorn's own protocol runs without the deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency
        log.warning("httptools is not installed: request headers have no read timeout")
        return None

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                # No response: the request never arrived, and a client this slow is not reading one.
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
