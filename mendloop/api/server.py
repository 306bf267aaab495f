"""create_api(): the FastAPI application around an App. Docs are served from mendloop itself (no CDN)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from mendloop import __version__
from mendloop.api import auth, errors
from mendloop.api.routes import events, incidents, runs, stats, system, work_orders
from mendloop.app import App

# Reachable without a token: liveness checks and the docs.
_PUBLIC = ("/health", "/docs", "/openapi.json", "/_static/")


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

    tokens = list(app.settings.api_tokens)
    if tokens:

        @api.middleware("http")
        async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            path = request.url.path
            if path == "/health" or path.startswith(_PUBLIC[1:]):
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
