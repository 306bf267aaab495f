"""`mendloop playbooks ...`: the server's playbooks (over the HTTP API); checking and rendering a playbook file locally,
and the template context's reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mendloop.cli.common import DEFAULT_URL, ConfigOpt, JsonOpt, TokenOpt, UrlOpt, call, fail, out, print_json

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


@pb_cli.command("render")
def pb_render(
    file: Annotated[Path, typer.Argument(dir_okay=False, help="The playbook file.")],
    event: Annotated[
        Path, typer.Option("--event", dir_okay=False, help="The event as JSON (what templates read as `event`).")
    ],
    config: ConfigOpt = None,
    target: Annotated[str | None, typer.Option("--target", help="The target (default: as a run would pick).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a playbook's steps as they would run for EVENT, without running anything: each `with` rendered, each
    `when` evaluated (or what it waits for), each capability's call as its binding would make it."""
    from mendloop.config import load_settings
    from mendloop.playbooks import dry_run
    from mendloop.playbooks.loader import load_file
    from mendloop.playbooks.templates import Templates

    templates = Templates()
    pb = load_file(file, templates)
    try:
        data = json.loads(event.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"{event}: cannot read: {exc.strerror}", 2)
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"{event}: not valid JSON: {exc}", 2)
    if not isinstance(data, dict):
        fail(f"{event}: the event must be a JSON object, not {type(data).__name__}", 2)
    settings = load_settings(config)
    if target is not None and target not in settings.targets:
        known = ", ".join(sorted(settings.targets)) or "none configured"
        fail(f"--target: no target {target!r} (known: {known})", 2)
    result = dry_run.plan(pb, data, settings, target=target, templates=templates)
    if as_json:
        print_json(result.as_dict())
        return
    sys.stdout.write(dry_run.text(result))


@pb_cli.command("context")
def pb_context(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="The reference as Markdown (docs/template-context.md).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Every name a playbook's templates can read (the schema in mendloop/playbooks/context_schema.py)."""
    from mendloop.playbooks import context_schema

    if markdown:
        sys.stdout.write(context_schema.markdown())
        return
    if as_json:
        print_json(context_schema.as_json())
        return
    sys.stdout.write(context_schema.names_text())
