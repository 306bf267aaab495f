"""Detections → events, incidents and (when storm control allows) runs, all in one transaction per batch."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from mendloop.config import StormConfig
from mendloop.domain import fix_memory, storm
from mendloop.domain import incidents as lifecycle
from mendloop.domain.incidents import OPEN, RESOLVED, TrackedIncident
from mendloop.domain.list_totals import Total
from mendloop.domain.page_cursor import After
from mendloop.domain.records import Detection, DetectionOutcome, NewEvent
from mendloop.domain.runs import stamp
from mendloop.domain.states import RUN_FINAL, RunStatus, StepStatus
from mendloop.domain.storm import Situation, Verdict, WindowCounts, decide
from mendloop.domain.trust import TrustMove, TrustReason
from mendloop.errors import NotFound
from mendloop.storage import schema as t
from mendloop.storage.db import Tx, sqlite_insert
from mendloop.storage.fixes import mark_recurred_in
from mendloop.storage.incident_resolution import resolve_by_operator_in
from mendloop.storage.pages import INCIDENTS_PAGE, newest_first
from mendloop.storage.row_counts import total_in
from mendloop.storage.store import Store

# What a new run needs from the caller, who knows playbooks and targets: insert_run's keyword arguments.
RunSpec = dict[str, Any]
RunFor = Callable[[Detection], RunSpec | None]


# Event ids or fingerprints per IN (...) query: far below every backend's limit on bound parameters.
_CHUNK = 500
_SQLITE_INSERT_KEYS = sqlite_insert(t.idempotency)
assert [c.name for c in t.idempotency.c] == ["scope", "key", "response", "created_at"]
_SQLITE_INSERT_INCIDENTS = sqlite_insert(t.incidents)
_incident_tuple = operator.itemgetter(*(c.name for c in t.incidents.c))
_DUPLICATE = DetectionOutcome(event_id=None, incident_id=None, run_id=None, verdict="duplicate", duplicate=True)

# Storm counters are rows of `sequences` (no table of their own): per window (its index since the epoch,
# zero-padded so names sort by window) the new runs of all components, of each component, and the detections
# rate-limited; and the rate-limited detections of all time. The global row of a window is locked (UPDATE) by
# the first transaction of that window that would start a run and held until it commits, so concurrent intake
# (PostgreSQL) decides one after the other and can never exceed a cap; SQLite's single writer already does.
_WINDOW = "storm:w:"
# GET /patches/stats reads these on every request: built once (three bound names, not an expanding IN, whose
# per-execution rewrite costs more than the read).
_STORM_NAMES = ("n0", "n1", "n2")
_STORM_COUNTS = sa.select(t.sequences.c.name, t.sequences.c.value).where(
    t.sequences.c.name.in_([sa.bindparam(n, type_=sa.String()) for n in _STORM_NAMES])
)
_RATE_LIMITED_TOTAL = "storm:rate_limited"


def _window_name(index: int, what: str) -> str:
    return f"{_WINDOW}{index:012d}:{what}"


def _component_key(component: str) -> str:
    # `sequences.name` holds 100 characters; a component holds 200.
    return "c:" + hashlib.sha1(component.encode(), usedforsecurity=False).hexdigest()[:20]


@dataclasses.dataclass(frozen=True, slots=True)
class StormCounts:
    """What `/health` and `/patches/stats` show of the caps on new runs."""

    window_seconds: float
    window_started_at: float
    new_runs_in_window: int
    rate_limited_in_window: int
    rate_limited_total: int
    max_new_runs_per_window: int
    max_new_runs_per_component: int


@dataclasses.dataclass(slots=True, eq=False)
class _Open:
    """A fingerprint's current incident as one call of `record` sees it (open, or resolved until a detection
    reopens it), with the counts it has yet to write."""

    id: str
    last_run_id: str | None
    last_run_at: float | None
    status: str = OPEN
    recurrences: int = 0
    resolved_at: float | None = None
    resolved_by_run: str | None = None
    resolved_commit: str | None = None
    regressions: int = 0
    # Set by a reopening that is a regression (domain/fix_memory.py): what the run it starts is flagged with.
    regression: dict[str, Any] | None = None
    # Whether its last run is still going: read only when a decision needs it.
    in_progress: bool | None = None
    # Created in this transaction and not inserted yet.
    row: dict[str, Any] | None = None
    count: int = 0
    absorbed: int = 0
    sample: str | None = None


class IncidentStore:
    def __init__(self, store: Store, storm: StormConfig) -> None:
        self.store = store
        self.storm = storm
        # Built once, with bound parameters: the hot path neither rebuilds nor re-coerces them.
        self._claim_keys = (
            store.db.insert(t.idempotency)
            .on_conflict_do_nothing()
            .returning(t.idempotency.c.scope, t.idempotency.c.key)
        )
        self._known_keys = sa.select(t.idempotency.c.key).where(
            t.idempotency.c.scope == sa.bindparam("scope"),
            t.idempotency.c.key.in_(sa.bindparam("keys", expanding=True)),
        )
        c = t.incidents.c
        # Every incident of the fingerprints, resolved ones too: a detection of a resolved one reopens it.
        self._by_fingerprint = (
            sa.select(
                c.fingerprint,
                c.id,
                c.last_run_id,
                c.last_run_at,
                c.status,
                c.recurrences,
                c.resolved_at,
                c.resolved_by_run,
                c.resolved_commit,
                c.regressions,
            )
            .where(c.fingerprint.in_(sa.bindparam("fps", expanding=True)))
            .order_by(c.first_seen)
            .with_for_update()
        )
        self._count = (
            sa.update(t.incidents)
            .where(c.id == sa.bindparam("_id"))
            .values(
                count=c.count + sa.bindparam("_n", type_=sa.BigInteger()),
                absorbed=c.absorbed + sa.bindparam("_absorbed", type_=sa.BigInteger()),
                last_seen=sa.bindparam("_now", type_=sa.Double()),
                sample=sa.bindparam("_sample", type_=sa.Text()),
            )
        )
        self._run_status = sa.select(t.runs.c.status).where(t.runs.c.id == sa.bindparam("_id"))

    def record(
        self, detections: Sequence[Detection], run_for: RunFor, *, also: Callable[[Connection], None] | None = None
    ) -> list[DetectionOutcome]:
        """Count each detection on its open incident (or open one), store its event, and start a run where storm
        control allows: one transaction for the whole list (and `also`), decided detection by detection in order,
        written with a handful of statements however long the list is."""
        with self.store.db.write() as tx:
            outcomes = _Recording(self, tx, run_for).run(detections)
            if also is not None:
                also(tx.conn)  # the caller's own writes in the same transaction (a watcher's checkpoint)
        return outcomes

    # -- queries --------------------------------------------------------------------------------------------

    def storm_counts(self, now: float | None = None) -> StormCounts:
        """The current window's counters and the all-time rate-limited count: three primary-key reads."""
        now = self.store.clock() if now is None else now
        index = _window_index(now, self.storm)
        names = [_window_name(index, "*"), _window_name(index, "rl"), _RATE_LIMITED_TOTAL]
        with self.store.db.read() as conn:
            values = {
                str(n): int(v) for n, v in conn.execute(_STORM_COUNTS, dict(zip(_STORM_NAMES, names, strict=True)))
            }
        return StormCounts(
            window_seconds=self.storm.new_runs_window_seconds,
            window_started_at=index * self.storm.new_runs_window_seconds,
            new_runs_in_window=values.get(names[0], 0),
            rate_limited_in_window=values.get(names[1], 0),
            rate_limited_total=values.get(names[2], 0),
            max_new_runs_per_window=self.storm.max_new_runs_per_window,
            max_new_runs_per_component=self.storm.max_new_runs_per_component,
        )

    def get(self, incident_id: str) -> TrackedIncident:
        with self.store.db.read() as conn:
            row = conn.execute(sa.select(t.incidents).where(t.incidents.c.id == incident_id)).first()
        if row is None:
            raise NotFound("incident", incident_id)
        return _incident(row)

    def find(
        self,
        *,
        status: str | None = None,
        fingerprint: str | None = None,
        error_type: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[TrackedIncident], int]:
        found, total, _ = self.page(
            status=status, fingerprint=fingerprint, error_type=error_type, limit=limit, offset=offset
        )
        return found, total.n

    def page(
        self,
        *,
        status: str | None = None,
        fingerprint: str | None = None,
        error_type: str | None = None,
        after: After | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[TrackedIncident], Total, str | None]:
        """Most recently seen first (last_seen, id), from a cursor: the incidents, how many match
        (storage/row_counts.py), the next cursor."""
        conds = []
        if status:
            conds.append(t.incidents.c.status == status)
        if fingerprint:
            conds.append(t.incidents.c.fingerprint == fingerprint)
        if error_type:
            conds.append(t.incidents.c.error_type == error_type)
        q = sa.select(t.incidents).where(*conds)
        with self.store.db.read() as conn:
            rows, cursor = newest_first(
                conn,
                q,
                kind=INCIDENTS_PAGE,
                key=t.incidents.c.last_seen,
                item_id=t.incidents.c.id,
                after=after,
                limit=limit,
                offset=offset,
            )
            filters = {"status": status, "fingerprint": fingerprint, "error_type": error_type}
            total = total_in(conn, "incidents", filters, q)
        return [_incident(r) for r in rows], total, cursor

    def runs_of(self, incident_id: str) -> list[tuple[str, str]]:
        q = sa.select(t.runs.c.id, t.runs.c.status).where(t.runs.c.incident_id == incident_id).order_by(t.runs.c.id)
        with self.store.db.read() as conn:
            return [(str(i), str(s)) for i, s in conn.execute(q)]

    def resolve(self, incident_id: str) -> TrackedIncident:
        """An operator's word: resolved now, by no run (a resolved incident stays as it is)."""
        with self.store.db.write() as tx:
            found = tx.conn.execute(sa.select(t.incidents.c.component).where(t.incidents.c.id == incident_id)).first()
            if found is None:
                raise NotFound("incident", incident_id)
            resolve_by_operator_in(tx, incident_id, component=found.component)
        return self.get(incident_id)


class _Recording:
    """One call of `IncidentStore.record`: reads what it needs in bulk (event ids already seen, open incidents),
    decides detection by detection in order, and defers the common writes (events, new incidents, counts) to a
    few multi-row statements. Anything that writes other events (a run, a resolution) first flushes what is
    pending, so event ids keep the order the detections arrived in."""

    def __init__(self, owner: IncidentStore, tx: Tx, run_for: RunFor):
        self.owner = owner
        self.store = owner.store
        self.storm = owner.storm
        self.tx = tx
        self.conn = tx.conn
        self.published = tx.published
        self.run_for = run_for
        self.now = tx.now
        self.day = stamp(self.now).strftime("%Y%m%d")
        # By fingerprint: its open incident, else its newest resolved one; None: it has no incident.
        self.known: dict[str, _Open | None] = {}
        self.touched: dict[str, _Open] = {}  # by incident id: incidents with writes pending
        self.events: list[NewEvent] = []
        # (outcome index, pending event index, incident id, verdict): answered once the event has its id.
        self.waiting: list[tuple[int, int, str | None, str]] = []
        self.outcomes: list[DetectionOutcome | None] = []
        self.numbers: list[int] = []  # incident numbers reserved for this call, in reverse order
        # This window's storm counters, read (and locked) at the first run this call would start.
        self.window_index = _window_index(self.now, self.storm)
        self.window: dict[str, int] | None = None  # counter name -> value including this call's runs
        self.window_added: dict[str, int] = {}  # counter name -> what this call adds

    def run(self, detections: Sequence[Detection]) -> list[DetectionOutcome]:
        fresh = self._claim_event_ids(detections)
        self._load([d.fingerprint for d, ok in zip(detections, fresh, strict=True) if ok])
        wanted = {
            d.fingerprint
            for d, ok in zip(detections, fresh, strict=True)
            if ok and not d.resolved and self.known.get(d.fingerprint) is None
        }
        if wanted:
            last = self.tx.take_seq(self._sequence(), len(wanted))
            self.numbers = list(range(last, last - len(wanted), -1))
        for d, ok in zip(detections, fresh, strict=True):
            if ok:
                self._one(d)
            else:
                self.outcomes.append(_DUPLICATE)
        self._flush()
        counts = [
            {"_id": inc.id, "_n": inc.count, "_absorbed": inc.absorbed, "_now": self.now, "_sample": inc.sample}
            for inc in self.touched.values()
            if inc.sample is not None
        ]
        if counts:
            self.conn.execute(self.owner._count, counts)
        self._write_window()
        done = [o for o in self.outcomes if o is not None]
        assert len(done) == len(detections)
        return done

    def _claim_event_ids(self, detections: Sequence[Detection]) -> list[bool]:
        """An event id seen before (in an earlier call or earlier in this list) makes its detection a duplicate;
        the others are claimed (inserted) in this transaction, so a failed transaction leaves them unspent."""
        fresh: list[bool] = []
        rows: list[dict[str, Any]] = []
        keys: set[tuple[str, str]] = set()
        for d in detections:
            if d.event_id is None:
                fresh.append(True)
                continue
            key = (f"event:{d.source}", d.event_id)
            fresh.append(key not in keys)
            if key not in keys:
                keys.add(key)
                rows.append({"scope": key[0], "key": key[1], "response": {}, "created_at": self.now})
        if not rows:
            return fresh
        if self.store.is_sqlite:
            # This transaction holds SQLite's only write lock: what is not there now cannot appear before commit.
            # Read in bulk, then a plain executemany (RETURNING would cost SQLAlchemy one INSERT per row).
            seen: set[tuple[str, str]] = set()
            by_scope: dict[str, list[str]] = {}
            for row in rows:
                by_scope.setdefault(row["scope"], []).append(row["key"])
            for scope, names in by_scope.items():
                for i in range(0, len(names), _CHUNK):
                    found = self.conn.execute(self.owner._known_keys, {"scope": scope, "keys": names[i : i + _CHUNK]})
                    seen.update((scope, str(k)) for (k,) in found)
            if len(seen) < len(rows):
                self.conn.exec_driver_sql(
                    _SQLITE_INSERT_KEYS,
                    [(r["scope"], r["key"], "{}", self.now) for r in rows if (r["scope"], r["key"]) not in seen],
                )
        else:
            # A concurrent transaction claiming the same id makes this one wait, then skip it: never an error.
            seen = keys - {(str(s), str(k)) for s, k in self.conn.execute(self.owner._claim_keys, rows)}
        if seen:
            for i, d in enumerate(detections):
                if d.event_id is not None and fresh[i] and (f"event:{d.source}", d.event_id) in seen:
                    fresh[i] = False
        return fresh

    def _load(self, fingerprints: Sequence[str]) -> None:
        unique = [fp for fp in dict.fromkeys(fingerprints) if fp not in self.known]
        for i in range(0, len(unique), _CHUNK):
            chunk = unique[i : i + _CHUNK]
            self.known.update(dict.fromkeys(chunk))
            # Oldest first: the newest open incident wins, else the newest resolved one (from before reopening, a
            # fingerprint could have several).
            for r in self.conn.execute(self.owner._by_fingerprint, {"fps": chunk}):
                current = self.known[r.fingerprint]
                if current is None or r.status == OPEN or current.status != OPEN:
                    self.known[r.fingerprint] = _Open(
                        r.id,
                        r.last_run_id,
                        r.last_run_at,
                        r.status,
                        int(r.recurrences or 0),
                        r.resolved_at,
                        r.resolved_by_run,
                        r.resolved_commit,
                        int(r.regressions or 0),
                    )

    def _sequence(self) -> str:
        return f"incident:{self.day}"

    def _one(self, d: Detection) -> None:
        if d.fingerprint not in self.known:
            self._load([d.fingerprint])
        incident = self.known[d.fingerprint]
        if d.resolved:
            self._resolve(d, incident if incident is not None and incident.status == OPEN else None)
            return
        reopened = None
        if incident is None:
            incident = self._create(d)
        elif incident.status != OPEN:
            reopened = self._reopen(d, incident)
        incident.count += d.count
        incident.sample = d.message[:4000]
        self.touched[incident.id] = incident
        spec = self.run_for(d)
        verdict, failures = decide(
            Situation(
                has_playbook=spec is not None,
                last_run_at=incident.last_run_at,
                now=self.now,
                run_in_progress=lambda: self._in_progress(incident),
                recent_failures=lambda: self._failures(d.component) if d.component else 0,
                window_counts=lambda: self._window_counts(d.component),
                has_component=bool(d.component),
                reopens=reopened is not None,
            ),
            self.storm,
        )
        if spec is not None and verdict in (Verdict.RUN, Verdict.BREAKER_OPEN):
            outcome = self._start_run(d, incident, spec, verdict, failures)
            self.outcomes.append(outcome)
            if reopened is not None:
                self.tx.emit([dataclasses.replace(e, run_id=outcome.run_id) for e in reopened])
            return
        if verdict in (Verdict.ABSORBED_IN_PROGRESS, Verdict.ABSORBED_THROTTLED):
            incident.absorbed += d.count
        elif verdict is Verdict.RATE_LIMITED:
            self._add(_window_name(self.window_index, "rl"), 1)
            self._add(_RATE_LIMITED_TOTAL, 1)
        self._pend(storm.detection_event(d, incident.id), incident.id, verdict.value)
        if reopened is not None:
            self._flush()  # after its detection's event, as when a run starts
            self.tx.emit(reopened)

    def _pend(self, event: NewEvent, incident_id: str | None, verdict: str) -> None:
        self.waiting.append((len(self.outcomes), len(self.events), incident_id, verdict))
        self.events.append(event)
        self.outcomes.append(None)

    def _create(self, d: Detection) -> _Open:
        number = self.numbers.pop() if self.numbers else self.tx.take_seq(self._sequence(), 1)
        incident = _Open(f"inc_{self.day}_{number:04d}", None, None, in_progress=False)
        incident.row = {
            "id": incident.id,
            "fingerprint": d.fingerprint,
            "status": OPEN,
            "error_type": d.error_type,
            "event_type": d.event_type,
            "component": d.component,
            "source": d.source,
            "title": (d.title or d.message)[:2000],
            "first_seen": self.now,
            "last_seen": self.now,
            "resolved_at": None,
            "last_run_id": None,
            "last_run_at": None,
            "recurrences": 0,
            "resolved_by_run": None,
            "resolved_commit": None,
            "last_resolved_at": None,
            "regressions": 0,
            "regressed_commit": None,
        }
        self.known[d.fingerprint] = incident
        return incident

    def _resolve(self, d: Detection, incident: _Open | None) -> None:
        self._pend(
            storm.detection_event(d, incident.id if incident else None), incident.id if incident else None, "resolved"
        )
        if incident is None:
            return
        # The source says the error is gone (Alertmanager's `resolved`): resolved by no run; the next detection of
        # this fingerprint reopens it.
        values = {"status": RESOLVED, "resolved_at": self.now, "resolved_by_run": None, "resolved_commit": None}
        if incident.row is not None:
            incident.row.update(values)
        else:
            self.conn.execute(
                sa.update(t.incidents).where(t.incidents.c.id == incident.id).values(**values, last_seen=self.now)
            )
        incident.status, incident.resolved_at, incident.resolved_by_run = RESOLVED, self.now, None
        incident.resolved_commit = None

    def _reopen(self, d: Detection, incident: _Open) -> list[NewEvent]:
        """A detection of a resolved incident: open again, one recurrence more, and a regression when a run's
        verified fix had resolved it. Returns the events, published once the detection's own outcome is written
        (with the run it starts, if any)."""
        change = lifecycle.reopened(
            incident.id,
            recurrences=incident.recurrences,
            resolved_at=incident.resolved_at,
            resolved_by=incident.resolved_by_run,
            component=d.component,
            run_id=None,
        )
        values, events = dict(change.values), [change.event]
        by, commit = incident.resolved_by_run, incident.resolved_commit
        if fix_memory.is_regression(resolved_by_run=by, resolved_commit=commit) and by and commit:
            flag, event = fix_memory.regressed(
                incident.id,
                resolved_by_run=by,
                commit=commit,
                resolved_at=incident.resolved_at,
                now=self.now,
                regressions=incident.regressions,
                component=d.component,
            )
            values.update(regressions=incident.regressions + 1, regressed_commit=incident.resolved_commit)
            events.append(event)
            incident.regressions += 1
            incident.regression = flag
        if incident.row is not None:
            incident.row.update(values)
        else:
            self.conn.execute(sa.update(t.incidents).where(t.incidents.c.id == incident.id).values(values))
            # Its fixes stop holding now (a row created in this call has none yet).
            mark_recurred_in(self.conn, incident.id, self.now)
        incident.status, incident.recurrences = OPEN, incident.recurrences + 1
        incident.resolved_at = incident.resolved_by_run = incident.resolved_commit = None
        return events

    # -- storm counters ---------------------------------------------------------------------------------------

    def _counter(self, name: str) -> int:
        """A counter's value, its row locked until this transaction ends (created at 0 if missing)."""
        seq = t.sequences
        created = self.conn.execute(self.store.db.insert(seq).values(name=name, value=0).on_conflict_do_nothing())
        if created.rowcount and name.endswith(":*"):
            # The first run of a new window: counters of windows before the last one can never be read again.
            self.conn.execute(
                sa.delete(seq).where(seq.c.name >= _WINDOW, seq.c.name < _window_name(self.window_index - 1, ""))
            )
        # An UPDATE that changes nothing still takes the row lock (PostgreSQL); SELECT ... FOR UPDATE would too,
        # but SQLAlchemy drops FOR UPDATE on SQLite, where BEGIN IMMEDIATE holds the database anyway.
        value = self.conn.execute(
            sa.update(seq).where(seq.c.name == name).values(value=seq.c.value).returning(seq.c.value)
        ).scalar_one()
        return int(value)

    def _window_counts(self, component: str | None) -> WindowCounts:
        if self.window is None:
            # The global row first, always: every transaction that starts runs takes it before any component's,
            # so two of them can never wait on each other.
            everything = _window_name(self.window_index, "*")
            self.window = {everything: self._counter(everything)}
        total = self.window[_window_name(self.window_index, "*")]
        if not component:
            return WindowCounts(total, 0)
        name = _window_name(self.window_index, _component_key(component))
        if name not in self.window:
            self.window[name] = self._counter(name)
        return WindowCounts(total, self.window[name])

    def _add(self, name: str, n: int) -> None:
        self.window_added[name] = self.window_added.get(name, 0) + n
        if self.window is not None and name in self.window:
            self.window[name] += n

    def _count_new_run(self, component: str | None) -> None:
        if self.window is None:
            return  # no cap is on (the counters were never asked for)
        self._add(_window_name(self.window_index, "*"), 1)
        if component:
            self._add(_window_name(self.window_index, _component_key(component)), 1)

    def _write_window(self) -> None:
        seq = t.sequences
        for name, n in self.window_added.items():
            if not name.startswith(_WINDOW) or name.endswith(":rl"):
                # Rate-limited counters were not locked: create them if this is their first detection.
                self.conn.execute(self.store.db.insert(seq).values(name=name, value=0).on_conflict_do_nothing())
            self.conn.execute(sa.update(seq).where(seq.c.name == name).values(value=seq.c.value + n))

    def _in_progress(self, incident: _Open) -> bool:
        if incident.in_progress is None:
            status = None
            if incident.last_run_id is not None:
                status = self.conn.execute(self.owner._run_status, {"_id": incident.last_run_id}).scalar()
            incident.in_progress = status is not None and RunStatus(status) not in RUN_FINAL
        return incident.in_progress

    def _failures(self, component: str) -> int:
        runs, steps = t.runs.c, t.steps.c
        # A run an operator stopped at an approval (rejected, or left to time out into failure) says nothing about
        # whether the fixes work: it is not a failure the breaker counts.
        stopped_at_approval = sa.exists().where(
            steps.run_id == runs.id, steps.action == "approval", steps.status == StepStatus.FAILED.value
        )
        return int(
            self.conn.execute(
                sa.select(sa.func.count())
                .select_from(t.runs)
                .where(
                    runs.component == component,
                    runs.status.in_([RunStatus.FAILED.value, RunStatus.NEEDS_HUMAN.value]),
                    runs.finished_at >= self.now - self.storm.breaker_window_seconds,
                    ~stopped_at_approval,
                )
            ).scalar_one()
        )

    def _start_run(
        self, d: Detection, incident: _Open, spec: RunSpec, verdict: Verdict, failures: int
    ) -> DetectionOutcome:
        # Everything before this detection first, so the run's trigger event keeps its place in the order.
        self._flush()
        start_as = storm.run_start(d, verdict, failures, self.storm)
        start = len(self.published)
        # The detection is the run's trigger: it opens the run's timeline.
        if incident.regression is not None:
            # The run (and the work order it may escalate to) is flagged with the fix that did not hold.
            spec = {**spec, "context": {**spec.get("context", {}), "regression": incident.regression}}
        run = self.store.runs.insert(
            self.tx,
            **{**spec, "trigger": storm.detection_event(d, incident.id)},
            incident_id=incident.id,
            mutex_key=start_as.mutex_key,
            status=start_as.status,
            error=start_as.error,
        )
        event_id = self.published[start].id
        self.conn.execute(
            sa.update(t.incidents)
            .where(t.incidents.c.id == incident.id)
            .values(last_run_id=run.id, last_run_at=self.now)
        )
        incident.last_run_id, incident.last_run_at = run.id, self.now
        if incident.recurrences and run.component:
            # The run's insert took the plain incident move; a failure that came back after its resolution costs
            # more, the more often it has, and more again after a verified fix (a regression; domain/trust.py).
            reason = TrustReason.REGRESSION if incident.regression is not None else TrustReason.RECURRENCE
            self.store.trust.apply(self.tx, TrustMove(run.component, reason, incident.recurrences), run.id)
        incident.regression = None
        self._count_new_run(d.component)
        incident.in_progress = run.status not in RUN_FINAL
        if verdict is Verdict.BREAKER_OPEN:
            self.tx.emit([storm.circuit_open_event(d.component, run.id, failures, incident.id)])
        return DetectionOutcome(event_id, incident.id, run.id, verdict.value)

    def _flush(self) -> None:
        rows = []
        for incident in self.touched.values():
            if incident.row is not None:
                rows.append(
                    {
                        **incident.row,
                        "count": incident.count,
                        "absorbed": incident.absorbed,
                        "sample": incident.sample or "",
                    }
                )
                incident.row, incident.count, incident.absorbed, incident.sample = None, 0, 0, None
        if rows and self.store.is_sqlite:
            self.conn.exec_driver_sql(_SQLITE_INSERT_INCIDENTS, [_incident_tuple(r) for r in rows])
        elif rows:
            self.conn.execute(t.incidents.insert(), rows)
        if self.events:
            start = len(self.published)
            self.tx.emit(self.events)
            for at, index, incident_id, verdict in self.waiting:
                self.outcomes[at] = DetectionOutcome(self.published[start + index].id, incident_id, None, verdict)
            self.events, self.waiting = [], []


def _window_index(now: float, config: StormConfig) -> int:
    return math.floor(now / config.new_runs_window_seconds)


def _incident(r: Row[Any]) -> TrackedIncident:
    return TrackedIncident(
        id=r.id,
        fingerprint=r.fingerprint,
        status=r.status,
        error_type=r.error_type,
        event_type=r.event_type,
        component=r.component,
        source=r.source,
        title=r.title,
        sample=r.sample,
        count=int(r._mapping["count"]),
        first_seen=float(r.first_seen),
        last_seen=float(r.last_seen),
        resolved_at=r.resolved_at,
        last_run_id=r.last_run_id,
        last_run_at=r.last_run_at,
        absorbed=int(r.absorbed),
        recurrences=int(r.recurrences),
        resolved_by_run=r.resolved_by_run,
        resolved_commit=r.resolved_commit,
        last_resolved_at=r.last_resolved_at,
        regressions=int(r.regressions),
        regressed_commit=r.regressed_commit,
    )
