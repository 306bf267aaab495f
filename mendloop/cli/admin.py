"""`mendloop db ...` and `mendloop config ...`: the database's migrations, and the configuration."""

from __future__ import annotations

import sys

import typer

from mendloop.cli.common import ConfigOpt, fail, out

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
    """Load the config and the playbooks it names; report the first problem."""
    from mendloop.config import load_settings
    from mendloop.playbooks.actions.capability import Capabilities
    from mendloop.playbooks.loader import PlaybookSet
    from mendloop.playbooks.templates import Templates

    settings = load_settings(config)
    templates = Templates()
    pbs = PlaybookSet.load(settings.playbook_dirs, templates)
    Capabilities(settings.targets, templates)
    missing = {e: p for e, p in settings.routing_table().items() if pbs.get(p) is None}
    if missing:
        e, p = next(iter(missing.items()))
        fail(f"routing.{e}: no playbook {p!r} is loaded")
    out.print(f"ok: {len(pbs.by_id)} playbooks, {len(settings.targets)} target(s)")
