"""Log records → detections: every configured pattern matched at once (hyperscan, re2 or re), named groups as
fields, tracebacks parsed and fingerprinted by their shape. Used by the watchers and by POST /events for raw
records from Fluent Bit or Vector."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mendloop.config import PatternConfig, Settings, WatcherConfig
from mendloop.domain.records import Detection
from mendloop.infra import traceback
from mendloop.infra.redact import Redactor
from mendloop.intake import log_prefix
from mendloop.intake.fingerprint import fingerprint, fingerprint_traceback
from mendloop.intake.matcher import Match, Matcher, Pattern


def _pattern(p: PatternConfig, w: WatcherConfig) -> Pattern:
    component = p.component or w.component
    return Pattern(
        name=p.name,
        regex=p.regex,
        event_type=p.event_type,
        error_type=p.error_type,
        severity=p.severity,
        fields={"component": component} if component else {},
        prefix=w.prefix,
    )


class LogIntake:
    def __init__(self, settings: Settings, redactor: Redactor | None = None) -> None:
        self.settings = settings
        self.redactor = redactor
        self.matchers: dict[str, Matcher] = {}
        self._prefixes: dict[str, re.Pattern[str]] = {}
        for w in settings.watchers:
            self.matchers[w.name] = Matcher.build([_pattern(p, w) for p in w.patterns])
        # Records arriving over HTTP are matched against every watcher's patterns.
        every = [_pattern(p, w) for w in settings.watchers for p in w.patterns]
        self.all = Matcher.build(every) if every else None

    def detect_lines(
        self, texts: Sequence[str], *, matcher: Matcher | None, source: str, extra: Mapping[str, Any] | None = None
    ) -> list[Detection]:
        if matcher is None or not texts:
            return []
        return [self._detection(m, source, extra or {}) for m in matcher.scan_lines(texts)]

    def detect_records(self, records: Iterable[Mapping[str, Any]], source: str) -> list[Detection]:
        texts: list[str] = []
        metas: list[dict[str, Any]] = []
        for r in records:
            text = next((r[k] for k in ("log", "message", "msg", "line") if isinstance(r.get(k), str)), None)
            if text is None:
                continue
            texts.append(text)
            metas.append({k: v for k, v in r.items() if k in ("host", "hostname", "file", "path", "source_type")})
        if self.all is None:
            return []
        out: list[Detection] = []
        for m in self.all.scan_lines(texts):
            index = texts.index(m.line) if m.line in texts else -1
            out.append(self._detection(m, source, metas[index] if index >= 0 else {}))
        return out

    def _prefix(self, source: str | None) -> re.Pattern[str] | None:
        if source is None:
            return None
        compiled = self._prefixes.get(source)
        if compiled is None:
            compiled = self._prefixes[source] = re.compile(source)
        return compiled

    def _detection(self, m: Match, source: str, extra: Mapping[str, Any]) -> Detection:
        p = m.pattern
        payload: dict[str, Any] = {**extra, **m.groups, "pattern": p.name, "line": m.line.splitlines()[0][:2000]}
        parsed = traceback.parse(m.line) if "Traceback" in m.line else None
        if parsed is not None:
            payload["traceback"] = m.line
            payload["exception"] = {
                "type": parsed.exception_type,
                "message": parsed.message[:2000],
                "frames": [{"file": f.file, "line": f.line, "function": f.function} for f in parsed.frames[-50:]],
            }
            fp = fingerprint_traceback(parsed)
        else:
            # The pattern and the message: not the timestamp, level, logger or thread in front of it.
            message = log_prefix.strip(m.line.split("\n", 1)[0], self._prefix(p.prefix))
            if self.redactor is not None:  # a secret that changes from line to line must not split an incident
                message = self.redactor.text(message)
            fp = fingerprint(message, error_type=p.error_type, pattern=p.name)
        if p.error_type:
            payload["error_type"] = p.error_type
        return Detection(
            event_type=p.event_type,
            source=source,
            message=m.line[:4000],
            fingerprint=fp,
            error_type=p.error_type,
            component=p.fields.get("component"),
            payload=payload,
            severity=p.severity,
        )
