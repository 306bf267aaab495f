"""Prometheus metrics: a registry per API, its collectors, and the middleware that counts HTTP requests.

Two kinds of figure, told apart by name:

- `mendloop_*`: read from the database at scrape time (`storage/metrics.py`), so the work of every process counts
  (a `mendloop worker` on another machine included), and any replica of `serve` answers the same.
- `mendloop_process_*`: the figures of the `serve` that answers (its log watchers, its HTTP requests). They
  restart from zero with it; sum them over the servers Prometheus scrapes. With `serve --processes N` they are
  already summed over its N processes (prometheus_client's multiprocess mode, in files the processes share), and
  the watchers' figures come from the process that runs them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mendloop.app import App
from mendloop.domain.stats import ended_and_escalated
from mendloop.storage import metrics as m
from mendloop.storage.notify_cursor import NotifyCursors
from mendloop.storage.watcher_offsets import DbOffsetStore

_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _histogram(name: str, doc: str, label: str, values: dict[str, m.Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, h in sorted(values.items()):
        buckets: list[tuple[str, float]] = [
            (repr(float(b)), n) for b, n in zip(m.DURATION_BUCKETS, h.buckets, strict=True)
        ]
        buckets.append(("+Inf", h.count))
        family.add_metric([value], buckets, h.sum)
    return family


class DatabaseCollector(Collector):
    """The database's aggregates, queried once per scrape, in one read transaction."""

    def __init__(self, app: App) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []  # nothing at registration: the database is read only when scraped

    def collect(self) -> Iterator[Metric]:
        s = m.MetricsQueries(self.app.store.db).snapshot(self.app.clock())
        events = CounterMetricFamily("mendloop_events", "Events stored, by type and source.", labels=["type", "source"])
        for (ty, src), n in sorted(s.events.items()):
            events.add_metric([ty, src], n)
        yield events
        incidents = GaugeMetricFamily(
            "mendloop_incidents_open", "Incidents open now, by component ('' for none).", labels=["component"]
        )
        for component, n in sorted(s.incidents_open.items()):
            incidents.add_metric([component], n)
        yield incidents
        runs = CounterMetricFamily(
            "mendloop_runs",
            "Runs that ended, by playbook and final status (completed, failed, needs_human, cancelled, dry_run).",
            labels=["playbook", "status"],
        )
        active = GaugeMetricFamily(
            "mendloop_runs_active",
            "Runs not yet ended, by playbook and status (queued, running, verifying, awaiting_patch, "
            "awaiting_approval).",
            labels=["playbook", "status"],
        )
        # Ended runs and escalations come from the statistics' aggregates, not from counting the runs table:
        # retention deletes old runs, and a counter must never go down.
        ended, escalated = ended_and_escalated(s.aggregates)
        for (playbook, status), n in sorted(ended.items()):
            runs.add_metric([playbook, status], n)
        for (playbook, status), n in sorted(s.runs.items()):
            active.add_metric([playbook, status], n)
        yield runs
        yield active
        escalations = CounterMetricFamily(
            "mendloop_escalations",
            "Runs that escalated to a coding agent (a work order), by playbook.",
            labels=["playbook"],
        )
        for playbook, n in sorted(escalated.items()):
            escalations.add_metric([playbook], n)
        yield escalations
        yield _histogram(
            "mendloop_run_duration_seconds",
            "Runs from creation to their end, by final status.",
            "status",
            s.run_seconds,
        )
        yield _histogram(
            "mendloop_step_duration_seconds", "Steps from start to finish, by action.", "action", s.step_seconds
        )
        work_orders = GaugeMetricFamily("mendloop_work_orders", "Work orders, by status.", labels=["status"])
        for status, n in sorted(s.work_orders.items()):
            work_orders.add_metric([status], n)
        yield work_orders
        yield _histogram(
            "mendloop_patch_duration_seconds",
            "Completed work orders, from creation to completion by the coding agent.",
            "kind",
            {"coding": s.patch_seconds},
        )
        trust = GaugeMetricFamily(
            "mendloop_trust_score",
            f"Trust score per component (at most {m.MAX_LABEL_VALUES}: the least trusted).",
            labels=["component"],
        )
        for component, score in sorted(s.trust.items()):
            trust.add_metric([component], score)
        yield trust
        yield GaugeMetricFamily("mendloop_trust_components", "Components with a trust score.", value=s.trust_components)
        queue = GaugeMetricFamily(
            "mendloop_queue_depth",
            "Queued runs: due (a worker may take them now) or waiting (a backoff or a sleep).",
            labels=["state"],
        )
        queue.add_metric(["due"], s.queue_due)
        queue.add_metric(["waiting"], s.queue_waiting)
        yield queue


class NotifyCollector(Collector):
    """Notification deliveries per target, from `notify_cursors` at scrape time: every process's deliveries."""

    def __init__(self, app: App) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        delivered = CounterMetricFamily(
            "mendloop_notifications_delivered", "Notifications delivered, by target.", labels=["target"]
        )
        failed = CounterMetricFamily(
            "mendloop_notifications_failed",
            "Failed notification attempts (each retry counts), by target.",
            labels=["target"],
        )
        dropped = CounterMetricFamily(
            "mendloop_notifications_dropped",
            "Notifications given up after notify_settings.max_attempts, by target.",
            labels=["target"],
        )
        for row in NotifyCursors(self.app.store.db).all():
            delivered.add_metric([row.target], row.delivered)
            failed.add_metric([row.target], row.failed)
            dropped.add_metric([row.target], row.dropped)
        yield from (delivered, failed, dropped)


class WatcherCollector(Collector):
    """The log watchers `serve` runs (in its first process): what they read, and how far behind the files they
    are."""

    def __init__(self, app: App) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.app.parts().watchers
        lines = CounterMetricFamily(
            "mendloop_process_watcher_lines", "Log lines read by this process's watcher.", labels=["watcher"]
        )
        detections = CounterMetricFamily(
            "mendloop_process_watcher_detections", "Detections made by this process's watcher.", labels=["watcher"]
        )
        errors = CounterMetricFamily(
            "mendloop_process_watcher_errors", "Errors of this process's watcher (it restarts).", labels=["watcher"]
        )
        files = GaugeMetricFamily("mendloop_process_watcher_files", "Files followed now.", labels=["watcher"])
        read = GaugeMetricFamily(
            "mendloop_process_watcher_read_bytes",
            "Bytes of the followed files read and checkpointed (the checkpoints' offsets, summed).",
            labels=["watcher"],
        )
        lag = GaugeMetricFamily(
            "mendloop_process_watcher_lag_bytes",
            "Bytes written to the followed files and not yet read and checkpointed.",
            labels=["watcher"],
        )
        offsets = DbOffsetStore(self.app.store)
        for name, st in sorted(stats.items()):
            lines.add_metric([name], st.lines)
            detections.add_metric([name], st.detections)
            errors.add_metric([name], st.errors)
            files.add_metric([name], st.files)
            done, behind = _progress(offsets, name)
            read.add_metric([name], done)
            lag.add_metric([name], behind)
        yield from (lines, detections, errors, files, read, lag)


def _progress(offsets: DbOffsetStore, watcher: str) -> tuple[int, int]:
    """(bytes checkpointed, bytes on disk past the checkpoint) over a watcher's checkpointed files. A file now at
    the path that is not the one checkpointed (rotated, replaced) is behind by its whole size."""
    done = behind = 0
    for path, cp in offsets.load(watcher).items():
        try:
            st = os.stat(path)
        except OSError:
            continue  # gone: nothing left to read there
        same = (st.st_dev, st.st_ino) == (cp.identity.dev, cp.identity.inode)
        done += cp.offset if same else 0
        behind += max(0, st.st_size - cp.offset) if same else st.st_size
    return done, behind


# A request mendloop makes of its own API in process (an MCP tool calling the REST route it stands for) is counted
# once, as the /mcp request that made it, not a second time as the call. A scope key: no client can set one.
_UNCOUNTED = "mendloop.uncounted"


def uncounted(app: ASGIApp) -> ASGIApp:
    """`app` for calls the HTTP figures leave out (`_UNCOUNTED`)."""

    async def call(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, _UNCOUNTED: True}, receive, send)

    return call


class HttpMetrics:
    """Counts every request this process answers, by method, route template (never the raw path: ids would make
    a series each) and status, and times it; not its calls of itself (`uncounted`)."""

    def __init__(self, app: ASGIApp, requests: Counter, seconds: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get(_UNCOUNTED):
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes every handler
        started = time.perf_counter()

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope["method"])
            self.requests.labels(method, template, str(status)).inc()
            self.seconds.labels(method, template).observe(time.perf_counter() - started)


_SHARED_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_across_processes(folder: Path) -> None:
    """From now on this process's counters and histograms live in files of `folder` (prometheus_client's
    multiprocess mode), which the processes it starts inherit (the environment variable), so that any of them
    exposes the sum. For `serve --processes N` only: it is the whole process's choice."""
    os.environ[_SHARED_ENV] = str(folder)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # chosen at import time


def registry_for(app: App) -> tuple[CollectorRegistry, Counter, Histogram]:
    """A registry of its own per API (never the process-global one: tests build many APIs in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(app))
    registry.register(WatcherCollector(app))
    registry.register(NotifyCollector(app))
    shared = os.environ.get(_SHARED_ENV)
    if shared:
        # The HTTP figures are exposed by the files' sum over the processes, not by this process's objects.
        MultiProcessCollector(registry, path=shared)  # type: ignore[no-untyped-call]
    own = None if shared else registry
    requests = Counter(
        "mendloop_process_http_requests",
        "HTTP requests this server answered, by method, route and status.",
        ["method", "route", "status"],
        registry=own,
    )
    seconds = Histogram(
        "mendloop_process_http_request_duration_seconds",
        "Time this server took to answer HTTP requests, by method and route.",
        ["method", "route"],
        buckets=_HTTP_BUCKETS,
        registry=own,
    )
    return registry, requests, seconds
