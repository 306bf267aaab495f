"""create_api(): the FastAPI application around an App. Docs are served from mendloop itself (no CDN)."""

from __future__ import annotations

import gc
import math
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import swagger_ui_bundle
from fastapi import Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from mendloop import __version__
from mendloop.api import auth, errors, schemas
from mendloop.api.routes import events, incidents, runs, stats, system, work_orders
from mendloop.app import App
from mendloop.errors import ConfigError, InputError

# Reachable without a token: liveness checks and the docs (exact paths), and the docs' static files (a prefix).
_PUBLIC = frozenset({"/health", "/docs", "/openapi.json"})
_PUBLIC_PREFIX = "/_static/"
# Longer than any id, component or file name mendloop hands out (the widest such column holds 300).
MAX_PATH_PARAM = 300
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


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
        found = schemas.unstorable_body(await request.body())
        if found is not None:
            field, problem = found
            raise InputError(f"{field}: {problem}", field=field)


def _non_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False  # not a number: the route's own validation answers


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
    errors.install(api)
    api.mount("/_static/swagger", StaticFiles(directory=Path(swagger_ui_bundle.swagger_ui_path)), name="swagger")

    @api.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="mendloop API",
            swagger_js_url="/_static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/_static/swagger/swagger-ui.css",
            swagger_favicon_url="/_static/swagger/favicon-32x32.png",
        )

    tokens = [t for t in app.settings.api_tokens if t.strip()]
    if len(tokens) != len(app.settings.api_tokens):
        # Settings refuse these when loaded; a Settings built around that check must not open the API either.
        raise ConfigError("api_tokens: an entry is empty or whitespace", field="api_tokens")
    if tokens:

        @api.middleware("http")
        async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            path = request.url.path
            if path in _PUBLIC or path.startswith(_PUBLIC_PREFIX):
                return await call_next(request)
            if request.method == "POST" and path in ("/events", "/events/alertmanager"):
                return await call_next(request)  # intake checks intake tokens and signatures itself
            if not auth.token_accepted(request.headers.get("authorization"), tokens):
                return JSONResponse(
                    {"detail": "a valid bearer token is required", "field": "Authorization"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await call_next(request)

    api.include_router(work_orders.router)
    api.include_router(runs.router)
    api.include_router(stats.router)
    api.include_router(events.router)
    api.include_router(incidents.router)
    api.include_router(system.router)
    return api
