"""`mendloop notifications ...`: each `notify:` target's deliveries (read from the database), and a test message
to one target."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from mendloop.cli.common import ConfigOpt, JsonOpt, fail, out, print_json

notifications_cli = typer.Typer(no_args_is_help=True, help="Notifications: the `notify:` targets' deliveries.")


def _when(epoch: float | None) -> str:
    import datetime as dt

    return "" if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@notifications_cli.command("status")
def notifications_status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Each target's deliveries, failures and pending events, from the database (every process's counts)."""
    from mendloop.config import load_settings
    from mendloop.engine.notifier import TargetStatus, pending_of, status_of
    from mendloop.storage.event_feed import EventFeed
    from mendloop.storage.notify_cursor import NotifyCursors
    from mendloop.storage.store import Store

    settings = load_settings(config)
    store = Store(settings.database_url)
    try:
        rows = {r.target: r for r in NotifyCursors(store.db).all()}
        feed = EventFeed(store.db)
        statuses: list[tuple[TargetStatus, bool]] = []
        for target in settings.notify:
            row = rows.pop(target.name, None)
            if row is None:  # not started yet: it will start at the newest event
                statuses.append((TargetStatus(target.name), True))
                continue
            pending = pending_of(feed, target, row.cursor, settings.notify_settings.public_url)
            statuses.append((status_of(row, pending, delivering=row.lease_owner is not None), True))
        # Rows of targets no longer configured: their counters, nothing pending.
        statuses += [(status_of(row, 0, delivering=False), False) for row in rows.values()]
    finally:
        store.close()
    if as_json:
        print_json([{**dataclasses.asdict(s), "configured": configured} for s, configured in statuses])
        return
    if not statuses:
        out.print("no notify targets are configured")
        return
    table = Table("target", "delivered", "failed", "dropped", "pending", "last delivered", "last error")
    for s, configured in statuses:
        table.add_row(
            s.target + ("" if configured else " (not configured)"),
            str(s.delivered),
            str(s.failed),
            str(s.dropped),
            str(s.pending),
            _when(s.last_delivered_at),
            s.last_error or "",
        )
    out.print(table)


@notifications_cli.command("test")
def notifications_test(
    name: Annotated[str, typer.Argument(help="The target's name in `notify:`.")], config: ConfigOpt = None
) -> None:
    """Send a test message to one target now; exit 1 with the reason when it is not delivered."""
    from mendloop.config import load_settings
    from mendloop.domain.notifications import trial_notice
    from mendloop.engine.notifier import Channel
    from mendloop.infra.redact import Redactor

    settings = load_settings(config)
    target = next((t for t in settings.notify if t.name == name), None)
    if target is None:
        known = ", ".join(t.name for t in settings.notify) or "none"
        fail(f"no notify target is named {name!r} (configured: {known})")
    channel = Channel(
        target, timeout=settings.notify_settings.attempt_timeout_seconds, redactor=Redactor(settings.secret_patterns)
    )
    error = channel.send(trial_notice(name))
    if error is not None:
        fail(f"{name}: not delivered: {error}")
    out.print(f"{name}: delivered")
