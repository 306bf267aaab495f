"""The one client of mendloop's own HTTP API, used by the agent runner, the CLI and the demo.

`ApiClient` holds the base URL, the bearer token and the timeouts, and turns every HTTP problem into a mendloop
error, once for everyone:

- 401/403 → `AuthError` (with a hint to check the token);
- 404 → `NotFound`;
- 409 → `Conflict` (the lease is gone, the work order moved on, ...);
- any other 4xx → `InputError`, naming the field the server named;
- 5xx → `MendloopError`;
- a server that cannot be reached, or a URL that does not parse → `MendloopError` naming the URL.

Each error's message is `METHOD /path: STATUS: detail`; its `fields` keep `status`, `detail`, `method` and `path`
apart, for a face that shows them its own way.

`AgentClient` is the pull API's typed façade over it (claim, heartbeat, complete, fail), for coding agents.
`AsyncApiClient` is the same client for an asyncio caller (the MCP server): the same errors, from the same
`error_for`; with an `httpx.ASGITransport` it calls an application in the same process through its whole stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from mendloop.domain.states import FAIL_REASONS
from mendloop.errors import AuthError, Conflict, InputError, MendloopError, NotFound

__all__ = ["AUTH_HINT", "AgentClient", "ApiClient", "AsyncApiClient", "Claim", "Heartbeat", "auth_header", "error_for"]

DEFAULT_TIMEOUT = 30.0
AUTH_HINT = "check --token / MENDLOOP_TOKEN"
_DETAIL_CHARS = 300


def auth_header(token: str | None) -> dict[str, str]:
    """The Authorization header that carries `token`; none without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def error_for(resp: httpx.Response, *, auth_hint: str = AUTH_HINT) -> MendloopError | None:
    """The mendloop error an answer stands for, or None for a 1xx-3xx answer."""
    status = resp.status_code
    if status < 400:
        return None
    body = _body(resp)
    detail = body.get("detail", body) if isinstance(body, dict) else body
    field = body.get("field") if isinstance(body, dict) else None
    method, path = resp.request.method, resp.request.url.path
    message = f"{method} {path}: {status}: {detail}"
    facts: dict[str, Any] = {"status": status, "detail": detail, "method": method, "path": path}
    if status in (401, 403):
        return AuthError(f"{message} ({auth_hint})", **facts)
    if status == 404:
        exc = NotFound("resource", path)
        exc.message = message
        exc.args = (message,)
        exc.fields.update(facts)
        return exc
    if status == 409:
        return Conflict(message, **facts)
    if status < 500:
        return InputError(message, field=field if isinstance(field, str) else None, **facts)
    return MendloopError(message, **facts)


def _open(
    kind: type[httpx.Client] | type[httpx.AsyncClient],
    name: str,
    url: str,
    headers: Mapping[str, str],
    timeout: float,
    transport: Any,
    trust_env: bool,
) -> Any:
    """The httpx client of either kind, or one MendloopError naming the URL that does not parse."""
    try:
        return kind(
            base_url=url.rstrip("/"), headers=dict(headers), timeout=timeout, transport=transport, trust_env=trust_env
        )
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise MendloopError(f"{name} URL {url!r} is not valid: {exc}", url=url) from exc


def _request_args(
    json: Any, params: Mapping[str, Any] | None, headers: Mapping[str, str] | None, timeout: float
) -> dict[str, Any]:
    return {
        "json": json,
        "params": dict(params) if params else None,
        "headers": dict(headers) if headers else None,
        "timeout": timeout,
    }


def _checked(resp: httpx.Response, auth_hint: str) -> httpx.Response:
    """The answer itself when its status is not an error; else the matching mendloop error is raised."""
    exc = error_for(resp, auth_hint=auth_hint)
    if exc is not None:
        raise exc
    return resp


def _json_of(resp: httpx.Response) -> Any:
    return None if resp.status_code == 204 else _body(resp)


class ApiClient:
    """One HTTP connection pool to a mendloop server; safe to share between threads.

    `name` is what messages call the server ("mendloop"; the demo also talks to its sample service).
    `trust_env=False` ignores proxy variables, for a server on this host."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        trust_env: bool = True,
        name: str = "mendloop",
        auth_hint: str = AUTH_HINT,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.timeout = timeout
        self._auth_hint = auth_hint
        self._http: httpx.Client = _open(httpx.Client, name, url, auth_header(token), timeout, transport, trust_env)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------------------------

    def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """The raw answer, whatever its status; only a server that cannot be reached raises."""
        args = _request_args(json, params, headers, self.timeout if timeout is None else timeout)
        try:
            return self._http.request(method, path, **args)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise unreachable(self.name, self.url, exc) from exc

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The answer's JSON (None for a 204); an error status raises the matching mendloop error."""
        resp = self.send(method, path, json=json, params=params, headers=headers, timeout=timeout)
        return _json_of(_checked(resp, self._auth_hint))

    def call_object(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """As `call`, for an answer that must be a JSON object."""
        body = self.call(method, path, json=json, params=params, headers=headers, timeout=timeout)
        if not isinstance(body, dict):
            raise MendloopError(f"{method} {path}: expected a JSON object, got {str(body)[:200]}")
        return body

    def get(self, path: str, *, params: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        return self.call("GET", path, params=params, timeout=timeout)

    def post(
        self,
        path: str,
        json: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        return self.call("POST", path, json=json, headers=headers, timeout=timeout)


class AsyncApiClient:
    """`ApiClient` for asyncio callers: one connection pool, the same errors. `headers` go with every request
    (the caller's own Authorization, for a face that acts for whoever called it)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        trust_env: bool = True,
        name: str = "mendloop",
        auth_hint: str = AUTH_HINT,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.timeout = timeout
        self._auth_hint = auth_hint
        sent = {**auth_header(token), **dict(headers or {})}
        self._http: httpx.AsyncClient = _open(httpx.AsyncClient, name, url, sent, timeout, transport, trust_env)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncApiClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """The raw answer, whatever its status; only a server that cannot be reached raises."""
        args = _request_args(json, params, headers, self.timeout if timeout is None else timeout)
        try:
            return await self._http.request(method, path, **args)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise unreachable(self.name, self.url, exc) from exc

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """As `ApiClient.call`: the answer's JSON (None for a 204), or the matching mendloop error."""
        resp = await self.send(method, path, json=json, params=params, headers=headers, timeout=timeout)
        return _json_of(_checked(resp, self._auth_hint))

    async def text(self, path: str, *, headers: Mapping[str, str] | None = None, timeout: float | None = None) -> str:
        """A GET whose answer is text (a diff); an error status raises as `call` does."""
        resp = await self.send("GET", path, headers=headers, timeout=timeout)
        return _checked(resp, self._auth_hint).text


def unreachable(name: str, url: str, exc: Exception) -> MendloopError:
    """The error for a server that could not be reached, on one line whatever the transport said."""
    message = " ".join(str(exc).split())
    return MendloopError(f"cannot reach {name} at {url}: {type(exc).__name__}: {message}", url=url)


def _body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return {"detail": resp.text.strip()[:_DETAIL_CHARS]}


# -- the pull API for coding agents ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A claimed work order and its lease."""

    work_order: dict[str, Any]
    lease_id: str
    lease_expires_at: str | None
    heartbeat_interval_seconds: float

    @property
    def work_order_id(self) -> str:
        return str(self.work_order["work_order_id"])

    @property
    def context(self) -> dict[str, Any]:
        ctx = self.work_order.get("context")
        return ctx if isinstance(ctx, dict) else {}


@dataclass(frozen=True)
class Heartbeat:
    lease_expires_at: str | None
    cancel_requested: bool


class AgentClient:
    """The pull API (claim, heartbeat, complete, fail) over an `ApiClient`; safe to share between threads."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api = ApiClient(url, token, timeout=timeout, transport=transport)
        self.url = self.api.url

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def claim(self, agent_id: str, *, repository: str | None = None, wait_seconds: float = 0) -> Claim | None:
        """Claim the next queued work order (long-polls up to `wait_seconds`); None when there is no work."""
        body: dict[str, Any] = {"agent_id": agent_id, "wait_seconds": wait_seconds}
        if repository:
            body["repository"] = repository
        data = self.api.call("POST", "/patches/work-orders/claim", json=body, timeout=wait_seconds + self.api.timeout)
        if data is None:
            return None
        try:
            return Claim(
                work_order=dict(data["work_order"]),
                lease_id=str(data["lease_id"]),
                lease_expires_at=data.get("lease_expires_at"),
                heartbeat_interval_seconds=float(data.get("heartbeat_interval_seconds") or 30),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MendloopError(f"unexpected claim answer from {self.url}: {str(data)[:300]}") from exc

    def heartbeat(self, work_order_id: str, lease_id: str, note: str | None = None) -> Heartbeat:
        body: dict[str, Any] = {"lease_id": lease_id}
        if note:
            body["note"] = note
        data = self.api.call_object("POST", f"/patches/work-orders/{work_order_id}/heartbeat", json=body)
        return Heartbeat(
            lease_expires_at=data.get("lease_expires_at"), cancel_requested=bool(data.get("cancel_requested"))
        )

    def complete(
        self, work_order_id: str, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.api.call_object(
            "POST", f"/patches/work-orders/{work_order_id}/complete", json=body, headers=headers
        )

    def fail(
        self,
        work_order_id: str,
        *,
        lease_id: str,
        reason: str,
        retryable: bool,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if reason not in FAIL_REASONS:
            raise ValueError(f"unknown fail reason {reason!r}")
        body = {"lease_id": lease_id, "reason": reason, "retryable": retryable, "details": details or {}}
        return self.api.call_object("POST", f"/patches/work-orders/{work_order_id}/fail", json=body)
