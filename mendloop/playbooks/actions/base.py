"""What every action gets and gives: a frozen context in, a JSON-able output dict out, ActionError on failure."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from mendloop.domain.bounded import bounded

# An output is stored as JSON with the step and in the run. Deeper than this it is cut: the JSON encoder recurses
# once per level and a few hundred levels would crash the commit (RecursionError) and loop the run.
MAX_OUTPUT_DEPTH = 64
# Larger than this, once serialised, an output is kept as a preview only.
MAX_OUTPUT_CHARS = 1_000_000


@dataclass(frozen=True, slots=True)
class ActionContext:
    run_id: str
    step_id: str
    attempt: int
    # run_id:step_id:attempt: the same key when a crashed step runs again, so targets can deduplicate.
    idempotency_key: str
    timeout: float | None
    target: str | None
    http: httpx.Client
    template_vars: Mapping[str, Any] = field(default_factory=dict)
    # Set when the run is cancelled while the step runs (the worker pool watches the database): an action stops
    # its program, its waits and its retries then (StepCancelled).
    cancel: threading.Event = field(default_factory=threading.Event)


class Action(Protocol):
    def __call__(self, params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]: ...


def glimpse(result: Mapping[str, Any], limit: int = 300) -> str:
    """What a call answered, short, for a message that says what was seen: its outputs, its JSON answer, or its
    status or exit code."""
    for key in ("outputs", "json", "status_code", "exit_code"):
        value = result.get(key)
        if value is not None and value != {}:
            text = json.dumps(value, default=str, sort_keys=True)
            return text if len(text) <= limit else text[:limit] + "…"
    return "no answer"


def tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def storable(output: Mapping[str, Any]) -> dict[str, Any]:
    """`output` as a JSON-able dict that is safe to store: nesting cut at MAX_OUTPUT_DEPTH (the cut value is
    replaced by a note), keys made strings, values JSON cannot hold turned into their text, and an output
    larger than MAX_OUTPUT_CHARS kept as a preview. Never recurses deeper than MAX_OUTPUT_DEPTH."""
    safe = bounded(output, MAX_OUTPUT_DEPTH)
    assert isinstance(safe, dict)
    text = json.dumps(safe, allow_nan=False, separators=(",", ":"))
    if len(text) <= MAX_OUTPUT_CHARS:
        return safe
    return {"truncated": True, "size": len(text), "preview": text[: MAX_OUTPUT_CHARS // 10] + "…"}
