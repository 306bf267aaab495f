"""The MCP server coding agents take work from: the pull API's verbs as tools, a work order's context and diff as
resources.

Every tool is one or two calls to mendloop's own REST API, with the caller's agent token: the access rules, the
repository scope of the token, the redaction, the Idempotency-Key and the patch pipeline are the API's, once for
every face. `mendloop mcp` (stdio) calls a server over HTTP; `/mcp` in `serve` calls the same application in
process (`mendloop/mcp/http.py`). A refusal or a bad argument is a tool error naming what was wrong, never a
traceback.

`submit_patch` answers at once with a ticket (the work order's id: a work order takes one patch); the patch goes
through the pipeline in the run's worker, which can take minutes. `get_verdict` says where it is, and with
`wait_seconds` it follows it, sending a progress notification at each stage when the client asked for them
(MCP progress belongs to a request still open, so the waiting is a call of its own).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import Field

from mendloop import __version__
from mendloop.domain import patch_verdict
from mendloop.domain.patch_verdict import STAGES, Verdict
from mendloop.errors import InputError, MendloopError
from mendloop.infra.api_client import AsyncApiClient

T = TypeVar("T")
# How often a waiting `get_verdict` looks again; the patch pipeline's stages take seconds to minutes.
POLL_SECONDS = 0.5
MAX_WAIT_SECONDS = 600.0
_WO = "/patches/work-orders"
_SUMMARY_FIELDS = (
    "work_order_id",
    "status",
    "description",
    "repository",
    "component",
    "base_commit",
    "attempts",
    "max_attempts",
    "leased_to",
    "lease_expires_at",
    "deadline_at",
    "created_at",
)

INSTRUCTIONS = """mendloop hands out work orders: code fixes for failures it saw in a running service.
1. list_work_orders, then claim_work_order: you get a lease_id; heartbeat before the lease lapses.
2. get_work_order_context: the error, its events and log lines, the traceback with snippets, the test command and
   the constraints on what a patch may touch. Work in your own checkout of the repository at base_commit.
3. submit_patch with a unified diff (git diff against base_commit). mendloop checks it, runs the tests itself and
   applies it; the answer is a ticket. get_verdict(ticket, wait_seconds=...) says what became of it.
4. If you cannot fix it, fail_work_order with a reason."""


@dataclass(frozen=True)
class Caller:
    """Who a tool call acts for: the client of the API, the headers that carry the caller's token (none when the
    client holds the token itself), and the agent id its claims go under."""

    api: AsyncApiClient
    agent_id: str
    headers: dict[str, str] = field(default_factory=dict)

    async def call(self, method: str, path: str, *, json: Any = None, **kw: Any) -> Any:
        headers = {**self.headers, **kw.pop("headers", {})}
        return await self.api.call(method, path, json=json, headers=headers or None, **kw)

    async def text(self, path: str) -> str:
        return await self.api.text(path, headers=self.headers or None)


CallerFor = Callable[[Context], Caller]


def client_name(ctx: Context) -> str:
    """The MCP client's own name (clientInfo), for the agent id and the completion's `agent`; `mcp` without one."""
    try:
        info = ctx.session.client_params.client_info
        name = getattr(info, "name", None)
    except (AttributeError, ValueError):
        name = None
    return str(name)[:100] if name else "mcp"


def wo_path(work_order_id: str, verb: str = "") -> str:
    """A work order's API path. The id is the agent's argument: quoted whole, so no `/`, `..`, `?` or `#` in it
    can make the call another route's."""
    if work_order_id.strip(".") == "":
        raise InputError(f"work_order_id: {work_order_id!r} is not a work order id", field="work_order_id")
    return f"{_WO}/{quote(work_order_id, safe='')}" + (f"/{verb}" if verb else "")


def _summary(wo: dict[str, Any]) -> dict[str, Any]:
    return {k: wo.get(k) for k in _SUMMARY_FIELDS}


def _diff_files(diff: str) -> int:
    """How many files a unified diff touches, by its `+++`/`---` headers: the agent's report; the pipeline counts
    again from the diff itself."""
    paths = set()
    for line in diff.splitlines():
        if line.startswith(("+++ ", "--- ")):
            path = line[4:].split("\t", 1)[0].strip()
            if path != "/dev/null":
                paths.add(path.split("/", 1)[1] if path[:2] in ("a/", "b/") else path)
    return len(paths)


async def _guarded(work: Callable[[], Awaitable[T]]) -> T:
    """`work()`, with a mendloop error (a refusal, a bad argument) as the tool error that names it."""
    try:
        return await work()
    except MendloopError as exc:
        raise ToolError(exc.message) from None


async def verdict_of(caller: Caller, ticket: str) -> Verdict:
    wo = await caller.call("GET", wo_path(ticket))
    run_id = wo.get("self_healing_run_id") if isinstance(wo, dict) else None
    run = await caller.call("GET", f"/patches/runs/{quote(str(run_id), safe='')}") if run_id else None
    return patch_verdict.verdict(wo, run if isinstance(run, dict) else None)


async def follow(caller: Caller, ticket: str, wait_seconds: float, ctx: Context) -> Verdict:
    """The ticket's verdict, followed up to `wait_seconds` until it is final; each new stage is a progress
    notification (a no-op for a client that sent no progress token)."""
    deadline = anyio.current_time() + min(max(wait_seconds, 0.0), MAX_WAIT_SECONDS)
    told = 0.0  # MCP progress must grow with each notification: one per stage reached
    while True:
        found = await verdict_of(caller, ticket)
        if found.stage + 1 > told:
            told = found.stage + 1
            await ctx.report_progress(told, len(STAGES), f"{found.state}: {found.message}")
        if found.final or anyio.current_time() >= deadline:
            return found
        await anyio.sleep(min(POLL_SECONDS, max(0.0, deadline - anyio.current_time())))


def build(caller_for: CallerFor, *, name: str = "mendloop") -> MCPServer:
    """The MCP server; `caller_for(ctx)` says whom a call acts for and how it reaches the API."""
    server: MCPServer = MCPServer(
        name, instructions=INSTRUCTIONS, version=__version__, log_level="WARNING", warn_on_duplicate_tools=True
    )

    @server.tool()
    async def list_work_orders(
        ctx: Context,
        status: Annotated[
            str, Field(description="queued (the default), in_progress, awaiting_apply, completed, failed; '' for all")
        ] = "queued",
        limit: Annotated[int, Field(ge=1, le=100)] = 20,
    ) -> dict[str, Any]:
        """The work orders this agent token may work on, newest first."""
        caller = caller_for(ctx)
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        found = await _guarded(lambda: caller.call("GET", _WO, params=params))
        items = [_summary(w) for w in found.get("work_orders", [])]
        return {"work_orders": items, "count": len(items), "total": found.get("total")}

    @server.tool()
    async def claim_work_order(
        ctx: Context,
        repository: Annotated[str | None, Field(description="Only a work order of this repository")] = None,
        wait_seconds: Annotated[float, Field(ge=0, le=120, description="Wait this long for one to appear")] = 0,
        agent_id: Annotated[str | None, Field(max_length=200)] = None,
    ) -> dict[str, Any]:
        """Lease the oldest queued work order. Keep the lease_id: heartbeat, submit_patch and fail_work_order
        need it. Two agents never hold the same work order."""
        caller = caller_for(ctx)
        body: dict[str, Any] = {"agent_id": agent_id or caller.agent_id, "wait_seconds": wait_seconds}
        if repository:
            body["repository"] = repository
        claimed = await _guarded(lambda: caller.call("POST", f"{_WO}/claim", json=body, timeout=wait_seconds + 30))
        if claimed is None:
            return {"claimed": False, "message": "no queued work order for this token right now"}
        wo = claimed["work_order"]
        return {
            "claimed": True,
            "work_order": _summary(wo),
            "lease_id": claimed["lease_id"],
            "lease_expires_at": claimed.get("lease_expires_at"),
            "heartbeat_interval_seconds": claimed.get("heartbeat_interval_seconds"),
            "next": "get_work_order_context, then submit_patch with a unified diff against base_commit",
        }

    @server.tool()
    async def get_work_order_context(ctx: Context, work_order_id: str) -> dict[str, Any]:
        """What the agent prompt gets: the error, its events and log lines, the traceback located in the
        repository with snippets, the repository and base commit, the test command and the patch constraints."""
        wo = await _guarded(lambda: caller_for(ctx).call("GET", wo_path(work_order_id)))
        return {**_summary(wo), "context": wo.get("context") or {}}

    @server.tool()
    async def heartbeat(
        ctx: Context, work_order_id: str, lease_id: str, note: Annotated[str | None, Field(max_length=2000)] = None
    ) -> dict[str, Any]:
        """Extend the lease. `cancel_requested: true` means stop: the run was cancelled."""
        body = {"lease_id": lease_id, **({"note": note} if note else {})}
        caller = caller_for(ctx)
        return dict(await _guarded(lambda: caller.call("POST", wo_path(work_order_id, "heartbeat"), json=body)))

    @server.tool()
    async def submit_patch(
        ctx: Context,
        work_order_id: str,
        lease_id: str,
        diff: Annotated[str, Field(description="A unified diff (git diff) against the work order's base_commit")],
        summary: Annotated[str | None, Field(max_length=20_000)] = None,
        wait_seconds: Annotated[
            float, Field(ge=0, le=MAX_WAIT_SECONDS, description="0: answer at once; else follow it, as get_verdict")
        ] = 0,
    ) -> dict[str, Any]:
        """Hand in the fix. mendloop checks the diff, runs the tests itself at the base and with the patch, applies
        it as one commit, deploys and verifies. Answers at once with a ticket for get_verdict (or, with
        wait_seconds, follows the patch as get_verdict does)."""
        caller = caller_for(ctx)
        if not diff.strip():
            raise ToolError("diff: empty; submit a unified diff, or fail_work_order when there is no fix")
        body: dict[str, Any] = {
            "tests_passed": True,  # the agent's claim; mendloop runs the tests itself before anything lands
            "lease_id": lease_id,
            "diff": diff,
            "files_changed": _diff_files(diff),
            "agent": {"name": client_name(ctx), "version": None},
        }
        if summary:
            body["summary"] = summary
        # The same submission retried (a lost answer) is answered as the first time, never applied twice.
        key = hashlib.sha256(f"{work_order_id}\0{lease_id}\0{diff}".encode()).hexdigest()
        headers = {"Idempotency-Key": key}
        answer = await _guarded(
            lambda: caller.call("POST", wo_path(work_order_id, "complete"), json=body, headers=headers)
        )
        found = await _guarded(lambda: follow(caller, work_order_id, wait_seconds, ctx))
        return {
            "ticket": work_order_id,
            "status": answer.get("status"),
            "message": answer.get("message"),
            "verdict": found.as_dict(),
        }

    @server.tool()
    async def get_verdict(
        ctx: Context,
        ticket: str,
        wait_seconds: Annotated[
            float, Field(ge=0, le=MAX_WAIT_SECONDS, description="Follow the patch this long, until a final verdict")
        ] = 0,
    ) -> dict[str, Any]:
        """What became of a submitted patch: testing, rejected (with the reason), tests_failed (with the report),
        applied (awaiting verification), then verified, not_verified or verification_failed. `final: true` when
        nothing more will happen."""
        found = await _guarded(lambda: follow(caller_for(ctx), ticket, wait_seconds, ctx))
        return found.as_dict()

    @server.tool()
    async def fail_work_order(
        ctx: Context,
        work_order_id: str,
        lease_id: str,
        reason: Annotated[
            str,
            Field(
                description="cannot_reproduce, needs_human, out_of_scope, agent_error, timeout, tests_failed, "
                "unsafe_patch"
            ),
        ],
        message: Annotated[str | None, Field(max_length=2000)] = None,
        retryable: bool = False,
    ) -> dict[str, Any]:
        """Give the work order up. retryable: true puts it back in the queue for another attempt (while attempts
        remain); otherwise the run goes to a human."""
        body = {
            "lease_id": lease_id,
            "reason": reason,
            "retryable": retryable,
            "details": {"message": message} if message else {},
        }
        wo = await _guarded(lambda: caller_for(ctx).call("POST", wo_path(work_order_id, "fail"), json=body))
        return {**_summary(wo), "fail_reason": wo.get("fail_reason")}

    @server.resource(
        "mendloop://work-orders/{work_order_id}/context",
        name="work_order_context",
        description="A work order's context (JSON), as get_work_order_context gives it",
        mime_type="application/json",
    )
    async def context_resource(work_order_id: str, ctx: Context) -> str:
        try:
            wo = await caller_for(ctx).call("GET", wo_path(work_order_id))
        except MendloopError as exc:
            raise ResourceError(exc.message) from None
        return json.dumps(wo.get("context") or {}, indent=2, sort_keys=True)

    @server.resource(
        "mendloop://work-orders/{work_order_id}/diff",
        name="work_order_diff",
        description="The diff submitted for a work order (text/x-diff)",
        mime_type="text/x-diff",
    )
    async def diff_resource(work_order_id: str, ctx: Context) -> str:
        try:
            return await caller_for(ctx).text(f"/patches/diffs/{quote(work_order_id, safe='')}.diff")
        except MendloopError as exc:
            raise ResourceError(exc.message) from None

    return server


__all__ = ["INSTRUCTIONS", "MAX_WAIT_SECONDS", "Caller", "CallerFor", "build", "client_name", "follow", "verdict_of"]
