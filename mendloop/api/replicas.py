"""`serve --processes N`: one listening socket, answered by N processes.

The primary (the process `serve` started) runs the whole App: its workers, watchers, notifier and agent runner,
and the API. It binds the socket and starts N-1 replicas, API-only processes of the same settings that inherit the
socket, so the kernel hands each new connection to whichever process is free to accept it. Everything they serve
is read from and written to the database, so any of them answers the same; what only the primary knows reaches
the replicas through three channels it makes and they inherit:

- a report file, rewritten every `REPORT_SECONDS`: the primary's workers, watchers, notifications and processes,
  so /health and /metrics say the same whichever process answers;
- a wake pipe: an event a replica takes in wakes the primary's workers at once, not after their poll interval;
- an alive pipe, never written: when the primary dies (a `kill -9` included) it closes, and each replica shuts
  down and lets go of the socket.

A replica that has started serving says so with a file of the same directory named by its pid, so /health, from
whichever process, tells the processes configured from those accepting connections now.

The HTTP figures of /metrics are summed over the processes by prometheus_client's multiprocess mode, in a folder
of the same private directory. A replica that dies is started again (after a backoff while it keeps dying);
SIGTERM to the primary stops every process gracefully.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from mendloop.api import metrics
from mendloop.api.server import create_api, uvicorn_config
from mendloop.app import App, ProcessParts
from mendloop.config import Settings
from mendloop.engine.notifier import TargetStatus
from mendloop.intake.watcher import WatcherStats

log = logging.getLogger(__name__)

REPORT_SECONDS = 0.5
# A report older than this is stale: the primary is stopped or wedged, and a replica's /health says so (503).
STALE_SECONDS = 5.0
# A replica that dies is started again after this long, doubling while it keeps dying young, up to the cap.
RESTART_BACKOFF = (1.0, 30.0)
# A replica that lived this long before it died starts again after the shortest backoff.
SETTLED_SECONDS = 60.0
STOP_GRACE_SECONDS = 30.0


def encode(parts: ProcessParts) -> bytes:
    return json.dumps(dataclasses.asdict(parts)).encode()


def decode(raw: bytes) -> ProcessParts:
    data: dict[str, Any] = json.loads(raw)
    return ProcessParts(
        workers=int(data["workers"]),
        watchers={name: WatcherStats(**st) for name, st in data["watchers"].items()},
        notifications={name: TargetStatus(**st) for name, st in data["notifications"].items()},
        processes=int(data["processes"]),
        restarts=int(data["restarts"]),
        serving=int(data["serving"]),
    )


def serving_marker(folder: Path, pid: int) -> Path:
    """The file a replica of pid `pid` writes in the private directory once its server accepts connections."""
    return folder / f"serving-{pid}"


def serving_count(folder: Path) -> int:
    """The processes accepting connections: the primary, and each replica whose marker is in `folder`. A replica
    removes its marker as it shuts down; the primary removes a killed one's as soon as it has reaped it."""
    return 1 + sum(1 for _ in folder.glob("serving-*"))


@dataclass(frozen=True, slots=True)
class Channels:
    """The file descriptors and paths a replica inherits, in its command line."""

    listen_fd: int
    alive_fd: int
    wake_fd: int
    report: Path

    def as_arg(self) -> str:
        return f"{self.listen_fd},{self.alive_fd},{self.wake_fd},{self.report}"

    @classmethod
    def parse(cls, text: str) -> Channels:
        listen, alive, wake, report = text.split(",", 3)
        return cls(int(listen), int(alive), int(wake), Path(report))


class Replicas:
    """The primary's side: it starts and restarts the replicas, publishes its report, and wakes its workers when
    a replica asks. It is the primary App's `link`."""

    replica = False

    def __init__(self, app: App, count: int, argv: Sequence[str]) -> None:
        """`argv`: the command that starts a replica, to which `--channels` is added. Made before the API is: the
        HTTP figures of every process go to files of its private directory from the first request on."""
        self.app = app
        self.count = count
        self.argv = list(argv)
        self.dir = Path(tempfile.mkdtemp(prefix="mendloop-serve-"))  # 0700: the report names notify targets
        self.metrics_dir = self.dir / "metrics"
        self.metrics_dir.mkdir()
        metrics.share_across_processes(self.metrics_dir)
        self.sock: socket.socket | None = None
        self.report = self.dir / "report.json"
        self._alive_r, self._alive_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts = 0
        self._threads: list[threading.Thread] = []

    # ProcessLink
    def wake(self) -> None:
        pass  # the primary's own workers were woken by App._wake

    def parts(self, own: ProcessParts) -> ProcessParts:
        return own.counted(self.count + 1, self.restarts, serving_count(self.dir))

    def serve(self, config: uvicorn.Config) -> bool:
        """Bind the socket, start the replicas, and serve on it here too until SIGTERM (or SIGINT); then stop
        them. Whether this process's server started."""
        server = _PrimaryServer(config, self)
        try:
            self.sock = config.bind_socket()
            server.run(sockets=[self.sock])
        finally:
            self.stop()
            if self.sock is not None:
                self.sock.close()
        return server.started

    def start(self) -> Replicas:
        self._publish()  # a replica that answers before the first round finds a report
        for slot in range(self.count):
            self._spawn(slot)
        for name, target in (("report", self._report_loop), ("wake", self._wake_loop)):
            th = threading.Thread(target=target, name=f"mendloop-replicas-{name}", daemon=True)
            th.start()
            self._threads.append(th)
        for slot in range(self.count):
            th = threading.Thread(target=self._watch, args=(slot,), name=f"mendloop-replica-{slot}", daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs.values()]

    def signal_stop(self) -> None:
        """Ask every replica to stop now (SIGTERM: a graceful shutdown of its server), and start none again."""
        self._stop.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_GRACE_SECONDS) -> None:
        """Stop every replica (SIGKILL after `timeout`), then remove the private directory."""
        self.signal_stop()
        deadline = time.monotonic() + timeout
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("replica %d did not stop within %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        try:
            os.write(self._wake_w, b"x")  # lets the wake thread see the stop
        except BlockingIOError:
            pass  # full: the thread has bytes to read, and sees the stop after them
        for th in self._threads:
            th.join(5)
        for fd in (self._alive_r, self._alive_w, self._wake_r, self._wake_w):
            os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, slot: int) -> None:
        assert self.sock is not None
        channels = Channels(self.sock.fileno(), self._alive_r, self._wake_w, self.report)
        proc = subprocess.Popen(
            [*self.argv, "--channels", channels.as_arg()],
            pass_fds=(channels.listen_fd, channels.alive_fd, channels.wake_fd),
            stdin=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches the primary, which stops the replicas in order.
            start_new_session=True,
        )
        with self._lock:
            self._procs[slot] = proc
        log.info("replica %d started (pid %d)", slot, proc.pid)

    def _watch(self, slot: int) -> None:
        backoff = RESTART_BACKOFF[0]
        while not self._stop.is_set():
            with self._lock:
                proc = self._procs[slot]
            born = time.monotonic()
            code = proc.wait()
            serving_marker(self.dir, proc.pid).unlink(missing_ok=True)  # a later process may get its pid
            if self._stop.is_set():
                return
            if time.monotonic() - born >= SETTLED_SECONDS:
                backoff = RESTART_BACKOFF[0]
            log.warning("replica %d (pid %d) exited with %s; starting it in %.0f s", slot, proc.pid, code, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, RESTART_BACKOFF[1])
            with self._lock:
                self.restarts += 1
            self._spawn(slot)

    def _publish(self) -> None:
        tmp = self.report.with_suffix(".tmp")
        tmp.write_bytes(encode(self.app.parts()))
        os.replace(tmp, self.report)  # a replica never reads half a report

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_SECONDS):
            try:
                self._publish()
            except Exception:  # a full disk must not stop the primary; the replicas' /health says stale
                log.exception("could not write the replicas' report")

    def _wake_loop(self) -> None:
        while True:
            try:
                os.read(self._wake_r, 512)  # blocks until a replica (or stop) writes
            except OSError:
                return
            if self._stop.is_set():
                return
            self.app.workers.notify()


class ReplicaLink:
    """A replica's side: the primary's report for /health and /metrics, and its wake pipe."""

    replica = True

    def __init__(self, channels: Channels, clock: Any = time.time) -> None:
        self.channels = channels
        self.clock = clock
        self._seen: tuple[int, ProcessParts] | None = None

    def wake(self) -> None:
        try:
            os.write(self.channels.wake_fd, b"w")
        except BlockingIOError:
            pass  # the pipe is full of wakes the primary has yet to read: this one adds nothing
        except OSError:
            log.warning("the primary's wake pipe is closed")

    def parts(self, own: ProcessParts) -> ProcessParts:
        # Counted here and now, as the primary counts it, not read from a report up to REPORT_SECONDS old: a
        # client told by one process that every process serves is told so by the next.
        return dataclasses.replace(self._reported(own), serving=serving_count(self.channels.report.parent))

    def _reported(self, own: ProcessParts) -> ProcessParts:
        try:
            st = os.stat(self.channels.report)
        except OSError:
            return dataclasses.replace(own, stale="no report from the primary yet")
        if self._seen is None or self._seen[0] != st.st_mtime_ns:
            try:
                self._seen = (st.st_mtime_ns, decode(self.channels.report.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError):
                return dataclasses.replace(own, stale="the primary's report can't be read")
        parts = self._seen[1]
        age = self.clock() - st.st_mtime
        if age > STALE_SECONDS:
            return dataclasses.replace(parts, stale=f"no report from the primary for {age:.0f} s")
        return parts

    def serving(self, now: bool) -> None:
        """Whether this replica's server accepts connections now: the primary learns it from its private
        directory."""
        marker = serving_marker(self.channels.report.parent, os.getpid())
        try:
            if now:
                marker.touch()
            else:
                marker.unlink(missing_ok=True)
        except OSError as exc:  # the primary is gone with its directory; this replica is stopping too
            log.warning("could not tell the primary whether this replica serves: %s", exc)

    def watch_primary(self, server: uvicorn.Server) -> threading.Thread:
        """When the primary dies its end of the alive pipe closes: shut this server down (gracefully)."""

        def wait() -> None:
            try:
                os.read(self.channels.alive_fd, 1)
            except OSError:
                pass
            if not server.should_exit:
                log.warning("the primary process is gone; stopping")
                server.should_exit = True
                # A primary that was killed could not remove its private directory; its replicas can.
                shutil.rmtree(self.channels.report.parent, ignore_errors=True)

        th = threading.Thread(target=wait, name="mendloop-replica-alive", daemon=True)
        th.start()
        return th


class _PrimaryServer(uvicorn.Server):
    """The primary's server: the signal that stops it stops the replicas at the same time, so none of them goes on
    accepting connections on the socket while the primary shuts down."""

    def __init__(self, config: uvicorn.Config, replicas: Replicas) -> None:
        super().__init__(config)
        self.replicas = replicas

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # After the App opened (the lifespan's startup): the report needs its workers, and a replica must not
        # open the database before the primary has upgraded it.
        await super().startup(sockets)
        if not self.should_exit:
            self.replicas.start()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.replicas.signal_stop()
        super().handle_exit(sig, frame)


class _ReplicaServer(uvicorn.Server):
    """A replica's server: once it accepts connections on the inherited socket, the primary is told."""

    def __init__(self, config: uvicorn.Config, link: ReplicaLink) -> None:
        super().__init__(config)
        self.link = link

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.link.serving(True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.link.serving(False)  # it stops accepting first
        await super().shutdown(sockets)


def replica_command(argv: Sequence[str]) -> list[str]:
    """The command line that starts a replica: this Python, the CLI's hidden `serve-replica`, `argv`."""
    return [sys.executable, "-m", "mendloop", "serve-replica", *argv]


def run_replica(settings: Settings, channels: Channels, log_level: str) -> bool:
    """A replica's life: the API on the inherited socket until SIGTERM or the primary's end. Whether it started."""
    link = ReplicaLink(channels)
    api = create_api(App(settings, link=link))
    server = _ReplicaServer(uvicorn_config(api, settings, log_level=log_level), link)
    sock = socket.socket(fileno=channels.listen_fd)
    link.watch_primary(server)
    # As in `serve`: uvicorn raises SIGTERM again after its graceful shutdown; by then there is nothing left to do.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    return server.started
