"""`mendloop pause` and `mendloop resume`: stop new runs of a component (or all) and let them go again (over the
HTTP API)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mendloop.cli.common import DEFAULT_URL, JsonOpt, TokenOpt, UrlOpt, call, out, print_json


def pause(
    component: Annotated[str | None, typer.Argument(help="The component; leave it out to pause all.")] = None,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Shown on /health, runs and incidents.")] = "",
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pause a component, or all: detections still open incidents, but no run starts until `mendloop resume`."""
    body: dict[str, Any] = {"reason": reason or "paused by an operator"}
    if component is not None:
        body["component"] = component
    answer = call("POST", url, "/pause", token, json=body)
    if as_json:
        print_json(answer)
        return
    what = "all components" if answer["scope"] == "*" else answer["scope"]
    out.print(f"paused {what}: {answer['reason']}", markup=False)


def resume(
    component: Annotated[str | None, typer.Argument(help="The component; leave it out to lift every pause.")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Lift a component's pause, or every pause; the held runs start."""
    answer = call("POST", url, "/resume", token, json={"component": component} if component else {})
    if as_json:
        print_json(answer)
        return
    lifted = [("all components" if p["scope"] == "*" else p["scope"]) for p in answer["pauses"]]
    out.print(f"resumed {', '.join(lifted)}" if lifted else "nothing was paused", markup=False)
