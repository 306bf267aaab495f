"""The `diagnose` action: a failure's cause from mendloop's own evidence, refined by an analysis capability when the
target binds one (the rules are `domain/cause.py`'s).

    - id: analyze_timeout
      action: diagnose
      with:
        analysis: pipeline.analyze_timeout           # optional: unbound, the evidence alone decides
        observed_seconds: "{{ event.seconds | default(None) }}"   # optional: how long it ran before it timed out
        limit_seconds: "{{ target.vars.pipeline_timeout_seconds | default(None) }}"   # optional: the limit
        timeout_factor: 2                            # optional: how much a config cause raises the limit
        max_timeout_seconds: 3600                    # optional: never above this

Its output is read like a capability's: `steps.<id>.outputs.cause` (`code`, `config`, `unknown`, or the
analysis's own word), `.details`, `.source`, `.suspect_file`, `.suspect_line`, `.suspect_function`,
`.recommended_timeout_seconds`, and the analysis's other outputs; `steps.<id>.evidence` is what the evidence alone
said and `steps.<id>.analysis` the analysis capability's whole result (None when unbound).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from mendloop.domain import cause
from mendloop.errors import ActionError
from mendloop.infra import traceback
from mendloop.playbooks.actions.base import ActionContext

# A traceback longer than this (characters) is read from its end: the frames that matter are the last ones.
_MAX_TRACEBACK_CHARS = 200_000


class CapabilityCaller(Protocol):
    def is_bound(self, target: str | None, name: str) -> bool: ...

    def call(self, name: str, args: Mapping[str, Any], ctx: ActionContext, timeout: float | None) -> dict[str, Any]: ...


def diagnose(
    params: Mapping[str, Any],
    ctx: ActionContext,
    *,
    event: Mapping[str, Any],
    repository: Path | None,
    capabilities: CapabilityCaller,
) -> dict[str, Any]:
    evidence = gather(event, repository, params)
    found = cause.from_evidence(
        evidence,
        factor=_number(params, "timeout_factor") or cause.DEFAULT_TIMEOUT_FACTOR,
        max_timeout_seconds=_number(params, "max_timeout_seconds"),
    )
    analysis: dict[str, Any] | None = None
    name = params.get("analysis")
    if name is not None and not isinstance(name, str):
        raise ActionError("with.analysis must be a capability name", retryable=False)
    if name and capabilities.is_bound(ctx.target, name):
        # Bound means the operator says the service knows better: a failing analysis fails the step (its retry
        # policy applies) instead of quietly deciding on less.
        analysis = capabilities.call(name, params.get("args") or {}, ctx, ctx.timeout)
    outputs_of_analysis = analysis.get("outputs") if analysis else None
    _, outputs = cause.refine(found, outputs_of_analysis if isinstance(outputs_of_analysis, Mapping) else None)
    return {"outputs": outputs, "evidence": found.outputs(), "analysis": analysis}


def gather(event: Mapping[str, Any], repository: Path | None, params: Mapping[str, Any]) -> cause.Evidence:
    """The evidence in a run's triggering event: its traceback located in the repository, and the timeout figures
    the playbook passes in."""
    parsed = _traceback_of(event)
    inside: list[cause.Suspect] = []
    others = 0
    if parsed is not None:
        located = traceback.locate(parsed, repository)
        for frame in located.frames:
            if frame.in_repository and frame.repository_path:
                inside.append(cause.Suspect(frame.repository_path, frame.line, frame.function))
            else:
                others += 1
    exception = None
    if parsed is not None and parsed.exception_type != "unknown":
        exception = parsed.exception_type + (f": {parsed.message[:200]}" if parsed.message else "")
    return cause.Evidence(
        repository_frames=tuple(inside),
        other_frames=others,
        exception=exception,
        observed_seconds=_number(params, "observed_seconds"),
        limit_seconds=_number(params, "limit_seconds"),
    )


def _traceback_of(event: Mapping[str, Any]) -> traceback.ParsedTraceback | None:
    lines = event.get("lines")
    texts = [event.get("traceback"), "\n".join(lines) if isinstance(lines, list) else None, event.get("line")]
    for text in texts:
        if isinstance(text, str) and "Traceback" in text:
            parsed = traceback.parse(text[-_MAX_TRACEBACK_CHARS:])
            if parsed is not None:
                return parsed
    # An event posted already structured (`exception: {type, message, frames: [{file, line, function}]}`).
    exc = event.get("exception")
    if isinstance(exc, Mapping) and isinstance(exc.get("frames"), list):
        frames = [
            traceback.Frame(file=str(f["file"]), line=_line(f.get("line")), function=str(f.get("function") or "?"))
            for f in exc["frames"][-100:]
            if isinstance(f, Mapping) and isinstance(f.get("file"), str)
        ]
        if frames:
            return traceback.ParsedTraceback(str(exc.get("type") or "unknown"), str(exc.get("message") or ""), frames)
    return None


def _line(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(params: Mapping[str, Any], key: str) -> float | None:
    """A number the playbook passed, or None when it is absent or empty (a template over a missing value renders
    to nothing): never an error, since evidence may simply not be there."""
    value = params.get(key)
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ActionError(f"with.{key} must be a number, got {str(value)[:80]!r}", retryable=False) from None
    if number != number or number in (float("inf"), float("-inf")) or number < 0:
        raise ActionError(f"with.{key} must be a finite number >= 0, got {str(value)[:80]!r}", retryable=False)
    return number
