"""Notifications: each `notify:` target follows the durable events table by its own cursor (`notify_cursors`) and
is sent, through Apprise, the events its filter wants.

- Durable, at least once: an event is delivered, then the cursor moves past it in the database. A crash between
  the two sends it again; a crash anywhere else loses nothing, because the events table, not the in-process bus,
  is what is read (`storage/event_feed.py`, which also waits out PostgreSQL's late commits).
- A new target starts at the newest event, not at the start of the history.
- A failed attempt is tried again after a backoff (`domain/notifications.py`), up to `max_attempts`; then the
  event is counted dropped and the cursor moves on. The counters live in the table, so they survive restarts and
  count every process's deliveries.
- Never in a run's way: each target has its own thread, and an attempt has a connect and read timeout, so a slow
  or dead target delays neither runs nor the other targets.
- One process at a time delivers a target (`serve` and `mendloop worker` may both run notifiers): a lease in its
  row, renewed while it delivers, released on a clean stop, lapsing after `lease_seconds` when its holder died.

`/health` reads `snapshot()`, which each target's thread refreshes after every round: no database on the request
path.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import apprise

from mendloop.config import NotifySettings, NotifyTarget
from mendloop.domain import notifications as n
from mendloop.domain.records import EventRecord
from mendloop.errors import MendloopError
from mendloop.infra.redact import Redactor
from mendloop.storage.db import Database
from mendloop.storage.event_feed import EventFeed
from mendloop.storage.notify_cursor import CursorRow, NotifyCursors

log = logging.getLogger(__name__)

# Events read per round; `pending` counts at most this many (500 means 500 or more).
BATCH = 500
_MAX_ERROR_CHARS = 500
_NOTIFY_TYPES = {
    "info": apprise.NotifyType.INFO,
    "warning": apprise.NotifyType.WARNING,
    "error": apprise.NotifyType.FAILURE,
    "critical": apprise.NotifyType.FAILURE,
}


def _quiet_apprise_log() -> None:
    """Apprise logs each request's URL, token and payload at DEBUG, and hosts in its warnings: none of it reaches
    mendloop's log (the notifier logs each failure itself, redacted). The reasons come back in each call's result."""
    logger = logging.getLogger("apprise")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        logger.addHandler(logging.NullHandler())


class Channel:
    """One target's Apprise sender, built once from its expanded URL, with mendloop's timeouts."""

    def __init__(self, target: NotifyTarget, *, timeout: float, redactor: Redactor | None = None) -> None:
        _quiet_apprise_log()
        self.target = target
        self.redactor = redactor
        asset = apprise.AppriseAsset(async_mode=False)
        plugin = apprise.Apprise.instantiate(target.expanded_url, asset=asset)
        if plugin is None:  # config.py checked it; the environment can't have changed since
            raise MendloopError(f"notify target {target.name}: Apprise can't use its URL")
        self.timeout = timeout
        plugin.socket_connect_timeout = timeout
        plugin.socket_read_timeout = timeout
        self.apprise = apprise.Apprise(asset=asset)
        self.apprise.add(plugin)

    def send(self, notice: n.Notice) -> str | None:
        """Deliver one notice; None when it was accepted, else why not (redacted, one line)."""
        try:
            result = self.apprise.notify(
                title=notice.title,
                body=notice.body,
                notify_type=_NOTIFY_TYPES[notice.severity],
                timeout=self.timeout * 2 + 1,  # connect and read each, then a grace: a hung plugin can't hold on
                log_level=logging.WARNING,
            )
        except Exception as exc:  # a plugin's bug must not kill the target's thread
            return self.redact(f"{type(exc).__name__}: {exc}")
        if result:
            return None
        for r in result.results:
            if r.status is apprise.AppriseResultStatus.TIMEOUT:
                return f"no answer within {self.timeout * 2 + 1:g} s"
        lines = [e.message for r in result.results for e in r.logs() if str(e.message).strip()]
        return self.redact(str(lines[-1]) if lines else "the notification was not accepted")

    def redact(self, text: str) -> str:
        for secret in sorted({self.target.expanded_url, *self.target.secrets}, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "***")
        if self.redactor is not None:
            text = self.redactor.text(text)
        return " ".join(text.split())[:_MAX_ERROR_CHARS]


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """What `/health` and `mendloop notifications status` show of a target."""

    target: str
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    pending: int = 0
    cursor: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_delivered_at: float | None = None
    next_attempt_at: float | None = None
    delivering: bool = False  # this process holds the target's lease


def status_of(row: CursorRow, pending: int, *, delivering: bool) -> TargetStatus:
    return TargetStatus(
        target=row.target,
        delivered=row.delivered,
        failed=row.failed,
        dropped=row.dropped,
        pending=pending,
        cursor=row.cursor,
        last_error=row.last_error,
        last_error_at=row.last_error_at,
        last_delivered_at=row.last_delivered_at,
        next_attempt_at=row.next_attempt_at,
        delivering=delivering,
    )


def wanted(
    target: NotifyTarget, events: list[EventRecord], public_url: str | None
) -> list[tuple[EventRecord, n.Notice]]:
    """The events of `events` that `target`'s filter passes, with what it is told of each."""
    f = n.NotifyFilter(tuple(target.event_types), tuple(target.components), target.min_severity)
    out = []
    for e in events:
        notice = n.notice(
            event_type=e.type,
            message=e.message,
            component=e.component,
            run_id=e.run_id,
            payload=e.payload,
            public_url=public_url,
        )
        if f.matches(e.type, e.component, notice.severity):
            out.append((e, notice))
    return out


def pending_of(feed: EventFeed, target: NotifyTarget, cursor: int, public_url: str | None) -> int:
    """Events after `cursor` the target wants (at most BATCH)."""
    events, _ = feed.read_after(cursor, limit=BATCH)
    return len(wanted(target, events, public_url))


class Notifier:
    def __init__(
        self,
        db: Database,
        targets: list[NotifyTarget],
        settings: NotifySettings,
        *,
        clock: Callable[[], float],
        redactor: Redactor | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.cursors = NotifyCursors(db)
        self.feed = EventFeed(db)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.channels = [Channel(t, timeout=settings.attempt_timeout_seconds, redactor=redactor) for t in targets]
        self._status: dict[str, TargetStatus] = {t.name: TargetStatus(t.name) for t in targets}
        self._lease_until: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Notifier:
        head = self.feed.head()
        for ch in self.channels:
            self.cursors.ensure(ch.target.name, head)
        for ch in self.channels:
            thread = threading.Thread(
                target=self._loop, args=(ch,), name=f"mendloop-notify-{ch.target.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            # An attempt in flight ends within its timeout; a daemon thread past that is not waited for.
            thread.join(self.settings.attempt_timeout_seconds + 2)
        self._threads = []
        for ch in self.channels:
            if ch.target.name in self._lease_until:
                try:
                    self.cursors.release(ch.target.name, self.owner)
                except MendloopError as exc:
                    log.warning("notify %s: could not release its lease: %s", ch.target.name, exc.message)

    def snapshot(self) -> dict[str, TargetStatus]:
        return dict(self._status)

    def _loop(self, ch: Channel) -> None:
        while not self._stop.is_set():
            try:
                self.round(ch)
            except MendloopError as exc:  # the database is down: try again next round
                log.warning("notify %s: %s", ch.target.name, exc.message)
            except Exception:  # a target's thread must never die: its notifications would stop silently
                log.exception("notify %s: the round raised", ch.target.name)
            self._stop.wait(self.settings.poll_interval_seconds)

    def _hold(self, name: str, now: float) -> bool:
        """Whether this process delivers `name` now: its lease, renewed when half of it has run."""
        lease = self.settings.lease_seconds
        if self._lease_until.get(name, 0.0) - now > lease / 2:
            return True
        if self.cursors.claim(name, self.owner, now=now, lease_seconds=lease):
            self._lease_until[name] = now + lease
            return True
        self._lease_until.pop(name, None)
        return False

    def round(self, ch: Channel) -> None:
        """One round for one target: what is pending, and the deliveries that are due."""
        name = ch.target.name
        public_url = self.settings.public_url
        now = self.clock()
        holding = self._hold(name, now)
        row = self.cursors.get(name)
        if row is None:  # removed by hand meanwhile: start again from now
            self.cursors.ensure(name, self.feed.head())
            return
        events, next_cursor = self.feed.read_after(row.cursor, limit=BATCH)
        todo = wanted(ch.target, events, public_url)
        self._status[name] = status_of(row, len(todo), delivering=holding)
        if not holding or (row.next_attempt_at is not None and now < row.next_attempt_at):
            return
        failures = row.failures
        for i, (event, notice) in enumerate(todo):
            if self._stop.is_set():
                return
            error = ch.send(notice)
            now = self.clock()
            if error is None:
                if not self.cursors.delivered(name, self.owner, event.id, now=now):
                    return self._lost(name)
                failures = 0
            else:
                failures += 1
                retry = n.after_failure(
                    failures,
                    max_attempts=self.settings.max_attempts,
                    now=now,
                    base=self.settings.retry_base_seconds,
                    maximum=self.settings.retry_max_seconds,
                )
                if not self.cursors.failed(
                    name,
                    self.owner,
                    event.id,
                    failures=failures,
                    give_up=retry.give_up,
                    next_at=retry.next_at,
                    error=error,
                    now=now,
                ):
                    return self._lost(name)
                log.warning(
                    "notify %s: event %d: %s (%s)",
                    name,
                    event.id,
                    error,
                    "dropped" if retry.give_up else f"attempt {failures}, again in {retry.next_at - now:.1f} s",
                )
                if not retry.give_up:
                    self._refresh(name, len(todo) - i)
                    return
        if next_cursor > row.cursor and not self.cursors.advance(name, self.owner, next_cursor, now=self.clock()):
            return self._lost(name)
        self._refresh(name, 0)

    def _refresh(self, name: str, pending: int) -> None:
        row = self.cursors.get(name)
        if row is not None:
            self._status[name] = status_of(row, pending, delivering=name in self._lease_until)

    def _lost(self, name: str) -> None:
        log.warning("notify %s: another process took over its lease", name)
        self._lease_until.pop(name, None)
