"""`/mcp` in `serve`: the MCP server over the streamable HTTP transport, stateless, behind the agent role.

The access middleware lets only a token that may take `mcp` (agent, admin) reach this endpoint. Each tool then
calls the REST API of the same application in process (`httpx.ASGITransport`), with the Authorization header the
MCP request came with: the routes check that token again for every verb and scope it to its repositories, so the
MCP face can do nothing the token could not do over REST. Stateless: no MCP session outlives its HTTP request, so
there is no session id one agent could borrow from another; every request carries its own token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus
from starlette.types import ASGIApp, Receive, Scope, Send

from mendloop.config import Settings
from mendloop.infra.api_client import AsyncApiClient

if TYPE_CHECKING:
    from mcp.server.mcpserver import Context
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from mcp.server.transport_security import TransportSecuritySettings

    from mendloop.mcp.tools import Caller

PATH = "/mcp"
# The in-process API's base URL: never resolved, the transport hands each request to the application.
_INTERNAL = "http://mendloop.internal"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """The SDK's DNS-rebinding guard (Host and Origin must be loopback) for a server that listens on loopback
    without a proxy in front; behind a listed proxy the Host is the proxy's, and the bearer token guards."""
    from mcp.server.transport_security import TransportSecuritySettings

    if settings.host in _LOOPBACK and not settings.forwarded_allow_ips:
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
        )
    return TransportSecuritySettings(enable_dns_rebinding_protection=False)


class McpEndpoint:
    """The ASGI app at `/mcp`. `running()` (the API's lifespan) holds a task group; the first MCP request starts
    the SDK's session manager and the in-process API client in it, so a server nobody asks for MCP never loads
    the SDK (most of a second of start-up). Outside `running()` a request is a 503."""

    def __init__(self, api: ASGIApp, settings: Settings) -> None:
        self._api = api
        self._settings = settings
        self._group: TaskGroup | None = None
        self._manager: StreamableHTTPSessionManager | None = None
        self._client: AsyncApiClient | None = None
        self._starting = anyio.Lock()

    def _caller(self, ctx: Context) -> Caller:
        from mcp.server.mcpserver.exceptions import ToolError

        from mendloop.mcp import tools

        if self._client is None:
            raise ToolError("mendloop is shutting down")
        headers = ctx.headers or {}
        auth = headers.get("authorization") or headers.get("Authorization")
        return tools.Caller(
            api=self._client,
            agent_id=f"mcp:{tools.client_name(ctx)}",
            headers={"Authorization": auth} if auth else {},
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                yield
            finally:
                self._group = None
                group.cancel_scope.cancel()

    async def _serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        from mendloop.mcp import tools

        server = tools.build(self._caller)
        # Builds the SDK's session manager (a fresh one each time: one can run only once).
        server.streamable_http_app(
            streamable_http_path=PATH,
            stateless_http=True,
            max_request_body_size=self._settings.limits.max_diff_body_bytes,
            transport_security=transport_security(self._settings),
        )
        manager = server.session_manager
        transport = httpx.ASGITransport(app=self._api, raise_app_exceptions=False)
        # Long enough for a claim's long poll (at most 120 s) on top of the API's own time.
        async with AsyncApiClient(_INTERNAL, transport=transport, timeout=180, trust_env=False) as client:
            self._client = client
            try:
                async with manager.run():
                    self._manager = manager
                    task_status.started()
                    await anyio.sleep_forever()
            finally:
                self._manager = None
                self._client = None

    async def _started(self) -> StreamableHTTPSessionManager | None:
        if self._manager is None and self._group is not None:
            async with self._starting:
                if self._manager is None and self._group is not None:
                    await self._group.start(self._serve)
        return self._manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] in ("GET", "HEAD"):
            # The spec's answer for a server that offers no stream of its own: stateless, nothing would ever be
            # sent on one, and it would hold a connection open for nothing.
            await _answer(send, 405, "POST MCP messages to this endpoint; it opens no event stream", allow=b"POST")
            return
        manager = await self._started()
        if manager is None:
            await _answer(send, 503, "the MCP endpoint is not running")
            return
        await manager.handle_request(scope, receive, send)


async def _answer(send: Send, status: int, detail: str, *, allow: bytes | None = None) -> None:
    body = json.dumps({"detail": detail, "field": None}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if allow is not None:
        headers.append((b"allow", allow))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["PATH", "McpEndpoint", "transport_security"]
