"""Call an HTTP endpoint; an unexpected status is a failure carrying the response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from mendloop.errors import ActionError
from mendloop.playbooks.actions.base import ActionContext, tail


def call_http(
    client: httpx.Client,
    *,
    method: str,
    url: str,
    json_body: Any,
    headers: Mapping[str, str],
    expect_status: list[int],
    timeout: float,
    idempotency_key: str,
) -> dict[str, Any]:
    all_headers = {"Idempotency-Key": idempotency_key, **{str(k): str(v) for k, v in headers.items()}}
    try:
        resp = client.request(method.upper(), url, json=json_body, headers=all_headers, timeout=timeout)
    except httpx.TimeoutException as exc:
        raise ActionError(f"{method} {url} timed out after {timeout:g}s") from exc
    except httpx.HTTPError as exc:
        raise ActionError(f"{method} {url} failed: {exc}") from exc
    output: dict[str, Any] = {"status_code": resp.status_code, "text": tail(resp.text, 2000)}
    try:
        output["json"] = resp.json()
    except ValueError:
        output["json"] = None
    if resp.status_code not in expect_status:
        raise ActionError(
            f"{method} {url} answered {resp.status_code}, expected {', '.join(map(str, expect_status))}",
            output=output,
            retryable=resp.status_code >= 500 or resp.status_code == 429,
        )
    return output


def http_action(params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    expect = params.get("expect_status", [200, 201, 202, 204])
    if isinstance(expect, int):
        expect = [expect]
    return call_http(
        ctx.http,
        method=str(params.get("method", "GET")),
        url=str(params["url"]),
        json_body=params.get("json"),
        headers=params.get("headers") or {},
        expect_status=[int(s) for s in expect],
        timeout=float(params.get("timeout") or ctx.timeout or 30),
        idempotency_key=ctx.idempotency_key,
    )
