"""`mendloop mcp`: the MCP server on stdin/stdout, for a coding agent on the same machine, calling a running
mendloop server's REST API with an agent token."""

from __future__ import annotations

import anyio
from mcp.server.mcpserver import Context

from mendloop.infra.api_client import AsyncApiClient
from mendloop.mcp import tools

# Long enough for a claim's long poll (at most 120 s) on top of the server's own time.
HTTP_TIMEOUT = 180.0


async def serve(url: str, token: str | None, agent_id: str | None = None) -> None:
    """Serve MCP on stdio until the client closes it."""
    async with AsyncApiClient(url, token, timeout=HTTP_TIMEOUT) as api:

        def caller_for(ctx: Context) -> tools.Caller:
            return tools.Caller(api=api, agent_id=agent_id or f"mcp:{tools.client_name(ctx)}")

        await tools.build(caller_for).run_stdio_async()


def run(url: str, token: str | None, agent_id: str | None = None) -> None:
    anyio.run(serve, url, token, agent_id)


__all__ = ["run", "serve"]
