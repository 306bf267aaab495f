"""What every command shares: the consoles, the common options, failing with one line, and calling the API."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from mendloop.errors import MendloopError
from mendloop.infra.api_client import ApiClient

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", envvar="MENDLOOP_CONFIG", help="YAML config file.", dir_okay=False)
]
UrlOpt = Annotated[str, typer.Option("--url", envvar="MENDLOOP_URL", help="mendloop server URL.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="MENDLOOP_TOKEN", help="Bearer token.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON answer, for scripts.")]
LogLevelOpt = Annotated[str, typer.Option(envvar="MENDLOOP_LOG_LEVEL")]
DEFAULT_URL = "http://127.0.0.1:8000"
HTTP_TIMEOUT = 60.0


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def setup_logging(level: str) -> None:
    if level.upper() not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
        fail(f"--log-level: {level!r} is not one of critical, error, warning, info, debug")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def print_json(body: Any) -> None:
    sys.stdout.write(json.dumps(body, indent=2) + "\n")


def call(
    method: str,
    url: str,
    path: str,
    token: str | None,
    *,
    json: Any = None,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Any:
    """One call to the server's API; an HTTP problem ends the command with `error: STATUS: detail`."""
    try:
        with ApiClient(url, token, timeout=timeout) as api:
            return api.call(method, path, json=json, params=params, headers=headers)
    except MendloopError as exc:
        status = exc.fields.get("status")
        fail(f"{status}: {exc.fields.get('detail')}" if status is not None else exc.message)


def list_or_print(url: str, path: str, token: str | None, as_json: bool, **filters: Any) -> Any:
    """GET a list endpoint with the filters that were given (None ones left out). With `--json` the answer is
    printed as it came and None returned, so the caller only draws its table for an answer it gets back."""
    answer = call("GET", url, path, token, params={k: v for k, v in filters.items() if v is not None and v != ""})
    if as_json:
        print_json(answer)
        return None
    return answer
