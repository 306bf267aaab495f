"""`mendloop db ...` and `mendloop config ...`: the database's migrations, and the configuration."""

from __future__ import annotations

import sys

import typer

from mendloop.cli.common import ConfigOpt, err, out

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
