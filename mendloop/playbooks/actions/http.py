"""Call an HTTP endpoint; an unexpected status is a failure carrying the response.

A URL that cannot be called at all (it does not parse, has no host, names another protocol) fails the step at
once and is not retried: asking again cannot fix it.

A URL rendered from a template (`TrackedUrl`) is guarded before anything is sent (`guard_url`): its scheme, host
and port must come from the template's literal text or the target's `base_url` (or be one of the target's
`allowed_hosts`), and every value from data is percent-encoded into the path, query or fragment it sits in."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

import httpx

from mendloop.errors import ActionError, StepCancelled
from mendloop.playbooks.actions.base import ActionContext, tail
from mendloop.playbooks.templates import TrackedUrl

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
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """`cancel`: the run's cancel. Set before the request is sent, nothing is sent. Set while it is in flight, the
    step stops at once (StepCancelled) instead of waiting up to its `timeout` for an answer: the request may
    still reach the service (nothing can unsend it), so the step's output says it was sent, and the step loop
    neither retries it nor goes on."""
    all_headers = {"Idempotency-Key": idempotency_key, **{str(k): str(v) for k, v in headers.items()}}
    if isinstance(url, TrackedUrl):
        try:
            guarded = guard_url(method, url)
        except ActionError:
            # A URL that cannot be called at all says what is wrong with it first.
            _build(client, method, url, json_body, all_headers, timeout)
            raise
        # The request sent is the guarded one, so the headers (an Authorization) go only where the playbook said.
        url = guarded
    request = _build(client, method, url, json_body, all_headers, timeout)
    if cancel is not None and cancel.is_set():
        raise StepCancelled(f"stopped by the run's cancel; {method} {url} was not sent")
    try:
        resp = client.send(request) if cancel is None else _send_until_cancelled(client, request, cancel)
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


# How often a step waiting for an answer looks at the run's cancel (set by the worker pool's watcher).
CANCEL_POLL_SECONDS = 0.02


def _send_until_cancelled(client: httpx.Client, request: httpx.Request, cancel: threading.Event) -> httpx.Response:
    """`client.send(request)` on a thread of its own, waited for until it answers or `cancel` is set. A cancelled
    request's thread ends on its own within the request's timeout; its answer is dropped."""
    answer: list[httpx.Response | Exception] = []
    done = threading.Event()

    def send() -> None:
        try:
            answer.append(client.send(request))
        except Exception as exc:  # handed to the step's thread, which maps it as a direct call would
            answer.append(exc)
        finally:
            done.set()

    threading.Thread(target=send, name="http-step", daemon=True).start()
    while not done.wait(CANCEL_POLL_SECONDS):
        if cancel.is_set():
            stopped = StepCancelled(
                f"stopped by the run's cancel: {request.method} {request.url} had been sent; its answer was not "
                "waited for"
            )
            stopped.output = {"sent": True, "answered": False, "cancelled": True}
            raise stopped
    got = answer[0]
    if isinstance(got, Exception):
        raise got
    return got


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


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def guard_url(method: str, url: TrackedUrl) -> str:
    """The URL to call: `url` with every data span percent-encoded, or ActionError if data could choose where it
    goes. Every character of data is encoded (`/`, `?`, `#`, `@`, `%` included), so a value stays one value in the
    path segment, query parameter or fragment the template put it in."""
    text = str(url)
    head = _SCHEME.match(text)
    auth_start = head.end() if head else 0
    found = re.search(r"[/?#]", text[auth_start:])
    auth_end = auth_start + found.start() if found else len(text)
    # The origin is trusted when the literal text (or base_url) wrote all of it and closed it: no data before
    # the character that ends the authority, nor that character itself.
    trusted = head is not None and all(start > auth_end for start, _ in url.spans)
    allowed = _origins(url.allowed_hosts, url.base_url) if url.allowed_hosts else None
    if not trusted:
        if allowed is None:
            raise ActionError(
                f"{method} {text!r}: refused: template data would choose the URL's scheme, host or port; they must "
                "come from the playbook's literal text or the target's base_url (or be listed in the target's "
                "allowed_hosts); nothing was sent",
                retryable=False,
            )
        if "@" in text[auth_start:auth_end]:
            raise ActionError(
                f"{method} {text!r}: refused: template data would put credentials in the URL; nothing was sent",
                retryable=False,
            )
    _refuse_dot_segments(method, text, url, auth_end)
    out: list[str] = []
    last = 0
    for start, end in url.spans:
        out.append(text[last:start])
        value = text[start:end]
        # Data that writes the authority (only with allowed_hosts) is a URL chosen by data: kept as it is, and
        # the host it names is checked below. Anything after the authority is encoded.
        out.append(value if start <= auth_end else quote(value, safe=""))
        last = end
    out.append(text[last:])
    guarded = "".join(out)
    if allowed is not None:
        try:
            parsed = httpx.URL(guarded)
        except httpx.InvalidURL as exc:
            raise ActionError(f"{method} {text!r}: invalid URL: {exc}", retryable=False) from exc
        if _origin_of(parsed) not in allowed:
            raise ActionError(
                f"{method} {text!r}: refused: {parsed.host}:{_origin_of(parsed)[1]} is not in the target's "
                "allowed_hosts; nothing was sent",
                retryable=False,
            )
    return guarded


def _refuse_dot_segments(method: str, text: str, url: TrackedUrl, auth_end: int) -> None:
    # `/x/{{ v }}/y` with v=".." would be normalised to `/y` by the client: data leaving the path it was put in.
    # Segments end at a literal `/` only (a `/` from data is encoded, so it splits nothing).
    segment: list[str] = []
    from_data = False
    for i in range(auth_end, len(text) + 1):
        ch = text[i] if i < len(text) else "/"
        data = i < len(text) and url.is_data(i)
        if not data and ch in "/?#":
            value = "".join(segment)
            if from_data and unquote(value) in (".", ".."):
                raise ActionError(
                    f"{method} {text!r}: refused: a value from template data makes the path segment {value!r}, "
                    "which would leave the path the playbook wrote; nothing was sent",
                    retryable=False,
                )
            if ch in "?#":
                return
            segment, from_data = [], False
            continue
        segment.append(ch)
        from_data = from_data or data


def _origins(hosts: tuple[str, ...], base_url: str | None) -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for entry in (*hosts, *([base_url] if base_url else [])):
        text = entry if "://" in entry else f"http://{entry}"
        try:
            parsed = httpx.URL(text)
        except httpx.InvalidURL:
            continue
        if "://" in entry or parsed.port is not None:
            found.add(_origin_of(parsed))
        else:
            # A bare host: the default port of either scheme.
            found.update({(parsed.host.lower(), 80), (parsed.host.lower(), 443)})
    return found


def _origin_of(parsed: httpx.URL) -> tuple[str, int]:
    return parsed.host.lower(), parsed.port or _DEFAULT_PORTS.get(parsed.scheme, 0)


def http_action(params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    expect = params.get("expect_status", [200, 201, 202, 204])
    if isinstance(expect, int):
        expect = [expect]
    return call_http(
        ctx.http,
        method=str(params.get("method", "GET")),
        # A TrackedUrl stays one (str() of it would forget which characters came from data).
        url=params["url"] if isinstance(params["url"], str) else str(params["url"]),
        json_body=params.get("json"),
        headers=params.get("headers") or {},
        expect_status=[int(s) for s in expect],
        timeout=float(params.get("timeout") or ctx.timeout or 30),
        idempotency_key=ctx.idempotency_key,
        cancel=ctx.cancel,
    )
