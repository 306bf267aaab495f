"""`mendloop incidents ...`: list incidents, show one with its runs, resolve one by hand (over the HTTP API)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from mendloop.cli.common import DEFAULT_URL, JsonOpt, TokenOpt, UrlOpt, call, list_or_print, out, print_json

incidents_cli = typer.Typer(no_args_is_help=True, help="Incidents: repeats of one error, and what resolved them.")

_FIELDS = (
    "incident_id",
    "status",
    "error_type",
    "component",
    "title",
    "count",
    "recurrences",
    "first_seen",
    "last_seen",
    "resolved_at",
    "resolved_by_run",
    "resolved_commit",
    "last_resolved_at",
    "last_run_id",
)


@incidents_cli.command("list")
def incidents_list(
    status: Annotated[str | None, typer.Option("--status", help="open or resolved")] = None,
    error_type: Annotated[str | None, typer.Option("--error-type")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 20,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    answer = list_or_print(url, "/incidents", token, as_json, limit=limit, status=status, error_type=error_type)
    if answer is None:
        return
    table = Table("incident", "status", "error type", "count", "recurrences", "resolved by", "last seen")
    for i in answer["incidents"]:
        table.add_row(
            i["incident_id"],
            i["status"],
            i["error_type"] or "",
            str(i["count"]),
            str(i["recurrences"]),
            i["resolved_by_run"] or "",
            i["last_seen"],
        )
    out.print(table)


def _print(answer: dict[str, Any]) -> None:
    for key in _FIELDS:
        value = answer.get(key)
        out.print(f"{key}: {'' if value is None else value}", markup=False)
    for r in answer.get("runs", []):
        out.print(f"  run {r['run_id']}: {r['status']}", markup=False)


@incidents_cli.command("show")
def incidents_show(
    incident_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    answer = call("GET", url, f"/incidents/{incident_id}", token)
    if as_json:
        print_json(answer)
        return
    _print(answer)


@incidents_cli.command("resolve")
def incidents_resolve(
    incident_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Resolve an incident by hand (POST /incidents/{id}/resolve); its next detection reopens it."""
    answer = call("POST", url, f"/incidents/{incident_id}/resolve", token)
    if as_json:
        print_json(answer)
        return
    _print(answer)


def _held(fix: dict[str, Any]) -> str:
    if fix["held_seconds"] is None:
        return "never held" if not fix["verified"] else ""
    return f"held {fix['held_seconds']:.0f} s" + (" (still holding)" if fix["still_holding"] else " then recurred")


@incidents_cli.command("history")
def incidents_history(
    incident_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """What was done about an incident and whether it held (GET /incidents/{id}/history): its own fixes, and the
    most relevant fixes of other incidents with the same fingerprint or the same traceback frames."""
    answer = call("GET", url, f"/incidents/{incident_id}/history", token)
    if as_json:
        print_json(answer)
        return
    out.print(
        f"incident {answer['incident_id']}: {answer['recurrences']} recurrences, {answer['regressions']} regressions"
        + (f" (last: commit {answer['regressed_commit']} did not hold)" if answer["regressed_commit"] else ""),
        markup=False,
    )
    table = Table("matched", "run", "commit", "diff", "verified", "held", "what was done")
    for fix in [*answer["fixes"], *answer["related"]]:
        diff = fix["diff"]
        table.add_row(
            fix["matched"],
            fix["run_id"],
            (fix["commit"] or "")[:12],
            f"{len(diff['files'])} files +{diff['added'] or 0}/-{diff['removed'] or 0}",
            "yes" if fix["verified"] else ("reverted" if fix["reverted"] else "no"),
            _held(fix),
            fix["what_was_done"],
        )
    out.print(table)
