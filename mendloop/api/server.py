"""create_api(): the FastAPI application around an App. Docs are served from mendloop itself (no CDN)."""

from __future__ import annotations

import gc
import json
import math
import re
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import swagger_ui_bundle
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mendloop import __version__
from mendloop.api import access, errors, metrics, schemas
from mendloop.api.coalesce import ReadCoalescer
from mendloop.api.deps import prefixed, route_path
from mendloop.api.http_protocol import header_timeout_protocol
from mendloop.api.routes import audit, control, events, incidents, routing, runs, stats, system, work_orders
from mendloop.api.routes import metrics as metrics_route
from mendloop.api.routes import tokens as tokens_route
from mendloop.api.streams import StreamSlots
from mendloop.app import App
from mendloop.config import LimitsConfig, Settings
from mendloop.dashboard.routes import install as install_dashboard
from mendloop.errors import ConfigError, InputError
from mendloop.mcp import http as mcp_http

# Longer than any id, component or file name mendloop hands out (the widest such column holds 300).
MAX_PATH_PARAM = 300
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Bodies with a cap of their own: intake (batches from forwarders and webhooks) and a work order's completion
# (the diff, up to 5,000,000 characters, JSON-escaped).
_INTAKE_PATHS = frozenset({"/events", "/events/alertmanager"})
_COMPLETE_PATH = re.compile(r"/patches/work-orders/[^/]+/complete")
# An MCP request carries a whole diff too (submit_patch), JSON-escaped inside a JSON-RPC message.
_DIFF_PATHS = frozenset({mcp_http.PATH})


def _body_cap(method: str, path: str, limits: LimitsConfig) -> tuple[int, str]:
    """The byte cap of a request's body and the setting that names it."""
    if method == "POST" and path in _INTAKE_PATHS:
        return limits.max_intake_body_bytes, "limits.max_intake_body_bytes"
    if method == "POST" and (_COMPLETE_PATH.fullmatch(path) or path in _DIFF_PATHS):
        return limits.max_diff_body_bytes, "limits.max_diff_body_bytes"
    return limits.max_body_bytes, "limits.max_body_bytes"


class BodyLimits:
    """The outermost layer: a body over its cap is a 413 before it is read into memory (by its Content-Length, or
    as soon as a chunked body's bytes pass the cap), and a body nested deeper than `max_json_depth` is a 422
    before any JSON parser recurses into it. Both answers name the limit and its value. What passes is handed on
    whole, so routes read it as usual."""

    def __init__(self, app: ASGIApp, limits: LimitsConfig) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap, setting = _body_cap(scope["method"], route_path(scope), self.limits)
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            await _refuse(send, 413, "body", f"{declared} bytes is larger than {cap} bytes", setting, cap)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await _refuse(send, 413, "body", f"more than {cap} bytes", setting, cap)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        limit = self.limits.max_json_depth
        if raw and (depth := schemas.json_depth(raw, limit)) > limit:
            message_ = f"nested {depth} levels deep, deeper than {limit}"
            await _refuse(send, 422, "body", message_, "limits.max_json_depth", limit)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # a disconnect, for a route that waits on one
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed one before it reaches an application
    return None


async def _refuse(send: Send, status: int, field: str, message: str, limit: str, value: int) -> None:
    body = json.dumps(errors.limit_body(field=field, message=message, limit=limit, value=value)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is never read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header_name(key: str) -> str:
    return "-".join(part.capitalize() for part in key.split("-"))


def _float_queries(request: Request) -> frozenset[str]:
    """The query parameters the matched route reads as floats (NaN and Infinity parse as floats)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return frozenset()
    names = set()
    for param in route.dependant.query_params:
        annotation = param.field_info.annotation
        if annotation is float or float in typing.get_args(annotation):
            names.add(param.alias)
    return frozenset(names)


async def check_inbound(request: Request) -> None:
    """Every route's first dependency: nothing a database can't store or JSON can't carry reaches a route.

    A NUL character (PostgreSQL refuses it in text and JSON), a lone surrogate (no UTF-8 encoder takes it), or a
    non-finite number, in a path parameter, a query parameter, a header or anywhere in the body, is a 422 naming
    the field. Routes then need no check of their own, and a database error is never what answers bad input."""
    for name, value in request.path_params.items():
        if not isinstance(value, str):
            continue
        problem = schemas.text_problem(value)
        if problem is None and len(value) > MAX_PATH_PARAM:
            problem = f"must be at most {MAX_PATH_PARAM} characters"
        if problem:
            raise InputError(f"{name}: {problem}", field=name)
    floats = None
    for name, value in request.query_params.multi_items():
        problem = schemas.text_problem(name) or schemas.text_problem(value)
        if problem is None:
            floats = _float_queries(request) if floats is None else floats
            if name in floats and _non_finite(value):
                problem = schemas.NONFINITE_MESSAGE
        if problem:
            field = name if schemas.text_problem(name) is None else "query"
            raise InputError(f"{field}: {problem}", field=field)
    for key, value in request.headers.items():
        problem = schemas.text_problem(key) or schemas.text_problem(value)
        if problem:
            field = _header_name(key)
            raise InputError(f"{field}: {problem}", field=field)
    if request.method in _BODY_METHODS:
        raw = await request.body()
        found = schemas.unstorable_body(raw)
        if found is not None:
            field, problem = found
            raise InputError(f"{field}: {problem}", field=field)
        limits: LimitsConfig = request.app.state.mendloop.settings.limits
        # A completion's every string is bounded by its model (the diff by its own, far above this cap).
        if not _COMPLETE_PATH.fullmatch(route_path(request.scope)):
            long = schemas.overlong_string(raw, limits.max_string_chars)
            if long is not None:
                cap = limits.max_string_chars
                raise InputError(
                    f"{long}: longer than {cap} characters (the limit limits.max_string_chars is {cap})",
                    field=long,
                    limit="limits.max_string_chars",
                    max=cap,
                )


def _non_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False  # not a number: the route's own validation answers


class _NamedRoute(Route):
    """A plain Starlette route that puts itself in the scope as FastAPI's routes do, so that /metrics counts its
    requests by its path (`/mcp`), not as `unmatched`."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        return match, ({**child, "route": self} if match is not Match.NONE else child)


def create_api(app: App, *, manage: bool = True) -> FastAPI:
    """`manage`: open the App when the server starts and close it when it stops."""

    @asynccontextmanager
    async def lifespan(_api: FastAPI) -> AsyncIterator[None]:
        if manage:
            await run_in_threadpool(app.open)
            # What is alive once the server has started (modules, routes, schemas, the App) stays alive: keep it
            # out of the collector, whose full collections would otherwise scan it all again and again, in pauses
            # of tens of milliseconds that every request in flight waits out.
            gc.collect()
            gc.freeze()
        try:
            async with mcp_endpoint.running():
                yield
        finally:
            if manage:
                await run_in_threadpool(app.close)

    api = FastAPI(
        title="mendloop",
        version=__version__,
        description="Self-healing runs, coding agent work orders, events and trust.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        dependencies=[Depends(check_inbound)],
    )
    api.state.mendloop = app
    # Identical GETs in flight share one read (api/coalesce.py); reads of SQLite run one at a time.
    api.state.reads = ReadCoalescer(threads=1 if app.settings.database_url.startswith("sqlite") else 2)
    errors.install(api)
    api.mount("/_static/swagger", StaticFiles(directory=Path(swagger_ui_bundle.swagger_ui_path)), name="swagger")

    @api.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        # Behind a proxy's path prefix the browser must ask for the prefixed paths.
        return get_swagger_ui_html(
            openapi_url=prefixed(request, "/openapi.json"),
            title="mendloop API",
            swagger_js_url=prefixed(request, "/_static/swagger/swagger-ui-bundle.js"),
            swagger_css_url=prefixed(request, "/_static/swagger/swagger-ui.css"),
            swagger_favicon_url=prefixed(request, "/_static/swagger/favicon-32x32.png"),
        )

    tokens = [t for t in app.settings.api_tokens if t.strip()]
    if len(tokens) != len(app.settings.api_tokens):
        # Settings refuse these when loaded; a Settings built around that check must not open the API either.
        raise ConfigError("api_tokens: an entry is empty or whitespace", field="api_tokens")
    # Who may call what (domain/roles.py); innermost of the middlewares, so the HTTP counter counts its 401s.
    api.add_middleware(access.Access, mendloop=app)

    limits = app.settings.limits
    api.state.streams = StreamSlots(limits.max_sse_streams, limits.max_sse_streams_per_client)
    # /metrics; the HTTP counter sits outside authentication, so a 401 is counted too.
    api.state.metrics, requests, seconds = metrics.registry_for(app)
    api.add_middleware(metrics.HttpMetrics, requests=requests, seconds=seconds)
    # Added last, so outermost: before authentication reads a header, and before any route reads the body.
    api.add_middleware(BodyLimits, limits=app.settings.limits)

    api.include_router(work_orders.router)
    api.include_router(runs.router)
    api.include_router(control.router)
    api.include_router(stats.router)
    api.include_router(events.router)
    api.include_router(incidents.router)
    api.include_router(system.router)
    api.include_router(routing.router)
    api.include_router(metrics_route.router)
    api.include_router(tokens_route.router)
    api.include_router(audit.router)
    # MCP for coding agents (mendloop/mcp/): an ASGI endpoint of its own, every method; the agent role's.
    mcp_endpoint = mcp_http.McpEndpoint(metrics.uncounted(api), app.settings)
    api.router.routes.append(_NamedRoute(mcp_http.PATH, endpoint=mcp_endpoint))
    install_dashboard(api)  # `/` and `/ui/...`: the dashboard, under the same rules (domain/roles.py)
    return api


def uvicorn_config(api: FastAPI, settings: Settings, *, log_level: str = "info", **kw: typing.Any) -> uvicorn.Config:
    """The server `serve` runs: the `limits:` caps on what it holds at once. Past `max_connections` connections
    or requests in flight uvicorn answers 503; an idle kept-alive connection closes after
    `keep_alive_timeout_seconds`; one whose request headers take longer than `header_timeout_seconds` is closed
    (see http_protocol.py)."""
    limits = settings.limits
    protocol = header_timeout_protocol(limits.header_timeout_seconds)
    return uvicorn.Config(
        api,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_timeout_seconds,
        http=protocol if protocol is not None else "auto",
        root_path=settings.root_path,
        # Only a listed proxy may say who the client is; nobody else's X-Forwarded-For is read.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=",".join(settings.forwarded_allow_ips) or None,
        **kw,
    )
