"""Intake: what watchers and webhooks saw becomes detections, counted on incidents, and runs where storm control
allows. Generic JSON events, batches, Prometheus Alertmanager (webhook v4), and raw log records from Fluent Bit
or Vector (matched against the configured patterns on the server)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from sqlalchemy.engine import Connection

from mendloop.config import Settings
from mendloop.domain import runs
from mendloop.domain.records import Detection, DetectionOutcome, PlaybookRef
from mendloop.errors import InputError
from mendloop.infra.redact import Redactor
from mendloop.intake.fingerprint import fingerprint, fingerprint_labels
from mendloop.storage.incidents import IncidentStore, RunSpec

# What an Alertmanager alert's labels become: the component and error type columns hold 200 characters, an
# incident's fingerprint 64.
MAX_NAME = 200
MAX_FINGERPRINT = 64
MAX_ALERTS = 10_000


class _Alert(BaseModel):
    """One alert of an Alertmanager webhook (v4). Fields mendloop doesn't read are let through; the ones it reads
    must have their documented types: labels and annotations map strings to strings, times are strings."""

    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"] | None = None
    labels: dict[StrictStr, StrictStr] | None = None
    annotations: dict[StrictStr, StrictStr] | None = None
    startsAt: StrictStr | None = Field(default=None, max_length=64)
    endsAt: StrictStr | None = Field(default=None, max_length=64)
    generatorURL: StrictStr | None = Field(default=None, max_length=4000)
    fingerprint: StrictStr | None = Field(default=None, max_length=MAX_FINGERPRINT)


class _AlertmanagerBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"] | None = None
    alerts: list[_Alert] = Field(max_length=MAX_ALERTS)


def parse_alertmanager(body: Any) -> _AlertmanagerBody:
    """The webhook body checked field by field; InputError naming the first bad one (`alerts.0.labels`)."""
    if not isinstance(body, Mapping):
        raise InputError("body: an Alertmanager webhook body is a JSON object", field="body")
    try:
        parsed = _AlertmanagerBody.model_validate(dict(body))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InputError(f"{field}: {first['msg']}", field=field) from exc
    for i, alert in enumerate(parsed.alerts):
        for key, value in (alert.labels or {}).items():
            if key in ("alertname", "error_type", "component", "service", "job") and len(value) > MAX_NAME:
                field = f"alerts.{i}.labels.{key}"
                raise InputError(f"{field}: at most {MAX_NAME} characters", field=field)
    return parsed


class Router(Protocol):
    """Which playbook handles a detection (`mendloop.rules.routing.Routing`)."""

    def for_detection(self, error_type: str | None, event_type: str) -> PlaybookRef | None:
        """The playbook routed for `error_type`, else the one that handles `event_type`; None: no run."""
        ...

    def knows_error_type(self, error_type: str) -> bool:
        """`error_type` has a route of its own (an Alertmanager alert's name counts as its error type then)."""
        ...


class Intake:
    def __init__(
        self,
        *,
        settings: Settings,
        incidents: IncidentStore,
        router: Router,
        wake: Callable[[], None],
        redactor: Redactor,
    ) -> None:
        self.settings = settings
        self.incidents = incidents
        self.router = router
        self.redactor = redactor
        self.event_errors = settings.event_error_table()
        self._wake = wake

    def ingest(
        self, detections: Sequence[Detection], *, also: Callable[[Connection], None] | None = None
    ) -> list[DetectionOutcome]:
        """Redact, then record in one transaction; `also` writes in it too (a watcher's checkpoint)."""
        return self.ingest_redacted([self.redact(d) for d in detections], also=also)

    def redact(self, d: Detection) -> Detection:
        """The detection with every secret masked: its text, its payload (keys and nested values), its labels.
        This is the intake boundary: nothing of a detection is stored before it passed here. A computed
        fingerprint is a hash and comes through as it is (`from_event` computes it from the redacted text); one a
        caller sent is redacted like the rest."""
        fields = {
            "fingerprint": d.fingerprint,
            "event_type": d.event_type,
            "source": d.source,
            "message": d.message,
            "error_type": d.error_type,
            "component": d.component,
            "event_id": d.event_id,
            "title": d.title,
            "severity": d.severity,
            "payload": d.payload,
        }
        clean = self.redactor.value(fields)
        if clean is fields:
            return d  # the common case: one scan found nothing
        return dataclasses.replace(d, **clean)

    def ingest_redacted(
        self, detections: Sequence[Detection], *, also: Callable[[Connection], None] | None = None
    ) -> list[DetectionOutcome]:
        """`ingest` for detections that went through `redact` already (the group-commit writer's, redacted by
        each request before it queued)."""
        if not detections:
            return []
        outcomes = self.incidents.record(detections, self.run_for, also=also)
        if any(o.run_id for o in outcomes):
            self._wake()
        return outcomes

    def attach_after(self, after: Mapping[int, list[str]]) -> int:
        """A watcher's after-lines, read once their detection was stored, onto its events' `log_context.after`
        (redacted like everything else that enters). Returns how many events were found."""
        if not after:
            return 0
        changes = {
            event_id: {"log_context": {"after": self.redactor.value(lines)}} for event_id, lines in after.items()
        }
        return self.incidents.store.events.merge_payloads(changes)

    def error_type_of(self, event_type: str, payload: Mapping[str, Any]) -> str | None:
        given = payload.get("error_type")
        if isinstance(given, str) and given:
            return given
        return self.event_errors.get(event_type)

    def run_for(self, d: Detection) -> RunSpec | None:
        pb = self.router.for_detection(d.error_type, d.event_type)
        if pb is None:
            return None
        return {
            **runs.plan(
                pb,
                error_type=d.error_type or d.event_type.replace(".", "_"),
                description=d.message,
                component=d.component,
                context={
                    # The log lines around it stay in `event` only: a work order reads them from the stored event.
                    **{k: v for k, v in d.payload.items() if k not in ("error_type", "description", "log_context")},
                    "fingerprint": d.fingerprint,
                },
                event={**d.payload, "event_type": d.event_type, "line": d.message},
                targets=self.settings.targets,
                default_target=self.settings.target_for(None),
                dry_run=self.settings.control.dry_run,
            ),
            "trigger": None,
        }

    # -- shapes that arrive over HTTP -----------------------------------------------------------------------

    def from_event(
        self,
        *,
        event_type: str,
        payload: Mapping[str, Any],
        source: str,
        message: str | None = None,
        component: str | None = None,
        event_id: str | None = None,
        fingerprint_hint: str | None = None,
    ) -> Detection:
        # Redacted before it is fingerprinted: a secret that differs from line to line must not split an incident.
        text = self.redactor.text(message or _text_of(payload) or event_type)
        error_type = self.error_type_of(event_type, payload)
        return Detection(
            event_type=event_type,
            source=source,
            message=text,
            fingerprint=fingerprint_hint or fingerprint(f"{event_type} {text}", error_type=error_type),
            error_type=error_type,
            component=component,
            payload=dict(payload),
            event_id=event_id,
            severity=str(payload.get("severity", "error")),
        )

    def from_alertmanager(self, body: Mapping[str, Any], *, source: str = "alertmanager") -> list[Detection]:
        """One detection per alert; a body of another shape is an InputError naming the field."""
        webhook = parse_alertmanager(body)
        out: list[Detection] = []
        for alert in webhook.alerts:
            # Redacted before the labels are fingerprinted (see `from_event`).
            labels: dict[str, str] = self.redactor.value(dict(alert.labels or {}))
            annotations: dict[str, str] = self.redactor.value(dict(alert.annotations or {}))
            status = alert.status or webhook.status or "firing"
            name = labels.get("alertname") or "alert"
            error_type = labels.get("error_type") or (name if self.router.knows_error_type(name) else None)
            text = annotations.get("summary") or annotations.get("description") or name
            out.append(
                Detection(
                    event_type=f"alertmanager.{'resolved' if status == 'resolved' else 'firing'}",
                    source=source,
                    message=text,
                    # Not the caller's `fingerprint`: only a forwarder token may set one (api/routes/events.py).
                    fingerprint=fingerprint_labels(labels),
                    error_type=error_type or None,
                    component=labels.get("component") or labels.get("service") or labels.get("job"),
                    payload={
                        "labels": labels,
                        "annotations": annotations,
                        "status": status,
                        "startsAt": alert.startsAt,
                    },
                    title=f"{name}: {text}",
                    resolved=status == "resolved",
                    severity=labels.get("severity", "error"),
                )
            )
        return out


def _text_of(payload: Mapping[str, Any]) -> str | None:
    for key in ("message", "msg", "log", "line", "error", "description"):
        value = payload.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def records_of(body: Any) -> Iterable[Mapping[str, Any]]:
    """Fluent Bit's and Vector's HTTP outputs send a JSON array of records (or NDJSON, handled by the caller)."""
    if isinstance(body, list):
        return [r for r in body if isinstance(r, Mapping)]
    if isinstance(body, Mapping):
        return [body]
    return []


def aggregate(detections: Sequence[Detection]) -> list[Detection]:
    """Identical detections in one batch (same fingerprint, type and component, no event id) become one with a
    count: a storm of 100,000 lines is a handful of writes, and every line is still counted."""
    return aggregate_indexed(detections)[0]


def aggregate_indexed(detections: Sequence[Detection]) -> tuple[list[Detection], list[int]]:
    """`aggregate`, and for each detection given the index of the one it became part of (the first of identical
    ones keeps its payload)."""
    position: dict[tuple[str, str, str | None], int] = {}
    out: list[Detection] = []
    into: list[int] = []
    for d in detections:
        if d.event_id is not None or d.resolved:
            into.append(len(out))
            out.append(d)
            continue
        key = (d.fingerprint, d.event_type, d.component)
        at = position.get(key)
        if at is None:
            position[key] = len(out)
            into.append(len(out))
            out.append(d)
        else:
            into.append(at)
            out[at] = dataclasses.replace(out[at], message=d.message, count=out[at].count + d.count)
    return out, into
