"""`mendloop playbooks ...`: the server's playbooks (over the HTTP API), and checking a playbook file locally."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mendloop.cli.common import DEFAULT_URL, JsonOpt, TokenOpt, UrlOpt, call, out, print_json

pb_cli = typer.Typer(no_args_is_help=True, help="Playbooks.")


@pb_cli.command("list")
def pb_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    answer = call("GET", url, "/playbooks", token)
    if as_json:
        print_json(answer)
        return
    table = Table("playbook", "type", "error types", "steps")
    for p in answer["playbooks"]:
        table.add_row(p["id"], p["type"], ", ".join(p["handles"]["error_types"]), str(len(p["steps"])))
    out.print(table)


@pb_cli.command("validate")
def pb_validate(file: Annotated[Path, typer.Argument(dir_okay=False)], as_json: JsonOpt = False) -> None:
    """Check a playbook file; the first problem names the file and the field."""
    from mendloop.playbooks.loader import load_file
    from mendloop.playbooks.templates import Templates

    pb = load_file(file, Templates())
    if as_json:
        print_json({"valid": True, "id": pb.id, "version": pb.version, "steps": len(pb.model.steps)})
        return
    out.print(f"ok: {file}: playbook {pb.id!r} ({pb.model.type}), {len(pb.model.steps)} steps", markup=False)


def routing(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The routing table: which playbook each error type and event type runs, and why."""
    answer = call("GET", url, "/routing", token)
    if as_json:
        print_json(answer)
        return
    table = Table("kind", "type", "playbook", "from")
    for r in answer["routes"]:
        table.add_row(r["kind"].replace("_", " "), r["key"], r["playbook"], r["source"])
    out.print(table)
