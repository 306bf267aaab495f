"""The one place where mendloop's errors become HTTP answers: JSON naming the field, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mendloop import errors

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[errors.MendloopError], int]] = [
    (errors.AuthError, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.InputError, 422),
    (errors.PlaybookError, 422),
    (errors.StorageError, 503),
    (errors.ConfigError, 500),
]


def _status_for(exc: errors.MendloopError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


def limit_body(*, field: str, message: str, limit: str, value: int) -> dict[str, Any]:
    """A limit exceeded (413: the body's size; 422: its nesting or a string's length), in the shape of every other
    error, plus the setting (`limit`, e.g. `limits.max_body_bytes`) and its configured value (`max`)."""
    detail = f"{field}: {message} (the limit {limit} is {value})"
    return {
        "detail": detail,
        "error": "LimitExceeded",
        "field": field,
        "limit": limit,
        "max": value,
        "errors": [{"field": field, "message": detail, "type": "limit_exceeded"}],
    }


def answer(exc: errors.MendloopError) -> JSONResponse:
    """The JSON answer to one of mendloop's errors (the exception handler's, and the access middleware's)."""
    status = _status_for(exc)
    if status >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message)
    body: dict[str, Any] = {"detail": exc.message, "error": type(exc).__name__}
    body.update({k: v for k, v in exc.fields.items() if v is not None})
    if status < 500 and isinstance(body.get("field"), str):
        # The same shape as a request validation error: `detail`, `field` and the list of `errors`.
        body.setdefault("errors", [{"field": body["field"], "message": exc.message, "type": type(exc).__name__}])
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.MendloopError)
    async def _mendloop_error(_request: Request, exc: errors.MendloopError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": _field(e.get("loc", ())), "message": e.get("msg", "invalid"), "type": e.get("type")}
            for e in exc.errors()
        ]
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        status = 400 if first.get("type") == "json_invalid" else 422
        return JSONResponse(
            {"detail": f"{first['field']}: {first['message']}", "field": first["field"], "errors": problems},
            status_code=status,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"detail": "internal error", "error": type(exc).__name__}, status_code=500)
