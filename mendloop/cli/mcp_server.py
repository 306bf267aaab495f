"""`mendloop mcp`: the MCP server for a coding agent on this machine, on stdio."""

from __future__ import annotations

from typing import Annotated

import typer

from mendloop.cli.common import DEFAULT_URL, TokenOpt, UrlOpt, fail


def mcp(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    agent_id: Annotated[
        str | None,
        typer.Option("--agent-id", envvar="MENDLOOP_AGENT_ID", help="Claims go under this id (default: mcp:CLIENT)."),
    ] = None,
) -> None:
    """MCP server on stdio for a coding agent (Claude Code, Codex, Cursor): work orders as tools.

    It calls the mendloop server at --url with --token (an agent token), so the server's roles and the token's
    repositories decide what it may see and do. Register it with `claude mcp add` or in ~/.codex/config.toml
    (docs/mcp.md); `serve` also has it over HTTP at /mcp.
    """
    from mendloop.mcp import stdio

    if not url.startswith(("http://", "https://")):
        fail(f"--url: {url!r} is not an http:// or https:// URL")
    stdio.run(url, token, agent_id)
