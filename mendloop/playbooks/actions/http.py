"""Call an HTTP endpoint; an unexpected status is a failure carrying the response.

A URL that cannot be called at all (it does not parse, has no host, names another protocol) fails the step at
once and is not retried: asking again cannot fix it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx

from mendloop.errors import ActionError
from mendloop.playbooks.actions.base import ActionContext, tail

# A host name (letters, digits, dots, hyphens; underscores as container names use them) or an IP address,
# IPv6 with an optional zone. Anything else, such as a percent-encoded space, names no host.
_HOST = re.compile(rb"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%25[A-Za-z0-9._-]+)?")


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
    request = _build(client, method, url, json_body, all_headers, timeout)
    try:
        resp = client.send(request)
    except httpx.TimeoutException as exc:
        raise ActionError(f"{method} {url} timed out after {timeout:g}s") from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise ActionError(f"{method} {url!r}: invalid URL: {exc}", retryable=False) from exc
    except httpx.HTTPError as exc:
        raise ActionError(f"{method} {url} failed: {exc}") from exc
    output: dict[str, Any] = {"status_code": resp.status_code, "text": tail(resp.text, 2000)}
    try:
        output["json"] = resp.json()
    except (ValueError, RecursionError):
        # Not JSON, or JSON nested too deeply to decode: the text is kept either way.
        output["json"] = None
    if resp.status_code not in expect_status:
        raise ActionError(
            f"{method} {url} answered {resp.status_code}, expected {', '.join(map(str, expect_status))}",
            output=output,
            retryable=resp.status_code >= 500 or resp.status_code == 429,
        )
    return output


def _build(
    client: httpx.Client, method: str, url: str, json_body: Any, headers: dict[str, str], timeout: float
) -> httpx.Request:
    try:
        request = client.build_request(method.upper(), url, json=json_body, headers=headers, timeout=timeout)
    except httpx.InvalidURL as exc:
        raise ActionError(f"{method} {url!r}: invalid URL: {exc}", retryable=False) from exc
    except (TypeError, ValueError, RecursionError) as exc:
        # Not JSON-able, or nested deeper than the encoder recurses.
        raise ActionError(f"{method} {url}: the JSON body cannot be encoded: {exc}", retryable=False) from exc
    target = request.url
    if target.scheme not in ("http", "https"):
        what = f"unsupported protocol {target.scheme!r}" if target.scheme else "no http:// or https:// protocol"
        raise ActionError(f"{method} {url!r}: invalid URL: {what}", retryable=False)
    if not target.raw_host or _HOST.fullmatch(target.raw_host) is None:
        raise ActionError(f"{method} {url!r}: invalid URL: no valid host name", retryable=False)
    return request


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
