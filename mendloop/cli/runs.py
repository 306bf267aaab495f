"""`mendloop trigger` and `mendloop runs ...`: start a run, list runs, show one's timeline, decide, retry, cancel (over
the HTTP API)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from mendloop.cli.common import DEFAULT_URL, JsonOpt, TokenOpt, UrlOpt, call, list_or_print, out, print_json

runs_cli = typer.Typer(no_args_is_help=True, help="Playbook runs.")


def trigger(
    error_type: Annotated[str, typer.Option("--error-type", "-e", help="e.g. database_connection")],
    description: Annotated[str, typer.Option("--description", "-d")],
    file_path: Annotated[str | None, typer.Option("--file-path")] = None,
    component: Annotated[str | None, typer.Option("--component")] = None,
    wait: Annotated[float | None, typer.Option("--wait", help="Seconds to wait for escalation or the end.")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trigger the playbook routed for an error type (POST /patches/trigger)."""
    body: dict[str, Any] = {"error_type": error_type, "description": description}
    for k, v in (("file_path", file_path), ("component", component), ("wait_seconds", wait)):
        if v is not None:
            body[k] = v
    answer = call("POST", url, "/patches/trigger", token, json=body, timeout=(wait or 30) + 30)
    if as_json:
        print_json(answer)
        return
    out.print(f"{answer['message']}: run {answer['run_id']} is {answer['status']}")
    if answer.get("work_order_id"):
        out.print(f"escalated to coding agent: work order {answer['work_order_id']}")


@runs_cli.command("list")
def runs_list(
    status: Annotated[str | None, typer.Option("--status")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 20,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    answer = list_or_print(url, "/patches/runs", token, as_json, limit=limit, status=status)
    if answer is None:
        return
    table = Table("run", "playbook", "status", "steps", "work order", "created")
    for r in answer["runs"]:
        table.add_row(
            r["run_id"],
            r["playbook_id"],
            r["status"],
            f"{r['steps_completed']}/{r['steps_total']}",
            r["coding_work_order_id"] or "",
            r["created_at"],
        )
    out.print(table)


@runs_cli.command("show")
def runs_show(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    answer = call("GET", url, f"/patches/runs/{run_id}", token)
    if as_json:
        print_json(answer)
        return
    out.print(f"{answer['run_id']}  {answer['playbook_id']} ({answer['playbook_type']})  status: {answer['status']}")
    if answer.get("error"):
        out.print(f"error: {answer['error']}", markup=False)
    for item in answer["timeline"]:
        out.print(f"  [{item['time'][11:19]}] {item['message']}", markup=False)


def _decide(verb: str, run_id: str, comment: str | None, url: str, token: str | None, as_json: bool) -> None:
    body = {"comment": comment} if comment else {}
    answer = call("POST", url, f"/patches/runs/{run_id}/{verb}", token, json=body)
    if as_json:
        print_json(answer)
        return
    out.print(f"{answer['run_id']}: {answer['status']}", markup=False)


CommentOpt = Annotated[str | None, typer.Option("--comment", "-m", help="Why; kept on the run's timeline.")]


@runs_cli.command("approve")
def runs_approve(
    run_id: str, comment: CommentOpt = None, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Approve what a run waits for (an approval step, a trust gate, a held patch); it goes on."""
    _decide("approve", run_id, comment, url, token, as_json)


@runs_cli.command("reject")
def runs_reject(
    run_id: str, comment: CommentOpt = None, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Reject it; the run needs a human."""
    _decide("reject", run_id, comment, url, token, as_json)


@runs_cli.command("retry")
def runs_retry(
    run_id: str,
    from_step: Annotated[str, typer.Option("--from-step", help="The id of the step to start again from.")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a failed run again from a step, as a new run with the earlier steps' outputs."""
    answer = call("POST", url, f"/patches/runs/{run_id}/retry", token, json={"from_step": from_step})
    if as_json:
        print_json(answer)
        return
    out.print(f"{run_id} retried from {from_step} as {answer['run_id']}: {answer['status']}", markup=False)


@runs_cli.command("cancel")
def runs_cancel(
    run_id: str,
    reason: Annotated[str | None, typer.Option("--reason", "-m", help="Why; kept on the run.")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a run; a step it is running is stopped (a command's process group killed) within a second."""
    answer = call("POST", url, f"/patches/runs/{run_id}/cancel", token, json={"reason": reason} if reason else {})
    if as_json:
        print_json(answer)
        return
    out.print(f"{answer['run_id']}: {answer['status']}", markup=False)
