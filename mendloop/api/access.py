"""Who may call what: the middleware that finds a request's route, the action it is (`domain/roles.py`), the
caller's credential (`storage/tokens.py` `Keyring`), and answers 401 or 403 before the route runs; and the audit
log's row for every operator and admin action and every 403, written before the answer leaves.

- No token, or an unknown or revoked one: 401 naming `Authorization`. A known token whose role may not take the
  action: 403 naming `Authorization`, with the role and the action.
- An agent token naming repositories: heartbeat, complete and fail of a work order of another repository, and
  reading one (its context, its diff) or its run, are a 403 here; a claim hands out only work orders of its
  repositories and the list shows only those (the routes, from `credential_of`). An agent token reads nothing
  else (`Action.WORK_READ` is the one read its role has).
- POST /events and /events/alertmanager: a token whose role may post events passes; a known token whose role
  may not is a 403; anything else is the intake route's to judge (signed webhooks carry no bearer token).
- The dashboard's session cookie (`domain/sessions.py`) stands for its token's credential when no bearer token is
  sent, so page loads and EventSource pass like the API; a state-changing request made with it must carry the
  session's CSRF token (`X-CSRF-Token`), else 403 naming that header. A browser (Accept: text/html) asking for a
  page without a credential is sent to the login page instead of a 401.
- A server with no token at all (none configured, none in the database; `serve` allows that only on loopback)
  is open: every request passes, and the audit log names the caller `anonymous`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.routing import iter_route_contexts
from starlette.concurrency import run_in_threadpool
from starlette.routing import Mount, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mendloop.api import auth, errors
from mendloop.api.deps import route_path
from mendloop.app import App
from mendloop.domain import roles
from mendloop.domain import sessions as session_rules
from mendloop.domain.roles import Action, Credential
from mendloop.errors import AuthError, Forbidden, MendloopError, NotFound
from mendloop.storage.audit import AuditEntry
from mendloop.storage.tokens import ANONYMOUS, MISS_REFRESH_SECONDS, PROCESS_AGENT

log = logging.getLogger(__name__)

_CREDENTIAL = "credential"
_SESSION = "dashboard_session"


def credential_of(request: Request) -> Credential | None:
    """The credential the request's bearer token stands for (None: no token, or the server is open and the
    token is unknown)."""
    found = request.scope.get("state", {}).get(_CREDENTIAL)
    return found if isinstance(found, Credential) else None


def session_of(request: Request) -> str | None:
    """The secret of the dashboard session the request was let in with (None: a bearer token, or none)."""
    found = request.scope.get("state", {}).get(_SESSION)
    return found if isinstance(found, str) else None


def still_admitted(app: App, request: Request) -> bool:
    """Whether the credential a long-lived request (the event stream) was let in with still stands: its token
    not revoked, and its dashboard session (if it came with one) not logged out or expired. Blocking: the
    session is a database read."""
    credential = credential_of(request)
    if credential is None or credential.id == PROCESS_AGENT:
        return True  # an open server, or the process's own runner
    keyring = app.keyring
    if keyring.stale():
        keyring.refresh()
    if keyring.by_id(credential.id) is None:
        return False
    session = session_of(request)
    return session is None or app.sessions.credential_id(session) == credential.id


def known_caller(app: App, request: Request) -> bool:
    """Whether a public route's caller sent a token that stands for someone (or the server asks for none). From
    the keyring in memory: no database read on the way."""
    if app.keyring.is_open():
        return True
    return app.keyring.resolve(auth.bearer_token(request.headers.get("authorization"))) is not None


def actor_of(request: Request) -> str:
    """Who is acting, for the timeline: the token's name, or `anonymous` on a server open without tokens."""
    found = credential_of(request)
    return found.name if found is not None else ANONYMOUS.name


@dataclass(frozen=True, slots=True)
class _Route:
    template: str
    methods: frozenset[str]  # empty: a Mount, every method
    regex: re.Pattern[str] | None  # None: a Mount, matched by prefix


def routes_of(api_routes: list[Any]) -> Iterator[tuple[str, frozenset[str]]]:
    """Every route of the app as (path template, methods); a Mount has no methods. The test of the rules table
    walks the same list."""
    for context in iter_route_contexts(api_routes):
        path = context.path
        if path is None:
            continue
        if isinstance(context.route, Mount):
            yield path, frozenset()
        else:
            yield path, frozenset(context.methods or ())


def _storable(text: str) -> str:
    # A path may carry what no column stores (PostgreSQL refuses NUL; a lone surrogate has no UTF-8).
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class Access:
    def __init__(self, app: ASGIApp, mendloop: App) -> None:
        self.app = app
        self.mendloop = mendloop
        self._routes: list[_Route] | None = None

    def _table(self, scope: Scope) -> list[_Route]:
        if self._routes is None:
            table = []
            for template, methods in routes_of(scope["app"].routes):
                regex = None if not methods else compile_path(template)[0]
                table.append(_Route(template, methods, regex))
            self._routes = table
        return self._routes

    def _match(self, scope: Scope) -> tuple[str, dict[str, str]] | None:
        """The matched route's template and path parameters; None when no route has this path and method."""
        path = route_path(scope)
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        for route in self._table(scope):
            if route.regex is None:
                if path == route.template or path.startswith(route.template + "/"):
                    return route.template, {}
                continue
            found = route.regex.match(path)
            if found is not None and method in route.methods:
                return route.template, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        matched = self._match(scope)
        action = roles.action_for(scope["method"], matched[0]) if matched else Action.UNROUTED
        if action is Action.PUBLIC:
            await self.app(scope, receive, send)
            return
        keyring = self.mendloop.keyring
        if keyring.stale():
            await run_in_threadpool(keyring.refresh)
        token = auth.bearer_token(_header(scope, b"authorization"))
        credential = keyring.resolve(token)
        if credential is None and token is not None and keyring.stale(MISS_REFRESH_SECONDS):
            await run_in_threadpool(keyring.refresh, MISS_REFRESH_SECONDS)
            credential = keyring.resolve(token)
        session = None
        if token is None and not keyring.is_open():
            secret = session_rules.cookie_value(_header(scope, b"cookie"))
            if secret is not None:
                credential = await self._session_credential(secret)
                session = secret if credential is not None else None
        params = matched[1] if matched else {}
        refusal = await self._refusal(action, credential, keyring.is_open(), params)
        if (
            refusal is None
            and session is not None
            and scope["method"] in session_rules.STATE_CHANGING
            and not session_rules.csrf_matches(session, _header(scope, b"x-csrf-token"))
        ):
            header = session_rules.CSRF_HEADER
            refusal = Forbidden(
                f"{header}: a request made with the dashboard's session needs its CSRF token", field=header
            )
        if credential is not None and refusal is None:
            scope.setdefault("state", {})[_CREDENTIAL] = credential
            if session is not None:
                scope["state"][_SESSION] = session
        if isinstance(refusal, AuthError) and matched and _wants_login(scope, matched[0]):
            await _to_login(scope, send)
            return
        audit = _Audit(self.mendloop, scope, action, credential or (ANONYMOUS if keyring.is_open() else None), params)
        if refusal is not None:
            await errors.answer(refusal)(scope, receive, audit.wrap(send))
            return
        await self.app(scope, receive, audit.wrap(send))

    async def _session_credential(self, secret: str) -> Credential | None:
        """The credential a session cookie stands for, while its token is still known to the keyring."""
        try:
            credential_id = await run_in_threadpool(self.mendloop.sessions.credential_id, secret)
        except MendloopError:
            return None
        return self.mendloop.keyring.by_id(credential_id) if credential_id is not None else None

    async def _refusal(
        self, action: Action, credential: Credential | None, is_open: bool, params: dict[str, str]
    ) -> MendloopError | None:
        if action is Action.INTAKE:
            if credential is not None and not is_open and not roles.allows(credential.role, action):
                return _forbidden(credential, action)
            return None  # the intake route judges the rest: intake tokens, signatures, an open server
        if is_open:
            return None
        if credential is None:
            return AuthError("a valid bearer token is required", field="Authorization")
        if not roles.allows(credential.role, action):
            return _forbidden(credential, action)
        if credential.claim_scope() is None:
            return None
        if roles.scoped_to_work_order(action, params):
            wo_id = params.get("work_order_id", "")
            try:
                repository = await run_in_threadpool(self.mendloop.store.work_orders.repository_of, wo_id)
            except NotFound:
                return None  # the route answers 404
            if not credential.works_for(repository):
                return _out_of_scope(
                    credential, action, f"this agent token does not work for the repository of work order {wo_id}"
                )
        elif roles.scoped_to_run(action, params):
            run_id = params.get("run_id", "")
            try:
                escalated, repository = await run_in_threadpool(
                    self.mendloop.store.work_orders.repository_of_run, run_id
                )
            except NotFound:
                return None  # the route answers 404
            if not escalated or not credential.works_for(repository):
                return _out_of_scope(
                    credential,
                    action,
                    f"this agent token reads only the runs of its repositories' work orders, not run {run_id}",
                )
        return None


def _out_of_scope(credential: Credential, action: Action, message: str) -> Forbidden:
    return Forbidden(message, field="Authorization", role=credential.role.value, action=action.value)


def _forbidden(credential: Credential, action: Action) -> Forbidden:
    needed = ", ".join(r.value for r in roles.roles_for(action))
    return Forbidden(
        f"a {credential.role} token may not {action} (that needs: {needed})",
        field="Authorization",
        role=credential.role.value,
        action=action.value,
    )


def _wants_login(scope: Scope, template: str) -> bool:
    """A browser loading a dashboard page: sent to the login page, not shown a 401's JSON."""
    accept = _header(scope, b"accept") or ""
    return scope["method"] in ("GET", "HEAD") and roles.is_page(template) and "text/html" in accept


async def _to_login(scope: Scope, send: Send) -> None:
    root = scope.get("root_path") or ""
    location = f"{root}/ui/login".encode("latin-1", "replace")
    headers = [(b"location", location), (b"content-length", b"0"), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class _Audit:
    """Writes the request's audit row, when it is one the log keeps, as the answer starts (before its first byte
    is sent), so an answered action is durable."""

    def __init__(
        self, app: App, scope: Scope, action: Action, actor: Credential | None, params: dict[str, str]
    ) -> None:
        self.app = app
        self.scope = scope
        self.action = action
        self.actor = actor
        self.params = params

    def wrap(self, send: Send) -> Send:
        async def audited_send(message: Message) -> None:
            if message["type"] == "http.response.start" and roles.audited(self.action, message["status"]):
                await self._write(int(message["status"]))
            await send(message)

        return audited_send

    async def _write(self, status: int) -> None:
        actor, scope = self.actor, self.scope
        client = scope.get("client")
        target = next(iter(self.params.values()), None)
        entry = AuditEntry(
            at=self.app.clock(),
            actor_id=actor.id if actor else None,
            actor_name=actor.name if actor else None,
            role=actor.role.value if actor else None,
            action=self.action.value,
            method=scope["method"][:16],
            path=_storable(scope["path"]),
            target_id=_storable(target) if target else None,
            client=_storable(str(client[0]))[:200] if client else None,
            status=status,
        )
        try:
            await run_in_threadpool(self.app.audit.write, entry)
        except MendloopError as exc:
            # The action is done (or refused) either way; a lost row is loud in the log.
            log.error("audit log: could not record %s %s (%d): %s", entry.method, entry.path, status, exc.message)
