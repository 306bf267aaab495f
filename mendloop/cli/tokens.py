"""`mendloop tokens ...` and `mendloop audit ...`: API tokens with roles, and the audit log, on the configured
database (like `db upgrade`: no server needed). A token is printed once, when it is made; only its digest is kept."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mendloop.cli.common import ConfigOpt, JsonOpt, err, out, print_json

if TYPE_CHECKING:
    from mendloop.storage.store import Store

tokens_cli = typer.Typer(no_args_is_help=True, help="API tokens with roles (viewer, operator, agent, intake, admin).")
audit_cli = typer.Typer(no_args_is_help=True, help="The audit log of operator and admin actions.")


@contextmanager
def _store(config: ConfigOpt) -> Iterator[Store]:
    from mendloop.config import load_settings
    from mendloop.storage import migrate
    from mendloop.storage.store import Store

    store = Store(load_settings(config).database_url)
    try:
        migrate.upgrade(store.engine)  # as `serve` does: the tables exist before the first token
        yield store
    finally:
        store.close()


@tokens_cli.command("create")
def tokens_create(
    role: Annotated[str, typer.Option("--role", help="viewer, operator, agent, intake or admin.")],
    name: Annotated[str, typer.Option("--name", help="Who the token is for; the audit log names it.")],
    repository: Annotated[
        list[str] | None,
        typer.Option("--repository", "-r", help="An agent token: a repository it may work for (repeat; '*': all)."),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a token and print it, this once."""
    from mendloop.api.routes.tokens import token_out
    from mendloop.storage.tokens import TokenStore

    with _store(config) as store:
        row, secret = TokenStore(store.db).create(name, role, repository or [])
    if as_json:
        print_json({**token_out(row).model_dump(), "token": secret})
        return
    scope = f" for {', '.join(row.repositories)}" if row.repositories else ""
    err.print(f"token {row.name} ({row.role}{scope}), id {row.id}; shown this once:", markup=False)
    out.print(secret, markup=False)


@tokens_cli.command("list")
def tokens_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The stored tokens (never the tokens themselves)."""
    from mendloop.api.routes.tokens import token_out
    from mendloop.storage.tokens import TokenStore

    with _store(config) as store:
        rows = TokenStore(store.db).rows()
    shown = [token_out(r).model_dump() for r in rows]
    if as_json:
        print_json({"tokens": shown, "count": len(shown)})
        return
    table = Table("id", "name", "role", "repositories", "created", "revoked")
    for t in shown:
        table.add_row(
            t["id"], t["name"], t["role"], ", ".join(t["repositories"]), t["created_at"], t["revoked_at"] or ""
        )
    out.print(table)


@tokens_cli.command("revoke")
def tokens_revoke(
    name_or_id: Annotated[str, typer.Argument(help="The token's id, or the name of a token not revoked.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: a server refuses it within a second."""
    from mendloop.api.routes.tokens import token_out
    from mendloop.storage.tokens import TokenStore

    with _store(config) as store:
        row = TokenStore(store.db).revoke(name_or_id)
    if as_json:
        print_json(token_out(row).model_dump())
        return
    out.print(f"revoked {row.name} ({row.role}), id {row.id}", markup=False)


@audit_cli.command("list")
def audit_list(
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    actor: Annotated[str | None, typer.Option(help="A token's name or id.")] = None,
    action: Annotated[str | None, typer.Option(help="e.g. runs.trigger, tokens.create.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The newest audit entries first."""
    from mendloop.api.routes.audit import audit_out
    from mendloop.storage.audit import AuditLog

    with _store(config) as store:
        rows = AuditLog(store.db).list(limit=limit, actor=actor, action=action)
    shown = [audit_out(r).model_dump() for r in rows]
    if as_json:
        print_json({"entries": shown, "count": len(shown)})
        return
    table = Table("at", "actor", "role", "action", "method", "path", "client", "status")
    for e in shown:
        table.add_row(
            e["at"],
            e["actor_name"] or "",
            e["role"] or "",
            e["action"],
            e["method"],
            e["path"],
            e["client"] or "",
            str(e["status"]),
        )
    out.print(table)
