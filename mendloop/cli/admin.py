"""`mendloop db ...` and `mendloop config ...`: the database's migrations, retention and backup, and the
configuration."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mendloop.cli.common import ConfigOpt, JsonOpt, err, out, print_json

db_cli = typer.Typer(no_args_is_help=True, help="The database.")
config_cli = typer.Typer(no_args_is_help=True, help="Configuration.")


@db_cli.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply the migrations to the configured database."""
    from mendloop.config import load_settings
    from mendloop.storage import migrate
    from mendloop.storage.store import Store

    store = Store(load_settings(config).database_url)
    try:
        migrate.upgrade(store.engine)
        out.print(f"database at revision {migrate.current(store.engine)}")
    finally:
        store.close()


@db_cli.command("current")
def db_current(config: ConfigOpt = None) -> None:
    """Show the database's migration revision."""
    from mendloop.config import load_settings
    from mendloop.storage import migrate
    from mendloop.storage.store import Store

    store = Store(load_settings(config).database_url)
    try:
        out.print(f"current: {migrate.current(store.engine)}  head: {migrate.head()}")
    finally:
        store.close()


@db_cli.command("prune")
def db_prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of the finished runs (and events) that go: 30d, 12h, 2w.")
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")] = False,
    events: Annotated[
        bool, typer.Option("--events/--no-events", help="Also events older than that (not only the runs' own).")
    ] = True,
    audit_older_than: Annotated[
        str | None, typer.Option("--audit-older-than", help="Also audit log rows older than this (kept otherwise).")
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete finished runs older than --older-than with their steps, events, trust history and finished work
    orders, in batches. Live runs and events a cursor still needs stay; statistics are kept."""
    from mendloop.config import load_settings
    from mendloop.domain.retention import parse_age
    from mendloop.storage.store import Store

    settings = load_settings(config)
    cutoff = time.time() - parse_age(older_than)
    audit_cutoff = time.time() - parse_age(audit_older_than) if audit_older_than is not None else None
    store = Store(settings.database_url)
    try:
        report = store.retention.prune(
            runs_before=cutoff,
            events_before=cutoff if events else None,
            audit_before=audit_cutoff,
            dry_run=dry_run,
            batch=settings.retention.batch,
        )
    finally:
        store.close()
    if as_json:
        print_json(report.as_dict())
        return
    table = Table("rows", "would go" if dry_run else "deleted")
    for name, n in report.as_dict().items():
        if name not in ("event_floor", "dry_run"):
            table.add_row(name.replace("_", " "), str(n))
    out.print(table)
    if report.event_floor is not None:
        out.print(f"events from id {report.event_floor} on are kept: a cursor still needs them")


@db_cli.command("backup")
def db_backup(
    file: Annotated[Path, typer.Argument(help="Where the copy goes.", dir_okay=False)],
    config: ConfigOpt = None,
) -> None:
    """A consistent copy while serving: SQLite's online backup, or pg_dump for PostgreSQL."""
    from mendloop.config import load_settings
    from mendloop.storage.backup import backup

    how = backup(load_settings(config).database_url, file)
    out.print(f"backed up to {file} ({how})")


@config_cli.command("schema")
def config_schema() -> None:
    """Print the config file's JSON Schema."""
    from mendloop.config import config_json_schema

    sys.stdout.write(config_json_schema() + "\n")


@config_cli.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Check everything `serve` checks at startup; report every problem (exit 2 when there is an error)."""
    from mendloop import preflight
    from mendloop.config import load_settings

    settings = load_settings(config)  # a schema error: every one of them, exit 2 (cli/root.py)
    problems = preflight.check(settings)
    for problem in problems:
        err.print(problem.line(), markup=False)
    errors = sum(1 for p in problems if not p.warning)
    if errors:
        raise typer.Exit(2)
    warnings = len(problems)
    out.print(
        f"ok: {len(settings.targets)} target(s), {len(settings.watchers)} watcher(s)"
        + (f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else "")
    )
