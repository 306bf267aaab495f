"""`mendloop watch`: the configured watchers on a host that is not the server, shipping what they detect to
`POST {url}/events` in batches.

Nothing is lost and nothing is counted twice:

- a batch's events are written to the spool (one JSON file, fsynced, renamed into place) before the tailer's
  checkpoint moves past its lines; the spool entry also records that checkpoint, so a crash between the two is
  recovered at the next start;
- an entry leaves the spool only after the server answered 2xx; while the server is unreachable entries pile up
  and are sent, oldest first, once it is back;
- every event carries an `event_id` derived from where it was read (host, watcher, file, identity, offsets), so an
  entry sent again after a timeout whose answer never arrived is a no-op on the server;
- identical detections of one batch are sent as one event with a `count`, so a storm is a handful of requests and
  every line still counts on its incident.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mendloop.config import Settings
from mendloop.domain.checkpoints import Checkpoint
from mendloop.errors import ConfigError
from mendloop.intake.logs import LogIntake
from mendloop.intake.offsets import JsonFileOffsetStore, OffsetStore, checkpoint_json, checkpoint_of_json
from mendloop.intake.service import aggregate
from mendloop.intake.watcher import Batch, Sink, WatcherStats, WatchPipeline, supervise

log = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 10_000  # what POST /events takes in one body
# Bytes of events per request: well under the server's `limits.max_intake_body_bytes` (32 MiB by default), now
# that each event carries the log lines around it (a 413 would move the entry to `rejected/` for good).
MAX_BATCH_BYTES = 8 << 20
_PERMANENT = (400, 404, 405, 413, 415, 422)  # the server will never take this body: retrying cannot help


class CachedOffsetStore:
    """Skips a save identical to the last one: an idle forwarder does not rewrite and fsync its offsets file every
    second."""

    def __init__(self, inner: OffsetStore) -> None:
        self.inner = inner
        self._saved: dict[str, list[tuple[str, int, int, str, int]]] = {}

    def load(self, watcher: str) -> dict[str, Checkpoint]:
        out = self.inner.load(watcher)
        self._saved[watcher] = sorted(c.key() for c in out.values())
        return out

    def save(self, watcher: str, checkpoints: Iterable[Checkpoint]) -> None:
        cps = list(checkpoints)
        keys = sorted(c.key() for c in cps)
        if self._saved.get(watcher) == keys:
            return
        self._saved.pop(watcher, None)
        self.inner.save(watcher, cps)
        self._saved[watcher] = keys


@dataclass(frozen=True)
class SpoolEntry:
    path: Path
    seq: int
    watcher: str
    events: list[dict[str, Any]]
    checkpoints: list[Checkpoint]


class Spool:
    """Batches of events waiting for the server, one file each (`outbox/<seq>.json`), oldest first; entries the
    server refused for good go to `rejected/`. One process per directory (a lock file makes sure)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.root = Path(directory)
        self.dir = self.root / "outbox"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rejected = self.root / "rejected"
        self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            raise ConfigError(f"the spool {self.root} is in use by another `mendloop watch`") from e
        entries = self._names()
        self._next = (max(seq for seq, _ in entries) + 1) if entries else 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def _names(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.dir.glob("*.json"):
            stem = p.stem
            if stem.isdigit():
                out.append((int(stem), p))
        out.sort()
        return out

    def put(self, watcher: str, events: list[dict[str, Any]], checkpoints: Sequence[Checkpoint]) -> Path:
        """Durably: on disk (file and directory entry fsynced) when this returns."""
        seq = self._next
        self._next += 1
        body = {
            "version": 1,
            "seq": seq,
            "created_at": time.time(),
            "watcher": watcher,
            "events": events,
            "checkpoints": [checkpoint_json(c) for c in checkpoints],
        }
        final = self.dir / f"{seq:012d}.json"
        fd, tmp = tempfile.mkstemp(prefix=".spool.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(body, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fsync_dir()
        return final

    def pending(self) -> list[Path]:
        return [p for _, p in self._names()]

    def read(self, path: Path) -> SpoolEntry | None:
        """The entry, or None if it is unreadable (then it is moved aside, never silently deleted)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return SpoolEntry(
                path=path,
                seq=int(data["seq"]),
                watcher=str(data["watcher"]),
                events=list(data["events"]),
                checkpoints=[checkpoint_of_json(c) for c in data.get("checkpoints") or []],
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("spool entry %s is unreadable (%s); moved to %s", path, e, self.rejected)
            self.reject(path)
            return None

    def remove(self, paths: Iterable[Path]) -> None:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._fsync_dir()

    def reject(self, path: Path) -> None:
        self.rejected.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, self.rejected / path.name)

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class ForwarderStats:
    spooled: int = 0  # events written to the spool
    sent: int = 0  # events the server took (2xx)
    requests: int = 0
    failures: int = 0
    rejected: int = 0


class Forwarder:
    """Runs every watcher of `settings` and ships their events to `url`."""

    def __init__(
        self,
        settings: Settings,
        *,
        url: str,
        spool_dir: str | os.PathLike[str],
        token: str | None = None,
        host: str | None = None,
        use_inotify: bool = True,
        group_timeout: float = 0.5,
        poll_interval: float = 0.25,
        send_timeout: float = 10.0,
        retry_max: float = 5.0,
        drain_seconds: float = 5.0,
    ) -> None:
        if not settings.watchers:
            raise ConfigError("no watchers: the config has no `watchers:` for `mendloop watch` to run")
        self.settings = settings
        self.url = url.rstrip("/")
        self.token = token
        self.host = host or socket.gethostname()
        self.use_inotify = use_inotify
        self.group_timeout = group_timeout
        self.poll_interval = poll_interval
        self.send_timeout = send_timeout
        self.retry_max = retry_max
        self.drain_seconds = drain_seconds
        self.spool = Spool(spool_dir)
        self.offsets = CachedOffsetStore(JsonFileOffsetStore(self.spool.root / "offsets.json"))
        self.log_intake = LogIntake(settings)
        self.stats = ForwarderStats()
        self.watcher_stats: dict[str, WatcherStats] = {w.name: WatcherStats() for w in settings.watchers}
        self._spooled: asyncio.Event | None = None
        self._watchers_done = False
        self._failing_since: float | None = None
        self._last_warning = 0.0

    # -- recovery --------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """A crash between a spool write and the checkpoint save leaves the entry's checkpoint newer than the saved
        one: adopt it, so those lines are not read (and sent) again."""
        latest: dict[str, SpoolEntry] = {}
        for path in self.spool.pending():
            entry = self.spool.read(path)
            if entry is not None and entry.checkpoints:
                latest[entry.watcher] = entry  # pending() is oldest first: the last one wins
        for watcher, entry in latest.items():
            stored = self.offsets.load(watcher)
            merged = dict(stored)
            changed = False
            for cp in entry.checkpoints:
                old = stored.get(cp.path)
                same_file = old is not None and (old.identity.dev, old.identity.inode) == (
                    cp.identity.dev,
                    cp.identity.inode,
                )
                if old is None or (same_file and cp.offset > old.offset):
                    merged[cp.path] = cp
                    changed = True
            if changed:
                log.info("watcher %s: checkpoint recovered from spool entry %s", watcher, entry.path.name)
                self.offsets.save(watcher, merged.values())

    # -- running ---------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._spooled = asyncio.Event()
        self._watchers_done = False
        self.recover()
        pipelines = {w.name: self.pipeline(w.name) for w in self.settings.watchers}
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with httpx.AsyncClient(timeout=self.send_timeout, headers=headers, trust_env=False) as client:
            sender = asyncio.create_task(self._send_loop(client, stop))
            try:
                await asyncio.gather(
                    *(
                        supervise(name, p, functools.partial(self.pipeline, name), stop, self.watcher_stats[name])
                        for name, p in pipelines.items()
                    )
                )
            finally:
                # The sender outlives the watchers, to ship what they handed over while stopping.
                self._watchers_done = True
                self._spooled.set()
                await sender

    def pipeline(self, name: str) -> WatchPipeline:
        config = next(w for w in self.settings.watchers if w.name == name)
        return WatchPipeline(
            config,
            log_intake=self.log_intake,
            offsets=self.offsets,
            sink=self._sink(name),
            group_timeout=self.group_timeout,
            poll_interval=self.poll_interval,
            use_inotify=self.use_inotify,
            retry_max=self.retry_max,
            stats=self.watcher_stats[name],
        )

    def _sink(self, watcher: str) -> Sink:
        def take(batch: Batch) -> None:
            events = self.events_of(batch)
            if events:
                for chunk in _chunks(events):
                    self.spool.put(watcher, chunk, batch.checkpoints)
                self.stats.spooled += len(events)
                # The entry is durable: now the checkpoint may pass its lines.
                self.offsets.save(watcher, batch.checkpoints)
                if self._spooled is not None:
                    self._spooled.set()

        return take

    def events_of(self, batch: Batch) -> list[dict[str, Any]]:
        identity = {c.path: c.identity for c in batch.checkpoints}
        events: list[dict[str, Any]] = []
        for path, found in batch.detections.items():
            ident = identity.get(path)
            start, end = batch.spans[path]
            where = f"{self.host}\0{batch.watcher}\0{path}\0{ident.dev if ident else ''}\0"
            where += f"{ident.inode if ident else ''}\0{start}\0{end}"
            for i, d in enumerate(aggregate(found)):
                digest = hashlib.sha1(
                    f"{where}\0{i}\0{d.fingerprint}\0{d.count}".encode(), usedforsecurity=False
                ).hexdigest()
                events.append(
                    {
                        "event_type": d.event_type,
                        "source": d.source[:200],
                        "message": d.message[:4000],
                        "component": d.component,
                        "payload": {**d.payload, "severity": d.severity, "host": self.host},
                        "fingerprint": d.fingerprint,
                        "count": d.count,
                        "event_id": f"fwd-{digest}",
                    }
                )
        return events

    async def _send_loop(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        assert self._spooled is not None
        delay = 0.2
        drain_until: float | None = None
        while True:
            if self._watchers_done and drain_until is None:
                drain_until = time.monotonic() + self.drain_seconds
            entries = self._next_entries()
            if not entries:
                if self._watchers_done:
                    return
                self._spooled.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._spooled.wait(), 1.0)
                continue
            if drain_until is not None and time.monotonic() > drain_until:
                log.warning("stopping with %d spool entries not sent; they are sent at the next start", len(entries))
                return
            ok = await self._send(client, entries)
            if ok:
                delay = 0.2
                continue
            if drain_until is not None:
                return  # stopping and the server is away: the spool keeps them
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, self.retry_max)

    def _next_entries(self) -> list[SpoolEntry]:
        out: list[SpoolEntry] = []
        total = size = 0
        for path in self.spool.pending():
            entry = self.spool.read(path)
            if entry is None:
                continue
            with contextlib.suppress(OSError):
                size += path.stat().st_size
            if out and (total + len(entry.events) > MAX_BATCH_EVENTS or size > MAX_BATCH_BYTES):
                break
            out.append(entry)
            total += len(entry.events)
        return out

    async def _send(self, client: httpx.AsyncClient, entries: list[SpoolEntry]) -> bool:
        events = [e for entry in entries for e in entry.events]
        self.stats.requests += 1
        try:
            resp = await client.post(f"{self.url}/events", json={"events": events})
        except httpx.HTTPError as e:
            self._failed(f"cannot reach {self.url} ({e})")
            return False
        if 200 <= resp.status_code < 300:
            self.spool.remove(e.path for e in entries)
            self.stats.sent += len(events)
            if self._failing_since is not None:
                log.info("%s is back after %.1f s; sending the spool", self.url, time.monotonic() - self._failing_since)
                self._failing_since = None
            return True
        if resp.status_code in _PERMANENT:
            self.stats.failures += 1
            if len(entries) > 1:
                # One bad entry must not hold the others back: send them one at a time to find it.
                for entry in entries:
                    if not await self._send(client, [entry]):
                        return False
                return True
            log.error(
                "%s refused spool entry %s for good (%d: %s); moved to %s",
                self.url,
                entries[0].path.name,
                resp.status_code,
                resp.text[:300],
                self.spool.rejected,
            )
            self.spool.reject(entries[0].path)
            self.stats.rejected += len(events)
            return True
        self._failed(f"{self.url} answered {resp.status_code}: {resp.text[:300]}")
        return False

    def _failed(self, why: str) -> None:
        """Said once when the server goes away, then every 30 s while it stays away."""
        self.stats.failures += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._last_warning < 30:
            log.debug("%s", why)
            return
        self._last_warning = now
        log.warning("%s; %d spool entries wait, retrying", why, len(self.spool.pending()))

    def close(self) -> None:
        self.spool.close()


def _chunks(events: list[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    """Spool entries of at most MAX_BATCH_EVENTS events and about MAX_BATCH_BYTES bytes (one event may be more)."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for event in events:
        n = len(json.dumps(event, separators=(",", ":")))
        if chunk and (len(chunk) >= MAX_BATCH_EVENTS or size + n > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(event)
        size += n
    if chunk:
        yield chunk


def run_forwarder(forwarder: Forwarder, *, install_signals: bool = True) -> None:
    """Run until SIGTERM or SIGINT (or until the loop is stopped), then hand over and checkpoint."""

    # A line per inotify change and per request would drown what matters.
    for noisy in ("watchfiles", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).getEffectiveLevel()))

    async def main() -> None:
        stop = asyncio.Event()
        if install_signals:
            import signal

            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        await forwarder.run(stop)

    try:
        asyncio.run(main())
    finally:
        forwarder.close()
