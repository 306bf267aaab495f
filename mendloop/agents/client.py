"""A small client of the pull API for coding agents: claim, heartbeat, complete, fail.

HTTP problems become mendloop errors: 409 → `Conflict` (the lease is gone or the work order moved on),
401/403 → `AuthError`, 404 → `NotFound`, other 4xx/5xx → `MendloopError` with the server's detail, and a
server that cannot be reached → `MendloopError` naming the URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from mendloop.domain.states import FAIL_REASONS
from mendloop.errors import AuthError, Conflict, MendloopError, NotFound


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
    """One HTTP connection pool to a mendloop server; safe to share between threads."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the four calls -------------------------------------------------------------------------------------

    def claim(self, agent_id: str, *, repository: str | None = None, wait_seconds: float = 0) -> Claim | None:
        """Claim the next queued work order (long-polls up to `wait_seconds`); None when there is no work."""
        body: dict[str, Any] = {"agent_id": agent_id, "wait_seconds": wait_seconds}
        if repository:
            body["repository"] = repository
        resp = self._post("/patches/work-orders/claim", body, timeout=wait_seconds + self._timeout)
        if resp.status_code == 204:
            return None
        data = self._json(resp)
        try:
            return Claim(
                work_order=dict(data["work_order"]),
                lease_id=str(data["lease_id"]),
                lease_expires_at=data.get("lease_expires_at"),
                heartbeat_interval_seconds=float(data.get("heartbeat_interval_seconds") or 30),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MendloopError(f"unexpected claim answer from {self.url}: {str(data)[:300]}") from exc

    def heartbeat(self, work_order_id: str, lease_id: str, note: str | None = None) -> Heartbeat:
        body: dict[str, Any] = {"lease_id": lease_id}
        if note:
            body["note"] = note
        data = self._json(self._post(f"/patches/work-orders/{work_order_id}/heartbeat", body))
        return Heartbeat(
            lease_expires_at=data.get("lease_expires_at"), cancel_requested=bool(data.get("cancel_requested"))
        )

    def complete(
        self, work_order_id: str, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self._post(f"/patches/work-orders/{work_order_id}/complete", body, headers=headers))

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
        return self._json(self._post(f"/patches/work-orders/{work_order_id}/fail", body))

    # -- plumbing -------------------------------------------------------------------------------------------

    def _post(
        self, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None, timeout: float | None = None
    ) -> httpx.Response:
        try:
            return self._http.post(path, json=body, headers=headers, timeout=timeout or self._timeout)
        except httpx.HTTPError as exc:
            raise MendloopError(f"cannot reach mendloop at {self.url}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _json(resp: httpx.Response) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            body = {"detail": resp.text.strip()[:300]}
        if resp.status_code >= 400:
            detail = body.get("detail", body) if isinstance(body, dict) else body
            message = f"{resp.request.method} {resp.request.url.path}: {resp.status_code}: {detail}"
            if resp.status_code == 409:
                raise Conflict(message)
            if resp.status_code in (401, 403):
                raise AuthError(f"{message} (check --token / MENDLOOP_TOKEN)")
            if resp.status_code == 404:
                raise NotFound("path", resp.request.url.path)
            raise MendloopError(message, status=resp.status_code)
        if not isinstance(body, dict):
            raise MendloopError(f"{resp.request.url.path}: expected a JSON object, got {str(body)[:200]}")
        return body
