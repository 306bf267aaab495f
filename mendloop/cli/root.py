"""The root command: every group and command registered in the order `--help` shows them, and `main()`, the
console script, which turns mendloop's errors and click's into one line on stderr and an exit code."""

from __future__ import annotations

import sys

import click
import typer

from mendloop import errors
from mendloop.cli import (
    admin,
    control,
    incidents,
    mcp_server,
    notifications,
    playbooks,
    processes,
    runs,
    tokens,
    work_orders,
)
from mendloop.cli.common import err

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="mendloop: self-healing with coding agents.")
cli.add_typer(runs.runs_cli, name="runs")
cli.add_typer(work_orders.wo_cli, name="work-orders")
cli.add_typer(incidents.incidents_cli, name="incidents")
cli.add_typer(notifications.notifications_cli, name="notifications")
cli.add_typer(playbooks.pb_cli, name="playbooks")
cli.add_typer(admin.db_cli, name="db")
cli.add_typer(admin.config_cli, name="config")
cli.add_typer(tokens.tokens_cli, name="tokens")
cli.add_typer(tokens.audit_cli, name="audit")

cli.command()(processes.serve)
cli.command(hidden=True)(processes.serve_replica)
cli.command()(processes.worker)
cli.command()(processes.watch)
cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(processes.agent)
cli.command()(runs.trigger)
cli.command()(control.pause)
cli.command()(control.resume)
cli.command()(playbooks.routing)
cli.command()(processes.demo)
cli.command()(mcp_server.mcp)


def main() -> None:
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of raising it.
        code = cli(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except errors.MendloopError as exc:
        for line in exc.problems if isinstance(exc, errors.ConfigError) else [exc.message]:
            err.print(f"error: {line}", markup=False)
        # 2: the configuration or the database can't be used (a fix on the machine, not in the request).
        sys.exit(2 if isinstance(exc, errors.StorageError | errors.ConfigError | errors.PlaybookError) else 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:  # usage errors and the like
        exc.show()
        sys.exit(exc.exit_code)
