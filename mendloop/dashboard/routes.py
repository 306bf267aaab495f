"""The dashboard's routes: `/` (the Workflow tab) and the pages under `/ui/`, the login and logout, and the
package's static files at `/ui/static`. Their rules are in domain/roles.py; the access middleware lets a page load
in with a bearer token or the session cookie, and sends a browser without either to the login page."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from mendloop.api.access import credential_of, session_of
from mendloop.api.deps import AppDep, Cursor, prefixed
from mendloop.app import App
from mendloop.dashboard import pages, render
from mendloop.domain import roles
from mendloop.domain import sessions as decide
from mendloop.domain.roles import Action, Role
from mendloop.errors import InputError
from mendloop.storage.tokens import MISS_REFRESH_SECONDS

router = APIRouter(include_in_schema=False)
_env = render.environment()
Filter = Annotated[str | None, Query(max_length=200)]
# Actions whose buttons a page may show, by the name templates use.
_ACTIONS = {
    "trigger": Action.TRIGGER,
    "cancel": Action.CANCEL,
    "retry": Action.RETRY,
    "approve": Action.APPROVE,
    "reject": Action.REJECT,
    "run_approve": Action.RUN_APPROVE,
    "run_reject": Action.RUN_REJECT,
    "resolve": Action.RESOLVE,
    "merged": Action.MERGED,
}


def _page(request: Request, app: App, template: str, tab: str, context: dict[str, Any], status: int = 200) -> Response:
    viewer = pages.viewer_of(credential_of(request), is_open=app.keyring.is_open())
    session = session_of(request)
    body = _env.get_template(template).render(
        **context,
        tab=tab,
        viewer=viewer,
        can={name: viewer.may(action) for name, action in _ACTIONS.items()},
        csrf=decide.csrf_token(session) if session else "",
        root=prefixed(request, ""),
        live_types=json.dumps(pages.LIVE_TYPES),
    )
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


async def _render(request: Request, app: App, template: str, tab: str, build: Callable[[], dict[str, Any]]) -> Response:
    def both() -> dict[str, Any]:
        return {**build(), **pages.feed(app)}

    return _page(request, app, template, tab, await run_in_threadpool(both))


@router.get("/")
async def workflow(request: Request, app: AppDep) -> Response:
    return await _render(request, app, "workflow.html", "workflow", lambda: pages.workflow(app))


@router.get("/ui/runs")
async def runs(
    request: Request,
    app: AppDep,
    status: Filter = None,
    playbook: Filter = None,
    component: Filter = None,
    cursor: Cursor = None,
) -> Response:
    def build() -> dict[str, Any]:
        return pages.runs(
            app, status=status or None, playbook=playbook or None, component=component or None, cursor=cursor
        )

    return await _render(request, app, "runs.html", "runs", build)


@router.get("/ui/runs/{run_id}")
async def run(request: Request, app: AppDep, run_id: str) -> Response:
    return await _render(request, app, "run.html", "runs", lambda: pages.run(app, run_id))


@router.get("/ui/patches")
async def patches(request: Request, app: AppDep, status: Filter = None, cursor: Cursor = None) -> Response:
    return await _render(
        request, app, "patches.html", "patches", lambda: pages.patches(app, status=status or None, cursor=cursor)
    )


@router.get("/ui/patches/{work_order_id}")
async def patch(request: Request, app: AppDep, work_order_id: str) -> Response:
    def build() -> dict[str, Any]:
        found = pages.patch(app, work_order_id)
        diff = found["diff"]
        return {**found, "diff_html": render.highlight_diff(diff) if diff else None}

    return await _render(request, app, "patch.html", "patches", build)


@router.get("/ui/incidents")
async def incidents(request: Request, app: AppDep, status: Filter = None, cursor: Cursor = None) -> Response:
    return await _render(
        request, app, "incidents.html", "incidents", lambda: pages.incidents(app, status=status or None, cursor=cursor)
    )


@router.get("/ui/trust")
async def trust(request: Request, app: AppDep) -> Response:
    return await _render(request, app, "trust.html", "trust", lambda: pages.trust(app))


# -- login and logout ------------------------------------------------------------------------------------------


def _login_page(request: Request, app: App, error: str | None, status: int) -> Response:
    context: dict[str, Any] = {"error": error, "feed": [], "feed_after": 0, "open": app.keyring.is_open()}
    return _page(request, app, "login.html", "login", context, status)


@router.get("/ui/login")
async def login_form(request: Request, app: AppDep) -> Response:
    return _login_page(request, app, None, 200)


def _token_of(raw: bytes, content_type: str) -> str:
    """The `token` field of a login form (urlencoded) or of a JSON body."""
    given: object = None
    if content_type.startswith("application/json"):
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise InputError("body: not JSON", field="body") from None
        given = data.get("token") if isinstance(data, dict) else None
    else:
        values = parse_qs(raw.decode("utf-8", "replace"), max_num_fields=10).get("token")
        given = values[0] if values else None
    if not isinstance(given, str) or not given.strip():
        raise InputError("token: an API token is required", field="token")
    return given.strip()


@router.post("/ui/login")
async def login(request: Request, app: AppDep) -> Response:
    """Trade a token for a session cookie; a browser's form is sent on to the Workflow tab."""
    try:
        token = _token_of(await request.body(), request.headers.get("content-type", ""))
    except InputError as exc:
        return _login_page(request, app, exc.message, 422)
    keyring = app.keyring
    credential = keyring.resolve(token)
    if credential is None:
        # A token made a moment ago by another process; at most a few reads a second however many tries.
        await run_in_threadpool(keyring.refresh, MISS_REFRESH_SECONDS)
        credential = keyring.resolve(token)
    if credential is None or keyring.by_id(credential.id) is None:
        return _login_page(request, app, "Authorization: that token is unknown or revoked", 401)
    if not roles.allows(credential.role, Action.READ) or credential.role is Role.AGENT:
        return _login_page(request, app, f"Authorization: a {credential.role} token cannot use the dashboard", 403)
    secret = await run_in_threadpool(app.sessions.create, credential.id)
    cookie = decide.cookie_header(
        secret,
        path=prefixed(request, "") or "/",
        secure=request.url.scheme == "https",
        max_age=int(decide.SESSION_SECONDS),
    )
    return Response(status_code=303, headers={"Location": prefixed(request, "/"), "Set-Cookie": cookie})


@router.post("/ui/logout")
async def logout(request: Request, app: AppDep) -> Response:
    """End the session the request came with (its row deleted) and clear the cookie."""
    session = session_of(request)
    if session is not None:
        await run_in_threadpool(app.sessions.end, session)
    cookie = decide.cookie_header(
        "", path=prefixed(request, "") or "/", secure=request.url.scheme == "https", max_age=0
    )
    return Response(status_code=204, headers={"Set-Cookie": cookie})


def install(api: FastAPI) -> None:
    """Mount the dashboard on the API app: its pages, and its static files at /ui/static."""
    api.include_router(router)
    api.mount("/ui/static", StaticFiles(directory=render.STATIC), name="dashboard-static")
