"""`mendloop work-orders ...`: list, show, complete, and the operator's approve/merged/reject (over the HTTP API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mendloop.cli.common import DEFAULT_URL, JsonOpt, TokenOpt, UrlOpt, call, list_or_print, out, print_json

wo_cli = typer.Typer(no_args_is_help=True, help="Coding agent work orders.")


@wo_cli.command("list")
def wo_list(
    status: Annotated[str | None, typer.Option("--status")] = None,
    run_id: Annotated[str | None, typer.Option("--run")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 20,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    answer = list_or_print(
        url, "/patches/work-orders", token, as_json, limit=limit, status=status, self_healing_run_id=run_id
    )
    if answer is None:
        return
    table = Table("work order", "status", "complexity", "run", "description")
    for w in answer["work_orders"]:
        table.add_row(
            w["work_order_id"], w["status"], w["estimated_complexity"], w["self_healing_run_id"] or "", w["description"]
        )
    out.print(table)
    out.print(" ".join(f"{k}={v}" for k, v in answer["stats"].items()))


@wo_cli.command("show")
def wo_show(wo_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    answer = call("GET", url, f"/patches/work-orders/{wo_id}", token)
    if as_json:
        print_json(answer)
        return
    for key in ("work_order_id", "status", "description", "self_healing_run_id", "estimated_complexity", "priority"):
        out.print(f"{key}: {answer[key]}", markup=False)
    out.print("context: " + json.dumps(answer["context"], indent=2), markup=False)
    if answer.get("patch_result"):
        out.print("patch_result: " + json.dumps(answer["patch_result"]), markup=False)


@wo_cli.command("complete")
def wo_complete(
    wo_id: str,
    tests_passed: Annotated[bool, typer.Option("--tests-passed/--tests-failed", help="What the agent's tests said.")],
    files_changed: Annotated[int | None, typer.Option("--files-changed", min=0)] = None,
    diff_file: Annotated[Path | None, typer.Option("--diff-file", exists=True, dir_okay=False)] = None,
    summary: Annotated[str | None, typer.Option("--summary")] = None,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Report a work order done (the agent's claim; verification decides)."""
    body: dict[str, Any] = {"tests_passed": tests_passed}
    if files_changed is not None:
        body["files_changed"] = files_changed
    if diff_file is not None:
        body["diff"] = diff_file.read_text(encoding="utf-8", errors="replace")
    if summary:
        body["summary"] = summary
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    answer = call("POST", url, f"/patches/work-orders/{wo_id}/complete", token, json=body, headers=headers)
    if as_json:
        print_json(answer)
        return
    out.print(answer["message"], markup=False)


@wo_cli.command("approve")
def wo_approve(wo_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Apply a verified patch held for approval; its run resumes."""
    answer = call("POST", url, f"/patches/work-orders/{wo_id}/approve", token)
    print_json(answer) if as_json else out.print(answer["message"], markup=False)


@wo_cli.command("merged")
def wo_merged(wo_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Say a review branch was merged; its run resumes to deploy and verify."""
    answer = call("POST", url, f"/patches/work-orders/{wo_id}/merged", token)
    print_json(answer) if as_json else out.print(answer["message"], markup=False)


@wo_cli.command("reject")
def wo_reject(
    wo_id: str,
    reason: Annotated[str, typer.Option("--reason")] = "rejected",
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reject a patch waiting for an operator; its run needs a human."""
    answer = call("POST", url, f"/patches/work-orders/{wo_id}/reject", token, json={"reason": reason})
    print_json(answer) if as_json else out.print(f"{answer['work_order_id']}: {answer['status']}", markup=False)
