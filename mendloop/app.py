"""Builds every part from settings and owns their lifetimes. The API, the worker, the CLI and the tests all use
this one builder; nothing is built at import time."""

from __future__ import annotations

import functools
import logging
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import httpx

from mendloop.agents import patch_pipeline
from mendloop.agents.embedded import EmbeddedRunner
from mendloop.agents.runner_options import NOBODY
from mendloop.bus.bus import Bus
from mendloop.config import Settings
from mendloop.domain import retention
from mendloop.domain.records import PlaybookRef
from mendloop.engine.held_patch import HeldPatches
from mendloop.engine.notifier import Notifier, TargetStatus
from mendloop.engine.service import Remediation
from mendloop.engine.step_loop import StepLoop, StepLoopDeps
from mendloop.engine.worker import WorkerPool, every
from mendloop.errors import MendloopError
from mendloop.infra import git, sandbox
from mendloop.infra.redact import Redactor
from mendloop.intake.batcher import IntakeBatcher
from mendloop.intake.logs import LogIntake
from mendloop.intake.service import Intake
from mendloop.intake.watcher import WatcherService, WatcherStats
from mendloop.playbooks import dry_run
from mendloop.playbooks.actions.capability import Capabilities
from mendloop.playbooks.loader import CompiledCache, PlaybookSet
from mendloop.playbooks.templates import Templates
from mendloop.rules.routing import Claim, Routing
from mendloop.storage import migrate
from mendloop.storage.audit import AuditLog
from mendloop.storage.health import WriteProbe
from mendloop.storage.incidents import IncidentStore
from mendloop.storage.retention import PruneReport
from mendloop.storage.sessions import SessionStore
from mendloop.storage.store import Store
from mendloop.storage.tokens import Keyring, TokenStore
from mendloop.storage.watcher_offsets import DbOffsetStore

log = logging.getLogger(__name__)


PRUNE_BATCHES_PER_ROUND = 20


@dataclass(frozen=True, slots=True)
class ProcessParts:
    """What only the process running the workers knows (its workers, watchers and notifier), for /health and
    /metrics; with `serve --processes N`, also how many processes answer the API."""

    workers: int
    watchers: dict[str, WatcherStats]
    notifications: dict[str, TargetStatus]
    processes: int = 1
    # API processes restarted after they died.
    restarts: int = 0
    # Of `processes`, those accepting connections now: a replica starting (or started again) is not yet.
    serving: int = 1
    # In an API-only process: why the primary's report can't be trusted (it is late, or there is none yet).
    stale: str | None = None

    def counted(self, processes: int, restarts: int, serving: int) -> ProcessParts:
        return replace(self, processes=processes, restarts=restarts, serving=serving)


class ProcessLink(Protocol):
    """How one of `serve --processes N`'s processes reaches the others (api/replicas.py)."""

    @property
    def replica(self) -> bool:
        """An API-only process: no workers, watchers, notifier or agent runner of its own."""
        ...

    def wake(self) -> None:
        """A run may be due: tell the primary's workers."""
        ...

    def parts(self, own: ProcessParts) -> ProcessParts:
        """The figures /health and /metrics show, whichever process answers."""
        ...


@dataclass
class App:
    settings: Settings
    clock: Callable[[], float] = time.time
    rnd: random.Random = field(default_factory=random.Random)
    # `serve` sets it: start the agent runner of `settings.agent_runner` (when enabled) against this server.
    embedded_agent: bool = False
    # `serve` sets it: open() starts the log watchers of `settings.watchers` (one process per set of files).
    watch: bool = False
    # `serve --processes N` sets it; in an API-only process (`link.replica`) open() starts no worker, watcher,
    # notifier or agent runner, and leaves the schema to the primary.
    link: ProcessLink | None = None
    # Filled by open().
    bus: Bus = field(init=False)
    store: Store = field(init=False)
    playbooks: PlaybookSet = field(init=False)
    routing: Routing = field(init=False)
    capabilities: Capabilities = field(init=False)
    remediation: Remediation = field(init=False)
    workers: WorkerPool = field(init=False)
    incidents: IncidentStore = field(init=False)
    intake: Intake = field(init=False)
    # Group commit for single events posted over HTTP.
    batcher: IntakeBatcher = field(init=False)
    log_intake: LogIntake = field(init=False)
    http: httpx.Client = field(init=False)
    # The one redactor: applied where data enters (intake, triggers, step outputs, what agents post).
    redactor: Redactor = field(init=False)
    ready: bool = field(default=False, init=False)
    agent_runner: EmbeddedRunner | None = field(default=None, init=False)
    watchers: WatcherService | None = field(default=None, init=False)
    # The write probe whose last result /health reports (a thread: no write on the request path).
    health: WriteProbe | None = field(default=None, init=False)
    # Delivers `notify:` targets from the events table (threads, with workers only; /health reads its snapshot).
    notifier: Notifier | None = field(default=None, init=False)
    # Who a bearer token stands for; the tokens made with `mendloop tokens create`; the audit log.
    keyring: Keyring = field(init=False)
    tokens: TokenStore = field(init=False)
    # The dashboard's sessions (a browser's login with a token).
    sessions: SessionStore = field(init=False)
    audit: AuditLog = field(init=False)
    # The embedded runner's credential (an agent's, for every repository): random, made by open(), held only
    # here, so it is never stored anywhere and dies with the process.
    agent_token: str = field(default="", init=False, repr=False)

    def open(
        self,
        *,
        upgrade: bool = True,
        start_workers: bool = True,
        workers: int | None = None,
        start_watchers: bool | None = None,
    ) -> App:
        s = self.settings
        replica = self.link is not None and self.link.replica
        if replica:
            upgrade, start_workers, workers, start_watchers = False, False, 0, False
        self.redactor = Redactor(s.secret_patterns)  # first: a bad pattern is a ConfigError before anything opens
        templates = Templates()
        self.playbooks = PlaybookSet.load(s.playbook_dirs, templates)
        self.capabilities = Capabilities(s.targets, templates)
        self.bus = Bus()
        self.store = Store(s.database_url, clock=self.clock, trust=s.trust, after_commit=self.bus.fan_out)
        if upgrade:
            migrate.upgrade(self.store.engine)
        self.tokens = TokenStore(self.store.db)
        self.sessions = SessionStore(self.store.db)
        self.audit = AuditLog(self.store.db)
        self.agent_token = secrets.token_urlsafe(32)
        self.keyring = Keyring(s, self.tokens, process_token=self.agent_token)
        compiled = CompiledCache(templates)
        self.http = httpx.Client(follow_redirects=False)
        step_loop = StepLoop(
            StepLoopDeps(
                store=self.store,
                capabilities=self.capabilities,
                compiled=compiled,
                http=self.http,
                lease_seconds=s.lease_seconds,
                clock=self.clock,
                rnd=self.rnd,
                targets=s.targets,
                redactor=self.redactor,
                control=s.control,
                planner=lambda pb, run: [
                    step.as_dict()
                    for step in dry_run.plan(
                        pb, run.context.get("event", {}), s, target=run.context.get("target")
                    ).steps
                ],
                # The server's tests of a held patch run sandboxed as uid 65534 when it is root, like the runner's.
                patches=HeldPatches(
                    store=self.store,
                    targets=s.targets,
                    sandbox=functools.partial(sandbox.detect, NOBODY if os.geteuid() == 0 else None),
                    redactor=self.redactor,
                ),
            )
        )
        self.workers = WorkerPool(
            store=self.store,
            step_loop=step_loop,
            count=s.workers if workers is None else workers,
            lease_seconds=s.lease_seconds,
            poll_interval=s.poll_interval,
            clock=self.clock,
            max_concurrent=s.storm.max_concurrent_runs,
            shutdown_timeout=s.control.shutdown_timeout_seconds,
            cancel_poll_seconds=s.cancel_poll_seconds,
        )
        self.routing = Routing(s.routing, playbook_claims(self.playbooks))
        self.remediation = Remediation(
            settings=s,
            store=self.store,
            playbooks=self.playbooks,
            compiled=compiled,
            router=self.routing,
            wake=self._wake,
            stop_step=self.workers.cancel_in_flight,
        )
        self.workers.housekeeping.append(self.remediation.reap)
        self.workers.housekeeping.append(every(s.stats.fold_interval_seconds, self.store.stats.fold))
        self.workers.housekeeping.append(every(s.stats.fold_interval_seconds, self.store.row_counts.fold))
        if any(d is not None for d in (s.retention.runs_days, s.retention.events_days, s.retention.audit_days)):
            self.workers.housekeeping.append(every(s.retention.interval_seconds, self.prune))
        self.workers.housekeeping.append(self.remediation.reap_approvals)
        self.incidents = IncidentStore(self.store, s.storm)
        self.log_intake = LogIntake(s, redactor=self.redactor)
        self.intake = Intake(
            settings=s,
            incidents=self.incidents,
            router=self.routing,
            wake=self._wake,
            redactor=self.redactor,
        )
        self.batcher = IntakeBatcher(self.intake)
        self.health = WriteProbe(
            self.store, self.incidents, interval=s.health.probe_interval_seconds, max_age=s.health.max_write_age_seconds
        ).start()
        embedded = None
        if self.embedded_agent and s.agent_runner.enabled and not replica:
            # Checks its repository and adapter before anything starts.
            embedded = EmbeddedRunner(s, token=self.agent_token)
        if start_workers:
            self._recover_repositories()  # before any run can resume an apply a crash interrupted
            self._start_supervised()
            self.workers.start()
            if s.notify:
                self.notifier = Notifier(
                    self.store.db, s.notify, s.notify_settings, clock=self.clock, redactor=self.redactor
                ).start()
        if embedded is not None:
            self.agent_runner = embedded.start()
        if s.watchers and (self.watch if start_watchers is None else start_watchers):
            self.watchers = WatcherService(
                settings=s, intake=self.intake, log_intake=self.log_intake, offsets=DbOffsetStore(self.store)
            ).start()
        self.ready = True
        return self

    def _wake(self) -> None:
        self.workers.notify()
        if self.link is not None:
            self.link.wake()

    def parts(self) -> ProcessParts:
        own = ProcessParts(
            workers=self.workers.count,
            watchers=dict(self.watchers.stats) if self.watchers is not None else {},
            notifications=self.notifier.snapshot() if self.notifier is not None else {},
        )
        return self.link.parts(own) if self.link is not None else own

    def prune(self) -> PruneReport:
        """The `retention:` policy, once: finished runs and events older than it says."""
        r = self.settings.retention
        now = self.clock()
        report = self.store.retention.prune(
            runs_before=retention.cutoff(now, r.runs_days),
            events_before=retention.cutoff(now, r.events_days),
            audit_before=retention.cutoff(now, r.audit_days),
            batch=r.batch,
            # One housekeeping round holds up the reapers and the fold: a big first prune goes a slice a round.
            max_batches=PRUNE_BATCHES_PER_ROUND,
        )
        if report.runs or report.events or report.audit:
            log.info(
                "retention: pruned %d run(s), %d event(s), %d audit row(s)", report.runs, report.events, report.audit
            )
        return report

    def _start_supervised(self) -> None:
        """Adopt (or start) each `runs: {process: ...}` target's process: mendloop supervises it from its start,
        so its first restart knows its pid. A service that can't start is its runs' problem, not start-up's."""
        for supervisor in self.capabilities.supervisors():
            try:
                started = supervisor.ensure()
            except MendloopError as exc:
                log.warning("target %s: its process is not running: %s", supervisor.target, exc.message)
            else:
                how = "started" if started.restarted else "adopted"
                log.info("target %s: %s pid %d (%s)", supervisor.target, how, started.pid, supervisor.pidfile)

    def _recover_repositories(self) -> None:
        """Each target repository as before or after an apply a crash interrupted, never between; and without
        the worktrees a dead process left. A repository that can't be read is the run's problem, not start-up's."""
        for name, target in self.settings.targets.items():
            if not target.repository or not git.is_repo(Path(target.repository)):
                continue
            try:
                outcome = patch_pipeline.recover(Path(target.repository))
            except MendloopError as exc:
                log.warning("target %s: could not check %s after a restart: %s", name, target.repository, exc.message)
            else:
                if outcome:
                    log.warning("target %s: an apply interrupted by a crash was %s", name, outcome)

    def close(self) -> None:
        self.ready = False
        if self.watchers is not None:
            self.watchers.stop()  # hands over what it read and checkpoints, before the store closes
            self.watchers = None
        if self.agent_runner is not None:
            self.agent_runner.stop()  # kills its agent's process group
            self.agent_runner = None
        if self.notifier is not None:
            self.notifier.stop()  # hands its targets' leases back, so the next process goes on at once
            self.notifier = None
        if self.health is not None:
            self.health.stop()
            self.health = None
        if hasattr(self, "batcher"):
            self.batcher.close()  # commits the events already queued, before the store closes
        if hasattr(self, "workers"):
            self.workers.stop()
        if hasattr(self, "http"):
            self.http.close()
        if hasattr(self, "store"):
            self.store.close()


def playbook_claims(playbooks: PlaybookSet) -> list[Claim]:
    """What each loaded playbook's `handles` claims, for the routing table."""
    return [
        Claim(
            PlaybookRef(pb.id, pb.version, pb.document),
            tuple(pb.model.handles.error_types),
            tuple(pb.model.handles.event_types),
        )
        for pb in playbooks.by_id.values()
    ]
