"""Detections → events, incidents and (when storm control allows) runs, all in one transaction per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from mendloop.config import StormConfig
from mendloop.domain.records import Detection, DetectionOutcome, EventRecord, Incident, NewEvent
from mendloop.domain.states import RUN_FINAL, RunStatus
from mendloop.errors import NotFound
from mendloop.rules.storm import Situation, Verdict, decide
from mendloop.storage import schema as t
from mendloop.storage.store import Store, _stamp

# What a new run needs from the caller, who knows playbooks and targets: insert_run's keyword arguments.
RunSpec = dict[str, Any]
RunFor = Callable[[Detection], RunSpec | None]


class IncidentStore:
    def __init__(self, store: Store, storm: StormConfig) -> None:
        self.store = store
        self.storm = storm

    def record(self, detections: Sequence[Detection], run_for: RunFor) -> list[DetectionOutcome]:
        outcomes: list[DetectionOutcome] = []
        with self.store._tx() as (conn, published):
            for d in detections:
                outcomes.append(self._one(conn, published, d, run_for))
        return outcomes

    def _one(self, conn: Connection, published: list[EventRecord], d: Detection, run_for: RunFor) -> DetectionOutcome:
        now = self.store.clock()
        if d.event_id is not None:
            scope = f"event:{d.source}"
            seen = conn.execute(
                sa.select(t.idempotency.c.key).where(t.idempotency.c.scope == scope, t.idempotency.c.key == d.event_id)
            ).first()
            if seen is not None:
                return DetectionOutcome(
                    event_id=None, incident_id=None, run_id=None, verdict="duplicate", duplicate=True
                )
            conn.execute(t.idempotency.insert(), {"scope": scope, "key": d.event_id, "response": {}, "created_at": now})
        row = conn.execute(
            sa.select(t.incidents)
            .where(t.incidents.c.fingerprint == d.fingerprint, t.incidents.c.status == "open")
            .order_by(t.incidents.c.first_seen.desc())
            .limit(1)
            .with_for_update()
        ).first()
        incident = _incident(row) if row is not None else None
        if d.resolved:
            self.store._events(conn, published, [self._event(d, incident.id if incident else None)])
            if incident is not None:
                conn.execute(
                    sa.update(t.incidents)
                    .where(t.incidents.c.id == incident.id)
                    .values(status="resolved", resolved_at=now, last_seen=now)
                )
            return DetectionOutcome(published[-1].id, incident.id if incident else None, None, "resolved")
        if incident is None:
            seq = self.store._next_seq(conn, "incident:" + _stamp(now).strftime("%Y%m%d"))
            incident_id = f"inc_{_stamp(now):%Y%m%d}_{seq:04d}"
            conn.execute(
                t.incidents.insert(),
                {
                    "id": incident_id,
                    "fingerprint": d.fingerprint,
                    "status": "open",
                    "error_type": d.error_type,
                    "event_type": d.event_type,
                    "component": d.component,
                    "source": d.source,
                    "title": (d.title or d.message)[:2000],
                    "sample": d.message[:4000],
                    "count": d.count,
                    "first_seen": now,
                    "last_seen": now,
                    "resolved_at": None,
                    "last_run_id": None,
                    "last_run_at": None,
                    "absorbed": 0,
                },
            )
            last_run_id, last_run_at = None, None
        else:
            incident_id = incident.id
            last_run_id, last_run_at = incident.last_run_id, incident.last_run_at
            conn.execute(
                sa.update(t.incidents)
                .where(t.incidents.c.id == incident_id)
                .values(count=t.incidents.c.count + d.count, last_seen=now, sample=d.message[:4000])
            )
        self.store._events(conn, published, [self._event(d, incident_id)])
        event_id = published[-1].id
        spec = run_for(d)
        in_progress = False
        if last_run_id is not None:
            status = conn.execute(sa.select(t.runs.c.status).where(t.runs.c.id == last_run_id)).scalar()
            in_progress = status is not None and RunStatus(status) not in RUN_FINAL
        failures = 0
        if spec is not None and d.component:
            failures = int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(t.runs)
                    .where(
                        t.runs.c.component == d.component,
                        t.runs.c.status.in_([RunStatus.FAILED.value, RunStatus.NEEDS_HUMAN.value]),
                        t.runs.c.finished_at >= now - self.storm.breaker_window_seconds,
                    )
                ).scalar_one()
            )
        verdict = decide(
            Situation(
                has_playbook=spec is not None,
                run_in_progress=in_progress,
                last_run_at=last_run_at,
                recent_failures=failures,
                now=now,
            ),
            self.storm,
        )
        run_id = None
        if spec is not None and verdict in (Verdict.RUN, Verdict.BREAKER_OPEN):
            breaker = verdict is Verdict.BREAKER_OPEN
            run = self.store.insert_run(
                conn,
                published,
                **spec,
                incident_id=incident_id,
                mutex_key=d.component if self.storm.mutex_per_component and d.component else None,
                status=RunStatus.NEEDS_HUMAN if breaker else RunStatus.QUEUED,
                error=(
                    f"circuit breaker open for {d.component}: {failures} failed runs in the last "
                    f"{self.storm.breaker_window_seconds:g} s; auto-remediation stopped"
                    if breaker
                    else None
                ),
            )
            run_id = run.id
            conn.execute(
                sa.update(t.incidents)
                .where(t.incidents.c.id == incident_id)
                .values(last_run_id=run.id, last_run_at=now)
            )
            # The detection is the run's trigger: it opens the run's timeline.
            conn.execute(sa.update(t.events).where(t.events.c.id == event_id).values(run_id=run.id))
            conn.execute(sa.update(t.runs).where(t.runs.c.id == run.id).values(trigger_event_id=event_id))
            if breaker:
                self.store._events(
                    conn,
                    published,
                    [
                        NewEvent(
                            type="self_healing.circuit_open",
                            message=f"Circuit breaker open for {d.component}: run {run.id} needs a human",
                            payload={"failures": failures, "incident_id": incident_id},
                            run_id=run.id,
                            component=d.component,
                        )
                    ],
                )
        elif verdict in (Verdict.ABSORBED_IN_PROGRESS, Verdict.ABSORBED_THROTTLED):
            conn.execute(
                sa.update(t.incidents)
                .where(t.incidents.c.id == incident_id)
                .values(absorbed=t.incidents.c.absorbed + d.count)
            )
        return DetectionOutcome(event_id, incident_id, run_id, verdict.value)

    @staticmethod
    def _event(d: Detection, incident_id: str | None) -> NewEvent:
        payload = {**d.payload, "fingerprint": d.fingerprint, "incident_id": incident_id, "severity": d.severity}
        if d.count != 1:
            payload["count"] = d.count
        if d.error_type:
            payload.setdefault("error_type", d.error_type)
        return NewEvent(
            type=d.event_type, message=d.message[:4000], source=d.source, payload=payload, component=d.component
        )

    # -- queries --------------------------------------------------------------------------------------------

    def get(self, incident_id: str) -> Incident:
        with self.store._read() as conn:
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
    ) -> tuple[list[Incident], int]:
        conds = []
        if status:
            conds.append(t.incidents.c.status == status)
        if fingerprint:
            conds.append(t.incidents.c.fingerprint == fingerprint)
        if error_type:
            conds.append(t.incidents.c.error_type == error_type)
        q = sa.select(t.incidents).where(*conds).order_by(t.incidents.c.last_seen.desc()).limit(limit).offset(offset)
        c = sa.select(sa.func.count()).select_from(t.incidents).where(*conds)
        with self.store._read() as conn:
            rows = conn.execute(q).all()
            total = int(conn.execute(c).scalar_one())
        return [_incident(r) for r in rows], total

    def runs_of(self, incident_id: str) -> list[tuple[str, str]]:
        q = sa.select(t.runs.c.id, t.runs.c.status).where(t.runs.c.incident_id == incident_id).order_by(t.runs.c.id)
        with self.store._read() as conn:
            return [(str(i), str(s)) for i, s in conn.execute(q)]

    def resolve(self, incident_id: str) -> Incident:
        now = self.store.clock()
        with self.store._tx() as (conn, _):
            n = conn.execute(
                sa.update(t.incidents)
                .where(t.incidents.c.id == incident_id, t.incidents.c.status == "open")
                .values(status="resolved", resolved_at=now)
            ).rowcount
        if not n:
            self.get(incident_id)
        return self.get(incident_id)


def _incident(r: Row[Any]) -> Incident:
    return Incident(
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
    )
